#!/usr/bin/env python3
"""Import an existing cluster's Slurm setup into a stack's config.

    tools/slurm_import.py --slurm-conf /path/to/old/slurm.conf --stack prod \\
        --old-version "slurm 21.08.5"        # or --sinfo-version-output FILE
    tools/slurm_import.py --munge-key /path/to/munge.key --stack prod
    tools/slurm_import.py --old-version "slurm 22.05.8"     # the version check alone

What it does, each part when its inputs are given:

* Version check. Ubuntu 24.04's Slurm 23.11 reads state files, the accounting database
  and slurmd protocol only from the two releases before it (23.02 and 22.05). An older
  cluster is refused with the staged upgrade to do first (21.08 -> 22.05 or 23.02 ->
  23.11). Importing a slurm.conf needs this check (or --skip-version-check).
* slurm.conf import. Parses the file the way Slurm does (comments with `\\#` escapes,
  backslash line continuations, `include` files, several Key=Value pairs per line,
  quoted values, NodeName=DEFAULT / PartitionName=DEFAULT lines, NodeSet lines,
  hostlist expressions) and writes `slurm.nodes`, `slurm.partitions`,
  `slurm.cluster_name` and `slurm.srun_port_range` into `Pulumi.<stack>.yaml` under the
  `<project>:slurm` key. Only that key's entry is rewritten, round-trip with ruamel.yaml
  (see write_stack_key); the rest of the file, comments included, is kept byte for byte.
* Munge key. Checks the key's size (munged accepts 32 to 1024 bytes) and prints the
  `pulumi config set --secret munge_key ...` command that stores it base64-encoded (the
  form hpc-munge-key decodes at boot). The key itself is never printed.

Exit status: 0 done, 1 refused (version too old, bad key, inconsistent slurm.conf),
2 usage error.

The parser and the version logic need only the standard library (slurm_move.py reuses
them on the old server); writing the stack file needs ruamel.yaml and PyYAML (the
repository's venv).
"""

from __future__ import annotations

import argparse
import copy
import difflib
import glob
import hashlib
import io
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MUNGE_KEY_MIN, MUNGE_KEY_MAX = 32, 1024
DEFAULT_SRUN_PORT_RANGE = "60001-63000"
TARGET_VERSION = "23.11"


class ImportError_(Exception):
    """A problem with the input that the operator has to fix (exit 1)."""


# --------------------------------------------------------------------------- versions

# Slurm's major releases in order. A release reads state, accounting and the RPCs of
# the releases up to WINDOW before it: two until 24.05, three from 24.11 on.
RELEASES = ("17.02", "17.11", "18.08", "19.05", "20.02", "20.11", "21.08", "22.05", "23.02",
            "23.11", "24.05", "24.11", "25.05", "25.11")
# Where a release can be had as a package (everything else: SchedMD's source release).
PACKAGED = {"21.08": "Ubuntu 22.04", "22.05": "Debian 12, Ubuntu 23.04", "23.11": "Ubuntu 24.04",
            "24.11": "Debian 13"}


def _window(release: str) -> int:
    return 3 if RELEASES.index(release) >= RELEASES.index("24.11") else 2


def reads_from(release: str, old: str) -> bool:
    """True when `release` accepts state/accounting/slurmd of `old`."""
    i, j = RELEASES.index(release), RELEASES.index(old)
    return 0 <= i - j <= _window(release)


def parse_version(text: str) -> tuple[str, str]:
    """('21.08', '21.08.5') from `sinfo -V` / `slurmctld -V` / `scontrol version` output
    ("slurm 21.08.5", "slurm-wlm 21.08.5", "slurm 23.11.4-1ubuntu1")."""
    m = re.search(r"(?<![\d.])(\d{2})\.(\d{2})(?:\.(\d+))?", text)
    if not m:
        raise ImportError_(f"no Slurm version (like 'slurm 21.08.5') in {text.strip()[:80]!r}")
    major = f"{m.group(1)}.{m.group(2)}"
    if major not in RELEASES:
        raise ImportError_(f"{major} is not a Slurm release (known: {', '.join(RELEASES)})")
    return major, m.group(0)


@dataclass
class VersionVerdict:
    ok: bool
    old: str
    full: str
    target: str
    message: str
    path: list[str] = field(default_factory=list)


