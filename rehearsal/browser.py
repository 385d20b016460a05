"""A real browser through the portal's name: Debian's headless Chromium driven by
Playwright (executable_path: nothing downloads a browser), in a network namespace (the
rehearsal's client namespace, "the internet"), trusting the portal's certificate through
an NSS database (no ignored certificate errors) and resolving the portal's name to the
address the caller gives (--host-resolver-rules: the Elastic IP).

The journey, once per protocol (`h1`: Chromium with --disable-http2, so the page and its
websocket use HTTP/1.1; `h2`: the default, the websocket over the HTTP/2 connection with
RFC 8441's extended CONNECT when the load balancer offers it): open the page, log in
through its form, wait for its websocket ("live"), submit a job through its form and
wait until the websocket changes the job's state in the table.

Around a fault (`Watch`, a context manager): the journey runs before the fault; then a
probe in the page sends the websocket service's `hello` every 200 ms on its own socket
(opening a new one at once when it closes) and records each answer. After the fault the
watch reports, per protocol, the seconds from the fault to the first round trip sent
after it, whether the login was kept (GET /auth/me still 200 with the cookie from
before: 0 forced re-logins; asked again while the portal answers 503, until it says 200 or
401) and a screenshot. Chromium's net log of each protocol's browser is kept beside the
screenshots (netlog-h1.json, netlog-h2.json; chrome://net-export's viewer reads them).

    python -m rehearsal.browser watch --url https://portal.example.org --resolve IP --ca PEM \\
        --user NAME --password-file F --out DIR [--protocols h1,h2]

runs in the caller's namespace (`ip netns exec NS` in front): it prints {"event":
"ready", ...} once the journeys are done, reads one line (the fault's epoch time) from
stdin, and prints {"event": "result", ...}. `Watch` is that process seen from a drill.

HPC_CHROMIUM names the browser binary (default /usr/bin/chromium; on Ubuntu 24.04, where
Chromium is a snap, a Chrome or Chromium binary outside snap confinement).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

CHROMIUM = os.environ.get("HPC_CHROMIUM", "/usr/bin/chromium")
# DEVELOPERS.md's flags for a browser on a shared machine, plus /dev/shm: containers and
# namespaces often have a small one and Chromium then crashes its renderers.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage"]
PROTOCOLS = {"h1": ["--disable-http2"], "h2": []}
WS_BACK_TIMEOUT = 60.0

# The probe, in the page: its own websocket to /ws/ (the page's cookie goes with it), a
# `hello` every 200 ms, each answer recorded as [sent, received, live] (epoch ms; live:
# the answer did not say "live": false, i.e. the server's copy of the job states was
# following Redis). A socket that closes, or an answer 2 s late, is replaced at once.
PROBE_JS = """
() => {
  if (window.__probe) return true
  const p = { trips: [], ws: null, pending: null, opened: 0 }
  window.__probe = p
  const url = (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + '/ws/'
  const open = () => {
    const ws = new WebSocket(url)
    p.ws = ws
    p.pending = null
    ws.onopen = () => { p.opened++ }
    ws.onmessage = (e) => {
      if (p.pending === null) return
      let live = true
      try { live = JSON.parse(e.data).live !== false } catch (err) { live = true }
      p.trips.push([p.pending, Date.now(), live]); p.pending = null
    }
    ws.onclose = () => { if (p.ws === ws) p.ws = null }
  }
  setInterval(() => {
    const now = Date.now()
    if (p.ws === null) return open()
    if (p.ws.readyState !== WebSocket.OPEN) return
    if (p.pending !== null && now - p.pending > 2000) { p.ws.close(); p.ws = null; return }
    if (p.pending === null) { p.pending = now; p.ws.send(JSON.stringify({ type: 'hello', last_seq: 0 })) }
  }, 200)
  return true
}
"""


class BrowserError(RuntimeError):
    pass


def nss_db(home: Path, ca_pem: Path) -> Path:
    """$HOME/.pki/nssdb (where Chromium on Linux reads its trust) with the certificate as
    a trusted CA for TLS servers."""
    if shutil.which("certutil") is None:
        raise BrowserError("certutil is not installed (Debian package libnss3-tools; tools/install-debian-deps.sh)")
    db = home / ".pki" / "nssdb"
    db.mkdir(parents=True, exist_ok=True)
    for argv in (["certutil", "-N", "-d", f"sql:{db}", "--empty-password"],
                 ["certutil", "-A", "-d", f"sql:{db}", "-n", "hpc-portal", "-t", "C,,", "-i", str(ca_pem)]):
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        if cp.returncode != 0:
            raise BrowserError(f"{' '.join(argv[:2])}: {cp.stderr.strip() or cp.stdout.strip()}")
    return db


def _chromium() -> str:
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        raise BrowserError(f"no browser at {CHROMIUM} (Debian package chromium; HPC_CHROMIUM names another)")
    return CHROMIUM


@dataclass
class Journey:
    protocol: str
    context: Any
    page: Any
    steps: dict[str, float] = field(default_factory=dict)  # step -> seconds it took
    job: str = ""
    job_states: list[str] = field(default_factory=list)


def journey(pw: Any, protocol: str, url: str, resolve: str, home: Path, user: str, password: str,
            timeout: float = 60.0, netlog: Path | None = None) -> Journey:
    """Log in, see the job list, submit a job and see its state change over the websocket.
    `netlog`: Chromium's own record of its sockets, sessions and websockets there (the
    default capture mode, which leaves cookies and credentials out), to tell afterwards
    why a connection hung."""
    name = urlparse(url).hostname or ""
    data_dir = Path(tempfile.mkdtemp(prefix=f"profile-{protocol}-", dir=home))  # a fresh profile
    log_args = [f"--log-net-log={netlog}", "--net-log-capture-mode=Default"] if netlog else []
    ctx = pw.chromium.launch_persistent_context(
        str(data_dir), executable_path=_chromium(), headless=True,
        args=FLAGS + PROTOCOLS[protocol] + [f"--host-resolver-rules=MAP {name} {resolve}"] + log_args,
        env={**os.environ, "HOME": str(home)}, viewport={"width": 1000, "height": 700})
    ms = int(timeout * 1000)
    ctx.set_default_timeout(ms)
    page = ctx.pages[0] if ctx.pages else ctx.new_page()
    j = Journey(protocol, ctx, page)

    def step(label: str, fn: Any) -> None:
        t = time.monotonic()
        fn()
        j.steps[label] = round(time.monotonic() - t, 2)

    step("page", lambda: page.goto(url, wait_until="load"))
    step("login_form", lambda: page.wait_for_selector("#login:not([hidden])"))

    def login() -> None:
        page.fill("#login input[name=username]", user)
        page.fill("#login input[name=password]", password)
        page.click("#login button")
        page.wait_for_selector("#jobs:not([hidden])")

    step("login", login)
    step("live", lambda: page.wait_for_function("document.getElementById('live').textContent === 'live'"))
    before = set(page.eval_on_selector_all("#job-rows tr td:first-child", "tds => tds.map(t => t.textContent)"))

    def submit() -> None:
        page.fill("#submit input[name=name]", f"browser-{protocol}")
        page.fill("#submit input[name=seconds]", "30")
        page.click("#submit button")
        page.wait_for_function(
            "before => [...document.querySelectorAll('#job-rows tr td:first-child')].some(t => !before.includes(t.textContent))",
            arg=sorted(before))

    step("submit", submit)
    j.job = next(i for i in page.eval_on_selector_all("#job-rows tr td:first-child", "tds => tds.map(t => t.textContent)")
                 if i not in before)
    state_of = ("id => { for (const tr of document.querySelectorAll('#job-rows tr')) "
                "if (tr.firstChild.textContent === id) return tr.lastChild.textContent; return null }")
    j.job_states.append(page.evaluate(state_of, j.job) or "")

    # SUBMITTED (or nothing) is what the page writes itself; any other state came over
    # the websocket (the poller's change for this job, before or after the POST's answer).
    def state_change() -> None:
        page.wait_for_function(f"id => {{ const s = ({state_of})(id); return s !== null && s !== 'SUBMITTED' }}",
                               arg=j.job)

    step("state_change", state_change)
    j.job_states.append(page.evaluate(state_of, j.job) or "")
    if page.evaluate("fetch('/auth/me', {credentials: 'same-origin'}).then(r => r.status)") != 200:
        raise BrowserError(f"{protocol}: logged in, but /auth/me does not know the session")
    page.evaluate(PROBE_JS)
    return j


def after_fault(j: Journey, fault: float, out: Path, timeout: float = WS_BACK_TIMEOUT) -> dict[str, Any]:
    """Seconds from the fault to the first probe round trip sent after it (ws_back_s)
    and to the first one answered from live state (ws_live_back_s: the server following
    Redis again), the login kept or not, a screenshot."""
    fault_ms = fault * 1000
    back: float | None = None
    live_back: float | None = None
    deadline = time.time() + timeout
    while time.time() < deadline:
        trips = j.page.evaluate("window.__probe.trips.slice(-400)")
        after = [t for t in trips if t[0] >= fault_ms]
        if after and back is None:
            back = round((after[0][1] - fault_ms) / 1000, 2)
        live = [t for t in after if len(t) < 3 or t[2]]
        if live:
            live_back = round((live[0][1] - fault_ms) / 1000, 2)
            break
        time.sleep(0.2)
    # The login: /auth/me with the cookie from before the fault, asked again until the
    # portal gives a verdict. 200: kept; 401 (login required): the session is gone, a
    # forced re-login. A 503 (the session store unavailable: a Redis failover still in
    # progress), a 502 or no answer is no verdict yet: the page would retry, so do we.
    statuses: list[int] = []
    status = 0
    while True:
        status = int(j.page.evaluate("fetch('/auth/me', {credentials: 'same-origin'}).then(r => r.status, e => 0)"))
        statuses.append(status)
        if status in (200, 401) or time.time() > deadline:
            break
        time.sleep(0.5)
    login_s = round(time.time() - fault, 2)
    shot = out / f"browser-{j.protocol}.png"
    j.page.screenshot(path=str(shot), full_page=True)
    return {"ws_back_s": back, "ws_live_back_s": live_back, "login_kept": status == 200, "forced_relogins": 0 if status == 200 else 1,
            "auth_me_status": status, "auth_me_statuses": statuses[-20:], "login_checked_s": login_s,
            "screenshot": str(shot), "journey_s": j.steps, "job": j.job,
            "job_states": j.job_states, "probe_sockets_opened": j.page.evaluate("window.__probe.opened")}


def watch_main(a: argparse.Namespace) -> int:
    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    from playwright.sync_api import sync_playwright

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    password = Path(a.password_file).read_text().strip()
    protocols = [p for p in a.protocols.split(",") if p]
    bad = [p for p in protocols if p not in PROTOCOLS]
    if bad:
        raise BrowserError(f"--protocols {a.protocols}: each one of {', '.join(PROTOCOLS)}")
    home = Path(tempfile.mkdtemp(prefix="hpc-browser-"))
    try:
        nss_db(home, Path(a.ca))
        with sync_playwright() as pw:
            journeys = {}
            for proto in protocols:
                journeys[proto] = journey(pw, proto, a.url, a.resolve, home, a.user, password, timeout=a.timeout,
                                          netlog=out / f"netlog-{proto}.json")
            print(json.dumps({"event": "ready", "journeys": {p: {"steps": j.steps, "job": j.job, "states": j.job_states}
                                                             for p, j in journeys.items()}}), flush=True)
            line = sys.stdin.readline().strip()
            if not line:
                return 0  # the caller went away before a fault: nothing to measure
            fault = float(line)
            result = {p: after_fault(j, fault, out, a.ws_timeout) for p, j in journeys.items()}
            for j in journeys.values():
                j.context.close()
        print(json.dumps({"event": "result", "fault": fault, "protocols": result}), flush=True)
        return 0
    finally:
        shutil.rmtree(home, ignore_errors=True)


class Watch:
    """The browser around a fault, from the caller's side:

        with Watch(url, resolve, ca_pem, user, password_file, out_dir, netns=NS) as w:
            inject()             # the fault: its time is when the block starts
        w.result                 # {"protocols": {"h1": {...}, "h2": {...}}} or {"error": ...}

    Entering runs both journeys (logged in before the fault) and raises BrowserError if
    they fail; leaving waits for the measurements (at most ws_timeout + 60 s)."""

    def __init__(self, url: str, resolve: str, ca_pem: Path, user: str, password_file: Path, out_dir: Path,
                 netns: str | None = None, protocols: str = "h1,h2", timeout: float = 90.0,
                 ws_timeout: float = WS_BACK_TIMEOUT) -> None:
        self.argv = [sys.executable, "-m", "rehearsal.browser", "watch", "--url", url, "--resolve", resolve,
                     "--ca", str(ca_pem), "--user", user, "--password-file", str(password_file),
                     "--out", str(out_dir), "--protocols", protocols, "--timeout", str(timeout),
                     "--ws-timeout", str(ws_timeout)]
        if netns:
            self.argv = ["ip", "netns", "exec", netns] + self.argv
        self.timeout, self.ws_timeout = timeout, ws_timeout
        self.out_dir = Path(out_dir)
        self.p: subprocess.Popen[str] | None = None
        self.ready: dict[str, Any] = {}
        self.result: dict[str, Any] = {}
        self.fault = 0.0
        self._stderr: list[str] = []

    def _line(self, timeout: float) -> dict[str, Any]:
        assert self.p is not None and self.p.stdout is not None
        box: list[str] = []
        t = threading.Thread(target=lambda: box.append(self.p.stdout.readline() if self.p and self.p.stdout else ""),
                             daemon=True)
        t.start()
        t.join(timeout)
        if not box or not box[0]:
            self.close()
            raise BrowserError(f"the browser gave no answer in {timeout:.0f}s: {''.join(self._stderr)[-2000:]}")
        return dict(json.loads(box[0]))

    def __enter__(self) -> Watch:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        repo = Path(__file__).resolve().parents[1]
        env = {**os.environ, "PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD": "1",
               "PYTHONPATH": str(repo) + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")}
        self.p = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=env, cwd=repo)
        threading.Thread(target=self._drain, daemon=True).start()
        self.ready = self._line(self.timeout * 6 + 60)
        if self.ready.get("event") != "ready":
            raise BrowserError(f"the browser: {self.ready}")
        self.fault = time.time()
        return self

    def _drain(self) -> None:
        assert self.p is not None and self.p.stderr is not None
        for line in self.p.stderr:
            self._stderr.append(line)
            del self._stderr[:-200]

    def __exit__(self, *exc: Any) -> None:
        try:
            assert self.p is not None and self.p.stdin is not None
            self.p.stdin.write(f"{self.fault}\n")
            self.p.stdin.flush()
            self.result = self._line(self.ws_timeout + 60)
        except (BrowserError, OSError, ValueError) as e:
            self.result = {"error": str(e)}
        finally:
            self.close()

    def close(self) -> None:
        if self.p is not None and self.p.poll() is None:
            self.p.kill()
            self.p.wait(10)


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """The figures a drill reports: per protocol the websocket's return and the login."""
    if "error" in result:
        return {"browser_error": result["error"]}
    keys = ("ws_back_s", "ws_live_back_s", "forced_relogins", "auth_me_statuses", "login_checked_s", "screenshot")
    return {f"browser_{p}": {k: r[k] for k in keys if k in r} for p, r in result.get("protocols", {}).items()}


