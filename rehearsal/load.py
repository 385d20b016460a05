"""Load through the VIP, from the client namespace ("the internet"), bounded in count and
time. Every request is one line in the output file (the history the drills read back):

    start end kind ok status request_id server ref

kinds: `write` (POST /api/records with a fresh request id: idempotent on the server),
`snew` (GET /api/session without a cookie: a new session written to the Redis master;
request_id is the session id), `session` (GET /api/session with the newest session's
cookie: Redis through Sentinel; ref `lost` when the server no longer knew it), `page`
(GET /: nginx), `record` (GET /api/records/<an acknowledged id>: MariaDB through the DB
writer), `job` (POST /api/jobs with a request id, one every --job-interval s from its
own thread; a failed attempt is repeated with the same request id until --job-deadline,
as a portal's retry would; ref is the job id). `server` is the web/app host that
answered ("-" when none did).

    python -m rehearsal.load run --url https://203.0.113.10 --out F [--rate 60] [--writes 0.3]
                                 [--duration 600] [--max-requests 40000]
    python -m rehearsal.load verify --url ... --ids F     read every acknowledged write back
    python -m rehearsal.load sessions --url ... --ids F   which acknowledged sessions are gone
    python -m rehearsal.load jobs --url ... submit --count 5 | states --ids 1,2
                                                           Slurm jobs through the portal
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import queue
import random
import signal
import ssl
import sys
import threading
import time
import uuid
from typing import Any
from urllib.parse import urlparse

TIMEOUT = 3.0
WRITE_KINDS = ("write", "snew", "job")  # the kinds that write: their acknowledgements are read back


class Conn:
    def __init__(self, url: str):
        u = urlparse(url)
        self.host, self.port, self.tls = u.hostname or "", u.port or (443 if u.scheme == "https" else 80), u.scheme == "https"
        self.ctx = ssl._create_unverified_context() if self.tls else None  # the rehearsal's self-signed certificate
        self.c: http.client.HTTPConnection | None = None
        self.cookie = ""

    def request(self, method: str, path: str, body: Any = None, timeout: float = TIMEOUT) -> tuple[int, bytes]:
        if self.c is None:
            if self.tls:
                self.c = http.client.HTTPSConnection(self.host, self.port, timeout=timeout, context=self.ctx)
            else:
                self.c = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        headers = {"Connection": "keep-alive"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.cookie:
            headers["Cookie"] = self.cookie
        try:
            self.c.request(method, path, body=data, headers=headers)
            r = self.c.getresponse()
            payload = r.read()
            sc = r.getheader("Set-Cookie")
            if sc and sc.startswith("sid="):
                self.cookie = sc.split(";", 1)[0]
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


def run(args: argparse.Namespace) -> int:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    tickets: queue.Queue[str] = queue.Queue(maxsize=int(args.rate * 2))
    out = open(args.out, "a", buffering=1)
    lock = threading.Lock()
    acked: list[str] = []
    counts = {"sent": 0, "skipped": 0}
    deadline = time.monotonic() + args.duration

    def worker() -> None:
        conn = Conn(args.url)
        while not stop.is_set():
            try:
                kind = tickets.get(timeout=0.5)
            except queue.Empty:
                continue
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
                    if kind == "snew" or not conn.cookie:
                        kind = "snew"
                        conn.cookie = ""
                    status, body = conn.request("GET", "/api/session")
                    doc = json.loads(body or b"{}") if status == 200 else {}
                    ok = status == 200 and bool(doc.get("session"))
                    server = str(doc.get("server", "-"))
                    if ok and kind == "snew":
                        rid = str(doc["session"])
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
            except Exception:  # noqa: BLE001 - timeouts, resets, refused: a failed request
                ok = False
            t1 = time.time()
            if ok and kind == "write":
                with lock:
                    acked.append(rid)
            out.write(line(t0, t1, kind, ok, status, rid, server, ref))

    def job_worker() -> None:
        """One job every --job-interval s; a failed attempt is repeated with the same
        request id (the portal finds the job a timed-out attempt created) until the
        deadline: a job is acknowledged once, lost never, duplicated never."""
        conn = Conn(args.url)
        n = 0
        while not stop.is_set():
            n += 1
            rid = f"{args.tag}-job-{uuid.uuid4().hex[:16]}"
            first = time.time()
            while not stop.is_set():
                t0 = time.time()
                status, server, ref, ok = 0, "-", "-", False
                try:
                    status, body = conn.request("POST", "/api/jobs", {"name": f"{args.tag}-load", "seconds": 3600,
                                                                      "request_id": rid}, timeout=args.job_timeout)
                    doc = json.loads(body or b"{}")
                    server = str(doc.get("server", "-"))
                    ok = status == 200 and bool(doc.get("job_id"))
                    ref = str(doc.get("job_id", "-"))
                except Exception:  # noqa: BLE001
                    ok = False
                out.write(line(t0, time.time(), "job", ok, status, rid, server, ref))
                if ok or time.time() - first > args.job_deadline:
                    break
                stop.wait(1.0)
            stop.wait(max(0.0, first + args.job_interval - time.time()))

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(args.workers)]
    if args.job_interval > 0:
        threads.append(threading.Thread(target=job_worker, daemon=True))
    for t in threads:
        t.start()
    interval = 1.0 / args.rate
    nxt = time.monotonic()
    reads = ["session", "page", "record"]
    while not stop.is_set() and time.monotonic() < deadline and counts["sent"] < args.max_requests:
        x = random.random()
        kind = "write" if x < args.writes else "snew" if x < args.writes + args.new_sessions else random.choice(reads)
        try:
            tickets.put_nowait(kind)
            counts["sent"] += 1
        except queue.Full:
            counts["skipped"] += 1  # every worker is waiting on a timeout: the load backs off
        nxt += interval
        time.sleep(max(0.0, nxt - time.monotonic()))
    stop.set()
    for t in threads:
        t.join(max(TIMEOUT, args.job_timeout) + 2)
    out.close()
    print(json.dumps({"sent": counts["sent"], "skipped": counts["skipped"], "acked_writes": len(acked)}), flush=True)
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
                                                {"name": f"rehearsal-{i}", "seconds": 600, "request_id": rid}, timeout=30)
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
    r = sub.add_parser("run")
    r.add_argument("--url", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--rate", type=float, default=60.0)
    r.add_argument("--writes", type=float, default=0.3)
    r.add_argument("--workers", type=int, default=24)
    r.add_argument("--duration", type=float, default=600.0)
    r.add_argument("--max-requests", type=int, default=60000)
    r.add_argument("--tag", default=os.environ.get("HPC_REHEARSAL_TAG", "rh"))
    r.add_argument("--new-sessions", type=float, default=0.05, help="share of requests that create a session")
    r.add_argument("--job-interval", type=float, default=5.0, help="seconds between job submissions (0: none)")
    r.add_argument("--job-timeout", type=float, default=25.0, help="one job submission's HTTP time-out")
    r.add_argument("--job-deadline", type=float, default=90.0, help="retry a failed job submission this long")
    ss = sub.add_parser("sessions")
    ss.add_argument("--url", required=True)
    ss.add_argument("--ids", required=True)
    v = sub.add_parser("verify")
    v.add_argument("--url", required=True)
    v.add_argument("--ids", required=True)
    j = sub.add_parser("jobs")
    j.add_argument("--url", required=True)
    j.add_argument("action", choices=("submit", "states"))
    j.add_argument("--count", type=int, default=5)
    j.add_argument("--ids", default="")
    a = p.parse_args(argv)
    return {"run": run, "verify": verify, "jobs": jobs, "sessions": sessions}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
