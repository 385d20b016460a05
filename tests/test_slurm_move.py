"""tools/slurm_move.py: Slurm's state and accounting move to the new controllers.

Offline:
- drain-check prints the drain for every partition of the old slurm.conf and refuses
  while squeue shows running jobs or sdiag shows records slurmdbd has not received;
- copy-state copies a StateSaveLocation with its modes and owners, checks every file by
  sha256, refuses a clustername that does not match, and writes the marker that lets
  the real hpc-slurm-state-guard start slurmctld on the copy (and only then);
- verify finds pending jobs lost in the move and job ids that start over;
- load-accounting refuses a dump with a table Galera cannot take, before connecting.

With real daemons (marker `daemons`), in a private network namespace: slurmdbd 22.05
creates slurm_acct_db in a plain MariaDB (munged with a temporary key), sacctmgr adds
the cluster, an account and a user, and job rows (completed, failed, cancelled and
pending, with steps and batch scripts) are inserted directly, since no slurmd can run
here. dump-accounting dumps it over TCP; load-accounting loads it through TCP into a
single-node Galera cluster whose wsrep_max_ws_size (128 KiB) is far below the dump, so
only the chunked load gets through (one transaction per table is refused by Galera,
checked as the negative control); verify compares row counts and job ids; and a second
slurmdbd on the Galera copy answers sacct with exactly the jobs the first one reports.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.loadfile import load_file, load_tool

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "slurm_move.py"
GUARD = ROOT / "cloud_init" / "scripts" / "hpc-slurm-state-guard"
FIXTURES = ROOT / "tests" / "fixtures" / "slurm"

sm = load_tool("slurm_move")

is_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (ownership of copied files)")


def run(*args: Any, prefix: list[str] | None = None, env: dict[str, str] | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*(prefix or []), sys.executable, str(TOOL), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


# =============================================================================== drain


def test_marker_name_matches_the_state_guard():
    guard = load_file(GUARD)
    assert sm.MARKER_NAME == guard.MARKER_NAME


def test_drain_check_prints_the_drain_and_refuses_running_jobs(tmp_path):
    r = run("drain-check", "--slurm-conf", FIXTURES / "old-center" / "slurm.conf")
    assert r.returncode == 0, r.stderr
    for p in ("normal", "big", "gpu", "viz"):
        assert f"scontrol update PartitionName={p} State=DOWN\n" in r.stdout
    assert r.stdout.index("State=DOWN") < r.stdout.index("systemctl disable --now slurmctld") \
        < r.stdout.index("systemctl disable --now slurmdbd")

    (tmp_path / "squeue.txt").write_text("JOBID STATE\n2498 PENDING\n2499_[1-4] PENDING\n2400 COMPLETED\n"
                                         "2450 RUNNING\n2451 COMPLETING\n")
    (tmp_path / "sdiag.txt").write_text("*******\nServer thread count: 3\nDBD Agent queue size: 17\n")
    r = run("drain-check", "--partition", "normal", "--squeue", tmp_path / "squeue.txt", "--sdiag",
            tmp_path / "sdiag.txt")
    assert r.returncode == 1
    assert "NOT DRAINED" in r.stdout and "2450(RUNNING)" in r.stdout and "2451(COMPLETING)" in r.stdout
    assert "NOT SYNCED" in r.stdout and "17 record(s)" in r.stdout

    (tmp_path / "squeue.txt").write_text("2498 PD\n2499_[1-4] PENDING\n2400 COMPLETED\n")
    (tmp_path / "sdiag.txt").write_text("DBD Agent queue size: 0\n")
    r = run("drain-check", "--partition", "normal", "--squeue", tmp_path / "squeue.txt", "--sdiag",
            tmp_path / "sdiag.txt")
    assert r.returncode == 0, r.stdout
    assert "2 pending, 0 still running" in r.stdout and "drained" in r.stdout


# =============================================================================== state


def make_state(root: Path, cluster: str = "koocae") -> Path:
    """A StateSaveLocation as slurmctld leaves it (file names of 22.05)."""
    src = root / "spool" / "slurmctld"
    (src / "hash.3" / "job.1003").mkdir(parents=True)
    files: dict[str, bytes | str] = {
        "clustername": cluster + "\n",
        "job_state": os.urandom(4096), "job_state.old": os.urandom(4000), "node_state": os.urandom(512),
        "part_state": os.urandom(300), "resv_state": b"", "trigger_state": os.urandom(64),
        "assoc_mgr_state": os.urandom(900), "fed_mgr_state": os.urandom(10), "last_config_lite": "ClusterName=x\n",
        "hash.3/job.1003/script": "#!/bin/bash\nsrun hostname\n", "hash.3/job.1003/environment": os.urandom(700),
    }
    for rel, data in files.items():
        p = src / rel
        p.write_bytes(data if isinstance(data, bytes) else data.encode())
        p.chmod(0o600)
    (src / "hash.3").chmod(0o700)
    (src / "last_config_lite").chmod(0o644)
    (src / "job_state.link").symlink_to("job_state")
    return src


def mountinfo(path: Path, efs: Path) -> Path:
    path.write_text("22 1 259:1 / / rw,relatime shared:1 - ext4 /dev/root rw\n"
                    f"98 22 0:52 / {efs} rw,relatime shared:40 - nfs4 fs-0123.efs.example:/ rw,vers=4.1\n")
    return path


def guard(state: Path, tmp: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(GUARD), "--state-dir", str(state), "--slurm-user", "slurm",
                           "--first-init-record", str(tmp / "first-init"),
                           "--mountinfo", str(mountinfo(tmp / "mountinfo", tmp / "efs"))],
                          capture_output=True, text=True, timeout=30)


@is_root
def test_copy_state_keeps_every_byte_mode_and_owner_and_satisfies_the_guard(tmp_path):
    src = make_state(tmp_path)
    efs = tmp_path / "efs"
    efs.mkdir()
    dest = efs / "state"
    # Without the copy, the guard refuses the empty directory (no --allow-first-init).
    dest.mkdir()
    assert guard(dest, tmp_path).returncode == 1

    (tmp_path / "old.manifest.json").write_text(run("manifest", src).stdout)
    r = run("copy-state", src, dest, "--owner", "slurm", "--cluster-name", "koocae", "--expect-manifest",
            tmp_path / "old.manifest.json")
    assert r.returncode == 0, r.stderr
    slurm = pwd.getpwnam("slurm")
    want, got = sm.manifest(src), sm.manifest(dest)
    assert set(want) == set(got) and len(got) == 16  # root, 2 dirs, 12 files, 1 link
    for rel, e in want.items():
        g = got[rel]
        assert (g["type"], g["mode"], g.get("sha256"), g.get("target")) == \
            (e["type"], e["mode"], e.get("sha256"), e.get("target")), rel
        assert (g["uid"], g["gid"]) == (slurm.pw_uid, slurm.pw_gid), rel
    assert (dest / "job_state").read_bytes() == (src / "job_state").read_bytes()
    assert os.readlink(dest / "job_state.link") == "job_state"
    marker = json.loads((dest / sm.MARKER_NAME).read_text())
    assert marker["copied_from"] == str(src) and marker["manifest_sha256"] == sm.manifest_digest(want)
    assert not list(efs.glob(".state.partial-*"))
    g = guard(dest, tmp_path)
    assert g.returncode == 0 and "has its marker" in g.stdout, g.stderr

    # A second copy over it is refused, or moves it aside with --replace.
    r = run("copy-state", src, dest, "--owner", "slurm")
    assert r.returncode == 1 and "not empty" in r.stderr
    r = run("copy-state", src, dest, "--owner", "slurm", "--replace")
    assert r.returncode == 0, r.stderr
    assert len(list(efs.glob("state.replaced-*"))) == 1


@is_root
def test_copy_state_refusals(tmp_path):
    src = make_state(tmp_path)
    (tmp_path / "efs").mkdir()
    r = run("copy-state", src, tmp_path / "efs" / "state", "--cluster-name", "hpc")
    assert r.returncode == 1 and "'koocae'" in r.stderr and "slurm.cluster_name" in r.stderr
    assert not (tmp_path / "efs" / "state").exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    r = run("copy-state", tmp_path / "other", tmp_path / "efs" / "state")
    assert r.returncode == 1 and "not a StateSaveLocation" in r.stderr
    # The old server's list must match what arrived (a file changed in transit).
    (tmp_path / "old.manifest.json").write_text(run("manifest", src).stdout)
    (src / "node_state").write_bytes(b"changed")
    r = run("copy-state", src, tmp_path / "efs" / "state", "--expect-manifest", tmp_path / "old.manifest.json")
    assert r.returncode == 1 and "node_state: sha256" in r.stderr
    assert not (tmp_path / "efs" / "state").exists()


def test_manifest_comparison_names_each_difference():
    a = {".": {"type": "dir", "mode": "0700", "uid": 1, "gid": 1},
         "job_state": {"type": "file", "mode": "0600", "uid": 1, "gid": 1, "size": 3, "sha256": "aa"}}
    b = json.loads(json.dumps(a))
    assert sm.compare_manifests(a, b, None) == []
    b["job_state"]["mode"] = "0644"
    b["extra"] = {"type": "file"}
    problems = sm.compare_manifests(a, b, None)
    assert "job_state: mode is '0644' in the copy, '0600' in the source" in problems
    assert "extra in the copy: extra" in problems
    assert sm.compare_manifests(a, json.loads(json.dumps(a)), (5, 5)) != []  # owners must be the mapped ones


# =============================================================================== verify


def test_verify_finds_lost_pending_jobs_and_restarted_job_ids(tmp_path):
    before, after = tmp_path / "before.txt", tmp_path / "after.txt"
    before.write_text("2498 PENDING\n2499 PENDING\n2500 PENDING\n2400 COMPLETED\n")
    after.write_text("2498 PENDING\n2499 RUNNING\n2500 PENDING\n")
    r = run("verify", "--squeue-before", before, "--squeue-after", after, "--new-job-id", 2501)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3 before, 3 still there after (1 have since started or ended)" in r.stdout

    after.write_text("2498 PENDING\n")
    r = run("verify", "--squeue-before", before, "--squeue-after", after, "--new-job-id", 7)
    assert r.returncode == 1
    assert "pending jobs lost in the move: 2499 2500" in r.stdout
    assert "got id 7, not above 2500" in r.stdout
    r = run("verify")
    assert r.returncode == 1 and "nothing to verify" in r.stderr


# =============================================================================== dumps


DUMP_SAMPLE = r"""/*M!999999\- enable the sandbox mode */
-- MariaDB dump 10.19
/*!40101 SET NAMES utf8mb4 */;
/*!40014 SET @OLD_UNIQUE_CHECKS=@@UNIQUE_CHECKS, UNIQUE_CHECKS=0 */;

