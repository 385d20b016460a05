"""The stand-in portal and Slurm.

- Its health check: `scontrol ping` in the background, never a bare TCP connection
  (slurmctld logs an error for each) and never on the request path.
- Idempotent job submission (POST /api/jobs through its real HTTP server on loopback,
  with fake sbatch/squeue/sacct on PATH): each request id becomes the job's comment and
  is looked up before submitting, so a retry after a time-out, including a time-out that
  still created the job (a ghost from a paused controller), never makes a second job.
"""

from __future__ import annotations

import http.client
import json
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakedb import FakeConn
from tests.loadfile import load_script

UP = "Slurmctld(primary) at slurm-1 is DOWN\nSlurmctld(backup) at slurm-2 is UP\n"
DOWN = "Slurmctld(primary) at slurm-1 is DOWN\nSlurmctld(backup) at slurm-2 is DOWN\n"


def _fake_scontrol(d: Path, out: str, rc: int) -> None:
    p = d / "scontrol"
    p.write_text(f"#!/bin/sh\necho \"$*\" >> '{d}/calls'\nprintf '%s' '{out}'\nexit {rc}\n")
    p.chmod(p.stat().st_mode | stat.S_IEXEC)


@pytest.mark.parametrize("out,rc,want", [
    (UP, 1, "ok"),  # scontrol ping exits 1 when one controller is down: one UP is enough
    (DOWN, 1, "error: no slurmctld answers scontrol ping (rc 1: Slurmctld(backup) at slurm-2 is DOWN)"),
])
def test_slurm_health_comes_from_scontrol_ping(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, out: str, rc: int,
                                                want: str) -> None:
    _fake_scontrol(tmp_path, out, rc)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    mod = load_script("portal_standin.py")
    assert mod.ping_slurm() == want
    assert (tmp_path / "calls").read_text() == "ping\n"


def test_the_health_check_reads_the_last_ping_and_notices_when_it_is_stale(monkeypatch: pytest.MonkeyPatch) -> None:
    mod = load_script("portal_standin.py")
    monkeypatch.setattr(mod, "_slurm_ready", type("E", (), {"wait": lambda self, t: False})())
    assert mod.check_slurm() == "error: Slurm not checked yet"
    now = mod.time.monotonic()
    mod._slurm_state.update(value="ok", t=now)
    assert mod.check_slurm() == "ok"
    mod._slurm_state.update(value="ok", t=now - 4 * mod.SLURM_CHECK_S - 31)
    assert mod.check_slurm().startswith("error: Slurm check stale")


# ------------------------------------------------------------ idempotent job submission
#
# Fake sbatch/squeue/sacct on PATH share one jobs file: "<id> <comment> <in squeue 0|1>"
# per line. sbatch's behaviour comes from the file `sbatch-mode`: ok (creates the job),
# timeout (fails, creates nothing), ghost (fails like a paused controller's time-out,
# but the job exists afterwards).

FAKE_SBATCH = r"""#!/bin/sh
d=$(dirname "$0")
echo "sbatch $*" >> "$d/calls"
comment=-
for a in "$@"; do case "$a" in --comment=*) comment=${a#--comment=} ;; esac; done
mode=$(cat "$d/sbatch-mode")
if [ "$mode" = timeout ]; then
    echo "sbatch: error: Batch job submission failed: Socket timed out on send/recv operation" >&2; exit 1
fi
n=$(( $(wc -l < "$d/jobs") + 101 ))
echo "$n $comment 1" >> "$d/jobs"
if [ "$mode" = ghost ]; then
    echo "sbatch: error: Batch job submission failed: Socket timed out on send/recv operation" >&2; exit 1
fi
echo "$n"
"""
FAKE_SQUEUE = r"""#!/bin/sh
d=$(dirname "$0")
echo "squeue $*" >> "$d/calls"
[ -e "$d/squeue-fails" ] && { echo "squeue: error: Socket timed out on send/recv operation" >&2; exit 1; }
awk '$3 == 1 { print $1, $2 }' "$d/jobs"
"""
FAKE_SACCT = r"""#!/bin/sh
d=$(dirname "$0")
echo "sacct $*" >> "$d/calls"
[ -e "$d/sacct-fails" ] && { echo "sacct: error: Problem talking to the database: Connection refused" >&2; exit 1; }
awk '{ print $1 "|" $2 }' "$d/jobs"
"""


