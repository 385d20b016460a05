#!/usr/bin/env python3
"""Move a running Slurm cluster's state and accounting to the new controllers.

The steps of docs/slurm-cutover.md, each a subcommand:

  drain-check      print the commands that drain and stop the old controller; with
                   --squeue (and --sdiag) output, check that no job runs any more and
                   that slurmdbd has every record
  manifest DIR     file list with modes, owners and sha256 of a state directory (JSON)
  copy-state SRC DEST
                   copy StateSaveLocation into the shared /slurm/state tree, keeping
                   modes and ownership, verify every file by sha256, and write the marker
                   the controllers' state guard (hpc-slurm-state-guard) expects
  dump-accounting  mariadb-dump/mysqldump of slurm_acct_db in one consistent snapshot
                   (--single-transaction), with routines, in bounded multi-row INSERTs,
                   plus a summary (row counts, job ids) for the checks that follow
  load-accounting  load that dump through the DB writer endpoint into Galera: every table
                   must have a primary key and be InnoDB (Galera replicates only those
                   reliably), and rows go in transactions that stay under the cluster's
                   wsrep_max_ws_size; the loaded row counts are compared with the dump
  verify           compare row counts and job ids between the old and the new database
                   (or the dump's summary), and pending jobs between squeue outputs taken
                   before and after the move
  rollback         print the way back to the old controller

Runs with Python 3.10+ and the standard library only (the old server is Ubuntu 22.04);
the database commands need the MariaDB/MySQL command-line client. Exit status: 0 ok,
1 a check failed or the operation was refused, 2 usage error.
"""

from __future__ import annotations

import argparse
import datetime
import grp
import hashlib
import json
import os
import pwd
import re
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The marker hpc-slurm-state-guard (cloud_init/scripts) looks for: a state directory that
# holds it was initialised on purpose, so the controllers may start on it.
MARKER_NAME = ".hpc-slurm-state"
DEFAULT_DB = "slurm_acct_db"
WS_ERRORS = ("Maximum writeset size exceeded", "wsrep_max_ws_size", "wsrep_max_ws_rows")

# squeue states (long and short forms).
RUNNING_STATES = {"RUNNING", "R", "COMPLETING", "CG", "CONFIGURING", "CF", "SUSPENDED", "S", "STOPPED", "ST",
                  "RESIZING", "RS", "SIGNALING", "SI", "STAGE_OUT", "SO"}
PENDING_STATES = {"PENDING", "PD", "REQUEUED", "RQ", "REQUEUE_HOLD", "RH", "REQUEUE_FED", "RF",
                  "SPECIAL_EXIT", "SE", "RESV_DEL_HOLD", "RD"}
SQUEUE_CMD = "squeue --noheader --all --states=all --format='%i %T'"


class Fail(Exception):
    """A check failed or an operation was refused (exit 1)."""


def say(msg: str = "") -> None:
    print(msg, flush=True)


# =========================================================================== drain


def read_squeue(path: Path) -> dict[str, str]:
    """job id -> state from `squeue --format='%i %T'` output (a header line is skipped)."""
    jobs: dict[str, str] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.replace("|", " ").split()
        if not fields or fields[0].upper() == "JOBID":
            continue
        if len(fields) < 2 or not re.match(r"\d", fields[0]):
            raise Fail(f"{path}:{n}: expected 'JOBID STATE' (from {SQUEUE_CMD}), got {line!r}")
        jobs[fields[0]] = fields[1].upper()
    return jobs


def job_number(job_id: str) -> int:
    m = re.match(r"\d+", job_id)
    return int(m.group(0)) if m else 0


def partitions_of(conf: Path) -> list[str]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import slurm_import  # the same parser the import uses

    parsed = slurm_import.parse_slurm_conf(conf)
    return [str(p["PartitionName"]) for p in parsed.partitions]


def cmd_drain_check(a: argparse.Namespace) -> int:
    parts = list(a.partition or [])
    if a.slurm_conf:
        parts += [p for p in partitions_of(a.slurm_conf) if p not in parts]
    if not parts:
        raise Fail("name the partitions (--partition) or pass the old --slurm-conf")
    say("# 1. Stop jobs from starting; pending jobs keep their place and their ids.")
    for p in parts:
        say(f"scontrol update PartitionName={p} State=DOWN")
    say("# 2. Let running jobs end (or requeue them: scontrol requeue <jobid>), then record the queue")
    say("#    and slurmdbd's backlog and check them with this command:")
    say(f"{SQUEUE_CMD} > squeue-before.txt")
    say("sdiag > sdiag-before.txt")
    say("python3 slurm_move.py drain-check --slurm-conf /etc/slurm/slurm.conf "
        "--squeue squeue-before.txt --sdiag sdiag-before.txt")
    say("# 3. Stop submissions (portal maintenance page), then stop the controller (it saves its")
    say("#    state on the way down) and, after it, slurmdbd:")
    say("systemctl disable --now slurmctld")
    say("systemctl disable --now slurmdbd")
    say("# 4. Copy the state and dump the accounting (docs/slurm-cutover.md, 5.4 and 5.5).")
    failed = False
    if a.squeue:
        jobs = read_squeue(a.squeue)
        running = sorted((j for j, s in jobs.items() if s in RUNNING_STATES), key=job_number)
        pending = sorted((j for j, s in jobs.items() if s in PENDING_STATES), key=job_number)
        unknown = sorted({s for s in jobs.values() if s not in RUNNING_STATES | PENDING_STATES})
        say(f"squeue: {len(jobs)} job(s), {len(pending)} pending, {len(running)} still running")
        if unknown:
            say(f"squeue: other states (finished, ignored): {', '.join(unknown)}")
        if running:
            say(f"NOT DRAINED: running/completing/suspended jobs: {' '.join(f'{j}({jobs[j]})' for j in running)}")
            failed = True
        else:
            say("drained: no job is running")
    if a.sdiag:
        m = re.search(r"DBD Agent queue size:\s*(\d+)", a.sdiag.read_text())
        if not m:
            raise Fail(f"{a.sdiag}: no 'DBD Agent queue size' line (is it sdiag output?)")
        if int(m.group(1)):
            say(f"NOT SYNCED: slurmctld still holds {m.group(1)} record(s) for slurmdbd; wait and run sdiag again")
            failed = True
        else:
            say("slurmdbd has every record (DBD Agent queue size: 0)")
    return 1 if failed else 0


