"""The reference portal (examples/reference-portal): its Flask services through the test
client, against REAL backends started on loopback ports (redis-server and redis-sentinel
from the Debian packages, a MariaDB from offline/mariadb.py) and fake Slurm client
commands on PATH; the websocket service as a real gunicorn behind a real HAProxy; and the
build script's artifact (pure-Python wheels only, installed offline)."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from offline.mariadb import APP_PASSWORD, APP_USER, MariaDB, mariadb  # noqa: F401  (session fixture)
from tests.conftest import Tally

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "reference-portal"
sys.path.insert(0, str(EXAMPLE / "app"))

from portal import slurm as portal_slurm  # noqa: E402
from portal.app import Backends, add_user, create_app  # noqa: E402
from portal.db import Database  # noqa: E402
from portal.reconcile import Reconciler  # noqa: E402
from portal.redisha import NoMaster, SentinelMaster  # noqa: E402
from portal.settings import Settings  # noqa: E402
from portal.ws import PUBLISH, RESYNC, Hub, Keys  # noqa: E402

PW = "redis-Pw-1"
MASTER = "portal-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def need(tool: str, package: str) -> str:
    path = shutil.which(tool) or (tool if os.path.exists(tool) else None)
    if path is None:
        pytest.fail(f"{tool} is not installed (Debian package {package}; tools/install-debian-deps.sh)")
    return path


def wait_for(pred: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            v = pred()
            if v:
                return v
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# --------------------------------------------------------------------------- Redis


class RedisLab:
    """redis-server and redis-sentinel processes on loopback ports, stopped by PID."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="h12-redis-"))
        self.procs: list[subprocess.Popen[bytes]] = []

    def server(self, replica_of: int | None = None) -> tuple[int, subprocess.Popen[bytes]]:
        port = free_port()
        extra = ["--replicaof", "127.0.0.1", str(replica_of), "--masterauth", PW] if replica_of else []
        d = self.dir / f"redis-{port}"  # own directory: a full sync writes dump.rdb
        d.mkdir()
        p = subprocess.Popen([need("redis-server", "redis-server"), "--port", str(port), "--bind", "127.0.0.1",
                              "--requirepass", PW, "--save", "", "--appendonly", "no", "--dir", str(d), *extra],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(p)
        wait_for(lambda: redis.Redis(port=port, password=PW, socket_timeout=1).ping(), 10, f"redis on {port}")
        return port, p

    def sentinel(self, master_port: int, down_after_ms: int = 600000) -> int:
        port = free_port()
        conf = self.dir / f"sentinel-{port}.conf"
        conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {self.dir}\nsentinel resolve-hostnames no\n"
                        f"requirepass {PW}\nsentinel sentinel-pass {PW}\n"
                        f"sentinel monitor {MASTER} 127.0.0.1 {master_port} 2\n"
                        f"sentinel auth-pass {MASTER} {PW}\n"
                        # No failover during a test (a paused master stays the master).
                        f"sentinel down-after-milliseconds {MASTER} {down_after_ms}\n"
                        f"sentinel failover-timeout {MASTER} 10000\n")
        self.procs.append(subprocess.Popen([need("redis-sentinel", "redis-sentinel"), str(conf)],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_for(lambda: redis.Redis(port=port, password=PW, socket_timeout=1).execute_command(
            "SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER), 10, f"sentinel on {port}")
        return port

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
                os.kill(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(p.pid, signal.SIGKILL)
                p.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def lab() -> Iterator[dict[str, Any]]:
    """Master A watched by three Sentinels; a second server B that one stale Sentinel
    believes is the master."""
    rl = RedisLab()
    try:
        a, _pa = rl.server()
        b, _pb = rl.server()
        good = [rl.sentinel(a) for _ in range(3)]
        stale = rl.sentinel(b)
        yield {"lab": rl, "a": a, "b": b, "sentinels": good, "stale": stale}
    finally:
        rl.stop()


def sentinels(ports: list[int]) -> tuple[tuple[str, int], ...]:
    return tuple(("127.0.0.1", p) for p in ports)


@pytest.mark.daemons
def test_discovery_takes_the_master_a_majority_reports_not_the_first_answer(lab: dict[str, Any], tally: Tally) -> None:
    order = [lab["stale"], *lab["sentinels"][:2]]  # the stale Sentinel answers first
    # redis-py's own discovery takes the first answer: the wrong master.
    from redis.sentinel import Sentinel
    naive = Sentinel(list(sentinels(order)), sentinel_kwargs={"password": PW, "socket_timeout": 1})
    tally.check(naive.discover_master(MASTER) == ("127.0.0.1", lab["b"]), "redis-py follows the first Sentinel")
    sm = SentinelMaster(sentinels(order), MASTER, PW, PW, timeout=1.0)
    answers = sm.ask_sentinels()
    tally.check(sorted(answers.values()) == sorted([f"127.0.0.1:{lab['b']}"] + [f"127.0.0.1:{lab['a']}"] * 2), str(answers))
    tally.check(sm.call(lambda r: r.ping()) is True)
    tally.check(sm.address == ("127.0.0.1", lab["a"]), f"majority wins: {sm.address}")
    # One Sentinel for each of two masters plus one that is down: no majority, no master.
    split = SentinelMaster(sentinels([lab["stale"], lab["sentinels"][0], free_port()]), MASTER, PW, PW, timeout=0.5)
    with pytest.raises(NoMaster, match="no master reported by 2 of 3"):
        split.discover()
    tally.check(True)
    tally.expect(5)


@pytest.mark.daemons
def test_a_paused_sentinel_costs_discovery_nothing_and_a_late_failure_keeps_the_new_master(
        lab: dict[str, Any], tally: Tally) -> None:
    """The Sentinels are asked at once and discovery ends when a majority agrees: a
    paused Sentinel (on the paused master's host) no longer costs every discovery its
    socket time-out. A thread whose command failed on a client that is no longer the
    one in use does not forget the one another thread found since."""
    tally.expect(7)
    rl = lab["lab"]
    paused = rl.procs[2]  # the first of the three good Sentinels (after servers A and B)
    sm = SentinelMaster(sentinels(lab["sentinels"]), MASTER, PW, PW, timeout=1.0)
    os.kill(paused.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        sm.discover().close()
        took = time.monotonic() - t0
        tally.check(took < 0.5, f"discovery with a paused Sentinel took {took:.2f} s (time-out 1 s)")
        tally.check(sm.address == ("127.0.0.1", lab["a"]), str(sm.address))
        t0 = time.monotonic()
        answers = sm.ask_sentinels()  # every answer: the paused one's after its time-out
        tally.check(answers[f"127.0.0.1:{lab['sentinels'][0]}"].startswith("error: Timeout")
                    and time.monotonic() - t0 >= 0.9, str(answers))
    finally:
        os.kill(paused.pid, signal.SIGCONT)
    # An exiting interpreter starts no new threads: the Sentinels are asked in turn.
    import concurrent.futures

    def refuse(*a: Any, **k: Any) -> Any:
        raise RuntimeError("cannot schedule new futures after interpreter shutdown")
    real_submit = concurrent.futures.ThreadPoolExecutor.submit
    concurrent.futures.ThreadPoolExecutor.submit = refuse  # type: ignore[method-assign]
    try:
        tally.check(len(sm.ask_sentinels(majority=True)) == 3, "asked in turn when no thread can start")
    finally:
        concurrent.futures.ThreadPoolExecutor.submit = real_submit  # type: ignore[method-assign]
    old = sm.master()
    sm.forget()
    new = sm.master()
    sm.forget(old)  # a late failure on the old client
    tally.check(sm.master() is new, "a failure on a client no longer in use dropped the current one")
    sm.forget(new)
    tally.check(sm.address is None, "a failure on the client in use forgets it")
    tally.check(sm.call(lambda r: r.ping()) is True)


@pytest.mark.daemons
def test_a_master_refusing_writes_for_want_of_replicas_is_forgotten(lab: dict[str, Any], tally: Tally) -> None:
    """An isolated master refuses writes with NOREPLICAS (min-replicas-to-write): the
    client must not stay on it but discover again on the next call."""
    import redis

    tally.expect(3)
    sm = SentinelMaster(sentinels(lab["sentinels"]), MASTER, PW, PW, timeout=1.0)
    tally.check(sm.call(lambda r: r.ping()) is True and sm.address == ("127.0.0.1", lab["a"]), str(sm.address))
    a = redis.Redis(port=lab["a"], password=PW, socket_timeout=2)
    a.config_set("min-replicas-to-write", 1)  # lab A has no replica: every write is refused
    try:
        with pytest.raises(redis.ResponseError, match="NOREPLICAS"):
            sm.call(lambda r: r.set("hpc-norepl", "1"))
        tally.check(sm.address is None, f"still on {sm.address}")
    finally:
        a.config_set("min-replicas-to-write", 0)
    tally.check(sm.call(lambda r: r.set("hpc-norepl", "1")) is True)


@pytest.mark.daemons
def test_forgetting_the_master_leaves_another_threads_command_alone(lab: dict[str, Any], tally: Tally) -> None:
    """One thread forgets the master (its call failed) while another is in the middle of
    a command on the same client: that command completes (it used to die with ValueError,
    'I/O operation on closed file', outside ERRORS: a 500)."""
    import threading

    m = SentinelMaster(sentinels(lab["sentinels"]), MASTER, PW, PW, timeout=3.0)
    m.call(lambda r: r.ping())
    out: list[Any] = []

    def slow() -> None:
        try:
            out.append(m.call(lambda r: r.blpop(["portal:test:never"], timeout=1)))
        except Exception as e:  # noqa: BLE001 - recorded and judged below
            out.append(e)

    t = threading.Thread(target=slow)
    t.start()
    time.sleep(0.3)  # BLPOP is waiting on its connection
    m.forget()
    t.join(10)
    tally.check(out == [None], f"the other thread's command: {out!r}")
    tally.check(m.call(lambda r: r.ping()) is True, "the next call discovers the master again")
    tally.expect(2)


@pytest.mark.daemons
def test_a_paused_master_times_out_within_the_socket_timeout(tally: Tally) -> None:
    rl = RedisLab()
    try:
        port, proc = rl.server()
        s = [rl.sentinel(port)]
        sm = SentinelMaster(sentinels(s), MASTER, PW, PW, timeout=0.5)
        tally.check(sm.call(lambda r: r.set("k", "v")) is True)
        os.kill(proc.pid, signal.SIGSTOP)  # accepts TCP (kernel backlog), never answers
        try:
            t0 = time.monotonic()
            with pytest.raises(redis.TimeoutError):
                sm.call(lambda r: r.get("k"))
            took = time.monotonic() - t0
            tally.check(took < 1.5, f"a command on the paused master took {took:.2f} s (time-out 0.5 s)")
            tally.check(sm.address is None, "the master is forgotten after a time-out")
            # Discovery again: the Sentinel still names it, ROLE on it times out.
            t0 = time.monotonic()
            with pytest.raises((redis.TimeoutError, redis.ConnectionError)):
                sm.call(lambda r: r.get("k"))
            took = time.monotonic() - t0
            tally.check(took < 2.5, f"discovery against the paused master took {took:.2f} s")
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        tally.check(sm.call(lambda r: r.get("k")) == "v", "back once the master answers again")
    finally:
        rl.stop()
    tally.expect(5)


def test_threads_that_waited_for_a_failed_discovery_fail_with_it_instead_of_queueing(tally: Tally) -> None:
    """During a failover a discovery takes up to twice the socket time-out; 40 threads
    asking at once must not run 40 of them one after another: those that waited for a
    failed one fail with it (NoMaster, a redis error: a 503), the next call tries again."""
    from portal.redisha import NoMaster

    sm = SentinelMaster((("127.0.0.1", 1),), MASTER, PW, PW, timeout=1.0)
    runs: list[float] = []

    def slow_failure() -> redis.Redis:
        runs.append(time.monotonic())
        time.sleep(0.5)
        raise redis.TimeoutError("Timeout reading from socket")

    sm.discover = slow_failure  # type: ignore[method-assign]
    errors: list[BaseException] = []

    def one() -> None:
        try:
            sm.master()
        except redis.RedisError as e:
            errors.append(e)

    t0 = time.monotonic()
    threads = [threading.Thread(target=one) for _ in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    took = time.monotonic() - t0
    tally.check(len(errors) == 40 and all(isinstance(e, redis.RedisError) for e in errors), str(errors[:3]))
    # the first runs one; those that queued meanwhile fail with it; a straggler may run one more
    tally.check(1 <= len(runs) <= 3 and took < 3, f"{len(runs)} discoveries, {took:.2f} s for 40 threads")
    tally.check(sum(isinstance(e, NoMaster) and "waited for" in str(e) for e in errors) >= 37, str(errors[-1]))
    # a call after the failure tries again (no back-off): the master is found once it is there
    master = redis.Redis(port=1)
    sm.discover = lambda: master  # type: ignore[method-assign]
    tally.check(sm.master() is master)
    tally.expect(4)


@pytest.mark.daemons
def test_after_a_sentinel_failover_the_client_finds_the_new_master_and_fails_fast_meanwhile(tally: Tally) -> None:
    rl = RedisLab()
    try:
        a, _pa = rl.server()
        b, _pb = rl.server(replica_of=a)
        wait_for(lambda: redis.Redis(port=b, password=PW).info("replication")["master_link_status"] == "up", 30,
                 "the replica in sync")
        s = [rl.sentinel(a, down_after_ms=5000) for _ in range(3)]
        sm = SentinelMaster(sentinels(s), MASTER, PW, PW, timeout=1.0)
        tally.check(sm.call(lambda r: r.set("k", "before")) is True and sm.address == ("127.0.0.1", a))
        for port in s:
            wait_for(lambda p=port: redis.Redis(port=p, password=PW).execute_command("SENTINEL", "REPLICAS", MASTER),
                     20, "the Sentinels to know the replica")
        # Sentinel promotes only a replica whose INFO it has seen recently with its link up
        # (refreshed every 10 s): NOGOODSLAVE until then, so ask again for a while.
        def failover() -> bool:
            try:
                redis.Redis(port=s[0], password=PW).execute_command("SENTINEL", "FAILOVER", MASTER)
                return True
            except redis.ResponseError as e:
                if "NOGOODSLAVE" not in str(e):
                    raise
                return False
        wait_for(failover, 30, "Sentinel to accept the failover")
        failures: list[str] = []
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            try:
                sm.call(lambda r: r.set("k", "after"))
                if sm.address == ("127.0.0.1", b):
                    break
            except redis.RedisError as e:
                failures.append(f"{type(e).__name__} in {time.monotonic() - t0:.2f}s")
                tally.check(time.monotonic() - t0 < 4.5, f"a call during the failover took {time.monotonic() - t0:.2f} s")
            time.sleep(0.2)
        tally.check(sm.address == ("127.0.0.1", b), f"the new master is found: {sm.address}, failures {failures}")
        tally.check(redis.Redis(port=b, password=PW, decode_responses=True).get("k") == "after")
        role = redis.Redis(port=a, password=PW, decode_responses=True).execute_command("ROLE")[0]
        tally.check(role == "slave", f"the old master was demoted: {role}")
    finally:
        rl.stop()
    tally.expect(4)


# ------------------------------------------------------------------------ fake Slurm

FAKE_SLURM = r'''#!PYTHON
"""Fake Slurm client commands over a JSON file (the queue and the accounting)."""
import json, os, sys
STATE = os.environ["FAKE_SLURM_STATE"]
cmd = os.path.basename(sys.argv[0])
args = sys.argv[1:]
db = json.load(open(STATE)) if os.path.exists(STATE) else {"next": 100, "jobs": {}}
with open(STATE + ".log", "a") as f:
    f.write(cmd + " " + " ".join(args) + "\n")
def opt(name):
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None
if cmd == "scontrol" and args[0] == "ping":
    print("Slurmctld(primary) at ctl-1 is UP")
elif cmd == "scontrol" and args[0] == "release":
    db["jobs"][args[1]]["held"] = False
    json.dump(db, open(STATE, "w"))
elif cmd == "scontrol" and args[0] == "update":
    kv = dict(a.split("=", 1) for a in args[1:])
    db["jobs"][kv["JobId"]]["comment"] = kv["Comment"]
    json.dump(db, open(STATE, "w"))
elif cmd == "scancel":
    for job in args:
        db["jobs"][job]["state"] = "CANCELLED"
    json.dump(db, open(STATE, "w"))
elif cmd == "sbatch":
    job = str(db["next"]); db["next"] += 1
    db["jobs"][job] = {"state": "PENDING", "comment": opt("--comment"), "done": False, "held": "--hold" in args,
                       "hidden": os.path.exists(STATE + ".in-flight")}
    json.dump(db, open(STATE, "w"))
    if os.path.exists(STATE + ".in-flight"):  # still on its way into the controller: unseen, unanswered
        os.unlink(STATE + ".in-flight")
        print("sbatch: error: Socket timed out on send/recv operation", file=sys.stderr)
        sys.exit(1)
    if os.path.exists(STATE + ".lose-answer"):  # queued, but the caller never hears
        os.unlink(STATE + ".lose-answer")
        print("sbatch: error: Socket timed out on send/recv operation", file=sys.stderr)
        sys.exit(1)
    print(job + ";cluster")
elif cmd == "squeue":
    fmt, only, states = opt("-o"), opt("-j"), opt("--states")
    for job, j in db["jobs"].items():
        if j["done"] or j.get("hidden") or (only and job != only) or (states == "PENDING" and j["state"] != "PENDING"):
            continue
        print(fmt.replace("%i", job).replace("%T", j["state"]).replace("%k", j["comment"] or "(null)")
                 .replace("%r", "JobHeldUser" if j.get("held") else "None"))
elif cmd == "sacct":
    fields, only = opt("-o").split(","), opt("-j")
    for job, j in db["jobs"].items():
        if j.get("hidden") or (only and job not in only.split(",")):
            continue
        print("|".join({"JobID": job, "State": j["state"], "Comment": j["comment"] or ""}[f] for f in fields))
'''


def set_job(state_file: Path, job: str, state: str, done: bool = False) -> None:
    db = json.loads(state_file.read_text())
    db["jobs"][job].update(state=state, done=done)
    state_file.write_text(json.dumps(db))


@pytest.fixture
def fake_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bindir = tmp_path / "slurm-bin"
    bindir.mkdir()
    for cmd in ("sbatch", "squeue", "sacct", "scontrol", "scancel"):
        p = bindir / cmd
        p.write_text(FAKE_SLURM.replace("PYTHON", sys.executable, 1))
        p.chmod(0o755)
    state = tmp_path / "slurm.json"
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_STATE", str(state))
    return state


# ----------------------------------------------------------------------- the services


@pytest.fixture(scope="module")
def db_ready(mariadb: MariaDB) -> MariaDB:  # noqa: F811
    mariadb.reset()
    mariadb.sql("DROP DATABASE IF EXISTS portal_auth")
    mariadb.sql("CREATE DATABASE portal_auth CHARACTER SET utf8mb4")
    for host in ("127.0.0.1", "localhost"):
        mariadb.sql(f"GRANT ALL PRIVILEGES ON `portal_auth`.* TO '{APP_USER}'@'{host}'")
    return mariadb


def settings(service: str, lab: dict[str, Any], db: MariaDB, **kw: Any) -> Settings:
    base: dict[str, Any] = dict(
        service=service, port=0, server_id="app-test-1", health_path={"api": "/api/health", "auth": "/auth/health",
                                                                     "cae": "/health", "ws": "/ws/health"}[service],
        sentinels=sentinels(lab["sentinels"]), master_name=MASTER, redis_password=PW, sentinel_password=PW,
        redis_timeout=1.0, db_host="127.0.0.1", db_port=db.port, db_user=APP_USER, db_password=APP_PASSWORD,
        db_name=f"portal_{service}", cluster="test", cookie_secure=False, poll_interval=0.5,
        reconcile_jobs=False)  # a background reconciler would act on other tests' journal rows
    base.update(kw)
    return Settings(**base)


@pytest.fixture
def apps(lab: dict[str, Any], db_ready: MariaDB, fake_slurm: Path) -> dict[str, Any]:
    out = {}
    for svc in ("auth", "api", "cae"):
        s = settings(svc, lab, db_ready)
        out[svc] = create_app(s, Backends(s)).test_client()
    add_user(Backends(settings("auth", lab, db_ready)), "alice", "alice-Pw-123")
    return out


def login(apps: dict[str, Any]) -> str:
    r = apps["auth"].post("/auth/login", json={"username": "alice", "password": "alice-Pw-123"})
    assert r.status_code == 200, r.get_json()
    sid = apps["auth"].get_cookie("sid").value
    for c in apps.values():
        c.set_cookie("sid", sid)
    return str(sid)


def master(lab: dict[str, Any]) -> redis.Redis:
    return redis.Redis(port=lab["a"], password=PW, decode_responses=True)


@pytest.mark.daemons
def test_sessions_live_in_redis_and_deleting_the_key_logs_out(apps: dict[str, Any], lab: dict[str, Any],
                                                              tally: Tally) -> None:
    bad = apps["auth"].post("/auth/login", json={"username": "alice", "password": "wrong-password"})
    tally.check(bad.status_code == 401)
    tally.check(apps["cae"].get("/cae/whoami").status_code == 401)
    before = apps["auth"].get("/auth/session").get_json()["session"]
    tally.check(master(lab).exists(f"portal:session:{before}") == 1)
    sid = login(apps)
    tally.check(len(sid) == 32 and "alice" not in sid, "the cookie is only an id")
    tally.check(sid != before and master(lab).exists(f"portal:session:{before}") == 0, "a new session id at login")
    stored = json.loads(master(lab).get(f"portal:session:{sid}") or "{}")
    tally.check(stored.get("user") == "alice", stored)
    tally.check(0 < master(lab).ttl(f"portal:session:{sid}") <= 8 * 3600)
    # Another service (another server, in production) reads the same session.
    tally.check(apps["cae"].get("/cae/whoami").get_json()["user"] == "alice")
    tally.check(apps["auth"].get("/auth/me").get_json() == {"user": "alice"})
    master(lab).delete(f"portal:session:{sid}")
    tally.check(apps["auth"].get("/auth/me").status_code == 401, "deleting the key logs out")
    tally.check(apps["cae"].get("/cae/whoami").status_code == 401)
    # Logout deletes the key.
    sid = login(apps)
    tally.check(apps["auth"].post("/auth/logout", json={}).status_code == 200)
    tally.check(master(lab).exists(f"portal:session:{sid}") == 0)
    tally.expect(13)


@pytest.mark.daemons
def test_a_session_that_cannot_be_saved_is_a_503_never_a_500(apps: dict[str, Any], lab: dict[str, Any],
                                                             monkeypatch: pytest.MonkeyPatch, tally: Tally) -> None:
    """Saving the session runs after the view, outside the app's error handlers: Redis
    failing there (a master killed mid-request, before Sentinel promotes another) gave a
    500 in the rehearsal's redis drill. A new session that could not be written is a 503
    without a cookie; a failed TTL renewal of an existing one leaves the answer alone."""
    api = apps["api"]
    known = api.get("/api/session").get_json()["session"]
    iface = api.application.session_interface
    real = iface.redis

    class WritesFail:  # reads work, SET and EXPIRE fail as on a master gone mid-request
        def call(self, fn: Any) -> Any:
            class R:
                def __getattr__(self, name: str) -> Any:
                    if name in ("set", "expire"):
                        raise redis.ConnectionError("Connection closed by server.")
                    return getattr(real.master(), name)
            return fn(R())

    monkeypatch.setattr(iface, "redis", WritesFail())
    r = api.get("/api/session")  # the known session: only its TTL renewal fails
    tally.check(r.status_code == 200 and r.get_json()["session"] == known, r.get_json())
    fresh = create_app(api.application.extensions["portal"].s, api.application.extensions["portal"]).test_client()
    fresh.application.session_interface.redis = WritesFail()  # type: ignore[attr-defined]
    r = fresh.get("/api/session")
    tally.check(r.status_code == 503, f"{r.status_code} {r.get_data(as_text=True)}")
    tally.check(r.get_json()["error"].startswith("session store unavailable: ConnectionError"), r.get_json())
    tally.check("Set-Cookie" not in r.headers, "no cookie for a session that does not exist")
    tally.expect(4)


@pytest.mark.daemons
def test_health_answers_200_with_every_check_and_503_when_one_fails(apps: dict[str, Any], lab: dict[str, Any],
                                                                    db_ready: MariaDB, tally: Tally) -> None:
    for svc, path in (("api", "/api/health"), ("auth", "/auth/health"), ("cae", "/health")):
        r = apps[svc].get(path)
        tally.check(r.status_code == 200, f"{svc}: {r.get_json()}")
        tally.check(r.get_json()["checks"] == {"redis": "ok", "database": "ok", "slurm": "ok"}, r.get_json())
    # A new process that never reached a backend is not ready (the gate, the LB's first rise).
    s = settings("api", lab, db_ready, sentinels=sentinels([free_port()]), redis_timeout=0.3)
    r = create_app(s, Backends(s)).test_client().get("/api/health")
    tally.check(r.status_code == 503 and r.get_json()["status"] == "unhealthy", r.get_json())
    tally.check(r.get_json()["checks"]["redis"].startswith("error: NoMaster"), r.get_json())
    tally.check(r.get_json()["why"] == "redis never reached since start", r.get_json())
    # Nothing listens on the DB writer's port: this host's own fault, a 503 at once.
    s = settings("api", lab, db_ready, db_port=free_port())
    r = create_app(s, Backends(s)).test_client().get("/api/health")
    tally.check(r.status_code == 503 and r.get_json()["checks"]["database"].startswith("error:"), r.get_json())
    tally.check("refuses connections" in r.get_json()["why"], r.get_json())
    # No controller answering: reported, not a 503 (that would take every server out at once).
    s = settings("api", lab, db_ready)
    b = Backends(s)

    class NoSlurm:
        def check(self) -> str:
            return "error: no slurmctld answers scontrol ping (rc 1: -)"
    b.slurm = NoSlurm()  # type: ignore[assignment]
    r = create_app(s, b).test_client().get("/api/health")
    tally.check(r.status_code == 200 and r.get_json()["status"] == "degraded", r.get_json())
    tally.check(r.get_json()["checks"]["slurm"].startswith("error: no slurmctld"), r.get_json())
    tally.expect(13)


def test_a_shared_backend_failing_over_degrades_the_check_and_only_a_long_or_local_fault_fails_it(
        monkeypatch: pytest.MonkeyPatch, tally: Tally) -> None:
    """The LB's check must not take every server out while Redis or the Galera writer
    fails over (every server shares them): 200 "degraded" inside the grace, 503 past it,
    503 at once when the local DB writer refuses connections."""
    import pymysql
    from portal import app as portal_app

    clock = [1000.0]
    monkeypatch.setattr(portal_app.time, "monotonic", lambda: clock[0])
    faults: dict[str, Exception | None] = {"redis": None, "database": None}

    class FakeRedis:
        def call(self, fn: Any) -> Any:
            if faults["redis"]:
                raise faults["redis"]
            return True

    class FakeDb:
        def query(self, sql: str, args: Any = None) -> tuple[int, list[Any]]:
            if faults["database"]:
                raise faults["database"]
            return 1, [(1,)]

    class Pong:
        def check(self) -> str:
            return "ok"

    s = Settings(service="api", port=5010, server_id="app-1", health_path="/api/health",
                 sentinels=(("127.0.0.1", 1),), master_name=MASTER, redis_password=PW, sentinel_password=PW,
                 redis_timeout=1.0, db_host="127.0.0.1", db_port=3306, db_user=APP_USER, db_password="x",
                 db_name="portal_api", cluster="test", cookie_secure=False, poll_interval=0.5)
    b = Backends.__new__(Backends)
    b.s, b.redis, b.db, b.slurm = s, FakeRedis(), FakeDb(), Pong()  # type: ignore[assignment]
    w = portal_app.HealthWatcher(s, b)
    faults["database"] = pymysql.err.OperationalError(2013, "Lost connection to MySQL server during query")
    doc, code = w.work_out()
    tally.check(code == 503 and doc["why"] == "database never reached since start", doc)
    faults["database"] = None
    tally.check(w.work_out() == ({"status": "healthy", "checks": {"redis": "ok", "database": "ok", "slurm": "ok"},
                                  "service": "api", "server": "app-1"}, 200))
    # The writer fails over: degraded, in service, for the whole grace.
    faults["database"] = pymysql.err.OperationalError(2013, "Lost connection to MySQL server during query")
    faults["redis"] = NoMaster("no Sentinel majority")
    for dt in (0.0, 10.0, portal_app.DEPENDENCY_GRACE_S):
        clock[0] = 1000.0 + dt
        doc, code = w.work_out()
        tally.check(code == 200 and doc["status"] == "degraded", f"{dt}: {doc}")
    clock[0] += 1.0
    doc, code = w.work_out()
    tally.check(code == 503 and doc["why"].startswith("redis failing for 31 s"), doc)
    # Back: the grace starts over with the next fault.
    faults["database"] = faults["redis"] = None
    tally.check(w.work_out()[1] == 200)
    faults["redis"] = NoMaster("no Sentinel majority")
    tally.check(w.work_out()[1] == 200)
    faults["redis"] = None
    faults["database"] = pymysql.err.OperationalError(
        2003, "Can't connect to MySQL server on '127.0.0.1' ([Errno 111] Connection refused)")
    doc, code = w.work_out()
    tally.check(code == 503 and "refuses connections" in doc["why"], doc)
    # A round that hangs on a backend (a frozen writer holds SELECT 1 for its read
    # time-out): degraded from HEALTH_HUNG_S, a 503 only once the verdict is stale.
    faults["database"] = None
    w.rounds.set(w.work_out(), at=clock[0])  # no thread: the test sets the verdict's age itself
    tally.check(w.verdict()[0]["status"] == "healthy")
    clock[0] += portal_app.HEALTH_HUNG_S + 1
    doc, code = w.verdict()
    tally.check(code == 200 and doc["status"] == "degraded" and "a backend hangs" in doc["note"], doc)
    clock[0] = w.rounds.at + portal_app.HEALTH_STALE_S + 1
    doc, code = w.verdict()
    tally.check(code == 503 and "s old" in doc["why"], doc)
    tally.expect(12)


@pytest.mark.daemons
def test_records_and_session_probes_keep_the_stand_in_semantics(apps: dict[str, Any], tally: Tally) -> None:
    api = apps["api"]
    first = api.get("/api/session").get_json()
    tally.check(first["new"] is True)
    tally.check(api.get("/api/session").get_json() == {**first, "new": False})
    tally.check(api.post("/api/records", json={"request_id": "r-1", "payload": "x"}).get_json()["duplicate"] is False)
    tally.check(api.post("/api/records", json={"request_id": "r-1", "payload": "x"}).get_json()["duplicate"] is True)
    tally.check(api.get("/api/records/r-1").status_code == 200)
    tally.check(api.get("/api/records/r-2").status_code == 404)
    doc = api.post("/api/records/missing", json={"ids": ["r-1", "r-2"]}).get_json()
    tally.check(doc["missing"] == ["r-2"] and doc["duplicates"] == 0, doc)
    tally.check(api.post("/api/records", json={"request_id": "bad id!"}).status_code == 400)
    tally.expect(8)


@pytest.mark.daemons
def test_job_submission_is_idempotent_by_request_id(apps: dict[str, Any], fake_slurm: Path, tally: Tally) -> None:
    api = apps["api"]
    tally.check(api.post("/api/jobs", json={"request_id": "req-1", "name": "a"}).status_code == 401, "login first")
    login(apps)
    r1 = api.post("/api/jobs", json={"request_id": "req-1", "name": "a", "seconds": 60}).get_json()
    tally.check(r1 == {"job_id": "100", "request_id": "req-1", "created": True, "server": "app-test-1"}, str(r1))
    r2 = api.post("/api/jobs", json={"request_id": "req-1", "name": "a", "seconds": 60}).get_json()
    tally.check(r2 == {**r1, "created": False, "found_in": "squeue"}, str(r2))
    # sbatch queues the job but its answer is lost: 503; the retry (the id in an
    # Idempotency-Key header this time) finds it in squeue.
    (fake_slurm.parent / "slurm.json.lose-answer").touch()
    lost = api.post("/api/jobs", json={"request_id": "req-2", "name": "b", "seconds": 60})
    tally.check(lost.status_code == 503 and "retry with the same request id" in lost.get_json()["error"],
                str(lost.get_json()))
    retry = api.post("/api/jobs", json={"name": "b", "seconds": 60}, headers={"Idempotency-Key": "req-2"}).get_json()
    tally.check(retry["job_id"] == "101" and retry["created"] is False and retry["request_id"] == "req-2", str(retry))
    # A job that already left the controller is found in accounting (sacct).
    set_job(fake_slurm, "100", "COMPLETED", done=True)
    again = api.post("/api/jobs", json={"request_id": "req-1", "name": "a", "seconds": 60}).get_json()
    tally.check(again["job_id"] == "100" and again["found_in"] == "sacct", str(again))
    sbatches = [line for line in (fake_slurm.parent / "slurm.json.log").read_text().splitlines()
                if line.startswith("sbatch")]
    tally.check(len(sbatches) == 2 and "--comment=pending/req-1" in sbatches[0] and "--comment=pending/req-2" in sbatches[1], str(sbatches))
    tally.check(api.get("/api/jobs/100").get_json() == {"job_id": "100", "state": "COMPLETED"})
    tally.check(api.get("/api/jobs/101").get_json() == {"job_id": "101", "state": "PENDING"})
    mine = api.get("/api/jobs").get_json()["jobs"]
    tally.check(sorted(j["job_id"] for j in mine) == ["100", "101"], mine)
    tally.check(api.post("/api/jobs", json={"seconds": -1}).status_code == 400)
    tally.check(api.post("/api/jobs", json={"seconds": True}).status_code == 400)
    tally.check(api.post("/api/jobs", data="name=x", content_type="application/x-www-form-urlencoded").status_code
                == 415, "a form post (cross-site) is refused")
    tally.expect(13)


def fake_jobs(state_file: Path) -> dict[str, dict[str, Any]]:
    return dict(json.loads(state_file.read_text())["jobs"])


def unhide(state_file: Path, job: str) -> None:
    """The straggler's sbatch reaches the controller at last (a backup taking over works
    off the requests queued meanwhile)."""
    db = json.loads(state_file.read_text())
    db["jobs"][job]["hidden"] = False
    state_file.write_text(json.dumps(db))


def test_a_job_is_submitted_held_and_released_only_once_its_request_id_is_settled(
        apps: dict[str, Any], fake_slurm: Path, tally: Tally) -> None:
    """The two phases (portal/slurm.py): every sbatch is --hold; the job the client gets
    was released by scontrol; an attempt the portal gave up on that turns into a job after
    its retry settled (the rehearsal's slurm drill: an sbatch killed at the portal's 20 s
    time-out, created by the backup at 21 s) stays held, never runs, and loses to the
    released job when the request id is settled again."""
    api = apps["api"]
    login(apps)
    r1 = api.post("/api/jobs", json={"request_id": "req-h1", "name": "a", "seconds": 60}).get_json()
    jobs = fake_jobs(fake_slurm)
    tally.check(r1["created"] is True and jobs[r1["job_id"]]["held"] is False, f"{r1} {jobs}")
    log = (fake_slurm.parent / "slurm.json.log").read_text().splitlines()
    tally.check(any(x.startswith("sbatch --parsable --hold --comment=pending/req-h1") for x in log)
                and f"scontrol release {r1['job_id']}" in log and jobs[r1["job_id"]]["comment"] == "req-h1", str(log))
    # The first attempt is still on its way when the portal gives up on it: 503.
    (fake_slurm.parent / "slurm.json.in-flight").touch()
    first = api.post("/api/jobs", json={"request_id": "req-h2", "name": "b", "seconds": 60})
    tally.check(first.status_code == 503, first.get_json())
    straggler = max(fake_jobs(fake_slurm), key=int)
    # The retry finds nothing yet, submits its own attempt and settles on it.
    retry = api.post("/api/jobs", json={"request_id": "req-h2", "name": "b", "seconds": 60}).get_json()
    tally.check(retry["created"] is True and retry["job_id"] != straggler, str(retry))
    unhide(fake_slurm, straggler)
    jobs = fake_jobs(fake_slurm)
    tally.check(jobs[straggler]["held"] is True and jobs[retry["job_id"]]["held"] is False,
                f"the straggler cannot run: {jobs}")
    tally.check(portal_slurm.queue_states() == {r1["job_id"]: "PENDING", retry["job_id"]: "PENDING"},
                "a held attempt is no job anyone is told of")
    # Settling again (a later retry, or the reconciler): the released job answers, the
    # straggler is renamed out of the request id and cancelled.
    again = api.post("/api/jobs", json={"request_id": "req-h2", "name": "b", "seconds": 60}).get_json()
    jobs = fake_jobs(fake_slurm)
    tally.check(again["job_id"] == retry["job_id"] and again["created"] is False, str(again))
    tally.check(jobs[straggler]["comment"] == "withdrawn/req-h2" and jobs[straggler]["state"] == "CANCELLED",
                str(jobs[straggler]))
    tally.check(portal_slurm.queue_request_ids().get("req-h2") == retry["job_id"], "one job answers req-h2")
    # Two held attempts and no released job (both answers lost): the lowest id wins.
    for _ in range(2):
        (fake_slurm.parent / "slurm.json.lose-answer").touch()
        portal_slurm.run(["sbatch", "--parsable", "--hold", "--comment=pending/req-h3", "--wrap=sleep 1"])
    low, high = sorted((j for j, x in fake_jobs(fake_slurm).items() if x["comment"] == "pending/req-h3"), key=int)
    won = api.post("/api/jobs", json={"request_id": "req-h3", "name": "c", "seconds": 60}).get_json()
    jobs = fake_jobs(fake_slurm)
    tally.check(won["job_id"] == low and not jobs[low]["held"] and jobs[high]["state"] == "CANCELLED",
                f"{won} {jobs}")
    tally.expect(10)


# ------------------------------------------- controller round trips of one submission

CONTROLLER = ("squeue", "sbatch", "scontrol", "scancel")  # sacct asks slurmdbd, not slurmctld


def slurm_log(state_file: Path) -> list[str]:
    """The fake Slurm commands run so far, each as its command and first argument, but
    `scontrol ping`: the health watchers' (of this test's apps and earlier tests', whose
    threads live on) ping in the background, and one wakes up when a command of the
    test finds no controller (ControllerOrder.trouble); they are no submission's calls."""
    log = state_file.parent / (state_file.name + ".log")
    lines = log.read_text().splitlines() if log.exists() else []
    calls = [" ".join(x.split()[:2]) if x.startswith("scontrol") else x.split()[0] for x in lines]
    return [c for c in calls if c != "scontrol ping"]


def controller_calls(calls: list[str]) -> int:
    """Each one a process that, with the primary controller dead, pays a connect time-out."""
    return sum(c.split()[0] in CONTROLLER for c in calls)


def released_jobs(state_file: Path, request_id: str) -> set[str]:
    """Jobs of request_id that can run: released and not cancelled."""
    return {j for j, x in fake_jobs(state_file).items() if x["comment"] in (request_id, f"pending/{request_id}")
            and not x["held"] and x["state"] != "CANCELLED"}


class Journal:
    """submit's `journal`, recording each job id with its state at that moment."""

    def __init__(self, state_file: Path, fail: bool = False) -> None:
        self.state_file, self.fail = state_file, fail
        self.seen: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, job_id: str) -> None:
        if self.fail:
            raise RuntimeError("the journal's database is down (the test says so)")
        self.seen.append((job_id, dict(fake_jobs(self.state_file)[job_id])))

    def recorded(self) -> set[str]:
        return {job for job, _ in self.seen}


def test_client_commands_ask_the_controller_that_answers_first_while_the_primary_is_down(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tally: Tally) -> None:
    """With the primary stopped each client command pays a connect time-out to it before
    it asks the backup; while scontrol ping finds the first controller DOWN, commands get
    a slurm.conf with the one that answers first, and slurm.conf itself once it is back."""
    etc = tmp_path / "etc"
    etc.mkdir()
    conf = etc / "slurm.conf"
    conf.write_text("ClusterName=hpc\nSlurmctldHost=slurm-1(10.0.0.1)\n# the backups\n"
                    "SlurmctldHost=slurm-2(10.0.0.2)\nslurmctldhost = slurm-3(10.0.0.3)\nMessageTimeout=5\n")
    (etc / "cgroup.conf").write_text("CgroupPlugin=autodetect\n")
    monkeypatch.setenv("SLURM_CONF", str(conf))
    order = portal_slurm.ControllerOrder()
    out = {"ping": ""}
    real_run = portal_slurm.run
    monkeypatch.setattr(portal_slurm, "run", lambda argv, timeout=0, ordered=True: (1, out["ping"]) if not ordered
                        else pytest.fail("scontrol ping ran with the reordered slurm.conf"))
    w = portal_slurm.PingWatcher(order)
    out["ping"] = ("Slurmctld(primary) at slurm-1 is DOWN\nSlurmctld(backup1) at slurm-2 is DOWN\n"
                   "Slurmctld(backup2) at slurm-3 is UP\n")
    tally.check(w.ping() == "ok" and order.first() == "slurm-3" and w.pause("ok") == w.INTERVAL)
    env = order.env()
    assert env is not None
    copy = Path(env["SLURM_CONF"])
    tally.check(copy.read_text() == "ClusterName=hpc\nslurmctldhost = slurm-3(10.0.0.3)\n# the backups\n"
                "SlurmctldHost=slurm-1(10.0.0.1)\nSlurmctldHost=slurm-2(10.0.0.2)\nMessageTimeout=5\n", copy.read_text())
    tally.check((copy.parent / "cgroup.conf").resolve() == (etc / "cgroup.conf").resolve(), "files beside it are linked")
    tally.check(conf.read_text().startswith("ClusterName=hpc\nSlurmctldHost=slurm-1"), "slurm.conf itself untouched")
    # slurm.conf changes while the primary is down (a node added): the copy follows it.
    conf.write_text(conf.read_text() + "NodeName=cn005 CPUs=4\n")
    env = order.env()
    tally.check(env is not None and Path(env["SLURM_CONF"]).read_text().startswith("ClusterName=hpc\nslurmctldhost = slurm-3")
                and Path(env["SLURM_CONF"]).read_text().endswith("NodeName=cn005 CPUs=4\n"), copy.read_text())
    # A client command runs with it; one that finds no controller wakes the watcher.
    monkeypatch.setattr(portal_slurm, "run", real_run)
    monkeypatch.setattr(portal_slurm, "ORDER", order)
    woken: list[int] = []
    order.on_trouble.append(lambda: woken.append(1))
    tally.check(portal_slurm.run(["sh", "-c", "echo $SLURM_CONF"]) == (0, str(copy)))
    rc, _o = portal_slurm.run(["sh", "-c", "echo 'squeue: error: Socket timed out on send/recv operation' >&2; exit 1"])
    tally.check(rc == 1 and woken == [1] and w.answers._wake.is_set(), f"woken {woken}")
    monkeypatch.setattr(portal_slurm, "run", lambda argv, timeout=0, ordered=True: (1, out["ping"]) if not ordered
                        else pytest.fail("scontrol ping ran with the reordered slurm.conf"))
    # Every controller silent: nothing to prefer, the order stays; the first back: slurm.conf's.
    out["ping"] = "Slurmctld(primary) at slurm-1 is DOWN\nSlurmctld(backup1) at slurm-2 is DOWN\n"
    tally.check(w.ping().startswith("error: no slurmctld answers") and order.first() == "slurm-3"
                and w.pause("error") == w.INTERVAL_DOWN)
    out["ping"] = "Slurmctld(primary) at slurm-1 is UP\nSlurmctld(backup1) at slurm-2 is DOWN\n"
    tally.check(w.ping() == "ok" and order.first() is None and order.env() is None)
    out["ping"] = "Slurmctld(primary) at slurm-1 is UP\nSlurmctld(backup1) at slurm-2 is UP\n"
    tally.check(w.ping() == "ok" and w.pause("ok") == w.INTERVAL)
    tally.expect(10)


def test_a_fresh_submission_makes_four_controller_calls_and_releases_only_a_recorded_job(
        fake_slurm: Path, tally: Tally) -> None:
    """squeue (the lookup), sbatch --hold, scontrol release, scontrol update: phase 2
    settles from the lookup's squeue and sbatch's job id, with no second squeue (five
    controller calls before, each a connect time-out while the primary is dead). The job
    is recorded while it is still held; a record that fails leaves it held, and the retry
    releases that same job in three calls."""
    journal = Journal(fake_slurm)
    doc = portal_slurm.submit("req-c1", "a", 60, journal)
    calls = slurm_log(fake_slurm)
    tally.check(calls == ["squeue", "sacct", "sbatch", "scontrol release", "scontrol update"], str(calls))
    tally.check(controller_calls(calls) == 4, str(calls))
    job = doc["job_id"]
    tally.check(doc == {"job_id": job, "request_id": "req-c1", "created": True}, str(doc))
    tally.check([j for j, _ in journal.seen] == [job] and journal.seen[0][1]["held"]
                and journal.seen[0][1]["comment"] == "pending/req-c1", f"recorded while held: {journal.seen}")
    jobs = fake_jobs(fake_slurm)
    tally.check(not jobs[job]["held"] and jobs[job]["comment"] == "req-c1", str(jobs[job]))
    # The record fails (the journal's database is down): the job stays held, unreleased.
    n = len(slurm_log(fake_slurm))
    with pytest.raises(RuntimeError):
        portal_slurm.submit("req-c2", "b", 60, Journal(fake_slurm, fail=True))
    held = max(fake_jobs(fake_slurm), key=int)
    tally.check(slurm_log(fake_slurm)[n:] == ["squeue", "sacct", "sbatch"] and fake_jobs(fake_slurm)[held]["held"],
                f"{slurm_log(fake_slurm)[n:]} {fake_jobs(fake_slurm)[held]}")
    n = len(slurm_log(fake_slurm))
    again = portal_slurm.submit("req-c2", "b", 60, journal)
    calls = slurm_log(fake_slurm)[n:]
    tally.check(calls == ["squeue", "scontrol release", "scontrol update"] and controller_calls(calls) == 3, str(calls))
    tally.check(again == {"job_id": held, "request_id": "req-c2", "created": False, "found_in": "squeue"}, str(again))
    for rid in ("req-c1", "req-c2"):
        tally.check(released_jobs(fake_slurm, rid) <= journal.recorded() and len(released_jobs(fake_slurm, rid)) == 1,
                    f"{rid}: one released job, recorded: {released_jobs(fake_slurm, rid)} {journal.seen}")
    tally.expect(9)


def test_a_retry_that_finds_an_attempt_settles_it_from_its_lookup_and_never_submits_again(
        fake_slurm: Path, tally: Tally) -> None:
    """sbatch queued the attempt but its answer was lost: the retry's lookup finds it held
    and settles it from that same squeue (squeue, release, rename: three controller calls,
    four before); a later retry finds the settled job in one squeue. Neither submits."""
    journal = Journal(fake_slurm)
    (fake_slurm.parent / "slurm.json.lose-answer").touch()
    with pytest.raises(portal_slurm.SlurmError, match="retry with the same request id"):
        portal_slurm.submit("req-r1", "a", 60, journal)
    attempt = max(fake_jobs(fake_slurm), key=int)
    tally.check(fake_jobs(fake_slurm)[attempt]["held"] and journal.seen == [], "held, not recorded")
    n = len(slurm_log(fake_slurm))
    doc = portal_slurm.submit("req-r1", "a", 60, journal)
    calls = slurm_log(fake_slurm)[n:]
    tally.check(calls == ["squeue", "scontrol release", "scontrol update"], str(calls))
    tally.check(controller_calls(calls) == 3, str(calls))
    tally.check(doc == {"job_id": attempt, "request_id": "req-r1", "created": False, "found_in": "squeue"}, str(doc))
    tally.check([j for j, _ in journal.seen] == [attempt] and journal.seen[0][1]["held"], str(journal.seen))
    n = len(slurm_log(fake_slurm))
    again = portal_slurm.submit("req-r1", "a", 60, journal)
    calls = slurm_log(fake_slurm)[n:]
    tally.check(calls == ["squeue"] and again == doc, f"{calls} {again}")
    tally.check(released_jobs(fake_slurm, "req-r1") == {attempt} and len(fake_jobs(fake_slurm)) == 1,
                f"one job, released once: {fake_jobs(fake_slurm)}")
    tally.expect(7)


def test_a_straggler_that_arrives_after_the_lookup_stays_held_and_the_next_settle_withdraws_it(
        fake_slurm: Path, tally: Tally) -> None:
    """Phase 2 no longer reads squeue again, so an attempt that reaches the controller
    between the retry's lookup and its release is not seen: it stays held (it cannot
    run), the request's released job is the one the client got, and the next settle (a
    retry, or the reconciler: a held attempt next to a released job of its request id)
    withdraws it, although its job id is the lower one."""
    (fake_slurm.parent / "slurm.json.in-flight").touch()
    with pytest.raises(portal_slurm.SlurmError):
        portal_slurm.submit("req-s1", "a", 60, Journal(fake_slurm))
    straggler = max(fake_jobs(fake_slurm), key=int)

    class Arriving(Journal):
        def __call__(self, job_id: str) -> None:
            super().__call__(job_id)
            unhide(fake_slurm, straggler)  # reaches the controller while the retry records its own
    journal = Arriving(fake_slurm)
    n = len(slurm_log(fake_slurm))
    doc = portal_slurm.submit("req-s1", "a", 60, journal)
    calls = slurm_log(fake_slurm)[n:]
    tally.check(calls == ["squeue", "sacct", "sbatch", "scontrol release", "scontrol update"], str(calls))
    mine = doc["job_id"]
    jobs = fake_jobs(fake_slurm)
    tally.check(doc["created"] is True and int(straggler) < int(mine), f"{doc} {straggler}")
    tally.check(jobs[straggler]["held"] and jobs[straggler]["comment"] == "pending/req-s1"
                and jobs[straggler]["state"] == "PENDING", f"the straggler cannot run: {jobs[straggler]}")
    tally.check(released_jobs(fake_slurm, "req-s1") == {mine} <= journal.recorded(), str(jobs))
    # What the reconciler's settle_held withdraws (reconcile.py): a held attempt of a
    # request id another (released) job answers.
    queue = [j for j in portal_slurm.queued_jobs() if j.request_id == "req-s1"]
    tally.check([j.job_id for j in queue if j.waiting] == [straggler] and [j.job_id for j in queue if j.job] == [mine],
                str(queue))
    tally.check(portal_slurm.queue_states() == {mine: "PENDING"}, "a held attempt is no job anyone is told of")
    # A retry with the same request id: the released job answers (not the lower id), the
    # straggler is withdrawn, nothing is submitted.
    n = len(slurm_log(fake_slurm))
    again = portal_slurm.submit("req-s1", "a", 60, journal)
    calls = slurm_log(fake_slurm)[n:]
    jobs = fake_jobs(fake_slurm)
    tally.check(again == {"job_id": mine, "request_id": "req-s1", "created": False, "found_in": "squeue"}, str(again))
    tally.check(calls == ["squeue", "scontrol update", "scancel"], f"the withdraw only, no sbatch: {calls}")
    tally.check(jobs[straggler]["comment"] == "withdrawn/req-s1" and jobs[straggler]["state"] == "CANCELLED",
                str(jobs[straggler]))
    tally.check(released_jobs(fake_slurm, "req-s1") == {mine} and portal_slurm.settle("req-s1") == mine,
                "one job answers req-s1, also for the reconciler's settle (its own squeue)")
    tally.expect(10)



def test_a_recorded_held_job_wins_over_a_straggler_with_a_lower_job_id(fake_slurm: Path, tally: Tally) -> None:
    """A settle recorded its job A and failed before releasing it; then a straggler S of
    the same request id, with a lower job id, reached the controller. The retry must
    release A, the job the journal names (its INSERT IGNORE keeps the first record), not
    the lowest: otherwise S runs while the portal's record names a withdrawn job."""
    (fake_slurm.parent / "slurm.json.in-flight").touch()
    with pytest.raises(portal_slurm.SlurmError):
        portal_slurm.submit("req-j1", "a", 60, Journal(fake_slurm))
    straggler = max(fake_jobs(fake_slurm), key=int)
    first: list[str] = []

    class RecordThenFail(Journal):
        def __call__(self, job_id: str) -> None:
            super().__call__(job_id)
            first.append(job_id)
            unhide(fake_slurm, straggler)  # the straggler arrives
            raise RuntimeError("the submission failed after the record (the test says so)")

    with pytest.raises(RuntimeError, match="after the record"):
        portal_slurm.submit("req-j1", "a", 60, RecordThenFail(fake_slurm))
    recorded = first[0]
    jobs = fake_jobs(fake_slurm)
    tally.check(int(straggler) < int(recorded) and jobs[recorded]["held"] and jobs[straggler]["held"], str(jobs))
    journal = Journal(fake_slurm)
    doc = portal_slurm.submit("req-j1", "a", 60, journal, recorded=lambda: recorded)
    jobs = fake_jobs(fake_slurm)
    tally.check(doc["job_id"] == recorded and released_jobs(fake_slurm, "req-j1") == {recorded}, f"{doc} {jobs}")
    tally.check(jobs[straggler]["comment"] == "withdrawn/req-j1" and jobs[straggler]["state"] == "CANCELLED",
                str(jobs[straggler]))
    # Without the record the lowest held attempt would have won (the rule for attempts
    # nobody recorded), which is what the journal guards against here.
    tally.expect(3)


@pytest.mark.daemons
def test_a_job_the_portal_could_not_record_stays_held_and_the_reconciler_settles_by_the_record(
        apps: dict[str, Any], fake_slurm: Path, lab: dict[str, Any], db_ready: MariaDB,
        monkeypatch: pytest.MonkeyPatch, tally: Tally) -> None:
    """The journal comes before the release: with the database refusing the record (the
    galera-full drill: every node down), the submission answers 503 and its job stays
    held, so it cannot run while its client may give up; the retry, the database back,
    records and releases that same job. A held job nobody settled is withdrawn by the
    reconciler after ORPHAN_S when the portal has no record of it, and released when it
    has one (recorded, then the release failed)."""
    import pymysql
    from portal import reconcile

    api = apps["api"]
    login(apps)
    b = Backends(settings("api", lab, db_ready))
    b.db.query("DELETE FROM portal_jobs")
    real = Database.query

    def refusing(self: Database, sql: str, args: Any = None) -> tuple[int, list[tuple[Any, ...]]]:
        if sql.startswith("INSERT IGNORE INTO portal_jobs"):
            raise pymysql.err.OperationalError(2003, "Can't connect to MySQL server (the test refuses it)")
        return real(self, sql, args)

    monkeypatch.setattr(Database, "query", refusing)
    r = api.post("/api/jobs", json={"request_id": "req-j1", "name": "a", "seconds": 60})
    job = max(fake_jobs(fake_slurm), key=int)
    jobs = fake_jobs(fake_slurm)
    tally.check(r.status_code == 503 and jobs[job]["held"] and jobs[job]["comment"] == "pending/req-j1",
                f"{r.status_code} {r.get_json()} {jobs[job]}")
    monkeypatch.setattr(Database, "query", real)
    again = api.post("/api/jobs", json={"request_id": "req-j1", "name": "a", "seconds": 60}).get_json()
    jobs = fake_jobs(fake_slurm)
    tally.check(again["job_id"] == job and not jobs[job]["held"] and jobs[job]["comment"] == "req-j1", f"{again} {jobs[job]}")
    n, _ = b.db.query("SELECT 1 FROM portal_jobs WHERE request_id = 'req-j1' AND job_id = %s", (job,))
    tally.check(n == 1, "recorded once released")
    # Two lone held jobs: one recorded (its release failed), one not (its record failed).
    for rid in ("req-j2", "req-j3"):
        (fake_slurm.parent / "slurm.json.lose-answer").touch()
        portal_slurm.run(["sbatch", "--parsable", "--hold", f"--comment=pending/{rid}", "--wrap=sleep 1"])
    held = {x["comment"].split("/")[1]: j for j, x in fake_jobs(fake_slurm).items() if x["comment"].startswith("pending/")}
    b.db.query("INSERT INTO portal_jobs (request_id, job_id, username, name, seconds) VALUES ('req-j2', %s, 'alice', "
               "'b', 60)", (held["req-j2"],))
    rec = reconcile.Reconciler(b)
    t0 = 5000.0
    tally.check(rec.settle_held(now=t0) == [] and rec.settle_held(now=t0 + reconcile.ORPHAN_S - 1) == [],
                "younger than ORPHAN_S: left alone")
    done = rec.settle_held(now=t0 + reconcile.ORPHAN_S)
    jobs = fake_jobs(fake_slurm)
    tally.check(done == [("req-j3", held["req-j3"])] and jobs[held["req-j3"]]["state"] == "CANCELLED",
                f"the unrecorded one withdrawn: {done} {jobs[held['req-j3']]}")
    tally.check(not jobs[held["req-j2"]]["held"] and jobs[held["req-j2"]]["comment"] == "req-j2",
                f"the recorded one released: {jobs[held['req-j2']]}")
    tally.expect(6)

@pytest.mark.daemons
def test_the_reconciler_withdraws_held_attempts_nobody_settled_and_leaves_a_retry_alone(
        apps: dict[str, Any], fake_slurm: Path, lab: dict[str, Any], db_ready: MariaDB, tally: Tally) -> None:
    """A straggler next to a released job is withdrawn after HELD_MIN_S; a lone held
    attempt (its client gave up) after ORPHAN_S, not before; a request id whose
    submission lock a client holds is left to that client; a job renamed but not
    cancelled is cancelled."""
    from portal import reconcile

    b = Backends(settings("api", lab, db_ready))
    login(apps)
    b.db.query("DELETE FROM portal_jobs")
    (fake_slurm.parent / "slurm.json.in-flight").touch()
    apps["api"].post("/api/jobs", json={"request_id": "req-s1", "name": "a", "seconds": 60})
    straggler = max(fake_jobs(fake_slurm), key=int)
    ok = apps["api"].post("/api/jobs", json={"request_id": "req-s1", "name": "a", "seconds": 60}).get_json()
    unhide(fake_slurm, straggler)
    (fake_slurm.parent / "slurm.json.lose-answer").touch()
    orphan = apps["api"].post("/api/jobs", json={"request_id": "req-s2", "name": "b", "seconds": 60})
    orphan_job = max(fake_jobs(fake_slurm), key=int)
    tally.check(orphan.status_code == 503 and fake_jobs(fake_slurm)[orphan_job]["held"], "a lone held attempt")
    rec = reconcile.Reconciler(b)
    t0 = 1000.0
    tally.check(rec.settle_held(now=t0) == [], "first seen now: too young")
    tally.check(rec.settle_held(now=t0 + reconcile.HELD_MIN_S - 1) == [], "younger than HELD_MIN_S")
    done = rec.settle_held(now=t0 + reconcile.HELD_MIN_S)
    jobs = fake_jobs(fake_slurm)
    tally.check(done == [("req-s1", straggler)] and jobs[straggler]["state"] == "CANCELLED"
                and jobs[ok["job_id"]]["state"] == "PENDING" and not jobs[ok["job_id"]]["held"], f"{done} {jobs}")
    tally.check(jobs[orphan_job]["held"] and jobs[orphan_job]["state"] == "PENDING", "the lone one waits ORPHAN_S")
    master(lab).set("portal:submit:req-s2", "a-client", ex=30)
    tally.check(rec.settle_held(now=t0 + reconcile.ORPHAN_S) == [], "locked: a client's retry is settling it")
    master(lab).delete("portal:submit:req-s2")
    tally.check(rec.settle_held(now=t0 + reconcile.ORPHAN_S) == [("req-s2", orphan_job)], "withdrawn")
    jobs = fake_jobs(fake_slurm)
    tally.check(jobs[orphan_job]["comment"] == "withdrawn/req-s2" and jobs[orphan_job]["state"] == "CANCELLED",
                str(jobs[orphan_job]))
    # A later retry of req-s2 submits afresh: the withdrawn attempt is no answer.
    again = apps["api"].post("/api/jobs", json={"request_id": "req-s2", "name": "b", "seconds": 60}).get_json()
    tally.check(again["created"] is True and again["job_id"] != orphan_job, str(again))
    # A withdraw interrupted after its rename: the next pass cancels the job.
    portal_slurm.run(["sbatch", "--parsable", "--hold", "--comment=withdrawn/req-s3", "--wrap=sleep 1"])
    renamed = max(fake_jobs(fake_slurm), key=int)
    rec.settle_held(now=t0 + 2 * reconcile.ORPHAN_S)
    tally.check(fake_jobs(fake_slurm)[renamed]["state"] == "CANCELLED", "renamed, then cancelled")
    tally.expect(10)


@pytest.mark.daemons
def test_a_submission_lock_left_by_a_dead_server_lapses_and_a_live_one_is_renewed(
        apps: dict[str, Any], fake_slurm: Path, lab: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
        tally: Tally) -> None:
    """The per-request-id lock: one left by a server that died mid-submission gives 409
    only until it lapses, then the retry goes through; a submission slower than the
    lock's time-to-live keeps it (renewed), and its end releases it."""
    from portal import redisha

    monkeypatch.setattr(redisha, "SUBMIT_LOCK_MS", 900)
    api = apps["api"]
    login(apps)
    m = master(lab)
    m.set("portal:submit:req-dead", "app-dead:0123456789ab", px=900)  # its holder died
    r = api.post("/api/jobs", json={"request_id": "req-dead", "name": "d", "seconds": 60})
    tally.check(r.status_code == 409, r.get_json())
    time.sleep(1.2)
    r = api.post("/api/jobs", json={"request_id": "req-dead", "name": "d", "seconds": 60})
    tally.check(r.status_code == 200 and r.get_json()["created"] is True, r.get_json())
    tally.check(m.get("portal:submit:req-dead") is None, "released after the submission")
    # A slow sbatch (2.5 s, the lock lives 0.9 s): the lock is still held half-way.
    real = portal_slurm.submit
    seen: dict[str, Any] = {}

    def slow(rid: str, name: str, seconds: int, *rest: Any) -> dict[str, Any]:  # rest: journal, recorded
        time.sleep(2.5)
        seen["held"] = m.get(f"portal:submit:{rid}")
        return real(rid, name, seconds, *rest)
    monkeypatch.setattr(portal_slurm, "submit", slow)
    r = api.post("/api/jobs", json={"request_id": "req-slow", "name": "s", "seconds": 60})
    tally.check(r.status_code == 200, r.get_json())
    tally.check(str(seen.get("held", "")).startswith("app-test-1:"), f"renewed while sbatch ran: {seen}")
    tally.expect(5)


@pytest.mark.daemons
def test_a_job_the_controller_lost_is_submitted_again_under_its_request_id(
        apps: dict[str, Any], fake_slurm: Path, lab: dict[str, Any], db_ready: MariaDB, tally: Tally,
        monkeypatch: pytest.MonkeyPatch) -> None:
    b = Backends(settings("api", lab, db_ready))
    login(apps)
    b.db.query("DELETE FROM portal_jobs")  # only this test's jobs in the journal
    lost = apps["api"].post("/api/jobs", json={"request_id": "req-lost", "name": "c", "seconds": 30}).get_json()
    kept = apps["api"].post("/api/jobs", json={"request_id": "req-kept", "name": "d", "seconds": 30}).get_json()

    def forget(job: str) -> None:  # the backup loaded a state saved before this job was
        state = json.loads(fake_slurm.read_text())
        del state["jobs"][job]
        fake_slurm.write_text(json.dumps(state))

    def sbatches() -> list[str]:
        return [x for x in (fake_slurm.parent / "slurm.json.log").read_text().splitlines() if x.startswith("sbatch")]

    forget(lost["job_id"])
    rec = Reconciler(b)
    tally.check(rec.once() == [], "acknowledged less than MIN_AGE_S ago: not judged yet")
    b.db.query("UPDATE portal_jobs SET created = NOW(6) - INTERVAL 20 SECOND")
    # The new job is recorded while still held, as an API submission's is (a read-back
    # between its release and its record saw two jobs for one request id).
    held_when_recorded: list[bool] = []
    real = Database.query

    def watching(self: Database, sql: str, args: Any = None) -> tuple[int, list[tuple[Any, ...]]]:
        if sql.startswith("UPDATE portal_jobs SET job_id"):
            held_when_recorded.append(bool(fake_jobs(fake_slurm)[args[0]]["held"]))
        return real(self, sql, args)

    monkeypatch.setattr(Database, "query", watching)
    done = rec.once()
    monkeypatch.setattr(Database, "query", real)
    tally.check(held_when_recorded == [True], f"recorded while held: {held_when_recorded}")
    tally.check(len(done) == 1 and done[0][:2] == ("req-lost", lost["job_id"]), str(done))
    new = done[0][2] if done else "?"
    tally.check("--comment=pending/req-lost" in sbatches()[-1] and "--job-name=c" in sbatches()[-1]
                and "sleep 30" in sbatches()[-1], sbatches()[-1])
    _n, rows = b.db.query("SELECT job_id, resubmitted_from FROM portal_jobs WHERE request_id = 'req-lost'")
    tally.check(rows == [(new, lost["job_id"])], str(rows))
    tally.check(rec.once() == [] and len(sbatches()) == 3, "found in squeue now: nothing more")
    # A client's retry of the same id holds its submission lock: the reconciler waits.
    forget(new)
    master(lab).set("portal:submit:req-lost", "a-client", ex=30)
    tally.check(rec.once() == [] and len(sbatches()) == 3, "locked: left to the client's retry")
    master(lab).delete("portal:submit:req-lost")
    # No controller answers squeue: nothing can be said about any job.
    (fake_slurm.parent / "slurm-bin" / "squeue").write_text("#!/bin/sh\necho 'slurm_load_jobs error' >&2\nexit 1\n")
    with pytest.raises(portal_slurm.SlurmError):
        rec.once()
    tally.check(len(sbatches()) == 3 and kept["job_id"] not in (new,), "nothing submitted without an answer")
    tally.expect(8)


# ----------------------------------------------------------- websocket, gunicorn, HAProxy


def ws_handshake(port: int, cookie: str | None) -> str:
    """The status line of a raw websocket upgrade on /ws/."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        hdr = ("GET /ws/ HTTP/1.1\r\nHost: portal\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n")
        if cookie:
            hdr += f"Cookie: sid={cookie}\r\n"
        s.sendall((hdr + "\r\n").encode())
        return s.recv(4096).decode(errors="replace").split("\r\n", 1)[0]


def next_message(ws: Any, want: str, timeout: float = 15.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        raw = ws.receive(timeout=max(0.1, deadline - time.monotonic()))
        if raw is None:
            break
        msg = json.loads(raw)
        if msg["type"] == want:
            return dict(msg)
    raise AssertionError(f"no {want!r} message within {timeout} s")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The app artifact as build.sh makes it, installed offline as a host would."""
    out = tmp_path_factory.mktemp("h12-build")
    cp = subprocess.run([str(EXAMPLE / "build.sh"), "--out", str(out), "--release", "test", "--only", "app",
                         "--git-remote", str(out / "portal.git")],
                        env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=600)
    assert cp.returncode == 0, cp.stderr[-3000:]
    dest = out / "app" / "test"
    cp = subprocess.run([str(dest / "install.sh"), need("/usr/bin/python3", "python3")], capture_output=True,
                        text=True, timeout=600)
    assert cp.returncode == 0, cp.stderr[-3000:]
    return dest


def test_build_makes_a_pure_python_wheelhouse_that_installs_offline(artifact: Path, tally: Tally) -> None:
    wheels = sorted(p.name for p in (artifact / "wheelhouse").glob("*.whl"))
    tally.check(len(wheels) >= 14, str(wheels))
    for w in wheels:
        tally.check(w.endswith("-py3-none-any.whl"), f"{w} is not a pure-Python wheel")
    for name in ("flask-", "markupsafe-", "gunicorn-", "redis-", "pymysql-", "flask_sock-", "async_timeout-"):
        tally.check(any(w.startswith(name) for w in wheels), f"no {name} wheel")
    reqs = (artifact / "wheelhouse" / "requirements.txt").read_text()
    tally.check(reqs.count("--hash=sha256:") == len(wheels), reqs)
    tally.check(os.access(artifact / "bin" / "hpc-portal-service", os.X_OK))
    # The same artifact as a git release (the {kind: git} artifact): the tag, no venv.
    clone = artifact.parent / "clone"
    cp = subprocess.run(["git", "clone", "--quiet", "--depth", "1", "--branch", "release-test",
                         str(artifact.parents[1] / "portal.git"), str(clone)], capture_output=True, text=True)
    tally.check(cp.returncode == 0, cp.stderr)
    tally.check(os.access(clone / "bin" / "hpc-portal-service", os.X_OK) and (clone / "wheelhouse" / "requirements.txt")
                .read_text() == reqs and not list(clone.glob("venv-*")), "the git release has the same files")
    venv = next(artifact.glob("venv-3.*"))
    cp = subprocess.run([str(venv / "bin" / "python"), "-c",
                         "import flask, markupsafe, gunicorn, redis, pymysql, flask_sock, sys;"
                         "import importlib.util as u; print(u.find_spec('markupsafe._speedups') is None)"],
                        capture_output=True, text=True, timeout=60)
    tally.check(cp.returncode == 0 and cp.stdout.strip() == "True", cp.stdout + cp.stderr)
    # pip runs from its own wheel (no ensurepip on minimal hosts), and the venv records
    # the wheelhouse it was made from: a checkout of another release replaces it.
    tally.check(any(w.startswith("pip-") for w in wheels), "no pip wheel: install.sh runs pip from it")
    tally.check((venv / ".wheelhouse-requirements.txt").read_text() == reqs, "the venv's wheelhouse stamp")
    tally.expect(len(wheels) + 14)


@pytest.mark.daemons
def test_websocket_pushes_job_changes_behind_haproxy_and_resyncs_after_reconnect(
        artifact: Path, lab: dict[str, Any], db_ready: MariaDB, fake_slurm: Path, tmp_path: Path,
        tally: Tally) -> None:
    from simple_websocket import Client, ConnectionClosed

    haproxy = need("haproxy", "haproxy")
    port, front = free_port(), free_port()
    env = {**os.environ, "PORTAL_SERVICE": "ws", "PORT": str(port), f"BACKEND_{port}_HOST": "127.0.0.1",
           "SERVER_ID": "app-test-1", "REDIS_SENTINELS": ",".join(f"127.0.0.1:{p}" for p in lab["sentinels"]),
           "REDIS_MASTER_NAME": MASTER, "REDIS_PASSWORD": PW, "DB_HOST": "127.0.0.1", "DB_PORT": str(db_ready.port),
           "DB_USER": APP_USER, "DB_PASSWORD": APP_PASSWORD, "DB_NAME": "portal_ws", "SLURM_CLUSTER": "wstest",
           "PORTAL_COOKIE_SECURE": "0", "PORTAL_POLL_INTERVAL": "0.3", "PORTAL_WORKERS": "2",
           "HPC_PORTAL_PYTHON": "/usr/bin/python3"}
    m = master(lab)
    for k in m.keys("portal:jobs:wstest*"):
        m.delete(k)
    cfg = tmp_path / "haproxy.cfg"
    # The LB tier's routing for websockets: by the Upgrade header, long tunnel time-out.
    cfg.write_text(f"""global
    maxconn 100
defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s
frontend fe
    bind 127.0.0.1:{front}
    acl route_ws hdr(Upgrade) -i websocket
    use_backend be_ws if route_ws
backend be_ws
    option httpchk GET /ws/health
    timeout tunnel 1h
    server app-test-1-{port} 127.0.0.1:{port} check inter 1s
""")
    log = tmp_path / "gunicorn.log"
    with open(log, "wb") as logf:
        started = time.monotonic()
        gunicorn = subprocess.Popen([str(artifact / "bin" / "hpc-portal-service")], env=env, stdout=logf,
                                    stderr=subprocess.STDOUT, start_new_session=True)
    lb_log = tmp_path / "haproxy.log"  # its warnings: a server going DOWN and why
    with open(lb_log, "wb") as f:
        lb = subprocess.Popen([haproxy, "-f", str(cfg), "-db"], stdout=f, stderr=subprocess.STDOUT)
    try:
        health = wait_for(lambda: json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/ws/health", timeout=5)
                                             .read()), 60, f"gunicorn's /ws/health (log: {log})")
        tally.check(health["status"] == "healthy", health)
        sid = "a" * 32
        m.set(f"portal:session:{sid}", json.dumps({"user": "alice"}), ex=600)
        # HAProxy has seen the server answer its health check.
        wait_for(lambda: not ws_handshake(front, None).startswith("HTTP/1.1 503"), 15, "HAProxy's backend up")
        status = ws_handshake(front, None)
        tally.check(status.startswith("HTTP/1.1 401"), f"no login, no websocket: {status}")
        status = ws_handshake(front, sid)
        tally.check(status == "HTTP/1.1 101 Switching Protocols", f"101 through HAProxy: {status}")
        ws = Client.connect(f"ws://127.0.0.1:{front}/ws/", headers={"Cookie": f"sid={sid}"})
        ws.send(json.dumps({"type": "hello", "last_seq": 0}))
        tally.check(next_message(ws, "uptodate")["seq"] == 0)
        job = portal_slurm.submit("ws-req-1", "wsjob", 60)["job_id"]
        pending = next_message(ws, "job")
        tally.check(pending["job_id"] == job and pending["state"] == "PENDING" and pending["seq"] == 1, str(pending))
        set_job(fake_slurm, job, "RUNNING")
        running = next_message(ws, "job")
        tally.check(running["state"] == "RUNNING" and running["seq"] == 2, str(running))
        ws.close()
        # While the client is away the job finishes (it leaves the queue; sacct has it).
        set_job(fake_slurm, job, "COMPLETED", done=True)
        wait_for(lambda: m.hget("portal:jobs:wstest:state", job) == "COMPLETED", 10, "the poller to see COMPLETED")
        ws = Client.connect(f"ws://127.0.0.1:{front}/ws/", headers={"Cookie": f"sid={sid}"})
        ws.send(json.dumps({"type": "hello", "last_seq": running["seq"]}))
        snap = next_message(ws, "snapshot")
        tally.check(snap["seq"] == 3 and snap["jobs"] == {job: "COMPLETED"}, str(snap))
        ws.send("not json")  # a bad message closes that connection with 1003, nothing else
        with pytest.raises(ConnectionClosed):
            ws.receive(timeout=5)
            ws.receive(timeout=5)
        tally.check(ws.close_reason == 1003, f"close code {ws.close_reason}")
        # Two worker processes, one poller: every change was published exactly once.
        tally.check(m.get("portal:jobs:wstest:seq") == "3")
        tally.check(m.get("portal:jobs:wstest:poller") is not None, "a poller holds the lease")
        # The hubs' heartbeat through their subscriptions holds: no resubscribing while
        # Redis is fine (well past BEAT_DEAD_S, after which a missing heartbeat would trigger one).
        time.sleep(max(0.0, started + 16 - time.monotonic()))
        tally.check("resubscribing" not in log.read_text(), log.read_text()[-2000:])
        # The entry point's add-user, as an operator runs it on a host.
        cp = subprocess.run([str(artifact / "bin" / "hpc-portal-service"), "add-user", "bob"], input="bob-Pw-12345\n",
                            env={**env, "PORTAL_SERVICE": "auth", "DB_NAME": "portal_auth"}, capture_output=True,
                            text=True, timeout=60)
        tally.check(cp.returncode == 0, cp.stderr)
        tally.check(db_ready.sql("SELECT username FROM portal_auth.portal_users WHERE username = 'bob'") == [("bob",)])
    finally:
        lb.terminate()
        lb.wait(10)
        os.killpg(gunicorn.pid, signal.SIGTERM)
        try:
            gunicorn.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(gunicorn.pid, signal.SIGKILL)
            gunicorn.wait(5)
    tally.expect(13)


@pytest.mark.daemons
def test_the_hub_answers_from_its_copy_while_redis_is_away_and_resyncs_after(db_ready: MariaDB,  # noqa: F811
                                                                            tally: Tally) -> None:
    """The ws service's hub follows the published changes in a copy of the cluster's
    state. With the master paused the copy still answers (marked not live, announced to
    the clients), and once Redis answers again the hub reloads it and tells every client
    to resync; a gap in the sequence reloads the copy from Redis."""
    rl = RedisLab()
    stop = threading.Event()
    try:
        a, pa = rl.server()
        lab_ = {"sentinels": [rl.sentinel(a) for _ in range(3)]}
        b = Backends(settings("ws", lab_, db_ready, redis_timeout=0.5))
        k = Keys("hubtest")
        r = redis.Redis(port=a, password=PW, decode_responses=True)

        def publish(job: str, state: str) -> int:
            return int(r.eval(PUBLISH, 3, k.seq, k.state, k.finished, k.channel, job, state, time.time(), "0"))

        publish("1", "PENDING")  # before the hub: in the state it loads
        hub = Hub(b, k)
        q = hub.add()
        threading.Thread(target=hub.run, args=(stop,), daemon=True).start()
        wait_for(lambda: (hub.view() or {}).get("seq") == 1, 15, "the hub to load the state")
        publish("1", "RUNNING")
        publish("2", "PENDING")
        wait_for(lambda: (hub.view() or {}).get("seq") == 3, 10, "the hub to follow the changes")
        v = hub.view()
        tally.check(v == {"type": "snapshot", "seq": 3, "jobs": {"1": "RUNNING", "2": "PENDING"}, "live": True}, v)
        # A gap: a change the hub never heard of (written without its message) and then
        # the next one. The copy is reloaded, not patched.
        r.incr(k.seq)
        r.hset(k.state, "3", "PENDING")
        publish("3", "RUNNING")
        wait_for(lambda: (hub.view() or {}).get("seq") == 5, 10, "the gap to reload the copy")
        tally.check((hub.view() or {}).get("jobs") == {"1": "RUNNING", "2": "PENDING", "3": "RUNNING"}, hub.view())
        while not q.empty():
            q.get_nowait()
        # The master paused: the heartbeat fails, the copy answers, not live.
        os.kill(pa.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        wait_for(lambda: not (hub.view() or {"live": True})["live"], 20, "the hub to notice the paused master")
        tally.check(time.monotonic() - t0 < 10, f"noticed after {time.monotonic() - t0:.1f}s")
        v = hub.view()
        tally.check(v is not None and v["seq"] == 5 and len(v["jobs"]) == 3, v)
        tally.check(json.loads(q.get(timeout=5)) == {"type": "status", "live": False}, "the clients are told")
        os.kill(pa.pid, signal.SIGCONT)
        tally.check(q.get(timeout=30) == RESYNC, "a resync once the hub has subscribed again")
        v = hub.view()
        tally.check(v is not None and v["live"] and v["seq"] == 5, v)
        publish("2", "RUNNING")
        wait_for(lambda: (hub.view() or {}).get("seq") == 6, 10, "the hub to follow changes again")
    finally:
        stop.set()
        rl.stop()
    tally.expect(7)


@pytest.mark.daemons
def test_database_is_reached_through_the_settings(db_ready: MariaDB, lab: dict[str, Any], tally: Tally) -> None:
    db = Database(settings("api", lab, db_ready))
    n, rows = db.query("SELECT DATABASE(), CURRENT_USER()")
    tally.check(rows[0][0] == "portal_api" and rows[0][1].startswith(f"{APP_USER}@"), str(rows))
    tally.check(sorted(r[0] for r in db.query("SHOW TABLES")[1]) == ["portal_jobs", "portal_users", "records"])
    tally.expect(2)


def test_frontend_builds_into_a_release_directory_for_nginx(tmp_path: Path, tally: Tally) -> None:
    need("npm", "npm")
    cp = subprocess.run([str(EXAMPLE / "build.sh"), "--out", str(tmp_path), "--release", "web-test", "--only", "web"],
                        capture_output=True, text=True, timeout=600)
    tally.check(cp.returncode == 0, cp.stderr[-3000:])
    release = tmp_path / "web" / "releases" / "web-test"
    index = (release / "index.html").read_text()
    assets = sorted(p.name for p in (release / "assets").iterdir())
    # Hashed names under assets/ (nginx caches /assets/ for a year), named by index.html.
    tally.check(any(a.endswith(".js") for a in assets) and any(a.endswith(".css") for a in assets), str(assets))
    for a in assets:
        tally.check(f"/assets/{a}" in index, f"index.html does not load {a}")
    js = next((release / "assets").glob("*.js")).read_text()
    for needle in ("/ws/", "last_seq", "/api/jobs", "/auth/login", "request_id"):
        tally.check(needle in js, f"{needle} not in the bundle")
    tracked = subprocess.run(["git", "-C", str(EXAMPLE), "ls-files", "frontend"], capture_output=True, text=True).stdout
    tally.check("package-lock.json" in tracked or not tracked, "package-lock.json is committed with the source")
    tally.check("node_modules" not in tracked and "dist/" not in tracked, "no node_modules or build output in git")
    tally.expect(10)


@pytest.mark.daemons
def test_a_pooled_db_connection_that_broke_is_replaced_once(db_ready: MariaDB, lab: dict[str, Any],  # noqa: F811
                                                             tally: Tally) -> None:
    """The DB writer cuts pooled connections (a failed node, or the preferred node's
    return): the statement runs once more on a new connection. A fresh connection's
    failure, or any other error, fails the request with PyMySQL's own exception."""
    import pymysql

    db = Database(settings("api", lab, db_ready, db_pool_size=1))
    first = db.query("SELECT CONNECTION_ID()")[1][0][0]
    db_ready.sql(f"KILL CONNECTION {int(first)}")  # idle in the pool, cut under it
    second = db.query("SELECT CONNECTION_ID()")[1][0][0]
    tally.check(second != first, f"a killed idle connection was used again: {first}")
    # Cut in the middle of a statement (2013): the statement runs again, on a new one.
    out: dict[str, Any] = {}

    def slow() -> None:
        try:
            out["rows"] = db.query("SELECT CONNECTION_ID(), SLEEP(1.5)")[1]
        except Exception as e:  # noqa: BLE001 - reported below
            out["error"] = e

    t = threading.Thread(target=slow)
    t.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not db_ready.sql(
            "SELECT ID FROM information_schema.PROCESSLIST WHERE ID = %s AND INFO LIKE 'SELECT CONNECTION_ID(), SLEEP%%'",
            (second,)):
        time.sleep(0.05)
    db_ready.sql(f"KILL CONNECTION {int(second)}")
    t.join(30)
    tally.check("error" not in out and out["rows"][0][0] not in (first, second), str(out))
    # A connection that cannot be made is not retried: 2003, as PyMySQL raises it.
    dead = Database(settings("api", lab, db_ready, db_port=free_port()))
    with pytest.raises(pymysql.err.OperationalError) as refused:
        dead.query("SELECT 1")
    tally.check(refused.value.args[0] == 2003, str(refused.value))
    # Any other error: PyMySQL's exception, not SQLAlchemy's wrapper, and no second try.
    rid = f"dup-{time.time_ns()}"
    db.query("INSERT INTO records (request_id, payload, server_id) VALUES (%s, 'p', 't')", (rid,))
    with pytest.raises(pymysql.err.IntegrityError):
        db.query("INSERT INTO records (request_id, payload, server_id) VALUES (%s, 'p', 't')", (rid,))
    tally.check(db.query("SELECT COUNT(*) FROM records WHERE request_id = %s", [rid])[1] == [(1,)])
    tally.expect(4)


@pytest.mark.daemons
def test_a_process_holds_at_most_its_pool_of_connections_however_many_threads_wait(
        db_ready: MariaDB, lab: dict[str, Any], tally: Tally) -> None:  # noqa: F811
    """Threads are many (a stalled backend holds one per request), connections are the
    pool's: 12 threads share 3; when all 3 stay busy past POOL_WAIT_S a request fails
    with PoolTimeout (a PyMySQL error: the app answers 503) and frees its thread."""
    import pymysql
    from portal.db import POOL_WAIT_S, PoolTimeout

    db = Database(settings("api", lab, db_ready, db_pool_size=3))
    seen: set[int] = set()
    errors: list[BaseException] = []

    def one(sleep: float) -> None:
        try:
            seen.add(int(db.query("SELECT CONNECTION_ID(), SLEEP(%s)", (sleep,))[1][0][0]))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(0.2,)) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    tally.check(not errors and 1 <= len(seen) <= 3, f"connections {seen}, errors {errors}")
    tally.check(db.pool_status() == {"size": 3, "in_use": 0, "idle": len(seen)}, str(db.pool_status()))
    # All three held longer than the wait: the fourth request gives up after POOL_WAIT_S.
    hold = [threading.Thread(target=one, args=(POOL_WAIT_S + 2,)) for _ in range(3)]
    for t in hold:
        t.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and db.pool_status()["in_use"] < 3:
        time.sleep(0.02)
    t0 = time.monotonic()
    with pytest.raises(PoolTimeout) as busy:
        db.query("SELECT 1")
    waited = time.monotonic() - t0
    for t in hold:
        t.join(60)
    tally.check(isinstance(busy.value, pymysql.err.OperationalError) and "pool of 3" in str(busy.value), str(busy.value))
    tally.check(POOL_WAIT_S - 0.1 <= waited < 30 and not errors, f"waited {waited:.2f} s, errors {errors}")
    tally.expect(4)


def test_the_pool_size_is_the_hosts_share_of_connections_divided_among_its_processes(tally: Tally) -> None:
    """portal.env as the program renders it for a prod app host: every portal process on
    the host (ports x gunicorn workers) together stays within DB_CONNECTIONS_PER_HOST."""
    from portal.settings import SettingsError, db_pool_size

    from cloud_init.templating import render_template
    from offline.contexts import contexts

    ctx = contexts("prod")["app-1"]
    env = dict(line.split("=", 1) for line in render_template("app/portal.env", ctx).splitlines()
               if line and not line.startswith("#"))
    share = int(env["DB_CONNECTIONS_PER_HOST"])
    ports = sum(len(s["ports"]) for s in ctx["services"])
    size = db_pool_size(env)
    tally.check(size >= 2 and ports * 2 * size <= share, f"{ports} ports x 2 workers x {size} > {share}")
    tally.check(db_pool_size({**env, "PORTAL_WORKERS": "4"}) == share // (ports * 4))
    tally.check(db_pool_size({**env, "PORTAL_DB_POOL_SIZE": "5"}) == 5)
    tally.check(db_pool_size({}) == 8, "no share announced: the default")
    for bad, key in (({**env, "DB_CONNECTIONS_PER_HOST": "12"}, "DB_CONNECTIONS_PER_HOST=12"),
                     ({**env, "PORTAL_DB_POOL_SIZE": "1"}, "PORTAL_DB_POOL_SIZE='1'"),
                     ({**env, "PORTAL_WORKERS": "two"}, "PORTAL_WORKERS='two'")):
        with pytest.raises(SettingsError) as e:
            db_pool_size(bad)
        tally.check(key in str(e.value), str(e.value))
    tally.expect(7)


# ------------------------------------------------------- the rehearsal's load against it


def _service(artifact: Path, svc: str, port: int, server: str, lab: dict[str, Any], db: MariaDB,  # noqa: F811
             log: Path, workers: int = 1) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PORTAL_SERVICE": svc, "PORT": str(port), f"BACKEND_{port}_HOST": "127.0.0.1",
           "SERVER_ID": server, "REDIS_SENTINELS": ",".join(f"127.0.0.1:{p}" for p in lab["sentinels"]),
           "REDIS_MASTER_NAME": MASTER, "REDIS_PASSWORD": PW, "DB_HOST": "127.0.0.1", "DB_PORT": str(db.port),
           "DB_USER": APP_USER, "DB_PASSWORD": APP_PASSWORD, "DB_NAME": f"portal_{svc}", "SLURM_CLUSTER": "loadtest",
           "PORTAL_COOKIE_SECURE": "0", "PORTAL_POLL_INTERVAL": "0.5", "PORTAL_WORKERS": str(workers),
           "HPC_PORTAL_PYTHON": "/usr/bin/python3"}
    with open(log, "ab") as f:
        return subprocess.Popen([str(artifact / "bin" / "hpc-portal-service")], env=env, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _haproxy_servers_up(sock: Path) -> set[str]:
    """backend/server of every server HAProxy has UP after a passed layer-7 check."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(sock))
        s.sendall(b"show stat\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    rows = list(csv.DictReader(io.StringIO(data.decode().lstrip("# "))))
    return {f"{r['pxname']}/{r['svname']}" for r in rows
            if r["svname"] not in ("FRONTEND", "BACKEND") and r["status"] == "UP" and r["check_status"] == "L7OK"}


def _kill(p: subprocess.Popen[bytes]) -> None:
    """kill -9 of the service's whole process group (gunicorn's master and workers), as
    when its host dies."""
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait(10)


@pytest.mark.daemons
def test_the_rehearsal_load_logs_in_submits_jobs_and_holds_a_websocket(
        artifact: Path, lab: dict[str, Any], db_ready: MariaDB, fake_slurm: Path, tmp_path: Path,  # noqa: F811
        tally: Tally) -> None:
    """rehearsal/load.py against the reference portal behind HAProxy (the LB tier's
    routing: /auth, /api, websocket upgrades; two API servers): every client logs in, jobs
    go in with their request id (the sbatch comment), one websocket subscription answers
    its hello every second, kept on one of two ws servers by HAProxy's stickiness
    cookie (the LB tier's `cookie SRV_<service> insert indirect nocache`). Its ws server
    killed while a change is published: the subscription reconnects to the other one
    (redispatch, a new cookie) and resyncs; the killed one comes back. HAProxy closes the
    subscription on its server, which is up: the reconnect carries the cookie and stays
    there. The sessions deleted: the job client's 401 is a forced re-login, counted."""
    from rehearsal.drills.base import failure_breakdown, history, load_portal_figures

    haproxy = need("haproxy", "haproxy")
    ports = {"auth": free_port(), "api1": free_port(), "api2": free_port(), "ws1": free_port(), "ws2": free_port()}
    front = free_port()
    m = master(lab)
    for k in m.keys("portal:jobs:loadtest*"):
        m.delete(k)
    add_user(Backends(settings("auth", lab, db_ready)), "loadtest", "loadtest-Pw-1")
    pw = tmp_path / "password"
    pw.write_text("loadtest-Pw-1\n")
    sock = tmp_path / "haproxy.sock"
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(f"""global
    maxconn 200
    stats socket {sock} mode 600 level admin
defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    # Not the LB tier's 1 s: this test is about the load's clients, and a check that a
    # busy shared machine answers late would take a server out for reasons of its own.
    timeout check 5s
    retries 3
    option redispatch
    retry-on conn-failure empty-response response-timeout
    default-server inter 1s fall 3 rise 2
frontend fe
    bind 127.0.0.1:{front}
    acl route_ws hdr(Upgrade) -i websocket
    acl route_auth path_beg /auth/
    acl route_api path_beg /api/
    http-request return status 200 content-type text/html string "<!doctype html>page" if {{ path / }}
    use_backend be_ws if route_ws
    use_backend be_auth if route_auth
    use_backend be_api if route_api
backend be_ws
    option httpchk GET /ws/health
    timeout tunnel 1h
    cookie SRV_ws insert indirect nocache
    server ws1 127.0.0.1:{ports['ws1']} check cookie ws1
    server ws2 127.0.0.1:{ports['ws2']} check cookie ws2
backend be_auth
    option httpchk GET /auth/health
    http-request disable-l7-retry if !METH_GET !METH_HEAD
    server auth 127.0.0.1:{ports['auth']} check
backend be_api
    balance leastconn
    option httpchk GET /api/health
    http-request disable-l7-retry if !METH_GET !METH_HEAD
    server api1 127.0.0.1:{ports['api1']} check
    server api2 127.0.0.1:{ports['api2']} check
""")
    log = tmp_path / "portal.log"
    procs = {"auth": _service(artifact, "auth", ports["auth"], "app-test-1", lab, db_ready, log),
             "api1": _service(artifact, "api", ports["api1"], "app-test-1", lab, db_ready, log, workers=2),
             "api2": _service(artifact, "api", ports["api2"], "app-test-2", lab, db_ready, log, workers=2),
             "ws1": _service(artifact, "ws", ports["ws1"], "app-test-1", lab, db_ready, log),
             "ws2": _service(artifact, "ws", ports["ws2"], "app-test-2", lab, db_ready, log)}
    lb_log = tmp_path / "haproxy.log"  # its warnings: a server going DOWN and why
    with open(lb_log, "wb") as f:
        lb = subprocess.Popen([haproxy, "-f", str(cfg), "-db"], stdout=f, stderr=subprocess.STDOUT)
    load: subprocess.Popen[str] | None = None
    out = tmp_path / "load.log"
    try:
        for name, port in ports.items():
            path = {"auth": "/auth/health", "ws1": "/ws/health", "ws2": "/ws/health"}.get(name, "/api/health")
            wait_for(lambda p=port, h=path: json.loads(urllib.request.urlopen(f"http://127.0.0.1:{p}{h}", timeout=5)
                                                       .read())["status"] == "healthy", 60, f"{name} (log: {log})")
        # A server starts UP in HAProxy and goes DOWN on its first failed check: the load
        # starts once every server has passed a check (UP, L7OK), not on HAProxy's start.
        every = {"be_ws/ws1", "be_ws/ws2", "be_auth/auth", "be_api/api1", "be_api/api2"}
        wait_for(lambda: _haproxy_servers_up(sock) == every, 30,
                 f"every server UP after a passed check (log: {lb_log})")
        load = subprocess.Popen([sys.executable, "-m", "rehearsal.load", "run", "--url", f"http://127.0.0.1:{front}",
                                 "--out", str(out), "--rate", "40", "--duration", "45", "--workers", "6",
                                 "--job-interval", "2", "--job-timeout", "10", "--tag", "lt", "--user", "loadtest",
                                 "--password-file", str(pw)], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        wait_for(lambda: sum(1 for h in history(out) if h[2] == "ws" and h[3]) >= 3, 20, "three websocket round trips")
        # The subscription's ws server dies; a job's state changes while the client is away
        # (published as the poller does, through the same keys); the client reconnects to
        # the other server; the dead one comes back.
        first = [h[6] for h in history(out) if h[2] == "ws" and h[3]][-1]
        tally.check(first in ("ws1", "ws2"), f"the subscription's server from its stickiness cookie: {first!r}")
        other = "ws2" if first == "ws1" else "ws1"
        _kill(procs[first])
        m.incr("portal:jobs:loadtest:seq")
        m.hset("portal:jobs:loadtest:state", "999999", "RUNNING")
        wait_for(lambda: load_portal_figures(history(out), 0)["ws_resyncs"] >= 1, 30, "a resync after the reconnect")
        procs[first] = _service(artifact, "ws", ports[first], "app-test-1" if first == "ws1" else "app-test-2",
                                lab, db_ready, log)
        wait_for(lambda: _haproxy_servers_up(sock) == every, 30, f"{first} back UP (log: {lb_log})")
        # HAProxy closes the subscription (its server is up): the reconnect keeps its server.
        closed_at = time.time()
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(sock))
            s.sendall(f"shutdown sessions server be_ws/{other}\n".encode())
            s.recv(65536)
        wait_for(lambda: any(h[2] == "ws" and h[3] and h[0] > closed_at + 0.5 for h in history(out))
                 and any(h[2] == "ws" and not h[3] and h[0] >= closed_at for h in history(out)), 20,
                 "the subscription closed and answering again")
        # Every session of the account goes (an operator's forced logout): the job
        # client's next submission answers 401 and it logs in again.
        for k in m.scan_iter("portal:session:*"):
            if "loadtest" in (m.get(k) or ""):
                m.delete(k)
        wait_for(lambda: load_portal_figures(history(out), 0)["forced_relogins"] >= 1, 20, "a forced re-login")
        stdout, stderr = load.communicate(timeout=60)
        summary = json.loads(stdout.strip().splitlines()[-1])
    finally:
        if load is not None and load.poll() is None:
            load.kill()
            load.wait(10)
        lb.terminate()
        lb.wait(10)
        for p in procs.values():
            _kill(p)
    hist = history(out)
    fig = load_portal_figures(hist, 0)
    tally.check(summary["login"] is True and summary["logins"] == 6 + 1 + 1, str(summary))  # workers, jobs, websocket
    failed_logins = [h for h in hist if h[2] == "login" and not h[3]]
    tally.check(fig["logins"] == 8 and fig["login_failures"] == 0,
                f"{fig}; failed logins (start, end, kind, ok, status, ...): {failed_logins}; "
                f"HAProxy: {lb_log.read_text()[-2000:]}; portal: {log.read_text()[-3000:]}")
    tally.check(fig["forced_relogins"] >= 1 and summary["relogins"] == fig["forced_relogins"], str((fig, summary)))
    tally.check(fig["ws_reconnects"] >= 1 and summary["ws_reconnects"] == fig["ws_reconnects"], str((fig, summary)))
    tally.check(fig["ws_resyncs"] >= 1 and fig["ws_round_trips"] >= 10, str(fig))
    # Placed on one server, moved once when it died, kept there across the closed session.
    tally.check(fig["ws_servers"] == 2 and fig["ws_moves"] == 1, str(fig))
    tally.check(summary["ws_moved"] == 1 and summary["ws_sticky_reconnects"] >= 1, str(summary))
    tally.check([h[6] for h in hist if h[2] == "ws" and h[3]][-1] == other, "the last round trips' server")
    jobs = {h[5]: h[7] for h in hist if h[2] == "job" and h[3]}
    tally.check(len(jobs) >= 5, f"jobs acknowledged: {jobs}")
    sbatch = (fake_slurm.parent / (fake_slurm.name + ".log")).read_text()
    for rid in jobs:
        tally.check(f"--comment=pending/{rid}" in sbatch and f"Comment={rid}" in sbatch,
                    f"{rid}: not submitted as an attempt and settled under its request id")
    refused = [h for h in hist if h[2] == "job" and h[4] == 401]
    tally.check(len(refused) == fig["forced_relogins"], f"every 401 led to a re-login: {refused}")
    # Outside the websocket's own restart and the forced logout, nothing failed.
    failed = failure_breakdown(hist, (0, 0))
    tally.check(set(failed) <= {"job 401 after"}, str(failed))
    tally.check(sum(1 for h in hist if h[2] == "write" and h[3]) >= 100, "records written")
    tally.expect(18)
