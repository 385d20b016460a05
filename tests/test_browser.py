"""rehearsal/browser.py against a small portal in a network namespace of its own: HAProxy
terminating TLS (h2 and http/1.1, as the rehearsal's LB offers them) in front of a
Flask + simple-websocket backend with the reference portal's API shape (/auth/login,
/auth/me, /api/jobs, /ws/ with hello/uptodate/job messages) serving the reference
portal's real page (frontend/index.html and src/main.js, unbuilt: the stylesheet import
is answered with an empty module). The browser is Debian's chromium through Playwright,
trusting the certificate through an NSS database, browsing by name.

The faults: the backend killed and restarted after 2 s (sessions in a file survive:
the login is kept and the websocket comes back in about the restart time, over both
protocols), and the same with the sessions lost (a forced re-login is reported).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FRONTEND = REPO / "examples" / "reference-portal" / "frontend"
NAME = "portal.browser.test"
sys.path.insert(0, str(REPO))

from rehearsal.browser import Watch  # noqa: E402

BACKEND = r'''
import json, os, sys, threading, time, uuid
from pathlib import Path
from flask import Flask, Response, jsonify, request
from simple_websocket import ConnectionClosed, Server

FRONTEND, STORE = Path(sys.argv[1]), Path(sys.argv[2])
app = Flask(__name__)
lock = threading.Lock()
state = {"seq": 0, "jobs": {}, "next": 100}
clients = []

def sessions():
    return json.loads(STORE.read_text()) if STORE.exists() else {}

def user():
    return sessions().get(request.cookies.get("sid", ""))

@app.get("/health")
def health():
    return "ok"

@app.get("/")
def index():
    return Response((FRONTEND / "index.html").read_text(), mimetype="text/html")

@app.get("/src/main.js")
def main_js():
    return Response((FRONTEND / "src" / "main.js").read_text(), mimetype="text/javascript")

@app.get("/src/style.css")
def style():
    return Response("export {}\n", mimetype="text/javascript")

@app.post("/auth/login")
def login():
    body = request.get_json()
    if body.get("username") != "alice" or body.get("password") != "wonderland":
        return jsonify({"error": "wrong username or password"}), 401
    sid = uuid.uuid4().hex
    with lock:
        s = sessions(); s[sid] = "alice"; STORE.write_text(json.dumps(s))
    r = jsonify({"user": "alice"})
    r.set_cookie("sid", sid, secure=True, httponly=True, samesite="Lax")
    return r

@app.get("/auth/me")
def me():
    u = user()
    return (jsonify({"user": u}), 200) if u else (jsonify({"error": "login required"}), 401)

def publish(job, st):
    with lock:
        state["seq"] += 1
        state["jobs"][job] = st
        msg = json.dumps({"type": "job", "seq": state["seq"], "job_id": job, "state": st})
        for c in list(clients):
            try:
                c.send(msg)
            except Exception:
                clients.remove(c)

@app.get("/api/jobs")
def jobs():
    if not user():
        return jsonify({"error": "login required"}), 401
    return jsonify({"jobs": [{"job_id": j, "name": "x", "state": s} for j, s in state["jobs"].items()]})

@app.post("/api/jobs")
def submit():
    if not user():
        return jsonify({"error": "login required"}), 401
    with lock:
        job = str(state["next"]); state["next"] += 1
    publish(job, "PENDING")
    threading.Timer(1.0, publish, (job, "RUNNING")).start()
    return jsonify({"job_id": job, "request_id": request.get_json().get("request_id"), "created": True})

@app.route("/ws/", websocket=True)
def ws():
    if not user():
        return jsonify({"error": "login required"}), 401
    w = Server.accept(request.environ)
    with lock:
        clients.append(w)
    try:
        while True:
            msg = json.loads(w.receive())
            if msg.get("type") == "hello":
                with lock:
                    seq = state["seq"]
                    doc = {"type": "uptodate", "seq": seq} if msg.get("last_seq", 0) >= seq else \
                        {"type": "snapshot", "seq": seq, "jobs": dict(state["jobs"])}
                w.send(json.dumps(doc))
    except ConnectionClosed:
        pass
    finally:
        with lock:
            if w in clients:
                clients.remove(w)
    return Response()

app.run("127.0.0.1", 8080, threaded=True)
'''


def need(path: str, package: str) -> str:
    found = path if os.path.isabs(path) and os.access(path, os.X_OK) else shutil.which(path)
    if not found:
        pytest.fail(f"{path} is not installed (Debian package {package}; tools/install-debian-deps.sh)")
    return found


class Portal:
    def __init__(self, ns: str, tmp: Path) -> None:
        self.ns, self.tmp = ns, tmp
        self.backend: subprocess.Popen[bytes] | None = None
        self.haproxy: subprocess.Popen[bytes] | None = None

    def nsexec(self, *argv: str, **kw: object) -> subprocess.Popen[bytes]:
        return subprocess.Popen(["ip", "netns", "exec", self.ns, *argv], **kw)  # type: ignore[call-overload]

    def start_backend(self) -> None:
        log = open(self.tmp / "backend.log", "ab")
        self.backend = self.nsexec(sys.executable, str(self.tmp / "backend.py"), str(FRONTEND),
                                   str(self.tmp / "sessions.json"), stdout=log, stderr=log)
        self.wait_port(8080)

    def kill_backend(self) -> None:
        assert self.backend is not None
        self.backend.send_signal(signal.SIGKILL)
        self.backend.wait(10)

    def wait_port(self, port: int, timeout: float = 20) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            r = subprocess.run(["ip", "netns", "exec", self.ns, sys.executable, "-c",
                                f"import socket; socket.create_connection(('127.0.0.1', {port}), 1)"],
                               capture_output=True)
            if r.returncode == 0:
                return
            time.sleep(0.2)
        raise AssertionError(f"nothing listens on {port} in {self.ns}: "
                             + (self.tmp / "backend.log").read_text(errors="replace")[-2000:])


@pytest.fixture
def portal(tmp_path: Path) -> Iterator[Portal]:
    if os.geteuid() != 0:
        pytest.fail("test_browser needs root (a network namespace of its own)")
    need("/usr/bin/chromium" if not os.environ.get("HPC_CHROMIUM") else os.environ["HPC_CHROMIUM"], "chromium")
    need("certutil", "libnss3-tools")
    haproxy = need("haproxy", "haproxy")
    need("openssl", "openssl")
    ns = f"pt-brw-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    p = Portal(ns, tmp_path)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        # A self-signed certificate with CA:TRUE for the portal's name, as the rehearsal makes.
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                        "-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem"), "-days", "2",
                        "-subj", f"/CN={NAME}", "-addext", f"subjectAltName=DNS:{NAME}",
                        "-addext", "basicConstraints=critical,CA:TRUE"], check=True, capture_output=True)
        (tmp_path / "portal.pem").write_text((tmp_path / "cert.pem").read_text() + (tmp_path / "key.pem").read_text())
        (tmp_path / "haproxy.cfg").write_text(textwrap.dedent(f"""\
            global
                log stdout format raw local0
            defaults
                mode http
                log global
                timeout connect 2s
                timeout client 30s
                timeout server 30s
                timeout tunnel 1h
            frontend portal
                bind 127.0.0.1:443 ssl crt {tmp_path / 'portal.pem'} alpn h2,http/1.1
                log-format "%HV %HM %HP %ST"
                default_backend app
            backend app
                option httpchk GET /health
                server app1 127.0.0.1:8080 check inter 500 fall 1 rise 1
            """))
        (tmp_path / "backend.py").write_text(BACKEND)
        (tmp_path / "password").write_text("wonderland\n")
        p.start_backend()
        hlog = open(tmp_path / "haproxy.log", "ab")
        p.haproxy = p.nsexec(haproxy, "-db", "-f", str(tmp_path / "haproxy.cfg"), stdout=hlog, stderr=hlog)
        p.wait_port(443)
        yield p
    finally:
        for proc in (p.haproxy, p.backend):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)
        subprocess.run(["ip", "netns", "delete", ns], check=False)


def watch(p: Portal, out: Path) -> Watch:
    return Watch(f"https://{NAME}", "127.0.0.1", p.tmp / "cert.pem", "alice", p.tmp / "password", out,
                 netns=p.ns, timeout=30, ws_timeout=20)


def restart_backend(p: Portal, lose_sessions: bool) -> None:
    p.kill_backend()
    if lose_sessions:
        (p.tmp / "sessions.json").unlink()
    time.sleep(2)
    p.start_backend()


def test_the_journey_keeps_its_login_and_websocket_over_h1_and_h2_across_a_server_restart(portal: Portal,
                                                                                       tmp_path: Path) -> None:
    t = time.monotonic()
    with watch(portal, tmp_path / "out") as w:
        restart_backend(portal, lose_sessions=False)
    took = time.monotonic() - t
    assert "error" not in w.result, w.result
    for proto in ("h1", "h2"):
        j = w.ready["journeys"][proto]
        assert j["states"][-1] in ("PENDING", "RUNNING"), j  # from the websocket, not the page's SUBMITTED
        r = w.result["protocols"][proto]
        assert r["forced_relogins"] == 0 and r["login_kept"], r
        # The backend is gone for 2 s plus its start: the websocket is back after that, soon.
        assert r["ws_back_s"] is not None and 2.0 <= r["ws_back_s"] <= 10.0, r
        assert Path(r["screenshot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        # Chromium's net log is kept, and it holds the websocket it watched.
        netlog = json.loads((tmp_path / "out" / f"netlog-{proto}.json").read_text())
        assert netlog["constants"] and "/ws/" in json.dumps(netlog["events"]), proto
    # Both protocols really ran: the websocket upgrade over HTTP/1.1 and RFC 8441's
    # extended CONNECT over HTTP/2, as HAProxy logged them.
    log = (tmp_path / "haproxy.log").read_text()
    ws_lines = [line for line in log.splitlines() if "/ws/" in line]
    assert any(line.startswith("HTTP/1.1 GET /ws/ 101") for line in ws_lines), ws_lines[:20]
    # (HAProxy logs the extended CONNECT as the GET it forwards, with the h2 authority.)
    assert any(line.startswith(f"HTTP/2.0 GET https://{NAME}/ws/ 101") for line in ws_lines), ws_lines[:20]
    print(json.dumps(w.result, indent=1))
    assert took < 120, f"the watch took {took:.0f}s"


def test_a_lost_session_is_a_forced_relogin(portal: Portal, tmp_path: Path) -> None:
    with watch(portal, tmp_path / "out") as w:
        restart_backend(portal, lose_sessions=True)
    r = w.result["protocols"]["h1"]
    assert r["forced_relogins"] == 1 and not r["login_kept"] and r["auth_me_status"] == 401, r
    assert r["ws_back_s"] is None, "the websocket needs the login: without it no round trip"


def test_an_untrusted_certificate_fails_the_journey(portal: Portal, tmp_path: Path) -> None:
    other = tmp_path / "other.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(tmp_path / "other.key"), "-out", str(other), "-days", "2", "-subj", f"/CN={NAME}",
                    "-addext", f"subjectAltName=DNS:{NAME}", "-addext", "basicConstraints=critical,CA:TRUE"],
                   check=True, capture_output=True)
    w = Watch(f"https://{NAME}", "127.0.0.1", other, "alice", portal.tmp / "password", tmp_path / "out",
              netns=portal.ns, protocols="h1", timeout=10, ws_timeout=5)
    with pytest.raises(Exception, match="ERR_CERT|net::"):
        with w:
            pass
