"""The Flask apps: one package, the service chosen by $PORTAL_SERVICE (api, auth, cae,
ws). Every service has its health endpoint and the shared session; the routes:

  auth  POST /auth/login {"username","password"}   POST /auth/logout   GET /auth/me
  api   POST /api/jobs {"request_id"?, "name", "seconds"} -> {"job_id","request_id","created"}
        GET /api/jobs (the user's jobs)   GET /api/jobs/<id> -> {"job_id","state"}
        the rehearsal's probes, as the stand-in serves them: GET /api/session,
        POST /api/records, GET /api/records/<id>, POST /api/records/missing, GET /api/records-stats
  cae   GET /cae/whoami (the same login, read from Redis by another service)
  ws    GET /ws/ (websocket: job-state changes, see ws.py)
"""

from __future__ import annotations

import functools
import json
import re
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

import pymysql  # type: ignore[import-untyped]
import redis
from flask import Flask, Response, abort, jsonify, request, session
from werkzeug.security import check_password_hash, generate_password_hash

from . import slurm
from .background import Background
from .db import Database
from .reconcile import Reconciler
from .redisha import ERRORS, SentinelMaster, SubmitLock
from .sessions import RedisSession, RedisSessionInterface
from .settings import Settings

PREFIX = {"api": "/api", "auth": "/auth", "cae": "/cae", "ws": "/ws"}
USERNAME = re.compile(r"[a-z_][a-z0-9_.-]{0,63}")
JOB_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
HEALTH_EVERY_S = 1.0  # the health thread works the verdict out this often
# A shared backend failing this long is this host's problem (or the tier is down for
# good): Redis fails over in ~5 s, the Galera writer in ~2-10 s (docs/rehearsal.md).
DEPENDENCY_GRACE_S = 30.0
HEALTH_HUNG_S = 3.0  # a round still running after this long: a backend hangs (degraded)
HEALTH_STALE_S = DEPENDENCY_GRACE_S  # ... and after this long a 503


class Backends:
    """What a service talks to; tests pass their own (real daemons on loopback ports)."""

    def __init__(self, s: Settings, redis: SentinelMaster | None = None, db: Database | None = None) -> None:
        self.s = s
        self.redis = redis or SentinelMaster(s.sentinels, s.master_name, s.redis_password, s.sentinel_password,
                                             s.redis_timeout)
        self.db = db or Database(s)
        self.slurm = slurm.PingWatcher()