def check_version(text: str, target: str = TARGET_VERSION) -> VersionVerdict:
    old, full = parse_version(text)
    if target not in RELEASES:
        raise ImportError_(f"target {target} is not a Slurm release")
    ti, oi = RELEASES.index(target), RELEASES.index(old)
    if oi > ti:
        return VersionVerdict(False, old, full, target,
                              f"the old cluster runs {full}, newer than the target {target}: Slurm cannot "
                              f"downgrade state or accounting. Use a {old} (or newer) build on the new controllers.")
    if reads_from(target, old):
        return VersionVerdict(True, old, full, target,
                              f"the old cluster runs {full}; {target} reads its state, accounting and slurmd "
                              f"directly (it accepts {', '.join(r for r in RELEASES[:ti] if reads_from(target, r))}).")
    # Staged: each hop goes as far as the window allows, the last hop lands on one the
    # target accepts.
    path, cur = [], old
    while not reads_from(target, cur):
        nxt = max((r for r in RELEASES[RELEASES.index(cur) + 1: ti] if reads_from(r, cur)), key=RELEASES.index)
        path.append(nxt)
        cur = nxt
    first_hop = [r for r in RELEASES[oi + 1: ti] if reads_from(r, old) and reads_from(target, r)]
    where = "; ".join(f"{r}: {PACKAGED.get(r, 'SchedMD source release only')}" for r in (first_hop or path[:1]))
    lines = [
        f"the old cluster runs {full}, which {target} cannot read: it accepts state, accounting and "
        f"slurmd only from {', '.join(r for r in RELEASES[:ti] if reads_from(target, r))}.",
        "Upgrade the old cluster in place first, in stages, before the move:",
    ]
    stages = path if not first_hop else [" or ".join(first_hop)]
    if first_hop:
        lines.append(f"  1. {old} -> {' or '.join(first_hop)} ({where})")
        lines.append(f"  2. then move to {target} (this project's controllers)")
    else:
        for n, hop in enumerate(path, 1):
            lines.append(f"  {n}. -> {hop} ({PACKAGED.get(hop, 'SchedMD source release only')})")
        lines.append(f"  {len(path) + 1}. then move to {target} (this project's controllers)")
    lines += [
        "Each stage, in SchedMD's order: back up StateSaveLocation and slurm_acct_db; upgrade",
        "slurmdbd first and start it once by hand (`slurmdbd -D -vvv`: it converts the",
        "database, which can take long), then slurmctld, then slurmd on every compute node",
        "(23.11 talks to slurmd only from the releases it accepts, so the compute nodes",
        "must be upgraded too). Then run this check again.",
    ]
    return VersionVerdict(False, old, full, target, "\n".join(lines), stages)


# --------------------------------------------------------------------------- hostlists

# Kept here rather than taken from python-hostlist: that library expands `cn[1-4]x`, which
# Slurm refuses ("Invalid hostlist"), its collect_hostlist sorts (a NodeAddr list must keep
# the NodeName order, which compress_hostlist does), and slurm_move.py imports this parser
# on the old server, where only the standard library can be counted on.
# tests/test_slurm_import.py compares expand_hostlist with `scontrol show hostnames`.

def _split_top(expr: str, sep: str = ",") -> list[str]:
    """Split at `sep` outside brackets."""
    out: list[str] = []
    cur: list[str] = []
    depth = 0
    for ch in expr:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ImportError_(f"unbalanced ']' in hostlist {expr!r}")
        if ch == sep and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise ImportError_(f"unbalanced '[' in hostlist {expr!r}")
    out.append("".join(cur))
    return [s for s in (x.strip() for x in out) if s]