DROP TABLE IF EXISTS `hpc_job_table`;
CREATE TABLE `hpc_job_table` (
  `job_db_inx` bigint(20) unsigned NOT NULL AUTO_INCREMENT,
  `id_job` int(10) unsigned NOT NULL,
  `job_name` tinytext NOT NULL,
  `time_submit` bigint(20) unsigned NOT NULL DEFAULT 0,
  PRIMARY KEY (`job_db_inx`)
) ENGINE=InnoDB DEFAULT CHARSET=latin1;
LOCK TABLES `hpc_job_table` WRITE;
INSERT INTO `hpc_job_table` VALUES (1,1001,'a),(b',5),(2,1002,'it\'s \\',6),(3,1003,'x;y\n(z)',7);
UNLOCK TABLES;
CREATE TABLE `nopk` (
  `a` int NOT NULL
) ENGINE=MyISAM;
DELIMITER ;;
CREATE DEFINER="slurm"@"localhost" PROCEDURE "p"()
begin select 1; end ;;
DELIMITER ;
"""


def test_dump_statements_values_and_keys(tmp_path):
    dump = tmp_path / "d.sql"
    dump.write_text(DUMP_SAMPLE)
    stmts = list(sm.iter_statements(iter(DUMP_SAMPLE.splitlines(keepends=True))))
    assert [s.kind for s in stmts] == ["header", "header", "ddl", "ddl", "skip", "insert", "skip", "ddl", "routine"]
    assert stmts[-1].delimiter == ";;" and stmts[-1].text.endswith("end")
    head, tuples = sm.insert_parts(stmts[5].text)
    assert head == "INSERT INTO `hpc_job_table` VALUES "
    assert tuples == ["(1,1001,'a),(b',5)", "(2,1002,'it\\'s \\\\',6)", "(3,1003,'x;y\\n(z)',7)"]
    assert sm.tuple_fields(tuples[0]) == ["1", "1001", "'a),(b'", "5"]
    info = sm.analyse_dump(dump)
    assert info.tables == {"hpc_job_table": 3, "nopk": 0}
    assert info.primary_key == {"hpc_job_table": True, "nopk": False}
    assert info.jobs["hpc_job_table"]["max_id_job"] == 1003 and info.routines == ["procedure p"]
    assert sm.strip_definer(stmts[-1].text).startswith('CREATE PROCEDURE "p"()')


def test_load_refuses_a_table_galera_cannot_take_before_connecting(tmp_path):
    dump = tmp_path / "d.sql"
    dump.write_text(DUMP_SAMPLE)
    # Port 9 of a TEST-NET address: a connection attempt would fail differently (and slowly).
    r = run("load-accounting", "--dump", dump, "--host", "192.0.2.1", "--port", "9", timeout=30)
    assert r.returncode == 1
    assert "nopk: no PRIMARY KEY" in r.stdout and "nopk: engine MyISAM" in r.stdout
    assert "refusing to load: Galera needs a primary key" in r.stderr


def test_rollback_prints_the_way_back():
    r = run("rollback", "--old-controller", "hpc-master", "--old-state-dir", "/var/spool/slurmctld")
    assert r.returncode == 0
    for step in ("systemctl stop slurmctld", "copy-state /var/tmp/state-rollback /var/spool/slurmctld",
                 "load-accounting --dump acct-rollback.sql", "restart slurmd on every node",
                 "systemctl enable --now slurmdbd ; systemctl enable --now slurmctld"):
        assert step in r.stdout, step


# =============================================================================== daemons

GALERA = "/usr/lib/galera/libgalera_smm.so"
SRC_PORT, DST_PORT, GALERA_BASE_PORT = 33071, 33072, 45681
DBD_PORTS = (36819, 36820)
WS_MAX = 128 * 1024
SLURM_PW = "Sl#rm\\pa ss-7"  # '#', a backslash and a space: every escape the config files need
N_JOBS, FIRST_JOB, PENDING = 1500, 1001, 5


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (namespaces, daemons as mysql/munge)"
    for exe in ("mariadbd", "mariadb-install-db", "mariadb", "mariadb-dump", "slurmdbd", "sacctmgr", "sacct",
                "munged", "unshare", "nsenter", "ip"):
        if not shutil.which(exe) and not os.path.exists(f"/usr/sbin/{exe}"):
            return f"{exe} is not installed"
    if not os.path.exists(GALERA):
        return f"{GALERA} is missing (galera-4)"
    return None


def _q(v: Any) -> str:
    if isinstance(v, int):
        return str(v)
    return "'" + str(v).replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n").replace("\t", "\\t") + "'"


def _inserts(table: str, rows: list[dict[str, Any]], per: int) -> list[str]:
    cols = list(rows[0])
    head = f"INSERT INTO `{table}` ({', '.join(f'`{c}`' for c in cols)}) VALUES "
    return [head + ",".join("(" + ",".join(_q(r[c]) for c in cols) + ")" for r in rows[i:i + per]) + ";"
            for i in range(0, len(rows), per)]


def jobs_sql(cluster: str, id_assoc: int) -> str:
    """Job, step and batch-script rows as slurmdbd records them (slurmd cannot run here, so
    no job can really run): completed, failed and cancelled jobs with two steps each, and
    PENDING jobs at the end."""
    import hashlib
    import random

    r = random.Random(7)
    scripts = []
    for i in range(40):
        body = ("#!/bin/bash\n#SBATCH -N 2\n# it's a \"quoted\" script; a \\ backslash, a tab\t, ünïcode 한글\n"
                + f"srun ./solver --case {i}\n" * 20)
        scripts.append({"hash_inx": i + 1, "script_hash": hashlib.sha256(body.encode()).hexdigest(),
                        "batch_script": body})
    jobs, steps = [], []
    t0 = 1767225600  # 2026-01-01
    for k in range(N_JOBS):
        state = 0 if k >= N_JOBS - PENDING else r.choice([3, 3, 3, 4, 5])  # PENDING, COMPLETE, CANCELLED, FAILED
        ts = t0 + k * 60
        start = 0 if state == 0 else ts + 30
        end = 0 if state == 0 else start + r.randint(60, 86400)
        nodes = f"cpu[{k % 30 + 1:03d}-{k % 30 + 2:03d}]"
        jobs.append({
            "job_db_inx": k + 1, "mod_time": ts, "account": "physics", "cpus_req": r.randint(1, 64),
            "id_assoc": id_assoc, "job_name": f"job-{k}", "work_dir": f"/home/alice/run{k}",
            "tres_alloc": f"1={r.randint(1, 64)},2={r.randint(1000, 64000)},4=2" if state else "",
            "tres_req": f"1={r.randint(1, 64)},2={r.randint(1000, 64000)},4=2", "id_job": FIRST_JOB + k,
            "id_user": 1000, "id_group": 1000, "id_resv": 0, "id_wckey": 0, "het_job_id": 0,
            "het_job_offset": 4294967294, "state_reason_prev": 0, "nodelist": nodes if state else "None assigned",
            "nodes_alloc": 2 if state else 0, "partition": "normal", "priority": 1000 + k,
            "script_hash_inx": r.randint(1, 40), "state": state, "timelimit": 1440, "time_submit": ts,
            "time_eligible": ts, "time_start": start, "time_end": end,
            "submit_line": f"sbatch --job-name=job-{k} run.sh",
        })
        if state:
            for sid, name in ((-5, "batch"), (0, "solver")):
                steps.append({"job_db_inx": k + 1, "id_step": sid, "nodelist": nodes, "nodes_alloc": 2, "state": 3,
                              "step_name": name, "task_cnt": 2, "time_start": start, "time_end": end,
                              "tres_alloc": "1=2,2=4000"})
    out = _inserts(f"{cluster}_job_script_table", scripts, 10)
    out += _inserts(f"{cluster}_job_table", jobs, 200) + _inserts(f"{cluster}_step_table", steps, 300)
    return "\n".join(out) + "\n"


class Env:
    """Everything runs in one private network namespace (only loopback plus an address on
    a veth end, which Slurm's getaddrinfo(AI_ADDRCONFIG) needs); every daemon is started
    here and stopped by its PID."""

    def __init__(self) -> None:
        self.work = Path(tempfile.mkdtemp(prefix="hpc-acct-", dir="/tmp"))
        self.work.chmod(0o755)
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.ns: list[str] = []

    # -- processes -------------------------------------------------------------
    def start(self, name: str, argv: list[str], netns: bool = True, **kw: Any) -> subprocess.Popen[bytes]:
        log = open(self.work / f"{name}.out", "wb")  # noqa: SIM115 (closed with the process)
        p = subprocess.Popen((self.ns if netns else []) + argv, stdin=subprocess.DEVNULL, stdout=log,
                             stderr=subprocess.STDOUT, **kw)
        log.close()
        self.procs.append((name, p))
        return p

    def stop(self, name: str) -> None:
        for n, p in self.procs:
            if n == name and p.poll() is None:
                os.kill(p.pid, signal.SIGTERM)
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    os.kill(p.pid, signal.SIGKILL)
                    p.wait(10)

    def stop_all(self) -> None:
        for name, _ in reversed(self.procs):
            self.stop(name)

    def out(self, name: str) -> str:
        p = self.work / f"{name}.out"
        return p.read_text(errors="replace")[-3000:] if p.exists() else ""

    def wait_for(self, what: str, check: Any, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if proc.poll() is not None:
                raise RuntimeError(f"{what}: exited with {proc.returncode}\n{self.out(what)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what}: not ready after {timeout} s\n{self.out(what)}")
            time.sleep(0.1)

    def sh(self, argv: list[str], netns: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run((self.ns if netns else []) + argv, capture_output=True, text=True, timeout=120, **kw)

    # -- MariaDB ---------------------------------------------------------------
    def sock(self, port: int) -> str:
        return str(self.work / "run" / f"mysqld-{port}.sock")

    def sql(self, port: int, query: str, database: str | None = None, check: bool = True) -> str:
        argv = ["mariadb", "-uroot", f"--socket={self.sock(port)}", "--batch", "--skip-column-names"]
        r = subprocess.run(argv + ([database] if database else []), input=query, capture_output=True, text=True,
                           timeout=120)
        if check and r.returncode != 0:
            raise RuntimeError(f"SQL on {port} failed: {r.stderr}")
        return r.stdout if check else r.stdout + r.stderr

    def mariadb(self, port: int, galera: bool) -> None:
        datadir = self.work / f"db-{port}"
        extra = ["--skip-log-bin"]
        if galera:
            extra = ["--wsrep-on=ON", f"--wsrep-provider={GALERA}", "--wsrep-cluster-address=gcomm://",
                     "--wsrep-cluster-name=hpc_test", "--wsrep-node-address=127.0.0.1",
                     f"--wsrep-provider-options=base_port={GALERA_BASE_PORT};gmcast.listen_addr=tcp://127.0.0.1:"
                     f"{GALERA_BASE_PORT};gcache.size=32M",
                     f"--wsrep-max-ws-size={WS_MAX}", "--binlog-format=ROW", "--innodb-autoinc-lock-mode=2",
                     "--default-storage-engine=InnoDB"]
        p = self.start(f"mariadb-{port}", [
            "mariadbd", "--no-defaults", f"--datadir={datadir}", f"--socket={self.sock(port)}", f"--port={port}",
            "--bind-address=127.0.0.1", "--user=mysql", f"--pid-file={self.work / 'run' / f'{port}.pid'}",
            "--innodb-buffer-pool-size=64M", "--innodb-flush-log-at-trx-commit=2", "--innodb-lock-wait-timeout=900",
            "--character-set-server=utf8mb4", "--collation-server=utf8mb4_general_ci", *extra])
        query, want = ("SHOW STATUS LIKE 'wsrep_ready'", ["wsrep_ready", "ON"]) if galera else ("SELECT 1", ["1"])
        self.wait_for(f"mariadb-{port}", lambda: self.sql(port, query, check=False).split() == want, p)
        pw = SLURM_PW.replace("\\", "\\\\").replace("'", "\\'")
        self.sql(port, f"CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '{pw}';"
                       "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';")

    # -- Slurm -----------------------------------------------------------------
    def slurm_confs(self, name: str, storage_port: int, dbd_port: int) -> dict[str, str]:
        etc = self.work / name
        etc.mkdir(mode=0o755)
        sock = self.work / "munge" / "munge.sock"
        (etc / "slurm.conf").write_text(
            f"ClusterName=hpc\nSlurmctldHost=localhost\nAuthType=auth/munge\nAuthInfo=socket={sock}\n"
            f"AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=localhost\n"
            f"AccountingStoragePort={dbd_port}\nAccountingStoragePass={sock}\n"
            "NodeName=cpu[001-031] State=FUTURE\nPartitionName=normal Nodes=ALL Default=YES\n")
        esc = SLURM_PW.replace("\\", "\\\\").replace("#", "\\#")
        dbd = etc / "slurmdbd.conf"
        dbd.write_text(
            f"AuthType=auth/munge\nAuthInfo=socket={sock}\nDbdHost=localhost\nDbdPort={dbd_port}\nSlurmUser=root\n"
            f"PidFile={self.work / 'run' / f'{name}-slurmdbd.pid'}\nLogFile={self.work / f'{name}-slurmdbd.log'}\n"
            f"DebugLevel=info\nStorageType=accounting_storage/mysql\nStorageHost=127.0.0.1\n"
            f"StoragePort={storage_port}\nStorageUser=slurm\nStoragePass=\"{esc}\"\nStorageLoc=slurm_acct_db\n")
        dbd.chmod(0o600)
        return {"SLURM_CONF": str(etc / "slurm.conf")}

    def slurmdbd(self, name: str, storage_port: int, dbd_port: int) -> dict[str, str]:
        env = self.slurm_confs(name, storage_port, dbd_port)
        log = self.work / f"{name}-slurmdbd.log"
        p = self.start(f"{name}-slurmdbd", ["slurmdbd", "-D"], env={**os.environ, **env})
        # "started" is logged while slurmdbd's RPC thread may still be opening its socket:
        # ready means the log line and a listening port inside the test's namespace.
        def ready() -> bool:
            if not (log.exists() and "started" in log.read_text()):
                return False
            return bool(self.sh(["ss", "-Hltn", f"sport = :{dbd_port}"]).stdout.strip())
        self.wait_for(f"{name}-slurmdbd", ready, p, 60)
        return env

    def setup(self) -> None:
        for d, owner in (("run", "mysql"), (f"db-{SRC_PORT}", "mysql"), (f"db-{DST_PORT}", "mysql"),
                         ("munge", "munge")):
            (self.work / d).mkdir(mode=0o755)
            shutil.chown(self.work / d, owner, owner)
        holder = self.start("netns", ["unshare", "--net", "sleep", "600"], netns=False)
        mine = os.readlink("/proc/self/ns/net")
        self.wait_for("netns", lambda: os.readlink(f"/proc/{holder.pid}/ns/net") != mine, holder, 10)
        self.ns = ["nsenter", f"--net=/proc/{holder.pid}/ns/net", "--"]
        for cmd in ("ip link set lo up", "ip link add hpc0 type veth peer name hpc1", "ip link set hpc0 up",
                    "ip addr add 10.254.0.1/32 dev hpc0"):
            r = self.sh(cmd.split())
            assert r.returncode == 0, f"{cmd}: {r.stderr}"
        for port in (SRC_PORT, DST_PORT):
            r = subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={self.work / f'db-{port}'}",
                                "--user=mysql", "--auth-root-authentication-method=normal", "--skip-test-db"],
                               capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, f"mariadb-install-db: {r.stdout[-2000:]}{r.stderr[-2000:]}"
        key = self.work / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
        m = self.work / "munge"
        munged = self.start("munged", ["munged", "-F", f"--key-file={key}", f"--socket={m / 'munge.sock'}",
                                       f"--pid-file={m / 'munged.pid'}", f"--seed-file={m / 'munged.seed'}",
                                       f"--log-file={m / 'munged.log'}"],
                            netns=False, user="munge", group="munge", extra_groups=[])
        self.wait_for("munged", lambda: (m / "munge.sock").exists(), munged)
        self.mariadb(SRC_PORT, galera=False)
        self.mariadb(DST_PORT, galera=True)
        self.src_env = self.slurmdbd("old", SRC_PORT, DBD_PORTS[0])
        for cmd in ("add cluster hpc", "add account physics Cluster=hpc Description=physics Organization=center",
                    "add user alice Account=physics DefaultAccount=physics"):
            r = self.sh(["sacctmgr", "-i", *cmd.split()], env={**os.environ, **self.src_env})
            assert r.returncode == 0, f"sacctmgr {cmd}: {r.stdout}{r.stderr}"
        id_assoc = int(self.sql(SRC_PORT, "SELECT id_assoc FROM hpc_assoc_table WHERE user='alice'",
                                "slurm_acct_db").strip())
        self.sql(SRC_PORT, jobs_sql("hpc", id_assoc), "slurm_acct_db")
        self.pw_file = self.work / "slurm-db-password"
        self.pw_file.write_text(SLURM_PW + "\n")
        self.pw_file.chmod(0o600)
        self.dump = self.work / "slurm_acct_db.sql"
        r = self.tool("dump-accounting", "--host", "127.0.0.1", "--port", SRC_PORT, "--user", "slurm",
                      "--password-file", self.pw_file, "--output", self.dump, "--net-buffer-length", "16K")
        assert r.returncode == 0, r.stdout + r.stderr
        self.dump_out = r.stdout

    def tool(self, *args: Any) -> subprocess.CompletedProcess[str]:
        return run(*args, prefix=self.ns)

    def db_args(self, port: int, prefix: str = "") -> list[Any]:
        return [f"--{prefix}host", "127.0.0.1", f"--{prefix}port", port, f"--{prefix}user", "slurm",
                f"--{prefix}password-file", self.pw_file]


@pytest.fixture(scope="module")
def acct() -> Iterator[Env]:
    reason = _missing()
    if reason:
        pytest.skip(reason)
    env = Env()
    try:
        env.setup()
        yield env
    finally:
        env.stop_all()
        shutil.rmtree(env.work, ignore_errors=True)


@dataclass
class Loaded:
    returncode: int
    stdout: str
    stderr: str
    replicated: int  # write sets the Galera node replicated during the load


@pytest.fixture(scope="module")
def loaded(acct: Env) -> Loaded:
    """The move itself: load-accounting through TCP (the DB writer endpoint's path)."""
    def replicated() -> int:
        return int(acct.sql(DST_PORT, "SHOW STATUS LIKE 'wsrep_replicated'").split()[1])

    before = replicated()
    r = acct.tool("load-accounting", *acct.db_args(DST_PORT), "--dump", acct.dump, "--require-galera")
    return Loaded(r.returncode, r.stdout, r.stderr, replicated() - before)


@pytest.mark.daemons
def test_slurmdbd_schema_has_a_primary_key_on_every_table(acct):
    rows = acct.sql(SRC_PORT, "SELECT t.table_name, t.engine, COUNT(c.constraint_name) FROM information_schema.tables t "
                              "LEFT JOIN information_schema.table_constraints c ON c.table_schema=t.table_schema AND "
                              "c.table_name=t.table_name AND c.constraint_type='PRIMARY KEY' WHERE "
                              "t.table_schema='slurm_acct_db' GROUP BY t.table_name, t.engine")
    tables = [line.split("\t") for line in rows.splitlines()]
    assert len(tables) >= 30 and {"hpc_job_table", "hpc_step_table", "hpc_assoc_table", "txn_table"} <= \
        {t[0] for t in tables}
    assert [t for t in tables if t[1] != "InnoDB" or t[2] != "1"] == []
    assert f"primary keys: all {len(tables)} tables have one and are InnoDB" in acct.dump_out
    assert f"hpc_job_table: {N_JOBS} job rows, highest job id {FIRST_JOB + N_JOBS - 1}" in acct.dump_out


@pytest.mark.daemons
def test_one_transaction_per_table_is_refused_by_galera(acct):
    """The negative control: the job table in one transaction is larger than the write-set
    limit, so an unchunked load cannot work on this cluster."""
    stmts = [s for s in sm.iter_statements(open(acct.dump, encoding="utf-8")) if s.table == "hpc_job_table"]
    create = next(s.text for s in stmts if s.text.startswith("CREATE TABLE"))
    inserts = [s.text for s in stmts if s.kind == "insert"]
    assert sum(map(len, inserts)) > WS_MAX
    sql = ("CREATE DATABASE ws_probe; USE ws_probe;\n" + create + ";\nSTART TRANSACTION;\n"
           + ";\n".join(inserts) + ";\nCOMMIT;\n")
    out = acct.sql(DST_PORT, sql, check=False)
    assert "Maximum writeset size exceeded" in out
    assert acct.sql(DST_PORT, "SELECT COUNT(*) FROM ws_probe.hpc_job_table").strip() == "0"
    acct.sql(DST_PORT, "DROP DATABASE ws_probe")


@pytest.mark.daemons
def test_load_goes_through_in_chunks_under_the_write_set_limit(acct, loaded):
    assert loaded.returncode == 0, loaded.stdout + loaded.stderr
    out = loaded.stdout
    assert "Galera cluster of 1, Primary/Synced" in out and f"wsrep_max_ws_size {WS_MAX}" in out
    m = re.search(r"loaded (\d+) transactions \(largest (\d+) bytes of SQL; (\d+) split", out)
    assert m, out
    chunks, largest, splits = map(int, m.groups())
    assert chunks > 10 and largest <= WS_MAX // 4 and splits == 0
    assert loaded.replicated >= chunks  # every chunk was a replicated write set
    assert f"job ids hpc_job_table max {FIRST_JOB + N_JOBS - 1} as in the dump" in out
    routines = acct.sql(DST_PORT, "SELECT routine_name FROM information_schema.routines WHERE "
                                  "routine_schema='slurm_acct_db' ORDER BY 1").split()
    assert routines == ["get_coord_qos", "get_parent_limits"]
    # Rows came over byte for byte (quotes, backslashes, tabs, UTF-8 in the batch scripts).
    q = "SELECT SHA2(GROUP_CONCAT(batch_script ORDER BY hash_inx SEPARATOR '|'), 256) FROM hpc_job_script_table"
    assert acct.sql(DST_PORT, q, "slurm_acct_db") == acct.sql(SRC_PORT, q, "slurm_acct_db")


@pytest.mark.daemons
def test_verify_compares_the_old_and_new_accounting(acct, loaded):
    assert loaded.returncode == 0
    r = acct.tool("verify", *acct.db_args(SRC_PORT, "source-"), *acct.db_args(DST_PORT, "target-"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"hpc_job_table up to job {FIRST_JOB + N_JOBS - 1}" in r.stdout and "verified" in r.stdout
    r = acct.tool("verify", "--source-summary", f"{acct.dump}.summary.json", *acct.db_args(DST_PORT, "target-"))
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.daemons
def test_slurmdbd_on_the_galera_copy_reports_the_same_jobs(acct, loaded):
    assert loaded.returncode == 0
    new_env = acct.slurmdbd("new", DST_PORT, DBD_PORTS[1])
    sacct = ["sacct", "-a", "-X", "-n", "-P", "-o", "jobid,state,jobname,elapsed", "-S", "2000-01-01",
             "-E", "2038-01-01", "-M", "hpc"]
    old = acct.sh(sacct, env={**os.environ, **acct.src_env})
    new = acct.sh(sacct, env={**os.environ, **new_env})
    assert old.returncode == 0 and new.returncode == 0, old.stderr + new.stderr
    lines = new.stdout.splitlines()
    assert len(lines) == N_JOBS and new.stdout == old.stdout
    pending = [x.split("|")[0] for x in lines if x.split("|")[1] == "PENDING"]
    assert pending == [str(FIRST_JOB + N_JOBS - PENDING + i) for i in range(PENDING)]
    assoc = ["sacctmgr", "-n", "-P", "show", "assoc", "format=cluster,account,user"]
    assert acct.sh(assoc, env={**os.environ, **new_env}).stdout == acct.sh(assoc, env={**os.environ, **acct.src_env}).stdout
    assert "hpc|physics|alice" in acct.sh(assoc, env={**os.environ, **new_env}).stdout


@pytest.mark.daemons
def test_write_set_errors_split_the_chunk_and_verify_catches_a_lost_row(acct):
    # Chunks sized to the full limit: Galera refuses some, the loader halves and retries them.
    r = acct.tool("load-accounting", "--socket", acct.sock(DST_PORT), "--user", "root", "--database", "acct_retry",
                  "--dump", acct.dump, "--ws-safety", "1", "--statements-per-commit", "1000")
    assert r.returncode == 0, r.stdout + r.stderr
    m = re.search(r"(\d+) split after a write-set-size error", r.stdout)
    assert m and int(m.group(1)) > 0, r.stdout
    target = ["--target-socket", acct.sock(DST_PORT), "--target-user", "root", "--target-database", "acct_retry"]
    r = acct.tool("verify", *acct.db_args(SRC_PORT, "source-"), *target)
    assert r.returncode == 0, r.stdout + r.stderr
    acct.sql(DST_PORT, f"DELETE FROM hpc_job_table WHERE id_job={FIRST_JOB + 10}", "acct_retry")
    for extra in ([], ["--allow-growth"]):
        r = acct.tool("verify", *acct.db_args(SRC_PORT, "source-"), *target, *extra)
        assert r.returncode == 1 and "MISMATCH: table hpc_job_table" in r.stdout, r.stdout
    # Loading over an existing database needs --replace, which replaces its tables.
    args = ["--socket", acct.sock(DST_PORT), "--user", "root", "--database", "acct_retry", "--dump", acct.dump]
    r = acct.tool("load-accounting", *args)
    assert r.returncode == 1 and "already has" in r.stderr
    r = acct.tool("load-accounting", *args, "--replace")
    assert r.returncode == 0 and re.search(r"dropping the \d+ existing tables", r.stdout), r.stdout + r.stderr
    r = acct.tool("verify", *acct.db_args(SRC_PORT, "source-"), *target)
    assert r.returncode == 0, r.stdout + r.stderr
    acct.sql(DST_PORT, "DROP DATABASE acct_retry")
