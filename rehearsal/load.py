"""Load through the VIP, from the client namespace ("the internet"), bounded in count and
time. Every request is one line in the output file (the history the drills read back):

    start end kind ok status request_id server ref

kinds: `write` (POST /api/records with a fresh request id: idempotent on the server),
`snew` (GET /api/session without a cookie: a new session written to the Redis master;
request_id is the session id), `session` (GET /api/session with the newest session's
cookie: Redis through Sentinel; ref `lost` when the server no longer knew it), `page`
(GET /: nginx), `record` (GET /api/records/<an acknowledged id>: MariaDB through the DB
writer), `job` (POST /api/jobs with a request id, in the body and as Idempotency-Key,
one every --job-interval s from its own thread; a failed attempt is repeated with the
same request id until --job-deadline, as a portal's retry would; ref is the job id).
`server` is the web/app host that answered ("-" when none did); a request that got no
answer at all has the exception's class as its ref (TimeoutError, ConnectionResetError, ...).

With --user and --password-file (the reference portal: the rehearsal makes the account
after boot, rehearsal/portal_artifact.py) every client logs in first, as a person would:
`login` (POST /auth/login; ref `first`, or `relogin` when a request answered 401 with
the session the client had: a forced re-login), keeps its cookies (the `sid` session,
HAProxy's stickiness cookie) for every request but the session probes, which carry their
own; and --ws (default 1) clients hold a websocket subscription on /ws/ (the ws service
through the LB): `ws` lines, one per round trip of the service's hello (every second;
ref `uptodate`, `snapshot` (the hello crossed a change on its way) or `resync` (the
snapshot that answers the first hello after a reconnect, or after a gap in the
sequence: the client had missed changes), with `-stale` when the server answered from
its copy while Redis was away ("live": false), request_id the sequence seen) and per failure
(ok 0, ref `connect` with the HTTP status that refused the upgrade, `closed` or
`timeout`). A connection after the first one is a reconnect. Without a login (the stand-in: no login, no
websocket) the load is the anonymous one, as before.

    python -m rehearsal.load run --url https://203.0.113.10 --out F [--rate 60] [--writes 0.3]
                                 [--duration 600] [--max-requests 40000]
                                 [--user NAME --password-file F [--ws 1]]
    python -m rehearsal.load verify --url ... --ids F     read every acknowledged write back
    python -m rehearsal.load sessions --url ... --ids F   which acknowledged sessions are gone
    python -m rehearsal.load jobs --url ... [--user NAME --password-file F] submit --count 5 | states --ids 1,2
                                                           Slurm jobs through the portal
"""

from __future__ import annotations

import argparse
import http.client
import http.cookies
import json
import os
import queue
import random
import signal
import socket
import ssl
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

TIMEOUT = 3.0
# A login checks a password hash (scrypt, ~0.1-0.2 s of CPU on purpose). The load's clients
# log in at most LOGINS_AT_ONCE at a time, as people arrive, not all in one second: two
# dozen hashes at once starve the auth services' health checks on a small host and HAProxy
# takes every auth server out (measured: 26 at once on 2 CPUs, checks timed out at 3 s).
LOGIN_TIMEOUT = 30.0
LOGINS_AT_ONCE = 3
# A job submission in flight is retried this long after the load stops: one whole attempt
# (--job-timeout 25 s) and a retry. With 9 s, the freeze-slurm drill's last attempt gave up
# 7 s into a submission the portal then completed (a job its client never heard of).
RESOLVE_AFTER_STOP_S = 40.0
WS_TIMEOUT = 5.0  # a websocket that brings nothing for this long (it answers a hello every second) is dead
WRITE_KINDS = ("write", "snew", "job")  # the kinds that write: their acknowledgements are read back



STICKY_PREFIX = "SRV_"  # HAProxy's stickiness cookies (lb/haproxy.cfg: one per sticky backend)


def set_cookies_parsed(set_cookies: list[str]) -> Iterator[tuple[str, http.cookies.Morsel[str]]]:
    """(name, morsel) of every cookie in these Set-Cookie headers; a header the cookie
    parser refuses is skipped."""
    for header in set_cookies:
        jar: http.cookies.SimpleCookie = http.cookies.SimpleCookie()
        try:
            jar.load(header)
        except http.cookies.CookieError:
            continue
        yield from jar.items()