def _expand_one(item: str) -> list[str]:
    m = re.search(r"\[([^\[\]]*)\]", item)
    if not m:
        return [item]
    prefix, suffix, body = item[: m.start()], item[m.end():], m.group(1)
    values: list[str] = []
    for part in body.split(","):
        part = part.strip()
        r = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not r:
            raise ImportError_(f"bad range {part!r} in hostlist {item!r}")
        lo, hi = r.group(1), r.group(2) or r.group(1)
        if int(hi) < int(lo):
            raise ImportError_(f"descending range {part!r} in hostlist {item!r}")
        if int(hi) - int(lo) > 100000:
            raise ImportError_(f"range {part!r} in hostlist {item!r} is implausibly large")
        values += [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    return [x for v in values for x in _expand_one(prefix + v + suffix)]


def expand_hostlist(expr: str) -> list[str]:
    """`node[01-03,07],gpu[1-2]` -> node01 node02 node03 node07 gpu1 gpu2 (like
    `scontrol show hostnames`; several bracket groups expand as a product)."""
    out: list[str] = []
    for item in _split_top(expr):
        if "]" in item and not item.endswith("]"):
            # Slurm (22.05, 23.11) refuses text after the last bracket: "Invalid hostlist".
            raise ImportError_(f"invalid hostlist {expr!r}: text after the last ']' in {item!r}")
        out += _expand_one(item)
    return out


def compress_hostlist(names: list[str]) -> str:
    """The inverse of expand_hostlist, order kept: expand_hostlist(compress_hostlist(x)) == x
    (Slurm pairs NodeAddr with NodeName by position). Neighbours that differ only in a
    trailing number with the same zero-padding share one bracket: node01,node02,node03 ->
    node[01-03]; 10.0.0.9,10.0.0.2,10.0.0.3 -> 10.0.0.[9,2-3]."""
    groups: list[tuple[str, int, list[int]] | str] = []
    for n in names:
        m = re.fullmatch(r"(.*?)(\d+)", n)
        if not m:
            groups.append(n)
            continue
        prefix, digits = m.group(1), m.group(2)
        width = len(digits) if digits.startswith("0") else 0
        last = groups[-1] if groups else None
        if isinstance(last, tuple) and last[:2] == (prefix, width):
            last[2].append(int(digits))
        else:
            groups.append((prefix, width, [int(digits)]))
    out: list[str] = []
    for g in groups:
        if isinstance(g, str):
            out.append(g)
            continue
        prefix, width, nums = g
        ranges: list[str] = []
        start = prev = nums[0]
        for x in [*nums[1:], None]:
            if x is not None and x == prev + 1:
                prev = x
                continue
            lo, hi = str(start).zfill(width), str(prev).zfill(width)
            ranges.append(lo if start == prev else f"{lo}-{hi}")
            if x is not None:
                start = prev = x
        out.append(f"{prefix}{ranges[0]}" if len(nums) == 1 else f"{prefix}[{','.join(ranges)}]")
    return ",".join(out)


# --------------------------------------------------------------------------- slurm.conf


def _strip_comment(line: str) -> str:
    """Cut at the first '#' preceded by an even number of backslashes (Slurm's rule)."""
    bs = 0
    for i, ch in enumerate(line):
        if ch == "#" and bs % 2 == 0:
            return line[:i]
        bs = bs + 1 if ch == "\\" else 0
    return line


def _strip_continuation(line: str) -> tuple[str, bool]:
    """An odd number of backslashes ending the line (after trailing spaces) continues it;
    the backslash goes, the next line is appended as it is."""
    body = line.rstrip()
    n = len(body) - len(body.rstrip("\\"))
    if n % 2 == 1:
        return body[:-1], True
    return line, False


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", r"\1", value)


def logical_lines(path: Path, _seen: tuple[Path, ...] = ()) -> list[tuple[str, int, str]]:
    """(file, line number, text) of every logical line, includes expanded in place.
    Relative include paths are relative to the including file's directory (as in Slurm);
    glob patterns are expanded in sorted order."""
    path = path.resolve()
    if path in _seen:
        raise ImportError_(f"include loop: {' -> '.join(str(p) for p in _seen + (path,))}")
    try:
        raw = path.read_text(encoding="utf-8", errors="surrogateescape").splitlines()
    except OSError as e:
        raise ImportError_(f"cannot read {path}: {e}") from e
    out: list[tuple[str, int, str]] = []
    buf, start = "", 0
    for n, line in enumerate(raw, 1):
        if not buf:
            start = n
        text, cont = _strip_continuation(_strip_comment(line))
        buf += text
        if cont:
            continue
        logical, buf = buf.strip(), ""
        if not logical:
            continue
        m = re.match(r"(?i)include\s+(.+)$", logical)
        if m:
            target = _unescape(m.group(1).strip().strip('"'))
            if not os.path.isabs(target):
                target = str(path.parent / target)
            matches = sorted(glob.glob(target)) if glob.has_magic(target) else [target]
            if not matches or not all(os.path.isfile(x) for x in matches):
                raise ImportError_(f"{path}:{start}: include {m.group(1)!r}: no such file")
            for inc in matches:
                out += logical_lines(Path(inc), _seen + (path,))
            continue
        out.append((str(path), start, logical))
    if buf.strip():
        out.append((str(path), start, buf.strip()))
    return out


_PAIR = re.compile(r'\s*([A-Za-z][A-Za-z0-9_]*)\s*=\s*("(?:[^"\\]|\\.)*"|(?:[^\s"\\]|\\.)*)')


def parse_pairs(text: str, where: str = "") -> list[tuple[str, str]]:
    """Key=Value pairs of one logical line; values may be double-quoted."""
    pairs, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _PAIR.match(text, pos)
        if not m or m.end() == pos:
            raise ImportError_(f"{where}: cannot parse {text[pos:pos + 40]!r} (expected Key=Value)")
        value = m.group(2)
        if value.startswith('"') and value.endswith('"') and len(value) >= 2:
            value = value[1:-1]
        pairs.append((m.group(1), _unescape(value)))
        pos = m.end()
    return pairs


@dataclass
class SlurmConf:
    globals: dict[str, list[str]] = field(default_factory=dict)  # lowercased key -> values
    names: dict[str, str] = field(default_factory=dict)  # lowercased key -> key as written
    nodes: list[dict[str, Any]] = field(default_factory=list)
    partitions: list[dict[str, Any]] = field(default_factory=list)
    nodesets: dict[str, dict[str, str]] = field(default_factory=dict)
    down_nodes: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def get(self, key: str, default: str | None = None) -> str | None:
        v = self.globals.get(key.lower())
        return v[-1] if v else default


def _typed(value: str) -> Any:
    """Plain decimal numbers become ints (RealMemory=257000); everything else stays text.
    A value with spaces keeps its quotes so the rendered line parses the same way."""
    if re.fullmatch(r"0|[1-9]\d{0,17}", value):
        return int(value)
    # Slurm cuts a line at an unescaped '#' even inside quotes, and drops a backslash
    # before any character: escape both, quote values with spaces.
    escaped = value.replace("\\", "\\\\").replace("#", "\\#")
    if re.search(r"\s", value):
        return '"' + escaped + '"'
    return escaped


def _canonical(key: str, name_key: str) -> str:
    return name_key if key.lower() == name_key.lower() else key


def parse_slurm_conf(path: Path) -> SlurmConf:
    conf = SlurmConf()
    node_default: dict[str, str] = {}
    part_default: dict[str, str] = {}
    for file, lineno, text in logical_lines(path):
        where = f"{file}:{lineno}"
        pairs = parse_pairs(text, where)
        if not pairs:
            continue
        first = pairs[0][0].lower()
        if first in ("nodename", "partitionname"):
            name_key = "NodeName" if first == "nodename" else "PartitionName"
            seen: dict[str, str] = {}
            for k, v in pairs[1:]:
                if k.lower() in (x.lower() for x in seen):
                    raise ImportError_(f"{where}: {k} given twice on one {name_key} line")
                seen[k] = v
            name = pairs[0][1]
            defaults = node_default if first == "nodename" else part_default
            if name.upper() == "DEFAULT":
                for k, v in seen.items():
                    defaults.pop(next((d for d in defaults if d.lower() == k.lower()), k), None)
                    defaults[k] = v
                continue
            entry: dict[str, Any] = {name_key: name}
            for k, v in defaults.items():
                if k.lower() not in (x.lower() for x in seen):
                    entry[k] = _typed(v)
            for k, v in seen.items():
                entry[_canonical(k, name_key)] = _typed(v)
            (conf.nodes if first == "nodename" else conf.partitions).append(entry)
        elif first == "nodeset":
            conf.nodesets[pairs[0][1]] = {k.lower(): v for k, v in pairs[1:]}
        elif first == "downnodes":
            conf.down_nodes.append(dict(pairs))
        elif first in ("frontendname", "switchname"):
            conf.notes.append(f"{where}: {pairs[0][0]} lines are not imported")
        else:
            for k, v in pairs:
                conf.globals.setdefault(k.lower(), []).append(v)
                conf.names.setdefault(k.lower(), k)
    return conf


def _node_names(conf: SlurmConf) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for n in conf.nodes:
        for name in expand_hostlist(str(n["NodeName"])):
            out.append((name, n))
    return out


def _features(entry: dict[str, Any]) -> set[str]:
    raw = ""
    for k, v in entry.items():
        if k.lower() in ("feature", "features", "availablefeatures"):
            raw = str(v).strip('"')
    return {f.strip() for f in raw.split(",") if f.strip()}


def resolve_nodesets(conf: SlurmConf) -> None:
    """Replace NodeSet names in partitions' Nodes= by the node lists they stand for (the
    stack config has no NodeSet lines)."""
    if not conf.nodesets:
        return
    names = _node_names(conf)
    sets: dict[str, list[str]] = {}
    for set_name, spec in conf.nodesets.items():
        members: list[str] = []
        if "nodes" in spec:
            members += expand_hostlist(spec["nodes"])
        if "feature" in spec:
            members += [n for n, e in names if spec["feature"] in _features(e)]
        if not members:
            raise ImportError_(f"NodeSet {set_name} selects no node")
        sets[set_name] = list(dict.fromkeys(members))
    for p in conf.partitions:
        key = next((k for k in p if k.lower() == "nodes"), None)
        if key is None:
            continue
        parts = _split_top(str(p[key]))
        if not any(x in sets for x in parts):
            continue
        expanded: list[str] = []
        for x in parts:
            expanded += sets[x] if x in sets else [x]
        p[key] = compress_hostlist(list(dict.fromkeys(expanded)))
        conf.notes.append(f"partition {p['PartitionName']}: NodeSet {', '.join(x for x in parts if x in sets)} "
                          f"written out as Nodes={p[key]}")


def load_hosts_file(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        fields = line.split("#", 1)[0].split()
        for name in fields[1:]:
            out.setdefault(name, fields[0])
    return out


TEMPLATE = ROOT / "cloud_init" / "templates" / "slurm" / "slurm.conf"
# Old settings that need not be carried: host-specific, or replaced by the stack's own.
_NOT_CARRIED_OK = {k.lower() for k in (
    "ClusterName", "SlurmctldHost", "ControlMachine", "ControlAddr", "BackupController", "BackupAddr",
    "StateSaveLocation", "SrunPortRange", "AccountingStorageHost", "AccountingStoragePort",
    "AccountingStoragePass", "AccountingStorageUser", "AccountingStorageLoc", "SlurmctldLogFile",
    "SlurmdLogFile", "SlurmSchedLogFile", "SlurmctldPidFile", "SlurmdPidFile", "SlurmctldTimeout",
    "SlurmctldPort", "SlurmdPort", "GresTypes", "SwitchType", "InactiveLimit", "KillWait", "MinJobAge",
    "Waittime", "JobAcctGatherFrequency", "AuthInfo", "SlurmctldParameters")}


def template_settings() -> dict[str, tuple[str, str]]:
    """Static Key=Value settings of the stack's slurm.conf template (lowercased key ->
    (key, value)); lines with template expressions are left out."""
    out: dict[str, tuple[str, str]] = {}
    if not TEMPLATE.exists():
        return out
    for line in TEMPLATE.read_text().splitlines():
        m = re.fullmatch(r"([A-Za-z]+)=([^\s{}%#]+)", line.strip())
        if m and m.group(1).lower() not in ("nodename", "partitionname"):
            out[m.group(1).lower()] = (m.group(1), m.group(2))
    return out


def _same_setting(key: str, a: str, b: str) -> bool:
    if key in ("taskplugin", "selecttypeparameters", "schedulerparameters", "slurmctldparameters"):
        return {x.strip().lower() for x in a.split(",")} == {x.strip().lower() for x in b.split(",")}
    return a.strip().lower() == b.strip().lower()


def check_consistency(conf: SlurmConf, hosts: dict[str, str] | None) -> list[str]:
    """Problems that would make the new controllers misbehave; warnings are returned."""
    warnings: list[str] = []
    if not conf.nodes:
        raise ImportError_("no NodeName lines found (is this the cluster's slurm.conf?)")
    if not conf.partitions:
        raise ImportError_("no PartitionName lines found")
    all_names: set[str] = set()
    for n in conf.nodes:
        names = expand_hostlist(str(n["NodeName"]))
        dup = all_names.intersection(names)
        if dup:
            raise ImportError_(f"node(s) {compress_hostlist(sorted(dup))} defined twice")
        all_names.update(names)
        for key in ("NodeAddr", "NodeHostname"):
            k = next((x for x in n if x.lower() == key.lower()), None)
            if k and len(expand_hostlist(str(n[k]).strip('"'))) != len(names):
                raise ImportError_(f"NodeName={n['NodeName']}: {key} lists {len(expand_hostlist(str(n[k])))} "
                                   f"addresses for {len(names)} nodes")
        if not any(x.lower() == "nodeaddr" for x in n):
            if hosts is not None:
                addrs = [hosts.get(x) for x in names]
                missing = [x for x, a in zip(names, addrs, strict=True) if not a]
                if missing:
                    warnings.append(f"NodeName={n['NodeName']}: no address in the hosts file for "
                                    f"{compress_hostlist(missing)}")
                else:
                    n["NodeAddr"] = compress_hostlist([a for a in addrs if a])
            else:
                warnings.append(f"NodeName={n['NodeName']} has no NodeAddr: the controllers in AWS must resolve "
                                f"these names (pass --hosts-file, or forward the on-prem zone with a Route 53 "
                                f"Resolver rule)")
        if any(k.lower() == "gres" for k in n) and not conf.get("GresTypes"):
            warnings.append(f"NodeName={n['NodeName']} has Gres but slurm.conf sets no GresTypes")
    for p in conf.partitions:
        nodes_key = next((k for k in p if k.lower() == "nodes"), None)
        if nodes_key is None or str(p[nodes_key]).upper() == "ALL":
            continue
        unknown = [x for x in expand_hostlist(str(p[nodes_key])) if x not in all_names]
        if unknown:
            raise ImportError_(f"partition {p['PartitionName']} names undefined node(s) {compress_hostlist(unknown)}")
    for key, want in (("SlurmctldPort", "6817"), ("SlurmdPort", "6818")):
        if conf.get(key, want) != want:
            warnings.append(f"{key}={conf.get(key)} differs from the stack's {want}: the compute nodes' "
                            f"slurm.conf and the security groups use {want} after the move")
    template = template_settings()
    for key, values in sorted(conf.globals.items()):
        old = values[-1]
        if key in template and key not in _NOT_CARRIED_OK and not _same_setting(key, old, template[key][1]):
            warnings.append(f"{template[key][0]}: the old cluster has {old}, the stack's slurm.conf has "
                            f"{template[key][1]}")
    dropped = sorted(conf.names[k] for k in conf.globals if k not in template and k not in _NOT_CARRIED_OK)
    if dropped:
        warnings.append(f"not carried over (the stack's slurm.conf does not set them): {', '.join(dropped)}; "
                        f"add what the cluster needs to cloud_init/templates/slurm/slurm.conf")
    if conf.down_nodes:
        warnings.append(f"{len(conf.down_nodes)} DownNodes line(s) not imported (set those nodes down after the move)")
    return warnings + conf.notes


def srun_port_range(conf: SlurmConf, current: str | None = None) -> tuple[str, str | None]:
    """The stack's srun_port_range: the old cluster's SrunPortRange, else the stack's own."""
    value = conf.get("SrunPortRange")
    if not value:
        keep = current or DEFAULT_SRUN_PORT_RANGE
        return keep, (
            f"SrunPortRange is not set in the old slurm.conf: srun listened on ephemeral ports there. The stack "
            f"sets {keep}; the compute nodes reach the submitting hosts on that range")
    m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", value)
    if not m or not 1024 < int(m.group(1)) < int(m.group(2)) <= 65535:
        raise ImportError_(f"SrunPortRange={value!r} is not a range LOW-HIGH above 1024")
    return f"{int(m.group(1))}-{int(m.group(2))}", None


def cluster_name(conf: SlurmConf) -> str:
    name = conf.get("ClusterName")
    if not name:
        raise ImportError_("slurm.conf sets no ClusterName (the state files carry it; it must match)")
    # slurmctld lowercases it; the name in StateSaveLocation/clustername is the lowercased one.
    lower = name.lower()
    if not re.fullmatch(r"[a-z][a-z0-9_]{0,39}", lower):
        raise ImportError_(f"ClusterName={name} does not fit the stack's cluster_name (lowercase letters, digits, _)")
    return lower


# --------------------------------------------------------------------------- stack file


def _round_trip(text: str = "") -> Any:
    """ruamel.yaml in round-trip mode: comments, key order, quoting and flow style of what
    it loads are dumped again as they were. Block layout: mappings indented by 2 (as
    Pulumi writes stack files), list items indented under their key as in the stack file's
    first block list (by 2 when it has none; ruamel.yaml has one setting per file)."""
    from ruamel.yaml import YAML
    from ruamel.yaml.util import load_yaml_guess_indent

    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 4096
    dash = load_yaml_guess_indent(text)[2] if text.strip() else None
    dash = 2 if dash is None else dash
    rt.indent(mapping=2, sequence=dash + 2, offset=dash)
    return rt


def _commented(value: Any) -> Any:
    """Plain dicts and lists as ruamel's containers, which can carry comments. A string
    that a YAML 1.1 reader (PyYAML, which reads the stack files here) would take for
    something else is quoted: ruamel.yaml writes YAML 1.2, where `YES`, `NO` and `12:00:00`
    are plain strings, but to PyYAML they are true, false and 43200."""
    import yaml
    from ruamel.yaml.comments import CommentedMap, CommentedSeq
    from ruamel.yaml.scalarstring import SingleQuotedScalarString

    if isinstance(value, dict):
        return CommentedMap((k, _commented(v)) for k, v in value.items())
    if isinstance(value, list):
        return CommentedSeq(_commented(v) for v in value)
    if isinstance(value, str) and yaml.resolver.Resolver().resolve(yaml.ScalarNode, value, (True, False)) != \
            "tag:yaml.org,2002:str":
        return SingleQuotedScalarString(value)
    return value


def _tail(container: Any, key: Any) -> tuple[Any, Any, int]:
    """Where ruamel keeps the comment lines that follow the entry container[key]: with the
    last scalar of its value (inside block collections, on the deepest last item)."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    node, k = container, key
    while True:
        child = node[k]
        if isinstance(child, CommentedMap | CommentedSeq) and len(child) and not child.fa.flow_style():
            node, k = child, (list(child)[-1] if isinstance(child, CommentedMap) else len(child) - 1)
            continue
        return node, k, 0 if isinstance(node, CommentedSeq) else 2


def _take_following_lines(container: Any, key: Any) -> Any:
    """Detach the comment and blank lines that follow the entry container[key] (they lead
    to whatever comes next in the file); a comment at the end of its last line stays."""
    node, k, slot = _tail(container, key)
    entry = node.ca.items.get(k)
    tok = entry[slot] if entry and len(entry) > slot else None
    if tok is None or "\n" not in tok.value:
        return None
    eol, rest = tok.value.split("\n", 1)
    if eol.strip():
        moved = copy.copy(tok)
        moved.value = "\n" + rest
        tok.value = eol + "\n"
        return moved
    entry[slot] = None
    tok.value = "\n" + rest
    return tok


def _put_following_lines(container: Any, key: Any, tok: Any) -> None:
    node, k, slot = _tail(container, key)
    entry = node.ca.items.setdefault(k, [None, None, None, None] if slot == 2 else [None, None])
    entry[slot] = tok


def _comment_tokens(x: Any) -> list[Any]:
    from ruamel.yaml.tokens import CommentToken

    if isinstance(x, CommentToken):
        return [x]
    return [t for y in x for t in _comment_tokens(y)] if isinstance(x, list | tuple) else []


def _comments_in(node: Any, kept: set[int]) -> int:
    """The comment lines ruamel.yaml keeps with a loaded value (full-line and end-of-line),
    except the tokens in `kept` (ruamel.yaml holds the comment after `key:` both with the
    key, where it stays, and with the value)."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    n = 0
    if isinstance(node, CommentedMap | CommentedSeq):
        for tok in _comment_tokens([node.ca.comment, *node.ca.items.values()]):
            if id(tok) not in kept:
                n += sum(1 for ln in tok.value.splitlines() if ln.strip().startswith("#"))
        n += sum(_comments_in(c, kept) for c in (node.values() if isinstance(node, CommentedMap) else node))
    return n


def _entry_lines(rt: Any, text: str, key: str) -> tuple[int, int]:
    """Lines [first, end) of config entry `key` in `text`: from its key to the last line of
    its value, not counting the comments and blank lines before the next entry."""
    doc = rt.load(text)
    cfg = doc["config"]
    keys = list(cfg)
    first = cfg.lc.key(key)[0]
    i = keys.index(key)
    if i + 1 < len(keys):
        nxt = cfg.lc.key(keys[i + 1])[0]
    else:
        top = list(doc)
        j = top.index("config")
        nxt = doc.lc.key(top[j + 1])[0] if j + 1 < len(top) else len(text.splitlines())
    lines = text.splitlines()
    while nxt > first + 1 and (not lines[nxt - 1].strip() or lines[nxt - 1].lstrip().startswith("#")):
        nxt -= 1
    return first, nxt


def write_stack_key(text: str, key: str, value: Any) -> tuple[str, int]:
    """Return `text` with config key `key` (e.g. "hpc-portal:slurm") set to `value`, and the
    number of comment lines dropped from inside the old block.

    ruamel.yaml loads the file round-trip, the key's value is replaced (or the key added at
    the end of `config:`) and the document is dumped again: every other part of the file,
    comments included, comes out as it was. Comments inside the old value belong to the
    old value and are counted instead of kept; comment lines between its end and the next
    key stay with that key. Two checks follow: the lines outside the key's entry are
    byte-identical to the old ones (a layout ruamel.yaml would normalize is refused rather
    than rewritten), and the result read back with PyYAML equals the old document with
    only this key changed."""
    import yaml

    try:
        from ruamel.yaml.comments import CommentedMap
        from ruamel.yaml.error import YAMLError
    except ModuleNotFoundError:
        raise ImportError_("writing the stack file needs ruamel.yaml: run the tool with the repository's venv "
                           "(`make venv` installs requirements-dev.txt)") from None
    if text and not text.endswith("\n"):
        text += "\n"
    before = yaml.safe_load(text) if text.strip() else {}
    if before is None:
        before = {}
    if not isinstance(before, dict) or not isinstance(before.get("config", {}), dict):
        raise ImportError_("the stack file's top level must be a mapping with a `config:` mapping")
    try:
        rt = _round_trip(text)
        doc = rt.load(text) if text.strip() else None
    except YAMLError as exc:
        raise ImportError_(f"the stack file is not YAML that can be rewritten: {exc}") from None
    prefix = ""
    if doc is None:  # blank, or comments only: the new document follows them
        prefix, doc = text, CommentedMap()
    if doc.get("config") is None:
        doc["config"] = CommentedMap()
    cfg = doc["config"]
    if cfg.fa.flow_style():
        raise ImportError_("`config:` is not written as a block mapping; edit the file by hand")
    new_value = _commented(value)
    dropped = 0
    if key in cfg:
        following = _take_following_lines(cfg, key)
        dropped = _comments_in(cfg[key], {id(t) for t in _comment_tokens(cfg.ca.items.get(key, []))})
        cfg[key] = new_value
    else:
        following = _take_following_lines(cfg, list(cfg)[-1]) if len(cfg) else None
        cfg[key] = new_value
    if following is not None:
        _put_following_lines(cfg, key, following)
    out = io.StringIO()
    rt.dump(doc, out)
    new_text = prefix + out.getvalue()

    old_lines, new_lines = text.splitlines(keepends=True), new_text.splitlines(keepends=True)
    n_first, n_end = _entry_lines(rt, new_text, key)
    if "config" not in before:  # `config:` itself is new, at the end of the file
        n_first -= 1
    if key in (before.get("config") or {}):
        o_first, o_end = _entry_lines(rt, text, key)
    else:  # the new entry follows what was the end of `config:`
        o_first = o_end = n_first
    outside_old = old_lines[:o_first] + old_lines[o_end:]
    outside_new = new_lines[:n_first] + new_lines[n_end:]
    if outside_new != outside_old:
        where = next((i for i, (a, b) in enumerate(zip(outside_old, outside_new, strict=False)) if a != b),
                     min(len(outside_old), len(outside_new)))
        shown = outside_old[where].rstrip("\n") if where < len(outside_old) else "(end of file)"
        raise ImportError_(f"rewriting {key} would also change other lines of the stack file (first: {shown!r}); "
                           "ruamel.yaml writes the whole file with mappings indented by 2 and every block list "
                           "laid out like the first one: bring the file to that layout or set the key by hand")
    after = yaml.safe_load(new_text)
    expected = dict(before)
    expected["config"] = dict(before.get("config") or {})
    expected["config"][key] = value
    if after != expected:
        raise ImportError_(f"internal check failed: rewriting {key} changed other parts of the stack file")
    return new_text, dropped


def project_name(stack_file: Path) -> str:
    import yaml

    p = stack_file.parent / "Pulumi.yaml"
    if not p.exists():
        raise ImportError_(f"{p} not found (pass --project)")
    return str(yaml.safe_load(p.read_text())["name"])


def current_slurm(stack_file: Path, project: str) -> dict[str, Any]:
    import yaml

    doc = (yaml.safe_load(stack_file.read_text()) if stack_file.exists() else None) or {}
    return dict((doc.get("config") or {}).get(f"{project}:slurm") or {})


def import_into_stack(conf: SlurmConf, stack_file: Path, project: str, dry_run: bool) -> str:
    text = stack_file.read_text() if stack_file.exists() else "config:\n"
    key = f"{project}:slurm"
    current = current_slurm(stack_file, project)
    rng, _ = srun_port_range(conf, current.get("srun_port_range"))
    new = dict(current)
    new["cluster_name"] = cluster_name(conf)
    new["srun_port_range"] = rng
    if conf.get("GresTypes"):
        # carried through slurm.settings; gres.conf on the compute nodes stays as it is
        new["settings"] = {**(current.get("settings") or {}), "GresTypes": conf.get("GresTypes")}
    new["nodes"] = conf.nodes
    new["partitions"] = conf.partitions
    new_text, dropped = write_stack_key(text, key, new)
    report = []
    if dropped:
        report.append(f"note: {dropped} comment line(s) inside the old {key} block were not kept")
    if dry_run:
        diff = difflib.unified_diff(text.splitlines(keepends=True), new_text.splitlines(keepends=True),
                                    str(stack_file), str(stack_file) + " (imported)")
        report.append("".join(diff) or "(no change)")
    else:
        tmp = stack_file.with_name(stack_file.name + ".tmp")
        tmp.write_text(new_text)
        os.replace(tmp, stack_file)
        report.append(f"wrote {key} into {stack_file}")
    return "\n".join(report)


# --------------------------------------------------------------------------- munge key


def munge_key_command(path: Path, stack: str | None) -> str:
    try:
        st = path.stat()
    except OSError as e:
        raise ImportError_(f"cannot read the munge key {path}: {e}") from e
    if not path.is_file():
        raise ImportError_(f"{path} is not a regular file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ImportError_(f"cannot read the munge key {path}: {e} (run as root or the munge user)") from e
    if not MUNGE_KEY_MIN <= len(data) <= MUNGE_KEY_MAX:
        raise ImportError_(f"{path} is {len(data)} bytes; munged accepts keys of {MUNGE_KEY_MIN} to {MUNGE_KEY_MAX} "
                           f"bytes, so this is not the cluster's key")
    if st.st_mode & 0o077:
        print(f"warning: {path} is readable by group/others (mode {st.st_mode & 0o777:o}); munged refuses "
              f"such a key, so this may be a copy, not the key in use", file=sys.stderr)
    stack_opt = f" --stack {shlex.quote(stack)}" if stack else ""
    return (f"# munge key {path}: {len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()}\n"
            f"# (compare on a compute node: sha256sum /etc/munge/munge.key)\n"
            f'pulumi config set{stack_opt} --secret munge_key "$(base64 -w0 {shlex.quote(str(path))})"')


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--slurm-conf", type=Path, help="the old cluster's slurm.conf (its includes are followed)")
    ap.add_argument("--stack", help="stack name: writes Pulumi.<stack>.yaml in the repository root")
    ap.add_argument("--stack-file", type=Path, help="write this stack file instead")
    ap.add_argument("--project", help="config namespace (default: name in Pulumi.yaml next to the stack file)")
    ap.add_argument("--hosts-file", type=Path, help="an /etc/hosts of the old cluster: fills NodeAddr for nodes without one")
    ap.add_argument("--dry-run", action="store_true", help="print the change as a diff, write nothing")
    ver = ap.add_mutually_exclusive_group()
    ver.add_argument("--old-version", help='the old cluster\'s version, e.g. "slurm 21.08.5" (output of `sinfo -V`)')
    ver.add_argument("--sinfo-version-output", type=Path, help="a file holding `sinfo -V` output of the old cluster")
    ver.add_argument("--skip-version-check", action="store_true", help="import without the version check")
    ap.add_argument("--target-version", default=TARGET_VERSION, help=f"the new controllers' release ({TARGET_VERSION})")
    ap.add_argument("--munge-key", type=Path, help="the old cluster's munge.key: prints the command that stores it")
    args = ap.parse_args(argv)

    if not (args.slurm_conf or args.munge_key or args.old_version or args.sinfo_version_output):
        ap.error("nothing to do: give --slurm-conf, --munge-key and/or --old-version/--sinfo-version-output")
    if args.slurm_conf and not (args.stack or args.stack_file):
        ap.error("--slurm-conf needs --stack or --stack-file")
    if args.slurm_conf and not (args.old_version or args.sinfo_version_output or args.skip_version_check):
        ap.error("--slurm-conf needs the old cluster's version: --old-version or --sinfo-version-output "
                 "(or --skip-version-check)")
    try:
        if args.old_version or args.sinfo_version_output:
            text = args.old_version or args.sinfo_version_output.read_text()
            verdict = check_version(text, args.target_version)
            if not verdict.ok:
                print(f"slurm_import: refusing: {verdict.message}", file=sys.stderr)
                return 1
            print(f"version: {verdict.message}")
        if args.slurm_conf:
            conf = parse_slurm_conf(args.slurm_conf)
            resolve_nodesets(conf)
            hosts = load_hosts_file(args.hosts_file) if args.hosts_file else None
            warnings = check_consistency(conf, hosts)
            stack_file = args.stack_file or ROOT / f"Pulumi.{args.stack}.yaml"
            project = args.project or project_name(stack_file)
            rng, rng_note = srun_port_range(conf, current_slurm(stack_file, project).get("srun_port_range"))
            n_nodes = sum(len(expand_hostlist(str(n["NodeName"]))) for n in conf.nodes)
            print(f"slurm.conf: cluster {cluster_name(conf)}, {len(conf.nodes)} NodeName line(s) "
                  f"({n_nodes} nodes), {len(conf.partitions)} partition(s), SrunPortRange {rng}")
            for w in warnings + ([rng_note] if rng_note else []):
                print(f"warning: {w}")
            print(import_into_stack(conf, stack_file, project, args.dry_run))
        if args.munge_key:
            print(munge_key_command(args.munge_key, args.stack))
    except ImportError_ as e:
        print(f"slurm_import: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
