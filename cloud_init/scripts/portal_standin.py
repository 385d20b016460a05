#!/usr/bin/python3
"""Stand-in portal service: what the hpc-portal-* units run when no application artifact
is configured (installed on app hosts as /usr/local/lib/hpc/portal_standin.py).

It behaves like the plan asks of the real services, so the tiers around it are exercised
for real: one process per (service, port) from the unit's environment (PORTAL_SERVICE,
PORT, SERVER_ID, DB_NAME, HEALTH_PATH) and /etc/hpc/portal.env.

  GET  <HEALTH_PATH>            200 {"status": "healthy", "checks": {...}} or 503
                                "unhealthy" (see health()): Redis through Sentinel (PING
                                on the master), the DB writer (SELECT 1 through
                                127.0.0.1:3306); Slurm (a controller answers `scontrol
                                ping`, every 15 s in the background) only reported
  GET  /<prefix>/session        session in Redis (cookie `sid`, TTL 8 h), created if absent
  POST /<prefix>/records        {"request_id", "payload"}: idempotent write to MariaDB
                                (unique request id; a replay changes nothing) -> 200
                                {"ok": true, "duplicate": bool}
  GET  /<prefix>/records/<id>   200 or 404
  POST /<prefix>/records/missing  {"ids": [...]} -> {"missing": [...], "rows", "duplicates"}
  GET  /<prefix>/records-stats  {"rows", "distinct", "checksum"} (CHECKSUM TABLE)
  POST /<prefix>/jobs           {"request_id", "name", "seconds"} (or the request id in
                                an Idempotency-Key header): idempotent sbatch --wrap ->
                                200 {"job_id", "request_id", "created": bool} (created
                                false: an earlier attempt's job was found), 503 when
                                Slurm did not answer (the job may exist: retry with the
                                same request id)
  GET  /<prefix>/jobs/<id>      {"job_id", "state"} from squeue/sacct/scontrol
  anything else                 200 {"service", "server"}

Needs python3-redis and python3-pymysql (Debian/Ubuntu packages).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

SERVICE = os.environ.get("PORTAL_SERVICE", "api")
PORT = int(os.environ.get("PORT", "5010"))
SERVER_ID = os.environ.get("SERVER_ID", socket.gethostname())
DB_NAME = os.environ.get("DB_NAME", "portal_api")
HEALTH = os.environ.get("HEALTH_PATH", "/health")
SESSION_TTL = 8 * 3600
HEALTH_EVERY_S = 1.0  # the health thread works the verdict out this often (as the reference portal)


def secret(env_name: str, file_var: str) -> str:
    if os.environ.get(env_name):
        return os.environ[env_name]
    path = os.environ.get(file_var)
    if path:
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError:
            pass
    return ""


def log(msg: str) -> None:
    print(f"portal-standin {SERVICE}:{PORT}: {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------- backends


class NoMaster(Exception):
    """No Redis master that a majority of the Sentinels reports and that says it is one."""


class Redis:
    """The Redis master, found the careful way (as examples/reference-portal does):
    redis-py's Sentinel client takes the FIRST Sentinel's answer, so one Sentinel with a
    stale view (the isolated side of a partition) sends every request to the old master.
    Here every Sentinel is asked and the address a majority of the configured ones
    reports wins; the winner must say ROLE master; every socket has a time-out (a paused
    master accepts connections and never answers) and redis-py's retries are off. A
    connection error, a time-out, READONLY (a demoted master) or NOREPLICAS (a master
    cut from its replicas refuses writes after min-replicas-max-lag) forgets the master:
    the next request discovers again."""

    def __init__(self) -> None:
        import redis

        self.redis = redis
        self.password = secret("REDIS_PASSWORD", "REDIS_PASSWORD_FILE")
        self.sentinel_password = secret("REDIS_SENTINEL_PASSWORD", "REDIS_SENTINEL_PASSWORD_FILE") or self.password
        self.sentinels: list[tuple[str, int]] = []
        for item in os.environ.get("REDIS_SENTINELS", "").split(","):
            if item.strip():
                host, _, port = item.strip().rpartition(":")
                self.sentinels.append((host, int(port)))
        self.name = os.environ.get("REDIS_MASTER_NAME", "mymaster")
        self.errors = (redis.RedisError, OSError)
        self.lock = threading.Lock()
        self.current: Any = None
        self.master = _Master(self)

    def client(self, host: str, port: int, password: str, timeout: float) -> Any:
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        return self.redis.Redis(host=host, port=port, password=password or None, socket_timeout=timeout,
                                socket_connect_timeout=1.0, retry=Retry(NoBackoff(), 0), retry_on_timeout=False)

    def discover(self) -> Any:
        answers: dict[str, str] = {}
        for host, port in self.sentinels:
            s = self.client(host, port, self.sentinel_password, 1.0)
            try:
                addr = s.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.name)
                answers[f"{host}:{port}"] = f"{_text(addr[0])}:{_text(addr[1])}" if addr else "error: unknown name"
            except self.errors as e:
                answers[f"{host}:{port}"] = f"error: {type(e).__name__}"
            finally:
                s.close()
        votes: dict[str, int] = {}
        for a in answers.values():
            if not a.startswith("error"):
                votes[a] = votes.get(a, 0) + 1
        need = len(self.sentinels) // 2 + 1
        best_addr, best_votes = max(votes.items(), key=lambda kv: kv[1]) if votes else ("", 0)
        if best_votes < need:
            raise NoMaster(f"no master reported by {need} of {len(self.sentinels)} Sentinels: {answers}")
        host, _, port_text = best_addr.rpartition(":")
        port = int(port_text)
        m = self.client(host, port, self.password, 1.5)
        try:
            role = m.execute_command("ROLE")
        except self.errors:
            m.close()
            raise
        if not role or _text(role[0]) != "master":
            m.close()
            raise NoMaster(f"{best_addr}, reported by the Sentinels, says ROLE {_text(role[0]) if role else '?'}")
        return m

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            if self.current is None:
                self.current = self.discover()
            m = self.current
        try:
            return getattr(m, method)(*args, **kwargs)
        except self.errors as e:
            if not isinstance(e, self.redis.ResponseError) or _forgets(e):
                with self.lock:
                    if self.current is m:
                        self.current = None
                m.close()
            raise


def _text(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _forgets(e: Exception) -> bool:
    """A reply error that means "not the master to write to" (demoted, or cut off)."""
    return str(e).startswith(("READONLY", "NOREPLICAS", "MASTERDOWN", "LOADING"))


class _Master:
    """redis().master.<command>(...): the command on the current master (see Redis)."""

    def __init__(self, owner: Redis) -> None:
        self.owner = owner

    def __getattr__(self, method: str) -> Any:
        return lambda *a, **kw: self.owner.call(method, *a, **kw)


# MySQL client errors of a connection that broke under a statement: server has gone away,
# lost connection during query; pymysql's InterfaceError is a use of a closed socket.
CONNECTION_LOST = {2006, 2013}


def connection_lost(e: BaseException) -> bool:
    import pymysql

    if isinstance(e, pymysql.err.InterfaceError):
        return True
    return isinstance(e, pymysql.err.OperationalError) and bool(e.args) and e.args[0] in CONNECTION_LOST


class Db:
    def __init__(self) -> None:
        self.local = threading.local()
        self.password = secret("DB_PASSWORD", "DB_PASSWORD_FILE")
        self.ready = False
        self.lock = threading.Lock()

    def conn(self) -> Any:
        import pymysql  # type: ignore[import-untyped]

        c = getattr(self.local, "c", None)
        if c is None:
            c = pymysql.connect(host=os.environ.get("DB_HOST", "127.0.0.1"), port=int(os.environ.get("DB_PORT", "3306")),
                                user=os.environ.get("DB_USER", "portal"), password=self.password, database=DB_NAME,
                                connect_timeout=2, read_timeout=5, write_timeout=5, autocommit=True,
                                # No TLS on MariaDB here; spares PyMySQL 1.1+'s per-connect TLS
                                # context (see the reference portal's portal/db.py).
                                ssl_disabled=True)
            self.local.c = c
        return c

    def drop(self) -> None:
        c = getattr(self.local, "c", None)
        self.local.c = None
        if c is not None:
            try:
                c.close()
            except Exception:  # noqa: BLE001
                pass

    def query(self, sql: str, args: Any = None) -> tuple[int, list[tuple[Any, ...]]]:
        """One statement. A broken connection is dropped; when it was a kept one that broke
        (the DB writer cut it: its node failed, or the preferred node came back and the
        sessions on a backup were shut), the statement runs once more on a new connection,
        as a pool with pre-ping would. Safe because every write here is idempotent by its
        request id (INSERT IGNORE on a unique key). Any other error fails the request."""
        for attempt in (1, 2):
            kept = getattr(self.local, "c", None) is not None
            try:
                self.ensure_schema()
                with self.conn().cursor() as cur:
                    n = cur.execute(sql, args)
                    return n, list(cur.fetchall())
            except Exception as e:
                self.drop()
                if attempt == 1 and kept and connection_lost(e):
                    continue
                raise
        raise AssertionError("unreachable")

    def ensure_schema(self) -> None:
        if self.ready:
            return
        with self.lock:
            if self.ready:
                return
            with self.conn().cursor() as cur:
                cur.execute("CREATE TABLE IF NOT EXISTS records ("
                            " id BIGINT AUTO_INCREMENT PRIMARY KEY,"
                            " request_id VARCHAR(64) NOT NULL,"
                            " payload VARCHAR(255) NOT NULL,"
                            " server_id VARCHAR(64) NOT NULL,"
                            " created TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),"
                            " UNIQUE KEY uq_request (request_id)) ENGINE=InnoDB")
            self.ready = True


REDIS: Redis | None = None
DB = Db()
_health_cache: dict[str, Any] = {"t": 0.0, "value": None}
_dep_state: dict[str, Any] = {"reached": set(), "failing_since": {}}
# A shared backend failing this long is this host's problem (or the tier is down for
# good): Redis fails over in ~5 s, the Galera writer in ~2-10 s.
DEPENDENCY_GRACE_S = 30.0
_health_lock = threading.Lock()


def redis() -> Redis:
    global REDIS
    if REDIS is None:
        REDIS = Redis()
    return REDIS


def check_redis() -> str:
    try:
        redis().master.ping()
        return "ok"
    except Exception as e:  # noqa: BLE001
        return f"error: {type(e).__name__}"


def check_db() -> str:
    try:
        DB.query("SELECT 1")
        return "ok"
    except Exception as e:  # noqa: BLE001
        # PyMySQL's 2003 "Can't connect" with ECONNREFUSED: the local DB writer is not there.
        refused = bool(getattr(e, "args", None)) and e.args[0] == 2003 and "refused" in str(e).lower()
        return f"error: {type(e).__name__}{' (connection refused)' if refused else ''}"


SLURM_CHECK_S = 15.0
_slurm_state: dict[str, Any] = {"value": None, "t": 0.0}
_slurm_ready = threading.Event()


def ping_slurm() -> str:
    """`scontrol ping`: ok when a controller answers (the backup answers in standby too).
    A bare TCP connection would do, but slurmctld logs an error for each one that sends
    no message: a health check every few seconds would flood its log."""
    rc, out = slurm(["scontrol", "ping"])
    if " is UP" in out:
        return "ok"
    return f"error: no slurmctld answers scontrol ping (rc {rc}: {out.strip().splitlines()[-1][-120:] if out.strip() else '-'})"


def _watch_slurm() -> None:
    while True:
        value = ping_slurm()
        _slurm_state.update(value=value, t=time.monotonic())
        _slurm_ready.set()
        time.sleep(SLURM_CHECK_S)


def check_slurm() -> str:
    """The last result of the background ping (a dead primary makes scontrol wait for
    its timeout: the health endpoint must not)."""
    _slurm_ready.wait(5)
    value, t = _slurm_state["value"], _slurm_state["t"]
    if value is None:
        return "error: Slurm not checked yet"
    if time.monotonic() - t > 4 * SLURM_CHECK_S + 30:
        return f"error: Slurm check stale ({time.monotonic() - t:.0f}s old)"
    return str(value)


HEALTH_HUNG_S = 3.0  # a round still running after this long waits on a hung backend
_health_ready = threading.Event()
_health_started: list[bool] = []


def _watch_health() -> None:
    while True:
        value = work_out_health()
        with _health_lock:
            _health_cache.update(t=time.monotonic(), value=value)
        _health_ready.set()
        time.sleep(HEALTH_EVERY_S)


def health() -> tuple[int, dict[str, Any]]:
    """The latest verdict of the health thread (a check from the LB, which gives it 1 s,
    never waits for Redis or the database). A round hung on a backend (a frozen Galera
    writer holds SELECT 1 for the read time-out) is "degraded" after HEALTH_HUNG_S like any
    failing shared backend, and a 503 once the verdict is DEPENDENCY_GRACE_S old."""
    with _health_lock:
        if not _health_started:
            threading.Thread(target=_watch_health, daemon=True, name="health").start()
            _health_started.append(True)
    _health_ready.wait(5)
    with _health_lock:
        value, age = _health_cache["value"], time.monotonic() - _health_cache["t"]
    if value is None:
        return 503, {"status": "unhealthy", "why": "not checked yet", "service": SERVICE, "server": SERVER_ID}
    if age > DEPENDENCY_GRACE_S:
        return 503, {**value[1], "status": "unhealthy", "why": f"the last verdict is {age:.0f} s old (a backend hangs)"}
    if age > HEALTH_HUNG_S and value[0] == 200:
        return 200, {**value[1], "status": "degraded", "note": f"the health round has run {age - HEALTH_EVERY_S:.0f} s"}
    return value


def work_out_health() -> tuple[int, dict[str, Any]]:
    checks = {"redis": check_redis(), "database": check_db(), "slurm": check_slurm()}
    # The LB's check asks "should this server get requests", and every backend shares
    # Redis, the database and the controllers: failing it on a shared dependency takes
    # every backend out of the load balancer at once (measured: with the primary slurmctld
    # paused, every request answered 503 by HAProxy until the backup fenced it; with the
    # Galera writer frozen, RTO 9 s against 5). So 503 only until Redis and the database
    # were reached once, when the local DB writer refuses connections, or when one has
    # failed for longer than DEPENDENCY_GRACE_S (this host is cut off, or the tier is down
    # for good); while a tier fails over, or Slurm does not answer, 200 "degraded".
    now = time.monotonic()
    with _health_lock:
        for dep in ("redis", "database"):
            if checks[dep] == "ok":
                _dep_state["reached"].add(dep)
                _dep_state["failing_since"].pop(dep, None)
            else:
                _dep_state["failing_since"].setdefault(dep, now)
        why = ("the local DB writer refuses connections" if "connection refused" in checks["database"] else "") \
            or next((f"{d} never reached since start" for d in ("redis", "database")
                     if d not in _dep_state["reached"]), "") \
            or next((f"{d} failing for {now - t:.0f} s (> {DEPENDENCY_GRACE_S:.0f} s)"
                     for d, t in _dep_state["failing_since"].items() if now - t > DEPENDENCY_GRACE_S), "")
    doc: dict[str, Any] = {"checks": checks, "service": SERVICE, "server": SERVER_ID}
    if why:
        value = (503, {"status": "unhealthy", "why": why, **doc})
    else:
        value = (200, {"status": "healthy" if all(v == "ok" for v in checks.values()) else "degraded", **doc})
    return value


def slurm(argv: list[str]) -> tuple[int, str]:
    try:
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return 1, str(e)
    return cp.returncode, (cp.stdout + cp.stderr).strip()


# --------------------------------------------------------------------- job submission
#
# A paused or hung slurmctld still completes TCP handshakes, so sbatch waits
# MessageTimeout and reports "Socket timed out on send/recv operation" although the
# submission may sit in the controller's backlog and be accepted later (a ghost job).
# The client therefore names each submission with a request id and repeats a failed one
# with the same id; the id travels as the job's comment (--comment), and before
# submitting the portal looks it up: in squeue (every job the controller still holds,
# including those that ended less than MinJobAge ago), then in sacct (slurmctld sends the
# comment with a job's completion record when AccountingStoreFlags=job_comment, so sacct
# has it for every job that squeue has forgotten).

REQUEST_ID_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
SACCT_LOOKBACK = "now-7days"  # retries come within minutes; a week is plenty


class LookupFailed(Exception):
    """Slurm could not say whether a job with the request id exists."""


def find_job(request_id: str) -> tuple[str | None, str]:
    """(job id or None, where it was looked up). Raises LookupFailed when squeue fails:
    then nothing may be submitted (a duplicate could follow). A failing sacct (slurmdbd
    down) only narrows the search to squeue, which holds every job a retry can concern
    for MinJobAge after it ended: submissions must not stop with accounting."""
    rc, out = slurm(["squeue", "--noheader", "--states=all", "-o", "%i %k"])
    if rc != 0:
        raise LookupFailed(f"squeue failed (rc {rc}): {out[-200:]}")
    for line in out.splitlines():
        job, _, comment = line.strip().partition(" ")
        if comment.strip() == request_id and job:
            return job, "squeue"
    rc, out = slurm(["sacct", "--noheader", "--parsable2", "--allusers", "--allocations",
                     f"--starttime={SACCT_LOOKBACK}", "--format=JobID,Comment"])
    if rc != 0:
        log(f"sacct failed (rc {rc}), request {request_id} looked up in squeue only: {out[-200:]}")
        return None, "squeue (sacct failed)"
    for line in out.splitlines():
        job, _, comment = line.strip().partition("|")
        if comment == request_id and job:
            return job, "sacct"
    return None, "squeue+sacct"


def submit_job(request_id: str | None, name: str, seconds: int) -> tuple[int, dict[str, Any]]:
    """(HTTP status, document) for one submission; see the comment above."""
    doc: dict[str, Any] = {"request_id": request_id, "server": SERVER_ID}
    if request_id is not None:
        try:
            job, where = find_job(request_id)
        except LookupFailed as e:
            return 503, {**doc, "error": f"cannot tell whether request {request_id} was already submitted: {e}; "
                                         "retry with the same request id"}
        if job:
            return 200, {**doc, "job_id": job, "created": False, "found_in": where}
    argv = ["sbatch", "--parsable", "--job-name", name, "--output", "/dev/null"]
    if request_id is not None:
        argv.append(f"--comment={request_id}")
    rc, out = slurm([*argv, f"--wrap=sleep {seconds}"])
    if rc != 0:
        hint = "; the job may exist: retry with the same request id" if request_id is not None else ""
        return 503, {**doc, "error": out[-300:] + hint}
    m = re.search(r"^(\d+)(;\S+)?$", out, re.M)  # --parsable: "<id>" or "<id>;<cluster>"
    if not m:
        return 503, {**doc, "error": f"sbatch answered without a job id: {out[-300:]}"}
    return 200, {**doc, "job_id": m.group(1), "created": True}


# ---------------------------------------------------------------------------- HTTP


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "hpc-portal-standin"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def reply(self, code: int, doc: Any, headers: dict[str, str] | None = None) -> None:
        body = (json.dumps(doc) + "\n").encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def body(self) -> Any:
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        return json.loads(raw or b"{}")

    def path_tail(self) -> str:
        """The path without the service's route prefix (/api/records -> /records)."""
        path = self.path.split("?", 1)[0]
        m = re.match(r"^/[A-Za-z0-9_-]+(/.*)$", path)
        return m.group(1) if m else path

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        try:
            if path == HEALTH:
                code, doc = health()
                return self.reply(code, doc)
            tail = self.path_tail()
            if tail == "/session":
                return self.session()
            m = re.fullmatch(r"/records/([A-Za-z0-9_.:-]{1,64})", tail)
            if m:
                _n, rows = DB.query("SELECT request_id FROM records WHERE request_id = %s", (m.group(1),))
                return self.reply(200 if rows else 404, {"found": bool(rows), "server": SERVER_ID})
            if tail == "/records-stats":
                _n, rows = DB.query("SELECT COUNT(*), COUNT(DISTINCT request_id) FROM records")
                _n, ck = DB.query("CHECKSUM TABLE records")
                return self.reply(200, {"rows": rows[0][0], "distinct": rows[0][1], "checksum": ck[0][1]})
            m = re.fullmatch(r"/jobs/(\d+)", tail)
            if m:
                return self.job_state(m.group(1))
            return self.reply(200, {"service": SERVICE, "server": SERVER_ID})
        except Exception as e:  # noqa: BLE001 - a backend failure is a 503, never a hang
            return self.reply(503, {"error": f"{type(e).__name__}: {e}", "server": SERVER_ID})

    def do_POST(self) -> None:
        try:
            tail = self.path_tail()
            req = self.body()
            if tail == "/records":
                rid = str(req.get("request_id", ""))
                if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", rid):
                    return self.reply(400, {"error": "request_id: 1-64 of [A-Za-z0-9_.:-]"})
                n, _rows = DB.query("INSERT IGNORE INTO records (request_id, payload, server_id) VALUES (%s, %s, %s)",
                                    (rid, str(req.get("payload", ""))[:255], SERVER_ID))
                return self.reply(200, {"ok": True, "duplicate": n == 0, "server": SERVER_ID})
            if tail == "/records/missing":
                ids = [str(x) for x in req.get("ids", [])]
                found: set[str] = set()
                for i in range(0, len(ids), 500):
                    chunk = ids[i:i + 500]
                    if chunk:
                        _n, rows = DB.query("SELECT request_id FROM records WHERE request_id IN (" +
                                            ",".join(["%s"] * len(chunk)) + ")", chunk)
                        found |= {r[0] for r in rows}
                _n, rows = DB.query("SELECT COUNT(*) - COUNT(DISTINCT request_id), COUNT(*) FROM records")
                return self.reply(200, {"missing": [x for x in ids if x not in found], "duplicates": int(rows[0][0]),
                                        "rows": int(rows[0][1])})
            if tail == "/jobs":
                rid = req.get("request_id", self.headers.get("Idempotency-Key"))
                if rid is not None and not REQUEST_ID_RE.fullmatch(str(rid)):
                    return self.reply(400, {"error": "request_id (or Idempotency-Key): 1-64 of [A-Za-z0-9_.:-]"})
                name = str(req.get("name", "portal"))
                if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
                    return self.reply(400, {"error": "name: 1-64 of [A-Za-z0-9_.-]"})
                secs = req.get("seconds", 600)
                if not isinstance(secs, int) or isinstance(secs, bool) or not 0 <= secs <= 7 * 86400:
                    return self.reply(400, {"error": "seconds: an integer from 0 to 604800"})
                code, doc = submit_job(None if rid is None else str(rid), name, secs)
                return self.reply(code, doc)
            return self.reply(404, {"error": "no such endpoint"})
        except Exception as e:  # noqa: BLE001
            return self.reply(503, {"error": f"{type(e).__name__}: {e}", "server": SERVER_ID})

    def session(self) -> None:
        sid = ""
        for part in (self.headers.get("Cookie") or "").split(";"):
            k, _, v = part.strip().partition("=")
            if k == "sid" and re.fullmatch(r"[0-9a-f]{32}", v):
                sid = v
        r = redis().master
        headers = {}
        if sid and r.expire(f"session:{sid}", SESSION_TTL):
            data = r.get(f"session:{sid}")
            return self.reply(200, {"session": sid, "new": False, "data": (data or b"").decode(), "server": SERVER_ID})
        sid = uuid.uuid4().hex
        r.set(f"session:{sid}", json.dumps({"created": time.time(), "server": SERVER_ID}), ex=SESSION_TTL)
        headers["Set-Cookie"] = f"sid={sid}; Path=/; HttpOnly; Secure; SameSite=Lax"
        return self.reply(200, {"session": sid, "new": True, "server": SERVER_ID}, headers)

    def job_state(self, job_id: str) -> None:
        rc, out = slurm(["squeue", "-h", "-j", job_id, "-o", "%T"])
        if rc == 0 and out:
            return self.reply(200, {"job_id": job_id, "state": out.splitlines()[0]})
        rc, out = slurm(["scontrol", "show", "job", job_id])
        m = re.search(r"JobState=(\S+)", out)
        if m:
            return self.reply(200, {"job_id": job_id, "state": m.group(1)})
        return self.reply(404, {"job_id": job_id, "error": out[-200:]})


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


def main() -> int:
    host = os.environ.get(f"BACKEND_{PORT}_HOST", "0.0.0.0")
    srv = Server((host, PORT), Handler)
    threading.Thread(target=_watch_slurm, daemon=True, name="slurm-ping").start()
    log(f"serving {SERVICE} on {host}:{PORT} (health {HEALTH}, database {DB_NAME})")
    srv.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