def stickiness(set_cookies: list[str]) -> str | None:
    """The server named by a stickiness cookie among these Set-Cookie headers, if one."""
    for name, morsel in set_cookies_parsed(set_cookies):
        if name.startswith(STICKY_PREFIX) and morsel.value:
            return str(morsel.value)
    return None


_STICKY: type | None = None


def sticky_client() -> Any:
    """simple_websocket's Client that keeps the Set-Cookie headers of its upgrade's 101
    answer (`set_cookies`): the library reads them (wsproto's AcceptConnection) and
    drops them. Built on first use: the stand-in's load runs without simple_websocket."""
    global _STICKY
    if _STICKY is None:
        from simple_websocket import Client
        from wsproto.events import AcceptConnection

        class StickyClient(Client):  # type: ignore[misc]
            def handshake(self) -> None:
                self.set_cookies: list[str] = []
                events = self.ws.events

                def spy() -> Any:
                    for event in events():
                        if isinstance(event, AcceptConnection):
                            self.set_cookies = [v.decode("latin-1") for k, v in event.extra_headers
                                                if k.lower() == b"set-cookie"]
                        yield event
                self.ws.events = spy
                try:
                    super().handshake()
                finally:
                    self.ws.events = events

        _STICKY = StickyClient
    return _STICKY

class Conn:
    """One client: a keep-alive connection and its cookies (every Set-Cookie it got, the
    way a browser keeps them: the `sid` session, HAProxy's stickiness cookie)."""

    def __init__(self, url: str):
        u = urlparse(url)
        self.url = url
        self.host, self.port, self.tls = u.hostname or "", u.port or (443 if u.scheme == "https" else 80), u.scheme == "https"
        self.ctx = ssl._create_unverified_context() if self.tls else None  # the rehearsal's self-signed certificate
        self.c: http.client.HTTPConnection | None = None
        self.jar: dict[str, str] = {}
        self.used = False  # the connection has carried a response: it may have been closed while idle
        self.stale_retries = 0

    @property
    def cookie(self) -> str:
        """The Cookie header this client sends ("" when it has none)."""
        return "; ".join(f"{k}={v}" for k, v in self.jar.items())

    @cookie.setter
    def cookie(self, value: str) -> None:
        self.jar = dict(part.strip().split("=", 1) for part in value.split(";") if "=" in part)

    def keep(self, set_cookies: list[str]) -> None:
        for name, morsel in set_cookies_parsed(set_cookies):
            if morsel["max-age"] == "0" or not morsel.value:  # deleted (a logout)
                self.jar.pop(name, None)
            else:
                self.jar[name] = morsel.value

    def request(self, method: str, path: str, body: Any = None, timeout: float = TIMEOUT,
                headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        """One request. A keep-alive connection that was closed or reset while it was
        idle (the LB's `timeout http-keep-alive`; the Elastic IP moved to the other LB,
        which resets every connection made to the first) fails at once without an answer:
        the request is sent again once on a new connection, as browsers and urllib3 do
        (nothing reached a server; the load's writes are idempotent by request id anyway).
        Over TLS, a reset seen while reading the answer is an SSLEOFError."""
        reused = self.used
        try:
            return self._request(method, path, body, timeout, headers)
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, ssl.SSLEOFError):
            if not reused:
                raise
            self.stale_retries += 1
            return self._request(method, path, body, timeout, headers)

    def _request(self, method: str, path: str, body: Any, timeout: float,
                 headers: dict[str, str] | None) -> tuple[int, bytes]:
        if self.c is None:
            if self.tls:
                self.c = http.client.HTTPSConnection(self.host, self.port, timeout=timeout, context=self.ctx)
            else:
                self.c = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        h = {"Connection": "keep-alive", **(headers or {})}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            h["Content-Type"] = "application/json"
        if self.jar:
            h["Cookie"] = self.cookie
        try:
            self.c.timeout = timeout
            if self.c.sock is not None:
                self.c.sock.settimeout(timeout)
            self.c.request(method, path, body=data, headers=h)
            r = self.c.getresponse()
            payload = r.read()
            self.keep(r.msg.get_all("Set-Cookie") or [])
            self.used = True
            if r.getheader("Connection", "").lower() == "close":
                self.close()
            return r.status, payload
        except Exception:
            self.close()
            raise

    def close(self) -> None:
        if self.c is not None:
            try:
                self.c.close()
            except Exception:  # noqa: BLE001
                pass
        self.c = None
        self.used = False