# =========================================================================== state copy


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def manifest(root: Path, exclude: tuple[str, ...] = (MARKER_NAME,)) -> dict[str, dict[str, Any]]:
    """Relative path -> type, mode, uid, gid, size/sha256 (files) or target (links) of
    every entry under `root` (the root itself as ".")."""
    out: dict[str, dict[str, Any]] = {}

    def entry(path: str) -> dict[str, Any]:
        st = os.lstat(path)
        e: dict[str, Any] = {"mode": f"{stat.S_IMODE(st.st_mode):04o}", "uid": st.st_uid, "gid": st.st_gid}
        if stat.S_ISLNK(st.st_mode):
            e.update(type="link", target=os.readlink(path))
        elif stat.S_ISDIR(st.st_mode):
            e.update(type="dir")
        elif stat.S_ISREG(st.st_mode):
            e.update(type="file", size=st.st_size, sha256=_sha256(path))
        else:
            e.update(type="other")
        return e

    if not root.is_dir():
        raise Fail(f"{root} is not a directory")
    out["."] = entry(str(root))
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames) + sorted(filenames):
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if rel in exclude:
                continue
            out[rel] = entry(os.path.join(dirpath, name))
    return out


def manifest_digest(m: dict[str, dict[str, Any]]) -> str:
    return hashlib.sha256(json.dumps(m, sort_keys=True).encode()).hexdigest()


def compare_manifests(want: dict[str, dict[str, Any]], got: dict[str, dict[str, Any]],
                      owner: tuple[int, int] | None) -> list[str]:
    problems = []
    for rel in sorted(set(want) | set(got)):
        if rel not in got:
            if want[rel].get("type") != "other":  # sockets, fifos: not copied, reported
                problems.append(f"missing in the copy: {rel}")
            continue
        if rel not in want:
            problems.append(f"extra in the copy: {rel}")
            continue
        w, g = dict(want[rel]), dict(got[rel])
        if owner is not None:
            w["uid"], w["gid"] = owner
        for k in sorted(set(w) | set(g)):
            if w.get(k) != g.get(k):
                problems.append(f"{rel}: {k} is {g.get(k)!r} in the copy, {w.get(k)!r} in the source")
    return problems


def _owner(spec: str | None) -> tuple[int, int] | None:
    if not spec:
        return None
    user, _, group = spec.partition(":")
    try:
        pw = pwd.getpwnam(user) if not user.isdigit() else pwd.getpwuid(int(user))
        gid = pw.pw_gid if not group else (int(group) if group.isdigit() else grp.getgrnam(group).gr_gid)
    except KeyError as e:
        raise Fail(f"--owner {spec}: no such user or group on this host") from e
    return pw.pw_uid, gid


def _copy_tree(src: Path, dest: Path, owner: tuple[int, int] | None) -> tuple[int, list[str]]:
    """Copy src's contents into the existing directory dest; returns (entries, skipped)."""
    count, skipped = 0, []
    dirs: list[tuple[str, os.stat_result]] = []
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, src)
        out_dir = dest if rel_dir == "." else dest / rel_dir
        for name in sorted(dirnames):
            s = os.path.join(dirpath, name)
            st = os.lstat(s)
            if stat.S_ISLNK(st.st_mode):  # os.walk lists links to directories as directories
                continue
            os.mkdir(out_dir / name, 0o700)
            dirs.append((str(out_dir / name), st))
            count += 1
        for name in sorted(filenames) + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            if rel_dir == "." and name == MARKER_NAME:
                continue
            s, d = os.path.join(dirpath, name), str(out_dir / name)
            st = os.lstat(s)
            uid, gid = owner or (st.st_uid, st.st_gid)
            if stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(s), d)
                os.lchown(d, uid, gid)
            elif stat.S_ISREG(st.st_mode):
                shutil.copyfile(s, d, follow_symlinks=False)
                os.chown(d, uid, gid)
                os.chmod(d, stat.S_IMODE(st.st_mode))
                os.utime(d, ns=(st.st_atime_ns, st.st_mtime_ns))
            else:
                skipped.append(os.path.relpath(s, src))
                continue
            count += 1
    for d, st in reversed(dirs):  # modes and times last, deepest first
        uid, gid = owner or (st.st_uid, st.st_gid)
        os.chown(d, uid, gid)
        os.chmod(d, stat.S_IMODE(st.st_mode))
        os.utime(d, ns=(st.st_atime_ns, st.st_mtime_ns))
    return count, skipped


def cmd_manifest(a: argparse.Namespace) -> int:
    m = manifest(a.dir)
    say(json.dumps({"dir": str(a.dir), "host": socket.gethostname(), "digest": manifest_digest(m), "entries": m},
                   indent=1, sort_keys=True))
    return 0