class Portal:
    """The stand-in's HTTP server on loopback with the fake Slurm commands on PATH."""

    def __init__(self, bin_dir: Path, mod: Any) -> None:
        self.bin = bin_dir
        for name, text in (("sbatch", FAKE_SBATCH), ("squeue", FAKE_SQUEUE), ("sacct", FAKE_SACCT)):
            (bin_dir / name).write_text(text)
            (bin_dir / name).chmod(0o755)
        (bin_dir / "jobs").write_text("")
        (bin_dir / "calls").write_text("")
        self.mode("ok")
        self.server = mod.Server(("127.0.0.1", 0), mod.Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def mode(self, mode: str) -> None:
        (self.bin / "sbatch-mode").write_text(mode + "\n")

    def submit(self, body: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request("POST", "/api/jobs", json.dumps(body), {"Content-Type": "application/json", **(headers or {})})
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read())
        finally:
            conn.close()

    def jobs(self) -> list[list[str]]:
        return [line.split() for line in (self.bin / "jobs").read_text().splitlines()]

    def calls(self, command: str) -> list[str]:
        return [c for c in (self.bin / "calls").read_text().splitlines() if c.split(" ", 1)[0] == command]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def portal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Portal]:
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    p = Portal(tmp_path, load_script("portal_standin.py"))
    yield p
    p.stop()


def test_first_submission_is_created_with_its_request_id_as_comment(portal: Portal) -> None:
    code, doc = portal.submit({"request_id": "req-1", "name": "portal", "seconds": 60})
    assert code == 200 and doc["created"] is True and doc["job_id"] == "101" and doc["request_id"] == "req-1", doc
    assert portal.jobs() == [["101", "req-1", "1"]]
    assert portal.calls("sbatch") == ["sbatch --parsable --job-name portal --output /dev/null --comment=req-1 "
                                      "--wrap=sleep 60"]
    # Looked up first: the controller's queue, then the accounting database.
    assert portal.calls("squeue") == ["squeue --noheader --states=all -o %i %k"]
    assert portal.calls("sacct") == ["sacct --noheader --parsable2 --allusers --allocations --starttime=now-7days "
                                     "--format=JobID,Comment"]


def test_a_retry_finds_the_job_an_earlier_attempt_created(portal: Portal) -> None:
    assert portal.submit({"request_id": "req-2"})[0] == 200
    # The client timed out waiting for that answer and sends the same request again.
    code, doc = portal.submit({"request_id": "req-2"})
    assert code == 200 and doc == {"request_id": "req-2", "server": doc["server"], "job_id": "101",
                                   "created": False, "found_in": "squeue"}
    assert len(portal.calls("sbatch")) == 1 and len(portal.jobs()) == 1
    # Once squeue has forgotten the job (MinJobAge), sacct still has its comment.
    (portal.bin / "jobs").write_text("101 req-2 0\n")
    code, doc = portal.submit({"request_id": "req-2"})
    assert code == 200 and doc["created"] is False and doc["found_in"] == "sacct" and doc["job_id"] == "101"
    assert len(portal.calls("sbatch")) == 1


def test_a_retry_submits_when_the_failed_attempt_created_nothing(portal: Portal) -> None:
    portal.mode("timeout")
    code, doc = portal.submit({"request_id": "req-3"})
    assert code == 503 and "Socket timed out" in doc["error"] and "retry with the same request id" in doc["error"]
    assert portal.jobs() == []
    portal.mode("ok")
    code, doc = portal.submit({"request_id": "req-3"})
    assert code == 200 and doc["created"] is True and doc["job_id"] == "101"
    assert portal.jobs() == [["101", "req-3", "1"]] and len(portal.calls("sbatch")) == 2