class Account:
    """The rehearsal's portal account (--user, --password-file); None: the stand-in, no login."""

    def __init__(self, user: str, password: str):
        self.user, self.password = user, password

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> Account | None:
        if not getattr(a, "user", ""):
            return None
        if not getattr(a, "password_file", ""):
            raise SystemExit("rehearsal.load: --user needs --password-file")
        with open(a.password_file) as f:
            return cls(a.user, f.read().strip())

    def login(self, conn: Conn, timeout: float = LOGIN_TIMEOUT) -> tuple[bool, int, str]:
        """POST /auth/login: (ok, status, server). The client starts from no cookie at all
        (the portal gives a new session id at login)."""
        conn.jar.pop("sid", None)
        status, body = conn.request("POST", "/auth/login", {"username": self.user, "password": self.password},
                                    timeout=timeout)
        return status == 200 and "sid" in conn.jar, status, _server_of(body)


def run(args: argparse.Namespace) -> int:
    stop = threading.Event()
    stopped_at = [0.0]  # when the load was told to stop (a job in flight is resolved after it)

    def halt(*_: Any) -> None:
        if not stop.is_set():
            stopped_at[0] = time.time()
        stop.set()
    signal.signal(signal.SIGTERM, halt)
    signal.signal(signal.SIGINT, halt)
    # Sockets made without an explicit time-out (the websocket client's) get this one:
    # its connect, and its reads (an answer comes every second, see ws_worker).
    socket.setdefaulttimeout(WS_TIMEOUT)
    account = Account.from_args(args)
    if args.spares is None:
        args.spares = int(args.rate * (TIMEOUT + 1))
    tickets: queue.Queue[str] = queue.Queue(maxsize=int(args.rate * 2))
    overflow: queue.Queue[str] = queue.Queue(maxsize=int(args.rate * 2))  # for the spare connections
    out = open(args.out, "a", buffering=1)
    lock = threading.Lock()
    acked: list[str] = []
    counts = {"sent": 0, "skipped": 0}
    stats = {"logins": 0, "relogins": 0, "login_failures": 0, "ws_opened": 0, "ws_reconnects": 0, "ws_resyncs": 0,
             "ws_failures": 0, "ws_round_trips": 0, "ws_job_messages": 0, "ws_gaps": 0, "stale_retries": 0,
             "ws_sticky_reconnects": 0, "ws_moved": 0}
    deadline = time.monotonic() + args.duration

    def count(key: str, n: int = 1) -> None:
        with lock:
            stats[key] += n

    logins_at_once = threading.BoundedSemaphore(LOGINS_AT_ONCE)

    def log_in(conn: Conn, why: str) -> bool:
        """Log in (retried every second until it works or the load stops): every client
        of a logged-in load has a session before its first request."""
        assert account is not None
        while not stop.is_set():
            status, server, ok = 0, "-", False
            with logins_at_once:
                t0 = time.time()
                try:
                    ok, status, server = account.login(conn)
                except Exception:  # noqa: BLE001
                    ok = False
            out.write(line(t0, time.time(), "login", ok, status, "-", server, why))
            if ok:
                count("relogins" if why == "relogin" else "logins")
                return True
            count("login_failures")
            stop.wait(1.0)
        return False

    users: list[Conn] = []  # the logged-in clients: a spare connection shares one's cookies
    idle = [0]  # user workers waiting for a ticket

    def worker(spare: bool = False) -> None:
        """A client taking tickets. A spare one takes only the tickets no user worker was
        free for (see the dispatch below) on a connection of its own that shares a
        logged-in client's cookies, as a browser's next connection does."""
        conn = Conn(args.url)  # the user's client: logged in when the load has an account
        probe = Conn(args.url)  # the session probes' own cookie (snew, session)
        source = overflow if spare else tickets
        if account is not None and not spare:
            if not log_in(conn, "first"):
                return
            with lock:
                users.append(conn)
        borrowed = account is None or not spare
        while not stop.is_set():
            if not spare:
                with lock:
                    idle[0] += 1
            try:
                kind = source.get(timeout=0.5)
            except queue.Empty:
                continue
            finally:
                if not spare:
                    with lock:
                        idle[0] -= 1
            if not borrowed:
                with lock:
                    if users:
                        conn.jar, borrowed = dict(random.choice(users).jar), True
            rid = ""
            t0 = time.time()
            status = 0
            server = ref = "-"
            try:
                if kind == "write":
                    rid = f"{args.tag}-{uuid.uuid4().hex[:20]}"
                    status, body = conn.request("POST", "/api/records", {"request_id": rid, "payload": f"load {t0:.3f}"})
                    doc = json.loads(body or b"{}") if status == 200 else {}
                    ok = doc.get("ok") is True
                    server = str(doc.get("server", "-"))
                elif kind in ("session", "snew"):
                    if kind == "snew" or "sid" not in probe.jar:
                        kind = "snew"
                        probe.jar.clear()
                    status, body = probe.request("GET", "/api/session")
                    doc = json.loads(body or b"{}") if status == 200 else {}
                    ok = status == 200 and bool(doc.get("session"))
                    server = str(doc.get("server", "-"))
                    if ok and kind == "snew":
                        rid = str(doc["session"])
                        probe.jar["sid"] = rid
                    elif ok and doc.get("new"):
                        ref = "lost"  # the cookie's session was gone: the server made a new one
                        rid = str(doc["session"])
                else:
                    if kind == "record":
                        with lock:
                            rid = random.choice(acked[-200:]) if acked else ""
                    path = f"/api/records/{rid}" if rid else "/"
                    status, body = conn.request("GET", path)
                    ok = status == 200
                    server = _server_of(body)
            except Exception as e:  # noqa: BLE001 - timeouts, resets, refused: a failed request
                ok = False
                if status == 0:  # no answer at all: which failure, for the drills' analysis
                    ref = type(e).__name__
            t1 = time.time()
            if ok and kind == "write":
                with lock:
                    acked.append(rid)
            out.write(line(t0, t1, kind, ok, status, rid, server, ref))
        count("stale_retries", conn.stale_retries + probe.stale_retries)

    def job_worker() -> None:
        """One job every --job-interval s; a failed attempt is repeated with the same
        request id (the portal finds the job a timed-out attempt created) until the
        deadline: a job is acknowledged once, lost never, duplicated never. A 401 (the
        session is gone) is a forced re-login, then the same request id again."""
        conn = Conn(args.url)
        if account is not None and not log_in(conn, "first"):
            return
        n = 0
        while not stop.is_set():
            n += 1
            rid = f"{args.tag}-job-{uuid.uuid4().hex[:16]}"
            first = time.time()
            while True:
                # The load stopping does not abandon a submission in flight: a person
                # whose click failed clicks again, and a job created by an attempt that
                # got no answer would otherwise count as a ghost. It is retried for
                # RESOLVE_AFTER_STOP_S more (the drill waits that long + 10 s for the load to exit).
                left = RESOLVE_AFTER_STOP_S - (time.time() - stopped_at[0]) if stop.is_set() else args.job_timeout
                if left <= 0:
                    break
                t0 = time.time()
                status, server, ref, ok = 0, "-", "-", False
                try:
                    status, body = conn.request("POST", "/api/jobs", {"name": f"{args.tag}-load", "seconds": 3600,
                                                                      "request_id": rid},
                                                timeout=min(args.job_timeout, left), headers={"Idempotency-Key": rid})
                    doc = json.loads(body or b"{}")
                    server = str(doc.get("server", "-"))
                    ok = status == 200 and bool(doc.get("job_id"))
                    ref = str(doc.get("job_id", "-"))
                except Exception as e:  # noqa: BLE001
                    ok = False
                    if status == 0:  # no answer at all (an answer that is not JSON keeps ref "-")
                        ref = type(e).__name__
                out.write(line(t0, time.time(), "job", ok, status, rid, server, ref))
                if ok or time.time() - first > args.job_deadline:
                    break
                if status == 401 and account is not None:
                    if stop.is_set():
                        break
                    log_in(conn, "relogin")
                    continue
                if stop.is_set():
                    time.sleep(1.0)
                else:
                    stop.wait(1.0)
            stop.wait(max(0.0, first + args.job_interval - time.time()))

    def ws_worker() -> None:
        """A websocket subscription, as the portal's page holds one: hello with the last
        sequence seen, every second; job messages between; reconnect at once when it
        closes or goes silent (a hello unanswered for WS_TIMEOUT s)."""
        from simple_websocket import ConnectionClosed
        from simple_websocket import ConnectionError as Refused

        assert account is not None
        conn = Conn(args.url)
        if not log_in(conn, "first"):
            return
        ws_url = ("wss" if conn.tls else "ws") + f"://{conn.host}:{conn.port}/ws/"
        last_seq = -1  # no snapshot or uptodate yet
        server = "-"  # the ws server HAProxy's stickiness cookie names (the browser's, kept here)
        while not stop.is_set():
            t0 = time.time()
            try:
                ws = sticky_client().connect(ws_url, headers={"Cookie": conn.cookie}, ssl_context=conn.ctx)
            except Refused as e:  # the upgrade answered with another status than 101
                code = int(e.status_code or 0)
                out.write(line(t0, time.time(), "ws", False, code, str(last_seq), "-", "connect"))
                count("ws_failures")
                if code == 401:
                    log_in(conn, "relogin")
                else:
                    stop.wait(0.5)
                continue
            except OSError:
                out.write(line(t0, time.time(), "ws", False, 0, str(last_seq), "-", "connect"))
                count("ws_failures")
                stop.wait(0.5)
                continue
            # The upgrade's Set-Cookie is kept as a browser keeps it: HAProxy inserts its
            # stickiness cookie when it places the client (first, or after its server went
            # away: `option redispatch`), and routes a reconnect that carries it back to
            # the same server.
            placed = stickiness(ws.set_cookies)
            conn.keep(ws.set_cookies)
            with lock:
                stats["ws_opened"] += 1
                if stats["ws_opened"] > 1:
                    stats["ws_reconnects"] += 1
                    if placed is None:
                        stats["ws_sticky_reconnects"] += 1
                    elif placed != server:
                        stats["ws_moved"] += 1
            server = placed or server
            why = "closed"
            # A snapshot is a resync when the client asks to catch up after a reconnect or
            # a gap; otherwise it only answers a hello sent while a change was on its way.
            behind = last_seq >= 0
            try:
                while not stop.is_set():
                    sent = time.time()
                    ws.send(json.dumps({"type": "hello", "last_seq": max(last_seq, 0)}))
                    answer = None
                    while answer is None:
                        raw = ws.receive(timeout=max(0.0, sent + WS_TIMEOUT - time.time()))
                        if raw is None:
                            break
                        msg = json.loads(raw)
                        if msg.get("type") == "job":
                            count("ws_job_messages")
                            seq = int(msg.get("seq", 0))
                            if last_seq >= 0 and seq > last_seq + 1:
                                count("ws_gaps")  # missed one: the next hello (old last_seq) gets a snapshot
                                behind = True
                            else:
                                last_seq = max(last_seq, seq)
                        elif msg.get("type") in ("uptodate", "snapshot"):
                            answer = str(msg["type"])
                            if answer == "snapshot" and behind:
                                answer = "resync"
                                count("ws_resyncs")
                            if msg.get("live") is False:  # answered from the server's copy, Redis away
                                answer += "-stale"
                            behind = False
                            last_seq = int(msg.get("seq", 0))
                    if answer is None:
                        why = "timeout"
                        break
                    out.write(line(sent, time.time(), "ws", True, 101, str(last_seq), server, answer))
                    count("ws_round_trips")
                    stop.wait(max(0.0, sent + 1.0 - time.time()))
            except (ConnectionClosed, OSError, ValueError, KeyError, TypeError):
                pass
            finally:
                try:
                    ws.close()
                except Exception:  # noqa: BLE001 - already closed
                    pass
            if not stop.is_set():
                out.write(line(time.time(), time.time(), "ws", False, 0, str(last_seq), server, why))
                count("ws_failures")

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(args.workers)]
    threads += [threading.Thread(target=worker, args=(True,), daemon=True) for _ in range(args.spares)]
    if args.job_interval > 0:
        threads.append(threading.Thread(target=job_worker, daemon=True))
    if account is not None:
        threads += [threading.Thread(target=ws_worker, daemon=True) for _ in range(args.ws)]
    for t in threads:
        t.start()
    interval = 1.0 / args.rate
    nxt = time.monotonic()
    reads = ["session", "page", "record"]
    while not stop.is_set() and time.monotonic() < deadline and counts["sent"] < args.max_requests:
        x = random.random()
        kind = "write" if x < args.writes else "snew" if x < args.writes + args.new_sessions else random.choice(reads)
        # Open, not closed: users do not wait for each other. When every user worker waits
        # on a request (a frozen LB hangs them all for TIMEOUT), the ticket goes to a spare
        # connection, so requests go on starting at the rate and the history shows when
        # the service came back, not when the load's own clients were free again (with
        # 24 clients and nothing else, no request started in the first 3 s of a freeze).
        try:
            (tickets if idle[0] > 0 or not args.spares else overflow).put_nowait(kind)
            counts["sent"] += 1
        except queue.Full:
            counts["skipped"] += 1  # every worker, spares too, is waiting on a timeout: the load backs off
        nxt += interval
        time.sleep(max(0.0, nxt - time.monotonic()))
    halt()
    end = stopped_at[0] + RESOLVE_AFTER_STOP_S + 3
    for t in threads:
        t.join(max(0.1, end - time.time()))
    out.close()
    print(json.dumps({"sent": counts["sent"], "skipped": counts["skipped"], "acked_writes": len(acked),
                      "login": account is not None, **stats}), flush=True)
    return 0