def cmd_copy_state(a: argparse.Namespace) -> int:
    src, dest = a.src.resolve(), Path(os.path.abspath(a.dest))
    if not src.is_dir():
        raise Fail(f"{src} is not a directory")
    names = set(os.listdir(src))
    if not names & {"job_state", "clustername", "node_state"} and not a.force:
        raise Fail(f"{src} holds no job_state/node_state/clustername: not a StateSaveLocation (--force to copy anyway)")
    if a.cluster_name is not None and "clustername" in names:
        found = (src / "clustername").read_text(errors="replace").strip("\0\n ")
        if found != a.cluster_name:
            raise Fail(f"{src}/clustername says {found!r}, the stack's cluster is {a.cluster_name!r}: slurmctld "
                       f"would refuse this state (set slurm.cluster_name to {found!r})")
    if dest == src or str(dest).startswith(str(src) + "/"):
        raise Fail("DEST must not be SRC or inside it")
    owner = _owner(a.owner)
    if os.path.lexists(dest):
        if not dest.is_dir():
            raise Fail(f"{dest} exists and is not a directory")
        if os.listdir(dest):
            if not a.replace:
                raise Fail(f"{dest} is not empty; --replace moves it aside to {dest.name}.replaced-<time> first")
    expected = None
    if a.expect_manifest:
        doc = json.loads(a.expect_manifest.read_text())
        expected = doc.get("entries", doc)
        problems = compare_manifests(expected, manifest(src), None)
        if problems:
            raise Fail(f"{src} differs from {a.expect_manifest} (the old server's list): " + "; ".join(problems[:20]))
        say(f"source matches {a.expect_manifest} ({len(expected)} entries)")

    source = manifest(src)
    staging = dest.parent / f".{dest.name}.partial-{os.getpid()}"
    os.mkdir(staging, 0o700)
    try:
        count, skipped = _copy_tree(src, staging, owner)
        root_st = os.stat(src)
        uid, gid = owner or (root_st.st_uid, root_st.st_gid)
        os.chown(staging, uid, gid)
        os.chmod(staging, stat.S_IMODE(root_st.st_mode))
        problems = compare_manifests(source, manifest(staging), owner)
        if problems:
            raise Fail("the copy does not match the source: " + "; ".join(problems[:20]))
        marker = {
            "initialised_by": f"slurm_move copy-state on {socket.gethostname()}",
            "at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),  # noqa: UP017 (3.10)
            "state_dir": str(dest),
            "copied_from": str(src),
            "entries": len(source) - 1,
            "manifest_sha256": manifest_digest(source),
        }
        with open(staging / MARKER_NAME, "w", encoding="utf-8") as f:
            json.dump(marker, f, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chown(staging / MARKER_NAME, uid, gid)
        os.chmod(staging / MARKER_NAME, 0o644)
        if os.path.lexists(dest):
            if os.listdir(dest):
                aside = dest.parent / f"{dest.name}.replaced-{datetime.datetime.now():%Y%m%d%H%M%S}"
                os.rename(dest, aside)
                say(f"moved the old {dest} aside to {aside}")
            else:
                os.rmdir(dest)
        os.rename(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    problems = compare_manifests(source, manifest(dest), owner)
    if problems:
        raise Fail(f"{dest} does not match the source after the rename: " + "; ".join(problems[:20]))
    if (dest / "dbd.messages").exists() and (dest / "dbd.messages").stat().st_size > 0:
        say("note: dbd.messages is not empty: the new slurmctld sends those accounting records to slurmdbd "
            "on start (row counts grow by them)")
    for s in skipped:
        say(f"skipped (not a file, directory or link): {s}")
    say(f"copied {count} entries from {src} to {dest}; every file's sha256, mode and owner verified; "
        f"manifest {marker['manifest_sha256']}")
    say(f"wrote {dest / MARKER_NAME} (hpc-slurm-state-guard lets the controllers start on this directory)")
    return 0


# =========================================================================== SQL dumps


@dataclass
class Stmt:
    kind: str  # header, ddl, insert, routine, other, skip
    table: str | None
    text: str  # without the delimiter
    delimiter: str = ";"


_TABLE_RE = {
    "insert": re.compile(r"INSERT\s+(?:IGNORE\s+)?INTO\s+[`\"]?([^`\"\s(]+)", re.I),
    "create": re.compile(r"CREATE\s+TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?[`\"]?([^`\"\s(]+)", re.I),
    "drop": re.compile(r"DROP\s+TABLE\s+(?:IF\s+EXISTS\s+)?[`\"]?([^`\"\s;]+)", re.I),
}


def iter_statements(lines: Iterator[str]) -> Iterator[Stmt]:
    """Statements of a mysqldump/mariadb-dump file, DELIMITER blocks included. Each INSERT
    of a dump is one line (the dump escapes line breaks inside values)."""
    delim, seen_table = ";", False
    buf: list[str] = []
    for line in lines:
        s = line.rstrip("\n")
        if not buf:
            stripped = s.strip()
            if not stripped or stripped.startswith("-- ") or stripped == "--":
                continue
            if stripped.startswith("/*M!999999\\- enable the sandbox mode"):
                continue
            m = re.fullmatch(r"DELIMITER\s+(\S+)\s*", stripped, re.I)
            if m:
                delim = m.group(1)
                continue
        buf.append(s)
        if s.rstrip().endswith(delim):
            text = "\n".join(buf).rstrip()
            text = text[: -len(delim)].rstrip()
            buf = []
            yield classify(text, delim, seen_table)
            if re.match(r"(DROP|CREATE)\s+TABLE", text, re.I):
                seen_table = True
    if buf and "\n".join(buf).strip():
        yield classify("\n".join(buf).strip(), delim, seen_table)


def classify(text: str, delim: str, seen_table: bool) -> Stmt:
    body = text.lstrip()
    for kind, regex in _TABLE_RE.items():
        m = regex.match(body)
        if m:
            return Stmt("insert" if kind == "insert" else "ddl", m.group(1), text, delim)
    if re.match(r"(LOCK\s+TABLES|UNLOCK\s+TABLES)\b", body, re.I) or \
            re.match(r"/\*!40000 ALTER TABLE .* (DISABLE|ENABLE) KEYS \*/$", body, re.I):
        return Stmt("skip", None, text, delim)
    if delim != ";" or re.match(r"CREATE\s+(DEFINER\S*\s+)?(PROCEDURE|FUNCTION|TRIGGER|EVENT)", body, re.I):
        return Stmt("routine", None, text, delim)
    if not seen_table and re.match(r"(/\*!\d+\s+)?SET\s", body, re.I):
        return Stmt("header", None, text, delim)
    return Stmt("other", None, text, delim)


# Tokens that matter inside a VALUES list: quoted strings (backslash escapes, doubled
# quotes) and parentheses.
_TOKEN = re.compile(r"'(?:[^'\\]|\\.|'')*'|\"(?:[^\"\\]|\\.|\"\")*\"|[(),]", re.S)


def insert_parts(text: str) -> tuple[str, list[str]]:
    """("INSERT INTO `t` VALUES ", ["(1,'a')", "(2,'b')"]) of an INSERT statement."""
    m = re.search(r"\)?\s*VALUES\s*(?=\()", text, re.I)
    if not m:
        raise Fail(f"cannot find VALUES in {text[:80]!r}")
    head, start = text[: m.end()], m.end()
    tuples, depth, begin = [], 0, None
    for t in _TOKEN.finditer(text, start):
        tok = t.group(0)
        if tok == "(":
            if depth == 0:
                begin = t.start()
            depth += 1
        elif tok == ")":
            depth -= 1
            if depth == 0 and begin is not None:
                tuples.append(text[begin: t.end()])
                begin = None
    if depth != 0:
        raise Fail(f"unbalanced VALUES list in {text[:80]!r}")
    return head, tuples


def tuple_fields(tup: str) -> list[str]:
    """Top-level fields of "(1,'a,b',NULL)" as written: ['1', "'a,b'", 'NULL']."""
    inner = tup[1:-1]
    out, depth, start = [], 0, 0
    for t in _TOKEN.finditer(inner):
        tok = t.group(0)
        if tok == "(":
            depth += 1
        elif tok == ")":
            depth -= 1
        elif tok == "," and depth == 0:
            out.append(inner[start: t.start()].strip())
            start = t.end()
    out.append(inner[start:].strip())
    return out


def create_columns(text: str) -> list[str]:
    cols = []
    for line in text.splitlines()[1:]:
        m = re.match(r"\s*[`\"]([^`\"]+)[`\"]\s+\w", line)
        if m:
            cols.append(m.group(1))
    return cols


def is_job_table(table: str) -> bool:
    return table.endswith("_job_table")


@dataclass
class DumpInfo:
    tables: dict[str, int] = field(default_factory=dict)  # table -> rows
    primary_key: dict[str, bool] = field(default_factory=dict)
    engine: dict[str, str] = field(default_factory=dict)
    jobs: dict[str, dict[str, int]] = field(default_factory=dict)
    routines: list[str] = field(default_factory=list)
    sha256: str = ""

    def as_json(self) -> dict[str, Any]:
        return {"tables": self.tables, "primary_key": self.primary_key, "engine": self.engine, "jobs": self.jobs,
                "routines": self.routines, "dump_sha256": self.sha256}


class JobStats:
    """count, max(id_job), distinct id_job and an order-free digest of (id_job, time_submit)
    computed the same way in SQL (see JOB_STATS_SQL)."""

    def __init__(self) -> None:
        self.rows, self.max_id, self.digest = 0, 0, 0
        self.ids: set[int] = set()

    def add(self, id_job: int, time_submit: int) -> None:
        self.rows += 1
        self.max_id = max(self.max_id, id_job)
        self.ids.add(id_job)
        self.digest ^= zlib.crc32(f"{id_job}/{time_submit}".encode())

    def as_dict(self) -> dict[str, int]:
        return {"rows": self.rows, "max_id_job": self.max_id, "distinct_id_job": len(self.ids), "digest": self.digest}


JOB_STATS_SQL = ("SELECT COUNT(*), COALESCE(MAX(id_job),0), COUNT(DISTINCT id_job), "
                 "COALESCE(BIT_XOR(CRC32(CONCAT(id_job,'/',time_submit))),0) FROM `{table}`")


def _unquote_int(field_: str) -> int:
    return int(field_.strip("'"))


def analyse_dump(path: Path) -> DumpInfo:
    info = DumpInfo()
    h = hashlib.sha256()
    columns: dict[str, list[str]] = {}
    stats: dict[str, JobStats] = {}

    def lines() -> Iterator[str]:
        with open(path, encoding="utf-8", errors="surrogateescape", newline="\n") as f:
            for line in f:
                h.update(line.encode("utf-8", errors="surrogateescape"))
                yield line

    for st in iter_statements(lines()):
        if st.kind == "ddl" and st.table and re.match(r"\s*CREATE\s+TABLE", st.text, re.I):
            t = st.table
            info.tables.setdefault(t, 0)
            info.primary_key[t] = bool(re.search(r"^\s*PRIMARY\s+KEY\s*\(", st.text, re.I | re.M))
            m = re.search(r"\)\s*ENGINE\s*=\s*(\w+)", st.text, re.I)
            info.engine[t] = m.group(1) if m else "?"
            columns[t] = create_columns(st.text)
        elif st.kind == "insert" and st.table:
            t = st.table
            _head, tuples = insert_parts(st.text)
            info.tables[t] = info.tables.get(t, 0) + len(tuples)
            if is_job_table(t) and {"id_job", "time_submit"} <= set(columns.get(t, [])):
                if re.search(r"`?\s*\)\s*VALUES", _head, re.I):
                    raise Fail(f"{t}: INSERTs with column lists are not supported in job tables (dump without "
                               f"--complete-insert)")
                i, j = columns[t].index("id_job"), columns[t].index("time_submit")
                js = stats.setdefault(t, JobStats())
                for tup in tuples:
                    f = tuple_fields(tup)
                    js.add(_unquote_int(f[i]), _unquote_int(f[j]))
        elif st.kind == "routine":
            m = re.search(r"CREATE\s+(?:DEFINER\S*\s+)?(PROCEDURE|FUNCTION|TRIGGER|EVENT)\s+[`\"]?([^`\"\s(]+)",
                          st.text, re.I)
            if m:
                info.routines.append(f"{m.group(1).lower()} {m.group(2)}")
    for t in columns:
        if is_job_table(t):
            info.jobs[t] = (stats.get(t) or JobStats()).as_dict()
    info.sha256 = h.hexdigest()
    return info


# =========================================================================== DB client


class DB:
    """The mariadb/mysql command-line client against one server."""

    def __init__(self, a: argparse.Namespace, prefix: str = "") -> None:
        g = lambda k: getattr(a, f"{prefix}{k}", None)  # noqa: E731
        self.client = g("client") or getattr(a, "client", None) or shutil.which("mariadb") or shutil.which("mysql")
        if not self.client:
            raise Fail("no mariadb or mysql client on PATH (apt install mariadb-client)")
        self.host, self.port, self.socket = g("host"), g("port"), g("socket")
        self.user, self.password_file, self.defaults = g("user"), g("password_file"), g("defaults_extra_file")
        self.label = f"{self.host}:{self.port}" if self.host else (self.socket or "local socket")
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    def _defaults_file(self) -> str | None:
        if self.defaults:
            return str(self.defaults)
        if not self.password_file:
            return None
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="slurm-move-")
            pw = Path(self.password_file).read_text().rstrip("\n")
            p = Path(self._tmp.name) / "client.cnf"
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write('[client]\npassword="' + pw.replace("\\", "\\\\") + '"\n')
        return str(Path(self._tmp.name) / "client.cnf")

    def argv(self, tool: str | None = None, database: str | None = None) -> list[str]:
        out = [tool or str(self.client)]
        d = self._defaults_file()
        if d:
            out.append(f"--defaults-extra-file={d}")
        if self.host:
            out += [f"--host={self.host}", f"--port={self.port or 3306}", "--protocol=TCP"]
        elif self.socket:
            out += [f"--socket={self.socket}"]
        if self.user:
            out.append(f"--user={self.user}")
        if database:
            out.append(f"--database={database}" if tool is None else database)
        return out

    def run(self, sql: str, database: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        # --binary-mode: no client commands other than DELIMITER inside the dump's text.
        r = subprocess.run(self.argv(database=database) + ["--batch", "--skip-column-names", "--raw", "--binary-mode"],
                           input=sql, capture_output=True, encoding="utf-8", errors="surrogateescape")
        if check and r.returncode != 0:
            raise Fail(f"{self.label}: {r.stderr.strip()[-2000:]}")
        return r

    def rows(self, sql: str, database: str | None = None) -> list[list[str]]:
        out = self.run(sql, database).stdout
        return [line.split("\t") for line in out.splitlines()]

    def value(self, sql: str, database: str | None = None) -> str | None:
        rows = self.rows(sql, database)
        return rows[0][0] if rows else None

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def add_db_args(p: argparse.ArgumentParser, prefix: str = "", what: str = "database") -> None:
    dash = prefix.replace("_", "-")
    p.add_argument(f"--{dash}host", help=f"{what}: host (TCP); the DB writer endpoint for the new cluster")
    p.add_argument(f"--{dash}port", type=int, default=3306, help=f"{what}: port (3306)")
    p.add_argument(f"--{dash}socket", help=f"{what}: unix socket instead of host/port")
    p.add_argument(f"--{dash}user", help=f"{what}: user")
    p.add_argument(f"--{dash}password-file", help=f"{what}: file holding the password (never on the command line)")
    p.add_argument(f"--{dash}defaults-extra-file", help=f"{what}: a client option file with credentials")


def table_counts(db: DB, database: str) -> dict[str, int]:
    tables = [r[0] for r in db.rows(
        f"SELECT table_name FROM information_schema.tables WHERE table_schema='{database}' "
        f"AND table_type='BASE TABLE' ORDER BY table_name")]
    if not tables:
        return {}
    sql = " UNION ALL ".join(f"SELECT '{t}', COUNT(*) FROM `{t}`" for t in tables)
    return {r[0]: int(r[1]) for r in db.rows(sql, database)}


def job_stats(db: DB, database: str, tables: list[str]) -> dict[str, dict[str, int]]:
    out = {}
    for t in tables:
        if is_job_table(t):
            r = db.rows(JOB_STATS_SQL.format(table=t), database)[0]
            out[t] = {"rows": int(r[0]), "max_id_job": int(r[1]), "distinct_id_job": int(r[2]), "digest": int(r[3])}
    return out


# =========================================================================== dump


def cmd_dump(a: argparse.Namespace) -> int:
    db = DB(a)
    try:
        tool = a.dump_tool or shutil.which("mariadb-dump") or shutil.which("mysqldump")
        if not tool:
            raise Fail("no mariadb-dump or mysqldump on PATH")
        argv = db.argv(tool=tool) + [
            "--single-transaction", "--quick", "--routines", "--triggers", "--skip-events",
            "--extended-insert", f"--net-buffer-length={a.net_buffer_length}",
            "--skip-add-locks", "--skip-lock-tables", "--skip-disable-keys", "--hex-blob",
            "--default-character-set=utf8mb4", "--no-create-db", a.database,
        ]
        out = a.output
        tmp = out.with_name(out.name + ".partial")
        say(f"dumping {a.database} from {db.label} into {out}")
        with open(tmp, "wb") as f:
            r = subprocess.run(argv, stdout=f, stderr=subprocess.PIPE)
        if r.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise Fail(f"{Path(tool).name} failed: {r.stderr.decode(errors='replace').strip()[-2000:]}")
        os.replace(tmp, out)
    finally:
        db.close()
    info = analyse_dump(out)
    summary = out.with_name(out.name + ".summary.json")
    summary.write_text(json.dumps({"database": a.database, "source": db.label, **info.as_json()}, indent=1,
                                  sort_keys=True) + "\n")
    report_keys(info)
    say(f"{len(info.tables)} tables, {sum(info.tables.values())} rows, routines: {', '.join(info.routines) or 'none'}")
    for t, s in sorted(info.jobs.items()):
        say(f"{t}: {s['rows']} job rows, highest job id {s['max_id_job']}")
    say(f"summary: {summary}")
    return 0


def report_keys(info: DumpInfo) -> list[str]:
    """Tables Galera cannot take safely: no primary key (rows cannot be certified and are
    applied by full scans on the other nodes), or not InnoDB (not replicated)."""
    bad = []
    for t in sorted(info.tables):
        if not info.primary_key.get(t):
            bad.append(f"{t}: no PRIMARY KEY")
        if info.engine.get(t, "").lower() != "innodb":
            bad.append(f"{t}: engine {info.engine.get(t)} (Galera replicates InnoDB only)")
    if bad:
        say("tables Galera cannot take: " + "; ".join(bad))
    else:
        say(f"primary keys: all {len(info.tables)} tables have one and are InnoDB")
    return bad


# =========================================================================== load


_DEFINER = re.compile(r"\bDEFINER\s*=\s*(?:`[^`]*`|\"[^\"]*\"|'[^']*'|[^\s@]+)@(?:`[^`]*`|\"[^\"]*\"|'[^']*'|\S+?)"
                      r"(?=\s|\*/)\s*", re.I)


def strip_definer(text: str) -> str:
    text = re.sub(r"/\*!50017\s+" + _DEFINER.pattern + r"\s*\*/\s*", "", text, flags=re.I)
    return _DEFINER.sub("", text)


def render(stmts: list[Stmt]) -> str:
    out, delim = [], ";"
    for s in stmts:
        if s.delimiter != delim:
            out.append(f"DELIMITER {s.delimiter}")
            delim = s.delimiter
        out.append(f"{s.text}{s.delimiter}")
    if delim != ";":
        out.append("DELIMITER ;")
    return "\n".join(out) + "\n"


@dataclass
class Loader:
    db: DB
    database: str
    prelude: list[Stmt]
    budget: int
    per_commit: int
    max_rows: int
    keep_definer: bool
    extra: list[Stmt]
    chunks: int = 0
    retries: int = 0
    biggest: int = 0

    def run_group(self, stmts: list[Stmt]) -> None:
        if not stmts:
            return
        if not self.keep_definer:
            stmts = [Stmt(s.kind, s.table, strip_definer(s.text), s.delimiter) for s in stmts]
        self.db.run(render(self.prelude + self.extra + stmts), self.database)

    def insert_chunk(self, stmts: list[Stmt]) -> None:
        """One transaction; on a write-set-size error it is split in two and retried."""
        sql = render(self.prelude + self.extra + [Stmt("other", None, "START TRANSACTION")] + stmts
                     + [Stmt("other", None, "COMMIT")])
        r = self.db.run(sql, self.database, check=False)
        if r.returncode == 0:
            self.chunks += 1
            self.biggest = max(self.biggest, sum(len(s.text) for s in stmts))
            return
        if not any(e in r.stderr for e in WS_ERRORS):
            raise Fail(f"{self.db.label}: loading {stmts[0].table} failed: {r.stderr.strip()[-1500:]}")
        self.retries += 1
        if len(stmts) > 1:
            half = len(stmts) // 2
            self.insert_chunk(stmts[:half])
            self.insert_chunk(stmts[half:])
            return
        head, tuples = insert_parts(stmts[0].text)
        if len(tuples) < 2:
            raise Fail(f"one row of {stmts[0].table} is larger than the cluster's write-set limit "
                       f"({r.stderr.strip()}); raise wsrep_max_ws_size")
        half = len(tuples) // 2
        for part in (tuples[:half], tuples[half:]):
            self.insert_chunk([Stmt("insert", stmts[0].table, head + ",".join(part))])

    def split(self, st: Stmt) -> list[Stmt]:
        """An INSERT over the byte or row budget becomes several."""
        head, tuples = insert_parts(st.text)
        if len(st.text) <= self.budget and (not self.max_rows or len(tuples) <= self.max_rows):
            return [st]
        out: list[Stmt] = []
        cur: list[str] = []
        size = len(head)
        for tup in tuples:
            if cur and (size + len(tup) + 1 > self.budget or (self.max_rows and len(cur) >= self.max_rows)):
                out.append(Stmt("insert", st.table, head + ",".join(cur)))
                cur, size = [], len(head)
            cur.append(tup)
            size += len(tup) + 1
        if cur:
            out.append(Stmt("insert", st.table, head + ",".join(cur)))
        return out

    def load_inserts(self, stmts: list[Stmt]) -> None:
        chunk: list[Stmt] = []
        size = rows = 0
        for big in stmts:
            for st in self.split(big):
                n = len(insert_parts(st.text)[1]) if self.max_rows else 0
                if chunk and (size + len(st.text) > self.budget or len(chunk) >= self.per_commit
                              or (self.max_rows and rows + n > self.max_rows)):
                    self.insert_chunk(chunk)
                    chunk, size, rows = [], 0, 0
                chunk.append(st)
                size += len(st.text)
                rows += n
        if chunk:
            self.insert_chunk(chunk)


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+)([KMG]?)i?B?", text.strip(), re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 16M")
    return int(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2).upper()]