class HealthWatcher:
    """The health verdict, worked out in a thread of its own every HEALTH_EVERY_S: a check
    from HAProxy is answered at once from the latest one and never waits for Redis or
    the database on a busy host (the LB gives a check 1 s). A round still running after
    HEALTH_HUNG_S waits on a hung backend (a frozen Galera writer holds SELECT 1 for its
    read time-out: measured, freeze-galera): "degraded" like any shared backend that
    fails, and a 503 once the verdict is HEALTH_STALE_S old.

    A check from the LB asks "should this server get requests", and every server shares
    the same Redis, database and controllers: failing it on a shared dependency takes every
    server out at once and turns a tier's failover into a whole-portal outage, then adds
    the LB's rise to the way back. Measured: with the primary slurmctld down, 693 requests
    answered by HAProxy with no server left; with the Galera writer frozen, 207 (RTO 9.04 s
    against the tier's 5). So:
    - 503 until this process has reached Redis and the database once (a new host is not
      put in service, and its gate does not pass, before it works);
    - 503 when the local path itself is broken: the local DB writer refuses connections;
    - 503 when Redis or the database has failed for longer than DEPENDENCY_GRACE_S, far
      past either tier's failover: this host is cut off, or the tier is down for good;
    - otherwise 200, "degraded" with the failing checks named while a tier fails over or
      Slurm does not answer (Slurm is never required). Requests that need the failing
      backend answer 503 with the reason on their own; the rest go on."""

    def __init__(self, s: Settings, b: Backends) -> None:
        self.s, self.b = s, b
        self.reached: set[str] = set()  # the backends reached once since start
        self.failing_since: dict[str, float] = {}
        self.rounds: Background[tuple[dict[str, Any], int]] = Background(self.work_out, HEALTH_EVERY_S, "health")

    def work_out(self) -> tuple[dict[str, Any], int]:
        checks = {"redis": "ok", "database": "ok", "slurm": self.b.slurm.check()}
        local_fault = ""
        try:
            self.b.redis.call(lambda r: r.ping())
        except ERRORS as e:
            checks["redis"] = f"error: {type(e).__name__}: {e}"
        try:
            self.b.db.query("SELECT 1")
        except Exception as e:  # noqa: BLE001 - any failure is a check's error, never a 500
            checks["database"] = f"error: {type(e).__name__}: {e}"
            if refused(e):
                local_fault = f"the local DB writer ({self.s.db_host}:{self.s.db_port}) refuses connections"
        now = time.monotonic()
        for dep in ("redis", "database"):
            if checks[dep] == "ok":
                self.reached.add(dep)
                self.failing_since.pop(dep, None)
            else:
                self.failing_since.setdefault(dep, now)
        why = local_fault or next(
            (f"{dep} never reached since start" for dep in ("redis", "database") if dep not in self.reached), "") \
            or next((f"{dep} failing for {now - t:.0f} s (> {DEPENDENCY_GRACE_S:.0f} s)"
                     for dep, t in self.failing_since.items() if now - t > DEPENDENCY_GRACE_S), "")
        doc: dict[str, Any] = {"checks": checks, "service": self.s.service, "server": self.s.server_id}
        if why:
            return {"status": "unhealthy", "why": why, **doc}, 503
        return {"status": "healthy" if all(v == "ok" for v in checks.values()) else "degraded", **doc}, 200

    def verdict(self) -> tuple[dict[str, Any], int]:
        value, age = self.rounds.latest()
        if value is None:
            return {"status": "unhealthy", "why": "not checked yet", "service": self.s.service,
                    "server": self.s.server_id}, 503
        if age > HEALTH_STALE_S:
            return {"status": "unhealthy", "why": f"the last verdict is {age:.0f} s old (a backend hangs)",
                    "checks": value[0].get("checks"), "service": self.s.service, "server": self.s.server_id}, 503
        if age > HEALTH_HUNG_S and value[1] == 200:
            return {**value[0], "status": "degraded",
                    "note": f"the health round has run {age - HEALTH_EVERY_S:.0f} s (a backend hangs)"}, 200
        return value


def refused(e: BaseException) -> bool:
    """PyMySQL's "Can't connect" (2003) with ECONNREFUSED underneath: nothing listens on
    the DB writer's port on this host."""
    return isinstance(e, pymysql.err.OperationalError) and bool(e.args) and e.args[0] == 2003 \
        and "refused" in str(e).lower()


def error(code: int, message: str) -> Response:
    # A backend failure says why in the journal too: the access log shows only "503 61".
    if code >= 500:
        print(f"hpc-portal: {code} {request.method} {request.path}: {message}", file=sys.stderr, flush=True)
    r = jsonify({"error": message})
    r.status_code = code
    return r


