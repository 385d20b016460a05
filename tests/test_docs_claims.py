"""The numbers README.md and docs/*.md quote are the numbers the program uses.

Each claim below names a document, a pattern that finds the quoted value on a line, and
where the real value comes from: a file rendered for a host of a stack (the same bytes
cloud-init writes), the config model's default (the prod stack file with that key taken
out, so an override in a stack file cannot hide a changed default), or a constant of the
code that acts on it. A claim whose pattern no longer matches fails too: the list must be
edited with the docs, never left checking nothing.

Lines that quote one of the GUARDED settings with a number must be covered by a claim,
so a new quoted value of these settings cannot slip in unchecked.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["README.md"] + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))


# --- where the real values come from ---------------------------------------------------------

@functools.cache
def rendered(stack: str, host: str, path: str) -> str:
    from cloud_init.render import render_host
    from offline.contexts import contexts

    return render_host(contexts(stack)[host]).file(path).content.decode()


def setting(stack: str, host: str, path: str, pattern: str) -> Callable[[], str]:
    """The first group of `pattern` (multiline) in a rendered file."""
    def get() -> str:
        text = rendered(stack, host, path)
        m = re.search(pattern, text, re.M)
        if not m:
            raise AssertionError(f"{stack} {host} {path}: no line matches {pattern!r}")
        return m.group(1)
    return get


@functools.cache
def defaults() -> tuple[Any, Any]:
    """(config, topology) of the prod stack file without the keys whose defaults the docs
    quote: what a stack gets when it does not set them."""
    from components.config import load_config
    from components.stackfile import namespace, project_name, read_stack
    from components.topology import build_topology

    config, secrets = read_stack("prod")
    project = project_name()
    raw = namespace(config, project)
    raw.pop("gates", None)
    raw.pop("roles", None)
    raw.setdefault("slurm", {})
    raw["slurm"] = {k: v for k, v in raw["slurm"].items() if k != "ctld_timeout"}
    raw["network"] = {k: v for k, v in (raw.get("network") or {}).items() if k not in ("vpc_cidr", "address_plan")}
    configured = frozenset(k.split(":", 1)[1] for k in secrets) | {"tls_cert", "tls_key"}
    cfg = load_config(raw, stack="prod", project=project, region=config.get("aws:region", "ap-northeast-2"),
                      configured_secrets=configured)
    return cfg, build_topology(cfg)


def default(get: Callable[[Any], Any]) -> Callable[[], str]:
    return lambda: str(get(defaults()[0]))


def default_host(role: str, attr: str) -> Callable[[], str]:
    return lambda: str(getattr(next(h for h in defaults()[1].hosts if role in h.roles), attr))


def subnet_range(role: str) -> Callable[[], str]:
    """A role's default subnets written as the README does: 10.40.0-2.0/24."""
    def get() -> str:
        nets = [ipaddress.IPv4Network(n) for n in defaults()[0].network.subnets[role]]
        first, last = (str(n.network_address).split(".") for n in (nets[0], nets[-1]))
        assert first[:2] == last[:2] and first[3] == last[3] == "0", nets
        return f"{first[0]}.{first[1]}.{first[2]}-{last[2]}.0/{nets[0].prefixlen}"
    return get


def const(module: str, expr: str) -> Callable[[], str]:
    """A value of the code, e.g. const("components.secrets", "MUNGE_KEY_BYTES")."""
    def get() -> str:
        import importlib

        value = eval(expr, vars(importlib.import_module(module)))  # noqa: S307 - fixed expressions below
        return f"{value:g}" if isinstance(value, float) else str(value)
    return get


def tool_const(tool: str, name: str) -> Callable[[], str]:
    def get() -> str:
        from tests.loadfile import load_tool

        return str(getattr(load_tool(tool), name))
    return get


# --- the claims --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Claim:
    doc: str
    pattern: str  # one group: the quoted value
    what: str     # where the real value is, for the message
    actual: Callable[[], str]