def line(t0: float, t1: float, kind: str, ok: bool, status: int, rid: str, server: str, ref: str) -> str:
    """One request as a line of the history (no field may hold a blank)."""
    def clean(x: str) -> str:
        return "".join(c for c in x if not c.isspace())[:80] or "-"
    return f"{t0:.3f} {t1:.3f} {kind} {int(ok)} {status} {clean(rid)} {clean(server)} {clean(ref)}\n"


def _server_of(body: bytes) -> str:
    try:
        doc = json.loads(body)
    except ValueError:
        return "-"
    return str(doc.get("server", "-")) if isinstance(doc, dict) else "-"


def sessions(args: argparse.Namespace) -> int:
    """Which of the session ids in --ids the portal no longer knows: GET /api/session
    with each one's cookie (a known session answers new=false)."""
    with open(args.ids) as f:
        ids = [x.strip() for x in f if x.strip()]
    gone: list[str] = []
    errors = 0
    for sid in ids:
        for _attempt in range(10):
            conn = Conn(args.url)
            conn.cookie = f"sid={sid}"
            try:
                status, body = conn.request("GET", "/api/session", timeout=5)
                if status == 200:
                    if json.loads(body).get("new"):
                        gone.append(sid)
                    break
            except Exception:  # noqa: BLE001
                pass
            finally:
                conn.close()
            time.sleep(0.5)
        else:
            errors += 1
    if errors:
        print(json.dumps({"error": f"{errors} of {len(ids)} sessions could not be read back"}))
        return 1
    print(json.dumps({"checked": len(ids), "missing": gone}))
    return 0