@contextlib.contextmanager
def around_fault(drill: Any, name: str, res: Any) -> Iterator[None]:
    """The rehearsal's drills: a browser logged in through the Elastic IP before the
    fault, measured after it, when the rehearsal runs the reference portal (its state
    records `portal: reference` and the browser user's password file); a no-op with the
    stand-in, which has no login and no websocket. The figures go into the drill's notes
    and checks (websocket back within 5 s, 0 forced re-logins)."""
    from .layout import EIP_PUBLIC_IP, NS_CLIENT
    from .stack import read_state

    st = read_state(drill.wd)
    portal = st.get("portal") or {}
    if portal.get("kind") != "reference":
        yield
        return
    w = Watch(f"https://portal.{drill.layout.cfg.domain}", EIP_PUBLIC_IP, Path(portal["ca"]), portal["user"],
              Path(portal["password_file"]), drill.out_dir / f"browser-{name}", netns=NS_CLIENT, timeout=30)
    try:
        w.__enter__()
    except Exception as e:  # noqa: BLE001 - a failed journey fails the drill's browser check, not the drill
        res.notes.append(f"browser before the fault: {e}")
        res.browser = {"browser_error": f"before the fault: {e}"}
        res.checks["browser"] = False
        yield
        return
    try:
        yield
    finally:
        w.__exit__(None, None, None)
        s = summary(w.result)
        res.browser = s
        res.notes.append("browser: " + json.dumps(s))
        per = [v for k, v in s.items() if k.startswith("browser_h")]
        res.checks["browser"] = bool(per) and all(
            v["ws_back_s"] is not None and v["ws_back_s"] <= 5.0 and v["forced_relogins"] == 0 for v in per)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rehearsal.browser")
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("watch")
    w.add_argument("--url", required=True)
    w.add_argument("--resolve", required=True, help="the address the portal's name maps to")
    w.add_argument("--ca", required=True, help="PEM of the certificate to trust")
    w.add_argument("--user", required=True)
    w.add_argument("--password-file", required=True)
    w.add_argument("--out", required=True)
    w.add_argument("--protocols", default="h1,h2")
    w.add_argument("--timeout", type=float, default=90.0, help="per journey step")
    w.add_argument("--ws-timeout", type=float, default=WS_BACK_TIMEOUT)
    a = p.parse_args(argv)
    try:
        return watch_main(a)
    except BrowserError as e:
        print(f"rehearsal.browser: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
