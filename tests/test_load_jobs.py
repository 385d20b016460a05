"""rehearsal/load.py's job client: a submission in flight when the load is told to stop is
retried with the same request id until it is acknowledged (or RESOLVE_AFTER_STOP_S), as a
person clicks again; it is not left behind as a job Slurm holds that nobody was told of
(the slurm drill counted one such "ghost" when its load stopped right after a 503)."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.conftest import Tally

ROOT = Path(__file__).resolve().parents[1]


class Portal:
    """Answers every job submission 503 until `accept` is set, then 200 with one job id
    per request id (idempotent, as the portal is); everything else 200."""

    def __init__(self) -> None:
        self.accept = threading.Event()
        self.stall_until = 0.0  # every answer waits until then (a frozen LB: connections hang)
        self.jobs: dict[str, str] = {}
        self.tried: list[str] = []
        portal = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, code: int, doc: dict[str, Any]) -> None:
                body = json.dumps(doc).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802
                time.sleep(max(0.0, portal.stall_until - time.time()))
                self._answer(200, {"server": "app-t"})

            def do_POST(self) -> None:  # noqa: N802
                time.sleep(max(0.0, portal.stall_until - time.time()))
                doc = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"{}")
                if self.path == "/api/jobs":
                    rid = str(doc.get("request_id"))
                    portal.tried.append(rid)
                    if not portal.accept.is_set():
                        self._answer(503, {"error": "Slurm did not answer: the job may exist, retry"})
                        return
                    job = portal.jobs.setdefault(rid, str(1000 + len(portal.jobs)))
                    self._answer(200, {"job_id": job, "request_id": rid, "server": "app-t"})
                    return
                self._answer(200, {"ok": True, "duplicate": False, "server": "app-t"})

            def log_message(self, fmt: str, *args: object) -> None:
                pass

        self.srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.srv.daemon_threads = True
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.srv.server_address[1]}"


@contextlib.contextmanager
def running_load(portal: Portal, out: Path, *args: str) -> Iterator[subprocess.Popen[str]]:
    """`python -m rehearsal.load run` against `portal`, writing `out`; killed if still
    running when the block ends, and the portal shut down."""
    load = subprocess.Popen([sys.executable, "-m", "rehearsal.load", "run", "--url", portal.url, "--out", str(out),
                             *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield load
    finally:
        if load.poll() is None:
            load.kill()
            load.wait(10)
        portal.srv.shutdown()

def test_a_job_in_flight_when_the_load_stops_is_resolved_with_its_request_id(tmp_path: Path, tally: Tally) -> None:
    portal = Portal()
    out = tmp_path / "load.log"
    with running_load(portal, out, "--rate", "5", "--workers", "2", "--duration", "120", "--job-interval", "60",
                      "--job-timeout", "5") as load:
        deadline = time.monotonic() + 30
        while len(portal.tried) < 2 and time.monotonic() < deadline:  # its first job failed at least twice
            time.sleep(0.1)
        tally.check(len(portal.tried) >= 2, f"job attempts: {portal.tried}")
        t_stop = time.time()
        load.send_signal(signal.SIGTERM)  # as a drill ends its load
        time.sleep(2)
        portal.accept.set()  # the controller answers again
        stdout, stderr = load.communicate(timeout=30)
    tally.check(load.returncode == 0, stderr[-2000:])
    rids = set(portal.tried)
    tally.check(len(rids) == 1, f"one request id, retried: {portal.tried}")
    jobs = [line.split() for line in out.read_text().splitlines() if line.split()[2] == "job"]
    acked = [j for j in jobs if j[3] == "1"]
    tally.check(len(acked) == 1 and acked[0][5] in rids and float(acked[0][0]) > t_stop,
                f"acknowledged after the stop, under its own request id: {jobs}")
    tally.check(json.loads(stdout.strip().splitlines()[-1])["sent"] > 0, stdout)
    tally.expect(5)


def test_requests_go_on_starting_while_every_client_waits_on_a_stall(tmp_path: Path, tally: Tally) -> None:
    """An open load: when every answer hangs (a frozen LB) and all the load's clients wait
    on their time-outs, the requests due meanwhile start on spare connections, so the
    history shows when the service came back. With --spares 0 (the closed load) none
    starts until the first time-outs free a client: the negative control."""
    from rehearsal.load import TIMEOUT

    def started_during_stall(spares: int) -> int:
        portal = Portal()
        out = tmp_path / f"load-{spares}.log"
        with running_load(portal, out, "--rate", "20", "--workers", "4", "--spares", str(spares), "--duration", "9",
                          "--job-interval", "0") as load:
            time.sleep(2)
            t0 = time.time()
            portal.stall_until = t0 + TIMEOUT + 1
            _stdout, stderr = load.communicate(timeout=60)
        tally.check(load.returncode == 0, stderr[-2000:])
        starts = [float(line.split()[0]) for line in out.read_text().splitlines()]
        # between the moment the first clients were surely stuck and the first time-outs
        return sum(1 for t in starts if t0 + 0.5 <= t < t0 + TIMEOUT - 0.2)

    open_load = started_during_stall(80)
    tally.check(open_load >= 20, f"requests started during the stall with spares: {open_load} (20/s for 2.3 s)")
    closed = started_during_stall(0)
    tally.check(closed == 0, f"the closed load started {closed} requests while its 4 clients waited")
    tally.expect(4)
