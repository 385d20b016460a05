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
  `<project>:slurm` key. Only that key's block is rewritten (see write_stack_key); the
  rest of the file, comments included, is kept byte for byte.
* Munge key. Checks the key's size (munged accepts 32 to 1024 bytes) and prints the
  `pulumi config set --secret munge_key ...` command that stores it base64-encoded (the
  form hpc-munge-key decodes at boot). The key itself is never printed.

Exit status: 0 done, 1 refused (version too old, bad key, inconsistent slurm.conf),
2 usage error.

The parser and the version logic need only the standard library (slurm_move.py reuses
them on the old server); writing the stack file needs PyYAML (the repository's venv).
"""

from __future__ import annotations

import argparse
import difflib
import glob
import hashlib
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
    """The inverse, for lists this tool builds: node01,node02,node03 -> node[01-03]."""
    groups: dict[tuple[str, int], list[int]] = {}
    order: list[tuple[str, int] | str] = []
    for n in names:
        m = re.fullmatch(r"(.*?)(\d+)", n)
        if not m:
            order.append(n)
            continue
        key = (m.group(1), len(m.group(2)) if m.group(2).startswith("0") else 0)
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(int(m.group(2)))
    out: list[str] = []
    for item in order:
        if isinstance(item, str):
            out.append(item)
            continue
        prefix, width = item
        key = item
        nums = sorted(set(groups[key]))
        ranges, start = [], nums[0]
        for a, b in zip(nums, nums[1:] + [None], strict=True):
            if b is None or b != a + 1:
                lo, hi = str(start).zfill(width), str(a).zfill(width)
                ranges.append(lo if start == a else f"{lo}-{hi}")
                if b is not None:
                    start = b
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


def _dump_block(key: str, value: Any, indent: int) -> str:
    import yaml

    class _Dumper(yaml.SafeDumper):
        # Indent list items under their key, like the hand-written stack files.
        def increase_indent(self, flow: bool = False, indentless: bool = False) -> Any:
            return super().increase_indent(flow, False)

    text = yaml.dump({key: value}, Dumper=_Dumper, sort_keys=False, default_flow_style=False,
                     allow_unicode=True, width=4096)
    return "".join(" " * indent + line + "\n" for line in text.splitlines())


def _is_meta(line: str) -> bool:
    s = line.strip()
    return not s or s.startswith("#")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def write_stack_key(text: str, key: str, value: Any) -> tuple[str, int]:
    """Return `text` with config key `key` (e.g. "hpc-portal:slurm") set to `value`, and the
    number of comment lines dropped from inside the old block.

    The file is edited as text: the key's block (its line and the lines indented below it)
    is replaced by a block emitted with PyYAML; every other line stays as it was, so the
    file's comments and layout survive. Comments inside the old block cannot be carried
    over (PyYAML does not read comments) and are counted instead. The result is parsed
    back and must equal the old document with only this key changed."""
    import yaml

    before = yaml.safe_load(text) if text.strip() else {}
    if before is None:
        before = {}
    if not isinstance(before, dict) or not isinstance(before.get("config", {}), dict):
        raise ImportError_("the stack file's top level must be a mapping with a `config:` mapping")
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    cfg_at = next((i for i, ln in enumerate(lines) if re.match(r"config:\s*(#.*)?$", ln.rstrip("\n"))), None)
    dropped = 0
    if cfg_at is None:
        if "config" in before:
            raise ImportError_("`config:` is not written as a block mapping; edit the file by hand")
        lines.append("config:\n")
        cfg_at = len(lines) - 1
    # The config block: up to the next top-level key.
    end = next((j for j in range(cfg_at + 1, len(lines)) if not _is_meta(lines[j]) and _indent(lines[j]) == 0),
               len(lines))
    child = next((_indent(lines[j]) for j in range(cfg_at + 1, end) if not _is_meta(lines[j])), 2)
    key_re = re.compile(rf"^ {{{child}}}(?:{re.escape(key)}|\"{re.escape(key)}\"|'{re.escape(key)}')\s*:(\s|$)")
    at = next((j for j in range(cfg_at + 1, end) if key_re.match(lines[j])), None)
    block = _dump_block(key, value, child)
    if at is None:
        last = max((j for j in range(cfg_at, end) if not _is_meta(lines[j])), default=cfg_at)
        new_lines = lines[: last + 1] + [block] + lines[last + 1:]
    else:
        stop = next((j for j in range(at + 1, end) if not _is_meta(lines[j]) and _indent(lines[j]) <= child), end)
        while stop > at + 1 and _is_meta(lines[stop - 1]):  # comments before the next key stay with it
            stop -= 1
        dropped = sum(1 for ln in lines[at + 1: stop] if ln.strip().startswith("#"))
        dropped += 1 if "#" in lines[at].split(":", 2)[-1] else 0
        new_lines = lines[:at] + [block] + lines[stop:]
    new_text = "".join(new_lines)
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