def login_required(view: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(view)
    def wrapped(*a: Any, **kw: Any) -> Any:
        assert isinstance(session, RedisSession)
        if session.error:
            return error(503, f"session store unavailable: {session.error}")
        if not session.get("user"):
            return error(401, "login required")
        return view(*a, **kw)
    return wrapped


def create_app(s: Settings | None = None, backends: Backends | None = None) -> Flask:
    s = s or Settings.from_env()
    b = backends or Backends(s)
    app = Flask(__name__)
    app.session_interface = RedisSessionInterface(b.redis, secure=s.cookie_secure)
    app.extensions["portal"] = b
    prefix = PREFIX[s.service]

    # A backend that fails answers 503 with the reason (HAProxy and clients retry),
    # never a 500 with a stack trace.
    @app.errorhandler(pymysql.MySQLError)
    @app.errorhandler(redis.RedisError)
    def backend_down(e: Exception) -> Response:
        return error(503, f"{type(e).__name__}: {e}")

    # JSON bodies only: a cross-site HTML form cannot send application/json, so with the
    # SameSite=Lax cookie this is the CSRF defence of the POST routes.
    @app.before_request
    def json_only() -> Response | None:
        if request.method == "POST" and not request.is_json:
            return error(415, "POST bodies are JSON (Content-Type: application/json)")
        return None

    watch = HealthWatcher(s, b)

    @app.get(s.health_path)
    def health() -> tuple[Response, int]:
        doc, code = watch.verdict()
        return jsonify(doc), code

    @app.get(f"{prefix}/session")
    def session_info() -> Response | tuple[Response, int]:
        assert isinstance(session, RedisSession)
        if session.error:
            return error(503, f"session store unavailable: {session.error}")
        new = session.new
        if new:
            session["created"] = time.time()
        return jsonify({"session": session.sid, "new": new, "user": session.get("user"), "server": s.server_id})

    if s.service == "auth":
        _auth_routes(app, b)
    elif s.service == "api":
        _api_routes(app, b)
    elif s.service == "cae":
        @app.get("/cae/whoami")
        @login_required
        def whoami() -> Response:
            return jsonify({"user": session["user"], "server": s.server_id})
    elif s.service == "ws":
        from .ws import add_websocket
        add_websocket(app, b)
    return app


def _auth_routes(app: Flask, b: Backends) -> None:
    @app.post("/auth/login")
    def login() -> Response | tuple[Response, int]:
        assert isinstance(session, RedisSession)
        if session.error:
            return error(503, f"session store unavailable: {session.error}")
        body = request.get_json(silent=True) or {}
        user, password = str(body.get("username", "")), str(body.get("password", ""))
        _n, rows = b.db.query("SELECT password_hash FROM portal_users WHERE username = %s", (user,))
        if not rows or not check_password_hash(rows[0][0], password):
            return error(401, "wrong username or password")
        # A new session id at login (no session fixation); the old key goes.
        old = session.sid
        if not session.new:
            b.redis.call(lambda r: r.delete(f"portal:session:{old}"))
        session.clear()
        session.sid, session.new = uuid.uuid4().hex, True
        session.update(user=user, login=time.time())
        return jsonify({"user": user})

    @app.post("/auth/logout")
    def logout() -> Response:
        session.clear()
        return jsonify({"user": None})

    @app.get("/auth/me")
    @login_required
    def me() -> Response:
        return jsonify({"user": session["user"]})


def add_user(b: Backends, username: str, password: str) -> None:
    if not USERNAME.fullmatch(username):
        raise ValueError(f"username {username!r}: lower-case letters, digits, _ . - (max 64)")
    if len(password) < 8:
        raise ValueError("password: at least 8 characters")
    b.db.query("INSERT INTO portal_users (username, password_hash) VALUES (%s, %s) "
               "ON DUPLICATE KEY UPDATE password_hash = VALUES(password_hash)",
               (username, generate_password_hash(password)))


def _api_routes(app: Flask, b: Backends) -> None:
    s, db = b.s, b.db
    reconciler = Reconciler(b)
    app.extensions["portal_reconciler"] = reconciler

    @app.before_request
    def start_reconciler() -> None:
        if s.reconcile_jobs:
            reconciler.start()

    @app.errorhandler(slurm.SlurmError)
    def slurm_down(e: Exception) -> Response:
        return error(503, str(e))

    @app.post("/api/jobs")
    @login_required
    def submit() -> Response:
        body = request.get_json(silent=True) or {}
        # The request id: from the body or an Idempotency-Key header, as the stand-in
        # takes it; without one the server makes one (the job still gets a comment, so
        # the websocket stream follows it), but then a retry cannot be recognised.
        rid = str(body.get("request_id") or request.headers.get("Idempotency-Key") or uuid.uuid4().hex)
        name = str(body.get("name", "portal"))
        seconds = body.get("seconds", 600)
        if not slurm.REQUEST_ID.fullmatch(rid):
            abort(error(400, "request_id (or Idempotency-Key): 1-64 of [A-Za-z0-9_.:-]"))
        if not JOB_NAME.fullmatch(name):
            abort(error(400, "name: 1-64 of [A-Za-z0-9_.-]"))
        if not isinstance(seconds, int) or isinstance(seconds, bool) or not 0 <= seconds <= 7 * 86400:
            abort(error(400, "seconds: an integer from 0 to 604800"))
        # One submission per request id at a time: a retry that arrives while the first
        # attempt still runs sbatch gets 409 and retries later (it then finds the job).
        with SubmitLock(b.redis, rid, s.server_id) as held:
            if not held:
                abort(error(409, f"request {rid} is being submitted; retry with the same request id"))
            user = session["user"]

            def journal(job_id: str) -> None:  # before the job is released (portal/slurm.py)
                db.query("INSERT IGNORE INTO portal_jobs (request_id, job_id, username, name, seconds) "
                         "VALUES (%s, %s, %s, %s, %s)", (rid, job_id, user, name, seconds))
            def recorded() -> str | None:  # the job an earlier attempt recorded (INSERT IGNORE keeps it)
                n, rows = db.query("SELECT job_id FROM portal_jobs WHERE request_id = %s", (rid,))
                return str(rows[0][0]) if n else None
            doc = slurm.submit(rid, name, seconds, journal, recorded)
        return jsonify({**doc, "server": s.server_id})

    @app.get("/api/jobs")
    @login_required
    def my_jobs() -> Response:
        _n, rows = db.query("SELECT job_id, name, request_id FROM portal_jobs WHERE username = %s "
                            "ORDER BY created DESC LIMIT 50", (session["user"],))
        states = b.redis.call(lambda r: r.hgetall(f"portal:jobs:{s.cluster}:state")) if rows else {}
        return jsonify({"jobs": [{"job_id": j, "name": n, "request_id": rid, "state": states.get(j)}
                                 for j, n, rid in rows]})

    @app.get("/api/jobs/<job_id>")
    def job(job_id: str) -> Response:
        if not slurm.JOB_ID.fullmatch(job_id):
            abort(error(400, "job id: digits"))
        state = slurm.job_state(job_id)
        if state is None:
            abort(error(404, f"job {job_id}: unknown to squeue and sacct"))
        return jsonify({"job_id": job_id, "state": state})

    # The rehearsal's data-consistency probes, with the stand-in's semantics.
    @app.post("/api/records")
    def write_record() -> Response:
        body = request.get_json(silent=True) or {}
        rid = str(body.get("request_id", ""))
        if not slurm.REQUEST_ID.fullmatch(rid):
            abort(error(400, "request_id: 1-64 of [A-Za-z0-9_.:-]"))
        n, _r = db.query("INSERT IGNORE INTO records (request_id, payload, server_id) VALUES (%s, %s, %s)",
                         (rid, str(body.get("payload", ""))[:255], s.server_id))
        return jsonify({"ok": True, "duplicate": n == 0, "server": s.server_id})

    @app.get("/api/records/<rid>")
    def read_record(rid: str) -> tuple[Response, int]:
        _n, rows = db.query("SELECT request_id FROM records WHERE request_id = %s", (rid,))
        return jsonify({"found": bool(rows), "server": s.server_id}), 200 if rows else 404

    @app.post("/api/records/missing")
    def missing_records() -> Response:
        ids = [str(x) for x in (request.get_json(silent=True) or {}).get("ids", [])]
        found: set[str] = set()
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            _n, rows = db.query(f"SELECT request_id FROM records WHERE request_id IN ({','.join(['%s'] * len(chunk))})",
                                chunk)
            found |= {r[0] for r in rows}
        _n, rows = db.query("SELECT COUNT(*) - COUNT(DISTINCT request_id), COUNT(*) FROM records")
        return jsonify({"missing": [x for x in ids if x not in found], "duplicates": int(rows[0][0]),
                        "rows": int(rows[0][1])})

    @app.get("/api/records-stats")
    def record_stats() -> Response:
        _n, rows = db.query("SELECT COUNT(*), COUNT(DISTINCT request_id) FROM records")
        _n, ck = db.query("CHECKSUM TABLE records")
        return jsonify({"rows": rows[0][0], "distinct": rows[0][1], "checksum": ck[0][1]})


def dumps(doc: Any) -> str:
    return json.dumps(doc, separators=(",", ":"))