SLURM = ("prod", "slurm-1", "/etc/slurm/slurm.conf")
SENTINEL = ("prod", "data-1", "/etc/hpc/templates/sentinel.conf.tmpl")
MONITOR = r"^sentinel monitor \S+ \S+ \d+ (\d+)$"
DRILL = "rehearsal.drills.base"

CLAIMS = [
    # Slurm
    Claim("README.md", r"`SlurmctldTimeout` (\d+) s", "slurm.conf SlurmctldTimeout (prod, rendered)",
          setting(*SLURM, r"^SlurmctldTimeout=(\d+)$")),
    Claim("docs/slurm-cutover.md", r"`SlurmctldTimeout`, (\d+) s", "slurm.conf SlurmctldTimeout (prod, rendered)",
          setting(*SLURM, r"^SlurmctldTimeout=(\d+)$")),
    Claim("docs/slurm-cutover.md", r"DOWN for `SlurmctldTimeout` \+ (\d+) s", "hpc-slurm-fence WATCH_MARGIN_S",
          setting("prod", "slurm-2", "/usr/local/sbin/hpc-slurm-fence", r"^WATCH_MARGIN_S = (\d+)\.0$")),
    Claim("docs/rehearsal.md", r"DOWN for `SlurmctldTimeout` \+ (\d+) s", "hpc-slurm-fence WATCH_MARGIN_S",
          setting("prod", "slurm-2", "/usr/local/sbin/hpc-slurm-fence", r"^WATCH_MARGIN_S = (\d+)\.0$")),
    Claim("README.md", r"`SlurmctldTimeout` (\d+) s", "slurm.ctld_timeout default",
          default(lambda c: c.slurm.ctld_timeout)),
    Claim("docs/rehearsal.md", r"0\.7 × `SlurmctldTimeout` (\d+) s", "slurm.ctld_timeout default",
          default(lambda c: c.slurm.ctld_timeout)),
    Claim("README.md", r"slurmdbd is (\d+)", "slurm.conf AccountingStoragePort",
          setting(*SLURM, r"^AccountingStoragePort=(\d+)$")),
    Claim("README.md", r"slurmdbd is (\d+)", "slurmdbd.conf DbdPort",
          setting("prod", "slurm-1", "/etc/hpc/slurm/slurmdbd.conf", r"^DbdPort=(\d+)$")),
    Claim("README.md", r"slurmctld (\d+) from the compute nodes", "slurm.conf SlurmctldPort",
          setting(*SLURM, r"^SlurmctldPort=(\d+)$")),
    Claim("README.md", r"slurmd (\d+) to them", "slurm.conf SlurmdPort", setting(*SLURM, r"^SlurmdPort=(\d+)$")),
    # Redis Sentinel
    Claim("README.md", r"Sentinel \(quorum (\d+)\)", "sentinel monitor quorum (prod)", setting(*SENTINEL, MONITOR)),
    Claim("README.md", r"3 sentinels, quorum (\d+)", "sentinel monitor quorum (prod)", setting(*SENTINEL, MONITOR)),
    Claim("README.md", r"one sentinel of quorum (\d+)", "sentinel monitor quorum (dev)",
          setting("dev", "data-1", "/etc/hpc/templates/sentinel.conf.tmpl", MONITOR)),
    Claim("README.md", r"Sentinel (\d+);", "sentinel.conf port", setting(*SENTINEL, r"^port (\d+)$")),
    # ports of the web and DB-writer paths
    Claim("README.md", r"nginx listens on (\d+)", "nginx site listen",
          setting("prod", "app-1", "/etc/nginx/conf.d/hpc-portal.conf", r"^\s*listen (\d+) default_server;")),
    Claim("README.md", r"default → nginx :(\d+)", "nginx site listen",
          setting("prod", "app-1", "/etc/nginx/conf.d/hpc-portal.conf", r"^\s*listen (\d+) default_server;")),
    Claim("docs/rehearsal.md", r"\(~10 s, `rise (\d+)`\)", "dbwriter.cfg the preferred writer's rise",
          setting("prod", "app-1", "/etc/haproxy/dbwriter.cfg", r"^\s*server \S+ \S+ check rise (\d+) ")),
    Claim("README.md", r"clustercheck (\d+)\.", "dbwriter.cfg health-check port",
          setting("prod", "app-1", "/etc/haproxy/dbwriter.cfg", r"^\s*default-server port (\d+) ")),
    Claim("README.md", r"HAProxy 127\.0\.0\.1:(\d+) → one Galera writer", "dbwriter.cfg bind",
          setting("prod", "app-1", "/etc/haproxy/dbwriter.cfg", r"^\s*bind 127\.0\.0\.1:(\d+)$")),
    Claim("README.md", r"an HAProxy on every DB client, 127\.0\.0\.1:(\d+)", "dbwriter.cfg bind",
          setting("prod", "app-1", "/etc/haproxy/dbwriter.cfg", r"^\s*bind 127\.0\.0\.1:(\d+)$")),
    # config defaults
    Claim("README.md", r"`gates: \{enabled: true, timeout_s: (\d+)\}`", "gates.timeout_s default",
          default(lambda c: c.gates.timeout_s)),
    Claim("README.md", r"Readiness gates are (on|off) by default for the `ha` profile", "gates.enabled default (ha)",
          default(lambda c: "on" if c.gates.enabled else "off")),
    Claim("README.md", r"`vpc_cidr` \(default ([\d./]+),", "network.vpc_cidr default",
          default(lambda c: c.network.vpc_cidr)),
    Claim("README.md", r"\bexternal (\d+\.\d+\.\d+-\d+\.0/\d+)", "default external subnets", subnet_range("external")),
    Claim("README.md", r"\binternal (\d+\.\d+\.\d+-\d+\.0/\d+)", "default internal subnets", subnet_range("internal")),
    Claim("README.md", r"\bmanagement (\d+\.\d+\.\d+-\d+\.0/\d+)", "default management subnets",
          subnet_range("management")),
    Claim("README.md", r"\(LB 4 vCPU/8 GiB/(\d+) GB", "default LB root_gb", default_host("lb", "root_gb")),
    Claim("README.md", r", app 8/16/(\d+), data", "default app root_gb", default_host("app", "root_gb")),
    Claim("README.md", r"data 4/16/(\d+) GB gp3", "default data data_gb", default_host("data", "data_gb")),
    # munge key
    Claim("README.md", r"a (\d+)-byte munge key", "components.secrets.MUNGE_KEY_BYTES",
          const("components.secrets", "MUNGE_KEY_BYTES")),
    Claim("docs/rehearsal.md", r"a (\d+)-byte munge", "components.secrets.MUNGE_KEY_BYTES",
          const("components.secrets", "MUNGE_KEY_BYTES")),
    Claim("docs/slurm-cutover.md", r"The key must be (\d+) to \d+ bytes", "tools/slurm_import.py MUNGE_KEY_MIN",
          tool_const("slurm_import", "MUNGE_KEY_MIN")),
    Claim("docs/slurm-cutover.md", r"The key must be \d+ to (\d+) bytes", "tools/slurm_import.py MUNGE_KEY_MAX",
          tool_const("slurm_import", "MUNGE_KEY_MAX")),
    # rehearsal targets
    Claim("docs/rehearsal.md", r"^\| `lb` \|.*\| RTO ≤ (\d+) s", "TARGETS['lb']", const(DRILL, "TARGETS['lb']['rto']")),
    Claim("docs/rehearsal.md", r"^\| `redis` \|.*\| RTO \(sessions\) ≤ (\d+) s", "TARGETS['redis']",
          const(DRILL, "TARGETS['redis']['rto']")),
    Claim("docs/rehearsal.md", r"^\| `galera` \|.*\| RTO \(writes\) ≤ (\d+) s", "TARGETS['galera']",
          const(DRILL, "TARGETS['galera']['rto']")),
    Claim("docs/rehearsal.md", r"^\| `slurm` \|.*\| backup in control ≤ (\d+) s", "TARGETS['slurm']",
          const(DRILL, "TARGETS['slurm']['rto']")),
    Claim("docs/rehearsal.md", r"^\| `az` \|.*\| service back ≤ (\d+) s", "TARGETS['az']",
          const(DRILL, "TARGETS['az']['rto']")),
    Claim("docs/rehearsal.md", r"at least (\d+) acknowledged writes per drill", "MIN_ACKED", const(DRILL, "MIN_ACKED")),
]