def cmd_load(a: argparse.Namespace) -> int:
    info = analyse_dump(a.dump)
    say(f"dump {a.dump}: {len(info.tables)} tables, {sum(info.tables.values())} rows, sha256 {info.sha256}")
    bad = report_keys(info)
    if bad:
        raise Fail("refusing to load: Galera needs a primary key on every table, and InnoDB")
    db = DB(a)
    try:
        v = db.rows("SELECT @@version, COALESCE(@@wsrep_on,0), @@wsrep_max_ws_size, @@wsrep_max_ws_rows, "
                    "@@max_allowed_packet")[0]
        version, wsrep_on = v[0], v[1] in ("1", "ON")
        ws_size, ws_rows, packet = int(v[2]), int(v[3]), int(v[4])
        if wsrep_on:
            status = {r[0]: r[1] for r in db.rows("SHOW GLOBAL STATUS WHERE Variable_name IN ('wsrep_cluster_status',"
                                                  "'wsrep_local_state_comment','wsrep_cluster_size')")}
            say(f"target {db.label}: MariaDB {version}, Galera cluster of {status.get('wsrep_cluster_size')}, "
                f"{status.get('wsrep_cluster_status')}/{status.get('wsrep_local_state_comment')}, "
                f"wsrep_max_ws_size {ws_size}, wsrep_max_ws_rows {ws_rows}")
            if status.get("wsrep_cluster_status") != "Primary" or status.get("wsrep_local_state_comment") != "Synced":
                raise Fail("the target node is not Synced in a Primary component; load through the DB writer "
                           "endpoint when the cluster is healthy")
        else:
            say(f"target {db.label}: MariaDB {version} without wsrep (not a Galera node)")
            if a.require_galera:
                raise Fail("--require-galera: the target has wsrep off")
        budget = a.max_chunk_bytes
        if wsrep_on:
            # A write set carries row images and keys: for slurm_acct_db's many-column rows it
            # comes out larger than the SQL text, so keep the text well under the limit.
            budget = min(budget, ws_size // a.ws_safety)
        budget = min(budget, packet // 2)
        exists = db.value(f"SELECT COUNT(*) FROM information_schema.tables WHERE table_schema='{a.database}'")
        if exists and int(exists):
            if not a.replace:
                raise Fail(f"{a.database} on {db.label} already has {exists} tables; --replace drops it first")
            # Tables and routines go, the database stays (with its character set and the
            # grants the data tier gave it).
            say(f"dropping the {exists} existing tables of {a.database} (--replace)")
            tables = [r[0] for r in db.rows(f"SELECT table_name FROM information_schema.tables "
                                            f"WHERE table_schema='{a.database}'")]
            routines = db.rows(f"SELECT routine_type, routine_name FROM information_schema.routines "
                               f"WHERE routine_schema='{a.database}'")
            db.run("".join(f"DROP TABLE IF EXISTS `{t}`;\n" for t in tables)
                   + "".join(f"DROP {kind} IF EXISTS `{name}`;\n" for kind, name in routines), a.database)
        db.run(f"CREATE DATABASE IF NOT EXISTS `{a.database}`")
        prelude: list[Stmt] = []
        # The dump turns unique checks off for speed; on Galera keep them on so every row is
        # checked (and certified) the same way on all nodes.
        after_header = [Stmt("other", None, "SET unique_checks=1")] if wsrep_on else []
        loader = Loader(db, a.database, prelude, budget, a.statements_per_commit, ws_rows - 1 if ws_rows else 0,
                        a.keep_definer, after_header)
        say(f"loading in transactions of at most {budget} bytes of SQL and {a.statements_per_commit} statements")
        group: list[Stmt] = []
        inserts: list[Stmt] = []
        skipped = 0

        def flush_inserts() -> None:
            if inserts:
                loader.load_inserts(inserts)
                inserts.clear()

        with open(a.dump, encoding="utf-8", errors="surrogateescape", newline="\n") as f:
            for st in iter_statements(f):
                if st.kind == "header":
                    prelude.append(st)
                    continue
                if st.kind == "skip":
                    skipped += 1
                    continue
                if st.kind == "insert":
                    loader.run_group(group)
                    group = []
                    if inserts and inserts[-1].table != st.table:
                        flush_inserts()
                    inserts.append(st)
                    if len(inserts) >= 4 * a.statements_per_commit:  # bounded memory
                        flush_inserts()
                    continue
                flush_inserts()
                group.append(st)
        flush_inserts()
        loader.run_group(group)
        say(f"loaded {loader.chunks} transactions (largest {loader.biggest} bytes of SQL; {loader.retries} split "
            f"after a write-set-size error); {skipped} LOCK/DISABLE KEYS statements skipped")
        counts = table_counts(db, a.database)
        problems = [f"{t}: {counts.get(t)} rows loaded, {n} in the dump" for t, n in sorted(info.tables.items())
                    if counts.get(t) != n]
        jobs = job_stats(db, a.database, list(counts))
        for t, want in sorted(info.jobs.items()):
            if jobs.get(t) != want:
                problems.append(f"{t}: job ids {jobs.get(t)} loaded, {want} in the dump")
        loaded_routines = {f"{r[0].lower()} {r[1]}" for r in db.rows(
            f"SELECT routine_type, routine_name FROM information_schema.routines WHERE routine_schema='{a.database}'")}
        problems += [f"routine {r} missing" for r in info.routines if r not in loaded_routines]
        if problems:
            raise Fail("the loaded database differs from the dump: " + "; ".join(problems))
        say(f"verified: {len(counts)} tables, {sum(counts.values())} rows, job ids "
            + ", ".join(f"{t} max {s['max_id_job']}" for t, s in sorted(jobs.items())) + " as in the dump")
    finally:
        db.close()
    return 0


# =========================================================================== verify


def cmd_verify(a: argparse.Namespace) -> int:
    problems: list[str] = []
    checked = False
    if a.target_host or a.target_socket:
        if not (a.source_host or a.source_socket or a.source_summary):
            raise Fail("give the source database (--source-host/--source-socket) or --source-summary")
        target = DB(a, "target_")
        try:
            t_counts = table_counts(target, a.target_database)
            t_jobs = job_stats(target, a.target_database, list(t_counts))
        finally:
            target.close()
        if a.source_summary:
            doc = json.loads(a.source_summary.read_text())
            s_counts, s_jobs, label = doc["tables"], doc["jobs"], str(a.source_summary)
        else:
            source = DB(a, "source_")
            try:
                s_counts = table_counts(source, a.source_database)
                s_jobs = job_stats(source, a.source_database, list(s_counts))
                label = source.label
            finally:
                source.close()
        grow = a.allow_growth
        for t in sorted(set(s_counts) | set(t_counts)):
            s, n = s_counts.get(t), t_counts.get(t)
            if s is None or n is None:
                if s is not None or not grow:
                    problems.append(f"table {t}: {'missing in the target' if n is None else 'not in the source'}")
            elif n != s and not (grow and n > s):
                problems.append(f"table {t}: {n} rows in the target, {s} in the source")
        for t, sj in sorted(s_jobs.items()):
            tj = t_jobs.get(t)
            if tj is None:
                problems.append(f"{t}: missing in the target")
            elif grow:
                if tj["max_id_job"] < sj["max_id_job"] or tj["rows"] < sj["rows"]:
                    problems.append(f"{t}: target has {tj['rows']} rows up to job {tj['max_id_job']}, source "
                                    f"{sj['rows']} up to {sj['max_id_job']}")
            elif tj != sj:
                problems.append(f"{t}: job ids differ (target {tj}, source {sj})")
        say(f"accounting: {len(s_counts)} tables compared ({label} -> {a.target_host or a.target_socket}); "
            + ", ".join(f"{t} up to job {sj['max_id_job']}" for t, sj in sorted(s_jobs.items())))
        checked = True
        highest_acct = max((s["max_id_job"] for s in t_jobs.values()), default=0)
    else:
        highest_acct = 0
    if a.squeue_before:
        before = read_squeue(a.squeue_before)
        pending = {j for j, s in before.items() if s in PENDING_STATES}
        highest_before = max((job_number(j) for j in before), default=0)
        if a.squeue_after:
            after = read_squeue(a.squeue_after)
            missing = sorted(pending - set(after), key=job_number)
            if missing:
                problems.append(f"pending jobs lost in the move: {' '.join(missing)}")
            moved = sorted((j for j in pending & set(after) if after[j] not in PENDING_STATES), key=job_number)
            say(f"pending jobs: {len(pending)} before, {len(pending) - len(missing)} still there after"
                + (f" ({len(moved)} have since started or ended)" if moved else ""))
            running_before = {j for j, s in before.items() if s in RUNNING_STATES}
            if running_before:
                problems.append(f"jobs were running at the cutover: {' '.join(sorted(running_before, key=job_number))}")
            checked = True
        if a.new_job_id is not None:
            floor = max(highest_before, highest_acct)
            if a.new_job_id <= floor:
                problems.append(f"a job submitted after the move got id {a.new_job_id}, not above {floor}: the new "
                                f"controller did not start from the copied state (ids would repeat)")
            else:
                say(f"new job id {a.new_job_id} continues after {floor}")
            checked = True
    elif a.squeue_after or a.new_job_id is not None:
        raise Fail("--squeue-after and --new-job-id need --squeue-before")
    if not checked:
        raise Fail("nothing to verify: give the databases and/or the squeue outputs")
    for p in problems:
        say(f"MISMATCH: {p}")
    if not problems:
        say("verified")
    return 1 if problems else 0


# =========================================================================== rollback


def cmd_rollback(a: argparse.Namespace) -> int:
    q = shlex.quote
    say(f"""# Rollback to the old controller {a.old_controller}. Nothing on the old server was changed by
# the move (copy-state and dump-accounting only read), so its state and database are as they were
# at the cutover.
#
# 1. Stop the new controllers (backup first, so it does not take over) and slurmdbd:
#      on each new controller:  systemctl stop slurmctld ; on {a.new_dbd_host}: systemctl stop slurmdbd
#
# 2. Decide what to carry back. If no job was submitted or ran after the cutover, skip to 3.
#    Otherwise carry the new state and accounting back, or those jobs are lost:
#      on the new primary:   tar -C {q(a.new_state_dir)} --numeric-owner -cpf state-rollback.tar .
#      on the old server:    mkdir /var/tmp/state-rollback && tar -C /var/tmp/state-rollback --numeric-owner -xpf state-rollback.tar
#                            mv {q(a.old_state_dir)} {q(a.old_state_dir)}.before-rollback
#                            python3 slurm_move.py copy-state /var/tmp/state-rollback {q(a.old_state_dir)} --owner slurm
#      accounting:           python3 slurm_move.py dump-accounting --host <DB writer endpoint> --user slurm \\
#                                --password-file <file> --output acct-rollback.sql
#                            python3 slurm_move.py load-accounting --dump acct-rollback.sql --socket /run/mysqld/mysqld.sock \\
#                                --user root --replace
#    (23.11 writes state and accounting that an older release cannot read: carrying back works only
#    when the old cluster runs 23.11 too. Otherwise the jobs of the new side are lost.)
#
# 3. Point the compute nodes back: restore their previous /etc/slurm/slurm.conf (the SlurmctldHost
#    lines of {a.old_controller}) and restart slurmd on every node (munge key unchanged).
#
# 4. Start the old daemons, slurmdbd first:
#      systemctl enable --now slurmdbd ; systemctl enable --now slurmctld
#      scontrol update PartitionName=<each> State=UP
#
# 5. Check: {SQUEUE_CMD} > squeue-rollback.txt
#      python3 slurm_move.py verify --squeue-before squeue-before.txt --squeue-after squeue-rollback.txt
#    and point the portal's SLURM_CONTROLLER_HOST back at the old server.""")
    return 0


# =========================================================================== main


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("drain-check", help="drain commands; check squeue/sdiag output")
    p.add_argument("--slurm-conf", type=Path, help="the old slurm.conf (for its partitions)")
    p.add_argument("--partition", action="append", help="a partition to drain (repeatable)")
    p.add_argument("--squeue", type=Path, help=f"output of {SQUEUE_CMD}")
    p.add_argument("--sdiag", type=Path, help="output of sdiag")
    p.set_defaults(func=cmd_drain_check)

    p = sub.add_parser("manifest", help="JSON list of a state directory with sha256")
    p.add_argument("dir", type=Path)
    p.set_defaults(func=cmd_manifest)

    p = sub.add_parser("copy-state", help="copy StateSaveLocation into the shared state tree")
    p.add_argument("src", type=Path)
    p.add_argument("dest", type=Path)
    p.add_argument("--owner", help="USER[:GROUP] for every copied entry (default: keep the numeric owners)")
    p.add_argument("--cluster-name", help="refuse unless SRC/clustername says this")
    p.add_argument("--expect-manifest", type=Path, help="the old server's `manifest` output; SRC must match it")
    p.add_argument("--replace", action="store_true", help="move a non-empty DEST aside first")
    p.add_argument("--force", action="store_true", help="copy a directory that does not look like Slurm state")
    p.set_defaults(func=cmd_copy_state)

    p = sub.add_parser("dump-accounting", help="dump slurm_acct_db")
    add_db_args(p)
    p.add_argument("--database", default=DEFAULT_DB)
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--net-buffer-length", type=parse_size, default=1 << 20,
                   help="upper bound of one multi-row INSERT (default 1M)")
    p.add_argument("--dump-tool", help="mariadb-dump or mysqldump (default: whichever is on PATH)")
    p.add_argument("--client", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_dump)

    p = sub.add_parser("load-accounting", help="load a dump into Galera through the DB writer endpoint")
    add_db_args(p)
    p.add_argument("--database", default=DEFAULT_DB)
    p.add_argument("--dump", type=Path, required=True)
    p.add_argument("--replace", action="store_true",
                   help="drop the tables already in the database first (e.g. the empty schema a new slurmdbd made)")
    p.add_argument("--max-chunk-bytes", type=parse_size, default=16 << 20,
                   help="SQL bytes per transaction at most (default 16M; lowered to fit wsrep_max_ws_size)")
    p.add_argument("--ws-safety", type=int, default=4,
                   help="keep a transaction's SQL under wsrep_max_ws_size / this (default 4)")
    p.add_argument("--statements-per-commit", type=int, default=20, help="INSERT statements per transaction (20)")
    p.add_argument("--keep-definer", action="store_true", help="keep DEFINER clauses of routines")
    p.add_argument("--require-galera", action="store_true", help="refuse a target with wsrep off")
    p.add_argument("--client", help="mariadb or mysql client binary")
    p.set_defaults(func=cmd_load)

    p = sub.add_parser("verify", help="compare accounting and pending jobs before/after")
    add_db_args(p, "source_", "old database")
    add_db_args(p, "target_", "new database")
    p.add_argument("--source-database", default=DEFAULT_DB)
    p.add_argument("--target-database", default=DEFAULT_DB)
    p.add_argument("--source-summary", type=Path, help="the dump's .summary.json instead of the old database")
    p.add_argument("--allow-growth", action="store_true",
                   help="after the new controllers ran: the target may have more rows and higher job ids")
    p.add_argument("--squeue-before", type=Path, help=f"old controller, at the drain: {SQUEUE_CMD}")
    p.add_argument("--squeue-after", type=Path, help="new controller, after its start: the same command")
    p.add_argument("--new-job-id", type=int, help="id of a test job submitted to the new controller")
    p.add_argument("--client", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("rollback", help="print the way back to the old controller")
    p.add_argument("--old-controller", default="<old server>")
    p.add_argument("--old-state-dir", default="/var/spool/slurmctld")
    p.add_argument("--new-state-dir", default="/slurm/state")
    p.add_argument("--new-dbd-host", default="<slurmdbd host>")
    p.set_defaults(func=cmd_rollback)
    return ap


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return int(a.func(a))
    except Fail as e:
        print(f"slurm_move {a.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