def test_a_ghost_job_from_a_timed_out_sbatch_is_found_not_duplicated(portal: Portal) -> None:
    """The paused-controller case: sbatch reports a time-out, yet the job exists."""
    portal.mode("ghost")
    code, doc = portal.submit({"request_id": "req-4", "name": "ghost"})
    assert code == 503 and "Socket timed out" in doc["error"]
    assert portal.jobs() == [["101", "req-4", "1"]]
    portal.mode("ok")
    code, doc = portal.submit({"request_id": "req-4", "name": "ghost"})
    assert code == 200 and doc["created"] is False and doc["job_id"] == "101"
    assert portal.jobs() == [["101", "req-4", "1"]] and len(portal.calls("sbatch")) == 1


def test_nothing_is_submitted_when_squeue_cannot_tell(portal: Portal) -> None:
    (portal.bin / "squeue-fails").write_text("")
    code, doc = portal.submit({"request_id": "req-5"})
    assert code == 503 and "cannot tell whether request req-5 was already submitted" in doc["error"]
    assert portal.calls("sbatch") == [] and portal.jobs() == []


def test_a_failing_sacct_does_not_stop_submissions(portal: Portal) -> None:
    """slurmdbd down: squeue (every job of the last MinJobAge) still guards retries."""
    (portal.bin / "sacct-fails").write_text("")
    code, doc = portal.submit({"request_id": "req-6"})
    assert code == 200 and doc["created"] is True
    code, doc = portal.submit({"request_id": "req-6"})
    assert code == 200 and doc["created"] is False and doc["found_in"] == "squeue"
    assert len(portal.jobs()) == 1


def test_the_request_id_may_come_as_an_idempotency_key_header(portal: Portal) -> None:
    assert portal.submit({}, {"Idempotency-Key": "hdr-1"})[1]["created"] is True
    code, doc = portal.submit({}, {"Idempotency-Key": "hdr-1"})
    assert code == 200 and doc["created"] is False and len(portal.jobs()) == 1


@pytest.mark.parametrize("body,error", [
    ({"request_id": "has space"}, "request_id"),
    ({"request_id": "x" * 65}, "request_id"),
    ({"request_id": "ok", "name": "a;b"}, "name"),
    ({"request_id": "ok", "seconds": "600; rm"}, "seconds"),
])
def test_bad_submissions_are_refused_before_slurm_is_asked(portal: Portal, body: dict[str, Any], error: str) -> None:
    code, doc = portal.submit(body)
    assert code == 400 and doc["error"].startswith(error)
    assert (portal.bin / "calls").read_text() == ""


def test_without_a_request_id_a_submission_is_not_looked_up(portal: Portal) -> None:
    code, doc = portal.submit({"name": "legacy"})
    assert code == 200 and doc["created"] is True and doc["request_id"] is None
    assert portal.calls("squeue") == [] and "--comment" not in portal.calls("sbatch")[0]


# ---- the Redis master: a majority of the Sentinels, checked with ROLE --------------------

class _FakeRedis:
    """One Redis or Sentinel process as the stand-in's client sees it."""

    def __init__(self, world: dict[str, Any], addr: str) -> None:
        self.world, self.addr = world, addr

    def execute_command(self, *args: Any) -> Any:
        import redis as _r

        node = self.world[self.addr]
        if node.get("down"):
            raise _r.ConnectionError(f"{self.addr} unreachable")
        if args[0] == "SENTINEL":
            host, _, port = node["says"].rpartition(":")
            return [host.encode(), port.encode()]
        if args[0] == "ROLE":
            return [node["role"].encode()]
        raise AssertionError(args)

    def set(self, *args: Any, **kw: Any) -> bool:
        import redis as _r

        node = self.world[self.addr]
        if node.get("noreplicas"):
            raise _r.ResponseError("NOREPLICAS Not enough good replicas to write.")
        node.setdefault("keys", []).append(args[0])
        return True

    def close(self) -> None:
        pass