# Settings whose quoted numbers must all be claims above: a line matching one of these and
# holding a number is a quoted value.
GUARDED = {
    "SlurmctldTimeout": r"SlurmctldTimeout",
    "Sentinel down-after-milliseconds": r"down-after-milliseconds",
    "Sentinel failover-timeout": r"failover-timeout",
    "Sentinel quorum": r"\bquorum\b",
    "keepalived advert_int": r"advert_int",
    "HAProxy inter/fall/rise": r"\b(?:inter|fall|rise) \d",
    "gates.timeout_s": r"timeout_s",
    "munge key size": r"munge.*\b\d+[- ]bytes?\b|\b\d+[- ]bytes?\b.*munge",
}
NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?![\w])")


def doc_lines(doc: str) -> list[tuple[int, str]]:
    return list(enumerate((ROOT / doc).read_text().splitlines(), 1))


def find(claim: Claim, text: str | None = None) -> list[tuple[int, int, str]]:
    """(first line, last line, quoted value) of every match; a space in the pattern also
    matches a line break, so a claim wrapped over two lines is still found."""
    text = (ROOT / claim.doc).read_text() if text is None else text
    rx = re.compile(claim.pattern.replace(" ", r"\s+"), re.M)
    return [(text.count("\n", 0, m.start()) + 1, text.count("\n", 0, m.end()) + 1, m.group(1))
            for m in rx.finditer(text)]