def verify(args: argparse.Namespace) -> int:
    with open(args.ids) as f:
        ids = [x.strip() for x in f if x.strip()]
    conn = Conn(args.url)
    missing: list[str] = []
    duplicates = rows = 0
    for i in range(0, len(ids), 400):
        chunk = ids[i:i + 400]
        last: Exception | None = None
        for _attempt in range(20):
            try:
                status, body = conn.request("POST", "/api/records/missing", {"ids": chunk}, timeout=15)
                if status == 200:
                    doc = json.loads(body)
                    missing += doc["missing"]
                    duplicates, rows = doc["duplicates"], doc["rows"]
                    break
                last = RuntimeError(f"HTTP {status}: {body[:200]!r}")
            except Exception as e:  # noqa: BLE001
                last = e
            time.sleep(1)
        else:
            print(json.dumps({"error": f"could not verify: {last}"}))
            return 1
    print(json.dumps({"checked": len(ids), "missing": missing, "duplicates": duplicates, "rows": rows}))
    return 0


def jobs(args: argparse.Namespace) -> int:
    """Through the portal, as a user would: `submit` queues --count jobs (POST /api/jobs)
    and prints their ids; `states` prints each job's state (GET /api/jobs/<id>)."""
    conn = Conn(args.url)
    out: dict[str, Any] = {}
    account = Account.from_args(args)

    def log_in() -> bool:
        for _attempt in range(10):
            try:
                if account is not None and account.login(conn, timeout=30)[0]:
                    return True
            except Exception as e:  # noqa: BLE001
                out.setdefault("errors", []).append(f"login: {e}")
            time.sleep(1)
        return False

    if account is not None and not log_in():
        print(json.dumps({**out, "error": f"could not log in as {account.user}"}))
        return 1
    if args.action == "submit":
        ids: list[str] = []
        run = uuid.uuid4().hex[:12]
        for i in range(args.count):
            # One request id per job, the same on every retry: a retry after a time-out
            # finds the job its first attempt created instead of queueing it twice.
            rid = f"rehearsal-{run}-{i}"
            for _attempt in range(10):
                try:
                    status, body = conn.request("POST", "/api/jobs",
                                                {"name": f"rehearsal-{i}", "seconds": 600, "request_id": rid}, timeout=30,
                                                headers={"Idempotency-Key": rid})
                    if status == 401 and account is not None:  # the session is gone: log in again, same request id
                        out["relogins"] = out.get("relogins", 0) + 1
                        log_in()
                        continue
                    if status == 200:
                        answer = json.loads(body)
                        ids.append(str(answer["job_id"]))
                        if answer.get("created") is False:
                            out.setdefault("found_on_retry", []).append(rid)
                        break
                    out.setdefault("errors", []).append(f"HTTP {status}: {body[:200]!r}")
                except Exception as e:  # noqa: BLE001
                    out.setdefault("errors", []).append(str(e))
                time.sleep(1)
        out["job_ids"] = ids
    else:
        states: dict[str, str] = {}
        for job in [x for x in args.ids.split(",") if x]:
            try:
                status, body = conn.request("GET", f"/api/jobs/{job}", timeout=30)
                states[job] = json.loads(body).get("state", f"HTTP {status}") if status == 200 else f"HTTP {status}"
            except Exception as e:  # noqa: BLE001
                states[job] = f"error: {e}"
        out["states"] = states
    print(json.dumps(out))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rehearsal.load")
    sub = p.add_subparsers(dest="cmd", required=True)
    login = argparse.ArgumentParser(add_help=False)
    login.add_argument("--user", default="", help="log in as this portal user (the reference portal); none: no login")
    login.add_argument("--password-file", default="", help="the user's password, the file's first line")
    r = sub.add_parser("run", parents=[login])
    r.add_argument("--url", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--rate", type=float, default=60.0)
    r.add_argument("--writes", type=float, default=0.3)
    r.add_argument("--workers", type=int, default=24)
    r.add_argument("--spares", type=int, default=None,
                   help="connections that take the requests no worker is free for (default: --rate x "
                        f"{TIMEOUT + 1:.0f} s, what a stall of the request time-out holds; 0: none, a closed load)")
    r.add_argument("--duration", type=float, default=600.0)
    r.add_argument("--max-requests", type=int, default=60000)
    r.add_argument("--tag", default=os.environ.get("HPC_REHEARSAL_TAG", "rh"))
    r.add_argument("--new-sessions", type=float, default=0.05, help="share of requests that create a session")
    r.add_argument("--job-interval", type=float, default=5.0, help="seconds between job submissions (0: none)")
    r.add_argument("--job-timeout", type=float, default=25.0, help="one job submission's HTTP time-out")
    r.add_argument("--job-deadline", type=float, default=90.0, help="retry a failed job submission this long")
    r.add_argument("--ws", type=int, default=1, help="websocket subscriptions held open (with a login only)")
    ss = sub.add_parser("sessions")
    ss.add_argument("--url", required=True)
    ss.add_argument("--ids", required=True)
    v = sub.add_parser("verify")
    v.add_argument("--url", required=True)
    v.add_argument("--ids", required=True)
    j = sub.add_parser("jobs", parents=[login])
    j.add_argument("--url", required=True)
    j.add_argument("action", choices=("submit", "states"))
    j.add_argument("--count", type=int, default=5)
    j.add_argument("--ids", default="")
    a = p.parse_args(argv)
    return {"run": run, "verify": verify, "jobs": jobs, "sessions": sessions}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