@pytest.fixture
def sentinel_world(monkeypatch: pytest.MonkeyPatch) -> tuple[Any, dict[str, Any]]:
    monkeypatch.setenv("REDIS_SENTINELS", "d1:26379,d2:26379,d3:26379")
    mod = load_script("portal_standin.py")
    world: dict[str, Any] = {
        "d1:26379": {"says": "d1:6379"}, "d2:26379": {"says": "d1:6379"}, "d3:26379": {"says": "d1:6379"},
        "d1:6379": {"role": "master"}, "d2:6379": {"role": "slave"}, "d3:6379": {"role": "slave"},
    }
    r = mod.Redis()
    monkeypatch.setattr(r, "client", lambda host, port, pw, t: _FakeRedis(world, f"{host}:{port}"))
    return r, world


def test_the_master_is_what_a_majority_of_sentinels_reports_not_the_first(sentinel_world: tuple[Any, Any]) -> None:
    r, world = sentinel_world
    # the isolated side: d1's own Sentinel still names d1; the majority promoted d2
    world["d2:26379"]["says"] = world["d3:26379"]["says"] = "d2:6379"
    world["d2:6379"]["role"] = "master"
    assert r.master.set("k") is True
    assert world["d2:6379"]["keys"] == ["k"] and "keys" not in world["d1:6379"]


def test_no_majority_no_master_and_a_demoted_master_is_refused(sentinel_world: tuple[Any, Any]) -> None:
    r, world = sentinel_world
    world["d2:26379"]["says"] = "d2:6379"
    world["d3:26379"]["down"] = True  # d1, d2 and an error: no two agree
    with pytest.raises(Exception, match="no master reported by 2 of 3"):
        r.master.set("k")
    world["d3:26379"] = {"says": "d1:6379"}
    world["d1:6379"]["role"] = "slave"  # the Sentinels lag: the address says it is a replica
    with pytest.raises(Exception, match="says ROLE slave"):
        r.master.set("k")


def test_noreplicas_forgets_the_master_and_the_next_call_finds_the_new_one(sentinel_world: tuple[Any, Any]) -> None:
    import redis as _r

    r, world = sentinel_world
    assert r.master.set("a") is True  # d1 cached
    world["d1:6379"]["noreplicas"] = True  # d1 cut from its replicas: it refuses writes
    with pytest.raises(_r.ResponseError):
        r.master.set("b")
    assert r.current is None  # forgotten
    world["d2:26379"]["says"] = world["d3:26379"]["says"] = "d2:6379"
    world["d2:6379"]["role"] = "master"
    assert r.master.set("c") is True and world["d2:6379"]["keys"] == ["c"]