@pytest.mark.parametrize("claim", CLAIMS, ids=lambda c: f"{c.doc}:{c.pattern[:40]}<->{c.what}")
def test_quoted_value_is_the_real_one(claim: Claim) -> None:
    hits = find(claim)
    assert hits, f"{claim.doc}: no line matches {claim.pattern!r} any more; update the claim with the doc"
    actual = claim.actual()
    wrong = [f"{claim.doc}:{n}: says {quoted}, {claim.what} is {actual}" for n, _, quoted in hits if quoted != actual]
    assert not wrong, "\n".join(wrong)


def test_every_quoted_guarded_setting_is_a_checked_claim() -> None:
    unchecked = []
    for doc in DOCS:
        covered = {n for c in CLAIMS if c.doc == doc for first, last, _ in find(c) for n in range(first, last + 1)}
        for n, line in doc_lines(doc):
            for name, guard in GUARDED.items():
                if re.search(guard, line) and NUMBER.search(line) and n not in covered:
                    unchecked.append(f"{doc}:{n}: quotes {name} ({line.strip()[:100]!r}) with no claim in CLAIMS")
    assert not unchecked, "\n".join(unchecked)


def test_find_reports_the_line_and_value_also_when_the_claim_is_wrapped() -> None:
    claim = next(c for c in CLAIMS if c.what == "network.vpc_cidr default")
    text = "intro\nFrom `vpc_cidr` (default\n10.99.0.0/16, /24 subnets)\nlater `vpc_cidr` (default 10.1.0.0/16, x\n"
    assert find(claim, text) == [(2, 3, "10.99.0.0/16"), (4, 4, "10.1.0.0/16")]