def test_slurm_down_degrades_the_health_check_but_does_not_fail_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every API backend shares the Slurm controllers, Redis and the database: failing the
    check on one of them would take every backend out of the load balancer at once. Only
    a backend never reached, a local DB writer that refuses, or a failure longer than the
    grace fail it."""
    mod = load_script("portal_standin.py")
    clock = [500.0]
    monkeypatch.setattr(mod.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(mod, "check_redis", lambda: "ok")
    monkeypatch.setattr(mod, "check_db", lambda: "error: OperationalError")
    monkeypatch.setattr(mod, "check_slurm", lambda: "error: no slurmctld answers")
    code, doc = mod.work_out_health()
    assert code == 503 and doc["why"] == "database never reached since start"
    monkeypatch.setattr(mod, "check_db", lambda: "ok")
    code, doc = mod.work_out_health()
    assert code == 200 and doc["status"] == "degraded" and doc["checks"]["slurm"].startswith("error")
    monkeypatch.setattr(mod, "check_db", lambda: "error: OperationalError")
    for dt in (0.0, mod.DEPENDENCY_GRACE_S):
        clock[0] = 500.0 + dt
        code, doc = mod.work_out_health()
        assert code == 200 and doc["status"] == "degraded", (dt, doc)
    clock[0] += 1
    code, doc = mod.work_out_health()
    assert code == 503 and doc["status"] == "unhealthy" and doc["why"].startswith("database failing for 31 s")
    monkeypatch.setattr(mod, "check_db", lambda: "ok")
    assert mod.work_out_health()[0] == 200
    monkeypatch.setattr(mod, "check_db", lambda: "error: OperationalError (connection refused)")
    code, doc = mod.work_out_health()
    assert code == 503 and doc["why"] == "the local DB writer refuses connections"


def test_the_health_check_answers_from_the_thread_and_a_hung_round_degrades_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """A check from the LB (1 s) is answered from the health thread's latest verdict; a
    round hung on a backend is "degraded" after HEALTH_HUNG_S and a 503 only once the
    verdict is DEPENDENCY_GRACE_S old."""
    mod = load_script("portal_standin.py")
    clock = [100.0]
    monkeypatch.setattr(mod.time, "monotonic", lambda: clock[0])
    mod._health_started.append(True)  # no thread: the test sets the verdict and its age
    mod._health_ready.set()
    assert mod.health() == (503, {"status": "unhealthy", "why": "not checked yet", "service": mod.SERVICE,
                                  "server": mod.SERVER_ID})
    ok = (200, {"status": "healthy", "checks": {"redis": "ok", "database": "ok", "slurm": "ok"}})
    mod._health_cache.update(t=clock[0], value=ok)
    assert mod.health() == ok
    clock[0] += mod.HEALTH_HUNG_S + 1
    code, doc = mod.health()
    assert code == 200 and doc["status"] == "degraded" and "has run" in doc["note"]
    clock[0] = 100.0 + mod.DEPENDENCY_GRACE_S + 1
    code, doc = mod.health()
    assert code == 503 and "s old" in doc["why"]


@pytest.fixture
def db(monkeypatch: pytest.MonkeyPatch) -> Any:
    import pymysql

    mod = load_script("portal_standin.py")
    monkeypatch.setattr(mod, "secret", lambda *a: "pw")
    d = mod.Db()
    d.ready = True
    conns: list[FakeConn] = []
    plan: list[list[BaseException | None]] = []

    def connect(**kw: Any) -> FakeConn:
        errors = plan.pop(0) if plan else []
        if errors and isinstance(errors[0], pymysql.err.OperationalError) and errors[0].args[0] == 2003:
            raise errors[0]
        conns.append(FakeConn(errors))
        return conns[-1]

    monkeypatch.setattr(pymysql, "connect", connect)
    return d, conns, plan, pymysql


def test_a_kept_connection_the_db_writer_cut_is_retried_once_on_a_new_one(db: Any) -> None:
    d, conns, plan, pymysql = db
    plan += [[None, pymysql.err.OperationalError(2013, "Lost connection to server during query")], [None]]
    assert d.query("SELECT 1") == (1, [])            # a kept connection now
    assert d.query("INSERT IGNORE ...") == (1, [])   # it broke: dropped, run again on a new one
    assert len(conns) == 2 and conns[0].closed and conns[1].statements == 1


@pytest.mark.parametrize("why", ["fresh connection", "not a lost connection", "the retry broke too"])
def test_no_second_retry_and_no_retry_of_other_errors(db: Any, why: str) -> None:
    d, conns, plan, pymysql = db
    lost = pymysql.err.OperationalError(2006, "server has gone away")
    if why == "fresh connection":
        plan += [[lost]]
        with pytest.raises(pymysql.err.OperationalError):
            d.query("SELECT 1")
        assert len(conns) == 1
    elif why == "not a lost connection":
        plan += [[None, pymysql.err.IntegrityError(1062, "Duplicate entry")]]
        d.query("SELECT 1")
        with pytest.raises(pymysql.err.IntegrityError):
            d.query("INSERT ...")
        assert len(conns) == 1
    else:
        plan += [[None, lost], [lost]]
        d.query("SELECT 1")
        with pytest.raises(pymysql.err.OperationalError):
            d.query("SELECT 1")
        assert len(conns) == 2
