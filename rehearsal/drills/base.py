"""What every drill shares: the targets, the Result, load through the VIP and its
measurements, the alert check, the drill registry, and the report (table and JSON).

Per drill (the common report schema, every drill): RTO (fault injection -> first of 10
consecutive successful requests of the kinds the fault touches), requests, failed reads
and writes, writes in flight at the fault, acknowledged writes of every kind (records in
MariaDB, sessions in Redis, Slurm jobs) and how many of them are lost, duplicated or
ghosts (each one is in the load's history with its time and the host that took it, and
is read back after the drill), how many were acknowledged inside the fault window, what
shows that the fault took effect, the Alertmanager alert that applies and its latency,
and whether every target was met. A drill whose fault shows no effect fails.

Faults are real: kill -9 of every process of a host (its PID namespace dies with them),
kill -9 of one daemon with its Restart= held back, or a link cut at the VPC router.
The drills themselves live with their family (lb_network, data, slurm, site, deploy);
each registers under its name with @register.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import io
import json
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .. import hosts as H
from ..awsd import ops_call
from ..layout import EIP_PUBLIC_IP, NS_CLIENT, Layout
from ..load import RESOLVE_AFTER_STOP_S
from ..stack import _python, read_state, say, write_state

REPO = Path(__file__).resolve().parents[2]  # the checkout: cwd of `python -m rehearsal.load`
URL = f"https://{EIP_PUBLIC_IP}"
ALL_KINDS = ("write", "snew", "session", "page", "record")
WRITE_KINDS = ("write", "snew", "job")  # records, sessions, jobs: every acknowledged one is read back
READ_KINDS = ("session", "page", "record")
# POSTs a failed request of counts as a failed write: the writes, and the logins (a
# session written to Redis). The load's websocket (`ws` lines) is reported on its own.
FAILED_WRITE_KINDS = (*WRITE_KINDS, "login")
KIND_NAMES = {"write": "records", "snew": "sessions", "job": "jobs"}
MIN_ACKED = 500
SETTLE_S = 45.0  # after a thaw or a heal: how long the invariants may take to hold again
# Before a drill: how long the LB pair may take to settle (hpc-eip-reconcile.timer's 30 s
# after boot plus a few of its 5 s periods and a takeover's own retries).
LB_SETTLE_S = 90.0
MIN_WINDOW_S = 15.0  # the shortest fault window of a drill under _under_load
READ_BACK_WAIT_S = 90.0  # how long the job read-back waits for squeue (a controller in charge)
# How long the job read-back gives the reference portal's reconciler when a job is lost
# or a held attempt is unsettled: ORPHAN_S 60 s + two passes of 10 s + the leader's lease
# (examples/reference-portal/app/portal/reconcile.py).
SETTLE_WAIT_S = 100.0
# How long a drill that brought a Slurm controller back waits for both to answer ping:
# hpc-slurm-fence's WEDGED_S (90 s) to restart a backup wedged by its hand-back, and its start.
HANDBACK_LIMIT_S = 150.0
ATTEMPT, WITHDRAWN = "pending/", "withdrawn/"  # comment prefixes of its two-phase submission (portal/slurm.py)
HOLDS = ("JobHeldUser", "JobHeldAdmin")  # squeue's reasons of a held job (--hold by a user / by root)
MIN_IN_WINDOW = 20  # acknowledged writes inside the fault window: a fault with no load under it proves nothing
LOAD_RATE = 60.0
ALERT_TARGET_S = 60.0  # every alert within a minute of its fault
# Sessions an isolated or killed Redis master acknowledged but had not replicated, from
# the fault on: min-replicas-max-lag (2 s) + 2 s. Redis counts the lag in whole seconds
# (its clock's second minus the second of the replica's last ack, acks once a second) and
# recounts the good replicas once a second (replicationCron), so an isolated master
# takes writes for up to max-lag + 2 s: the full run of 2026-12-02 saw sessions
# acknowledged 3.1-3.7 s after the cut (the window was max-lag + 1 s before; a max-lag of
# 1 would refuse writes whenever an ack is 1.1 s old across a second boundary). A session
# acknowledged up to 1 s before the fault may still be in flight to the replicas when
# the master dies (asynchronous replication).
SESSION_WINDOW_S = (-1.0, 4.0)

# name -> (target RTO s or None, alert names that apply, RTO kinds)
TARGETS: dict[str, dict[str, Any]] = {
    "lb": {"rto": 3.0, "alerts": ["ServerDown"], "kinds": ALL_KINDS},
    "app": {"rto": None, "alerts": ["ServerDown"], "kinds": ALL_KINDS},
    "redis": {"rto": 5.0, "alerts": ["RedisDown"], "kinds": ("session", "snew")},
    "galera": {"rto": 5.0, "alerts": ["ServerDown", "DatabaseDown", "GaleraClusterSize"], "kinds": ("write", "record")},
    "slurm": {"rto": 30.0, "alerts": ["SlurmctldDown", "ServerDown"], "kinds": ALL_KINDS},
    "az": {"rto": 10.0, "alerts": ["ServerDown"], "kinds": ALL_KINDS},
}
ORDER = ["lb", "app", "redis", "galera", "slurm", "az", "galera-full", "rolling", "deploy", "restore",
         "no-false-failover", "freeze-lb", "freeze-redis", "freeze-galera", "freeze-app", "freeze-slurm",
         "partition-redis", "partition-galera", "partition-lb", "crash-burst", "power-loss", "ec2-api",
         "slurm-host", "slow-galera", "efs-stall"]
SMOKE = ["lb", "redis", "galera"]


@dataclass
class Result:
    name: str
    rto_s: float | None = None
    target_rto_s: float | None = None
    requests: int = 0
    failed_reads: int = 0
    failed_writes: int = 0
    in_flight_writes: int = 0
    errors: int = 0
    acked_writes: int = 0
    lost_writes: int = 0
    duplicates: int = 0
    ghost_jobs: int = 0
    per_kind: dict[str, dict[str, int]] = field(default_factory=dict)
    acked_in_fault_window: int = 0
    fault_effect: str | None = None  # what shows the fault took effect; None: it did not
    alert: str | None = None
    alert_latency_s: float | None = None
    passed: bool = False
    alert_target_s: float | None = None
    # The load's own websocket subscription and logins (the reference portal): opened,
    # reconnects, resyncs, failures, seconds from the fault to its first round trip,
    # forced re-logins (see load_portal_figures).
    load_portal: dict[str, Any] = field(default_factory=dict)
    # Failed requests by kind, status and phase (before the fault, in its window, after):
    # what a failure count is made of.
    failures: dict[str, int] = field(default_factory=dict)
    # The browser logged in before the fault (rehearsal/browser.py, the reference
    # portal): per protocol ws_back_s, forced_relogins, screenshot.
    browser: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    checks: dict[str, bool] = field(default_factory=dict)
    seconds: float = 0.0
    fault_window: tuple[float, float] | None = None  # (fault, end of fault) epoch seconds
    min_in_window: int = MIN_IN_WINDOW

    def report(self) -> dict[str, Any]:
        d = asdict(self)
        return d


# drill name -> the method that runs it (DrillBase subclasses register with @register)
REGISTRY: dict[str, Callable[..., Result]] = {}
_F = TypeVar("_F", bound=Callable[..., Result])


def register(name: str) -> Callable[[_F], _F]:
    """Make the decorated method the drill `name` (what `Drills.drill(name)` runs)."""

    def deco(fn: _F) -> _F:
        if name in REGISTRY:
            raise ValueError(f"drill {name!r} registered twice")
        REGISTRY[name] = fn
        return fn

    return deco


def haproxy_active(stat_csv: str, backend: str = "galera_writer") -> str | None:
    """The server HAProxy sends a backend's connections to: the first UP active server,
    else the first UP backup (one writer: `backup` servers and no allbackups)."""
    head: list[str] = []
    rows: list[dict[str, str]] = []
    for line in stat_csv.splitlines():
        if line.startswith("# "):
            head = line[2:].split(",")
        elif head and line.strip():
            rows.append(dict(zip(head, line.split(","), strict=False)))
    servers = [r for r in rows if r.get("pxname") == backend and r.get("svname") not in ("FRONTEND", "BACKEND")]
    up = [r for r in servers if r.get("status", "").startswith("UP")]
    for want_backup in ("0", "1"):
        for r in up:
            if r.get("bck") == want_backup:
                return r.get("svname")
    return None


class AlertWatch:
    """Alertmanager's active alerts, looked at every 2 s from a fault on, each kept as first
    seen. A drill busy measuring after its fault (the flow-control counters, the RTO) looked
    only once that was done: slow-galera's GaleraFlowControl fired 30 s after the
    slowdown and was resolved 20 s later, just before the drill's first look, and the
    drill reported no such alert."""

    def __init__(self, fetch: Callable[[], list[dict[str, Any]]], every_s: float = 2.0):
        self.fetch, self.every_s = fetch, every_s
        self.seen: dict[str, dict[str, Any]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="alert-watch", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.look()
            self._stop.wait(self.every_s)

    def look(self) -> None:
        for a in self.fetch():
            key = a.get("fingerprint") or json.dumps(a.get("labels", {}), sort_keys=True)
            self.seen.setdefault(f"{key} {a.get('startsAt', '')}", a)

    def __enter__(self) -> AlertWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


class DrillBase:
    alert_watch: AlertWatch | None = None  # set while a fault is on (_under_load)

    def __init__(self, layout: Layout, out_dir: Path, ceiling: float = 1.0, alert_checks: int | None = None):
        self.layout = layout
        self.wd = layout.workdir
        self.out_dir = out_dir
        self.ceiling = ceiling  # targets x ceiling decide `passed` (the smoke test is generous)
        self.alert_checks_left = alert_checks  # None: every drill checks its alert
        self.deploy = json.loads((self.wd / "deploy.json").read_text())
        self._secrets: dict[str, str] = {}
        self.effect: str | None = None  # what a drill's inject() observed of its fault
        self.held_attempts: dict[str, set[str]] = {}  # the last job read-back's, see jobs_by_request_id
        # What a wait that timed out saw (wait_synced): added to the drill's notes, so a
        # failure in CI, where nothing of the run is kept, says what state the nodes were in.
        self.diagnoses: list[str] = []

    def killed(self, *hosts: str) -> None:
        """After kill -9 of whole hosts: the effect when none of their processes is left."""
        left = [h for h in hosts if H.alive(h)]
        if not left:
            self.effect = f"no process left on {', '.join(hosts)}"

    # ------------------------------------------------------------------ helpers
    def secret(self, name: str) -> str:
        if name not in self._secrets:
            r = ops_call(self.wd, "ssm", "get_parameter", Name=f"{self.deploy['ssm_path']}/secrets/{name}",
                         WithDecryption=True)
            self._secrets[name] = r["Parameter"]["Value"]
        return self._secrets[name]

    def run(self, host: str, cmd: str, timeout: float = 30) -> tuple[int, str]:
        return H.run(self.layout, host, ["sh", "-c", cmd], timeout=timeout)

    def eip_target(self) -> str | None:
        addr = ops_call(self.wd, "ec2", "describe_addresses", AllocationIds=[self.deploy["eip"]["allocation_id"]])
        a = addr["Addresses"][0]
        return a.get("PrivateIpAddress") if a.get("NetworkInterfaceId") else None

    def host_by_ip(self, ip: str | None) -> str | None:
        for h in self.layout.hosts:
            if h.ip == ip:
                return h.name
        return None

    @contextlib.contextmanager
    def load(self, name: str) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
        """Load through the VIP for the length of the block; the generator is always stopped."""
        p, path = self.start_load(name)
        try:
            yield p, path
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()

    def portal_login(self) -> list[str]:
        """The load's login (--user, --password-file) when the rehearsal runs the reference
        portal (its state records the account made after boot); none for the stand-in."""
        portal = read_state(self.wd).get("portal") or {}
        if portal.get("kind") != "reference":
            return []
        return ["--user", str(portal["user"]), "--password-file", str(portal["password_file"])]

    def start_load(self, name: str) -> tuple[subprocess.Popen[bytes], Path]:
        path = self.out_dir / f"load-{name}.log"
        path.unlink(missing_ok=True)
        p = subprocess.Popen(["nsenter", f"--net=/run/netns/{NS_CLIENT}", "--", _python(), "-m", "rehearsal.load", "run",
                              "--url", URL, "--out", str(path), "--rate", str(LOAD_RATE), "--duration", "900",
                              "--tag", name.replace("-", ""), *self.portal_login(),
                              # HPC_REHEARSAL_LOAD_SPARES=0: the closed load (no spare connections), to compare
                              *(["--spares", os.environ["HPC_REHEARSAL_LOAD_SPARES"]]
                                if os.environ.get("HPC_REHEARSAL_LOAD_SPARES") else [])],
                             cwd=str(REPO), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, start_new_session=True)
        st = read_state(self.wd)
        st["load_pid"] = p.pid
        write_state(self.wd, st)
        return p, path

    @staticmethod
    def records(path: Path) -> list[tuple[float, float, str, bool, int, str]]:
        return [h[:6] for h in history(path)]  # type: ignore[misc]

    def wait_healthy(self, path: Path, kinds: tuple[str, ...] = ALL_KINDS, timeout: float = 120) -> bool:
        deadline = time.time() + timeout
        while time.time() < deadline:
            recs = [r for r in self.records(path) if r[2] in kinds]
            if len(recs) >= 20 and all(r[3] for r in recs[-20:]):
                return True
            time.sleep(1)
        return False

    def rto(self, path: Path, t0: float, kinds: tuple[str, ...], timeout: float) -> float | None:
        """Seconds from t0 to the first of 10 consecutive successes (requests started after t0)."""
        deadline = time.time() + timeout
        last_print = 0.0
        while True:
            recs = [r for r in self.records(path) if r[2] in kinds and r[0] >= t0]
            found = rto_of(recs, t0)
            if found is not None:
                return found
            now = time.time()
            if now > deadline:
                return None
            if now - last_print > 5:
                fails = sum(1 for r in recs if not r[3])
                say(f"    ... {now - t0:5.1f}s after the fault: {len(recs)} requests, {fails} failed")
                last_print = now
            time.sleep(0.5)

    def finish_load(self, p: subprocess.Popen[bytes], path: Path, min_acked: int = MIN_ACKED, max_s: float = 240) -> None:
        deadline = time.time() + max_s
        while time.time() < deadline:
            acked = sum(1 for r in self.records(path) if r[2] == "write" and r[3])
            if acked >= min_acked:
                break
            time.sleep(1)
        p.terminate()
        try:
            p.wait(RESOLVE_AFTER_STOP_S + 10)  # a job submission in flight is resolved first
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    def client_tool(self, *args: str, timeout: float = 300) -> dict[str, Any]:
        """`python -m rehearsal.load ARGS` in the client namespace (`jobs` logged in as the
        portal's account when there is one): its last line of JSON, or {"error": ...}
        with what it printed."""
        login = self.portal_login() if args and args[0] == "jobs" else []
        cp = subprocess.run(["nsenter", f"--net=/run/netns/{NS_CLIENT}", "--", _python(), "-m", "rehearsal.load", *args,
                             *login],
                            cwd=str(REPO), capture_output=True, text=True,
                            timeout=timeout)
        try:
            return dict(json.loads(cp.stdout.strip().splitlines()[-1]))
        except (ValueError, IndexError):
            return {"error": cp.stdout[-300:] + cp.stderr[-300:]}

    def verify(self, path: Path, res: Result) -> None:
        """Read every acknowledged write of the history back: records (the portal's
        read-back), sessions (each one's cookie), jobs (Slurm's squeue and sacct from an
        app host, by request id); then cancel the load's jobs."""
        hist = history(path)
        ids = [h[5] for h in hist if h[2] == "write" and h[3]]
        ids_file = path.with_suffix(".acked")
        ids_file.write_text("\n".join(ids) + "\n")
        kinds = res.per_kind = {k: {"acked": 0, "lost": 0, "duplicated": 0, "ghost": 0}
                                for k in KIND_NAMES.values()}
        kinds["records"]["acked"] = len(ids)
        doc = self.client_tool("verify", "--url", URL, "--ids", str(ids_file))
        if "error" in doc:
            res.notes.append(f"read-back failed: {doc['error']}")
            kinds["records"]["lost"] = len(ids)
            res.checks["read_back"] = False
        else:
            kinds["records"]["lost"] = len(doc["missing"])
            kinds["records"]["duplicated"] = int(doc["duplicates"])
            if doc["missing"]:
                res.notes.append(f"lost: {', '.join(doc['missing'][:5])}{' ...' if len(doc['missing']) > 5 else ''}")
        # sessions
        sess = {h[5]: h[1] for h in hist if h[2] == "snew" and h[3] and h[5] != "-"}
        kinds["sessions"]["acked"] = len(sess)
        if sess:
            sfile = path.with_suffix(".sessions")
            sfile.write_text("\n".join(sess) + "\n")
            sdoc = self.client_tool("sessions", "--url", URL, "--ids", str(sfile))
            if "error" in sdoc:
                res.notes.append(f"session read-back failed: {sdoc['error']}")
                res.checks["read_back"] = False
                kinds["sessions"]["lost"] = len(sess)
            else:
                gone = {sid: sess[sid] for sid in sdoc["missing"] if sid in sess}
                inside, outside = split_window(gone, res.fault_window, SESSION_WINDOW_S)
                kinds["sessions"]["lost"] = len(outside)
                kinds["sessions"]["lost_in_window"] = len(inside)
                if inside:
                    res.notes.append(f"{len(inside)} sessions acknowledged inside the documented window "
                                     f"{SESSION_WINDOW_S} s around the fault were lost")
                if outside:
                    res.notes.append(f"{len(outside)} sessions lost outside the window, e.g. {sorted(outside)[:3]}")
        relost = sum(1 for h in hist if h[2] == "session" and h[7] == "lost")
        if relost:
            res.notes.append(f"{relost} session reads found their session gone")
        # jobs
        job_hist = [h for h in hist if h[2] == "job"]
        if job_hist:
            found = self.jobs_by_request_id()
            tried = {h[5] for h in job_hist}
            deadline = time.time() + SETTLE_WAIT_S
            journal_error: list[str] = []

            def resubmitted() -> dict[str, tuple[str, str]]:
                try:
                    return self.resubmitted_jobs()
                except RuntimeError as e:
                    journal_error[:] = [str(e)]
                    return {}
            resub = resubmitted()
            while found is not None and self.portal_reconciles():
                j = judge_jobs(job_hist, found, resub)
                # A duplicate can be a moment of the reconciler's resubmission (its new
                # job visible, the journal read a moment before): a real one outlasts the wait.
                if not (j["lost"] or j["duplicated"] or tried & set(self.held_attempts)) or time.time() >= deadline:
                    break
                time.sleep(5)  # the reconciler submits lost jobs again and withdraws held attempts
                found, resub = self.jobs_by_request_id(), resubmitted()
            if found is None:
                res.notes.append(f"job read-back failed: squeue did not answer within {READ_BACK_WAIT_S:.0f} s")
                res.checks["read_back"] = False
                kinds["jobs"]["lost"] = len({h[5] for h in job_hist if h[3]})
            else:
                j = judge_jobs(job_hist, found, resub)
                kinds["jobs"].update(j)
                if journal_error:
                    res.notes.append(journal_error[0])
                    res.checks["read_back"] = False
                unsettled = {rid: jobs for rid, jobs in self.held_attempts.items() if rid in tried}
                res.checks["held_attempts_settled"] = not unsettled
                if unsettled:
                    res.notes.append(f"held attempts nobody settled after {SETTLE_WAIT_S:.0f} s (they cannot run): "
                                     + ", ".join(f"{rid} {sorted(jobs)}" for rid, jobs in sorted(unsettled.items())[:5]))
                if j.get("resubmitted"):
                    res.notes.append(f"{j['resubmitted']} acknowledged jobs a controller crash lost were submitted "
                                     "again by the portal's reconciler (same request id, new job id)")
                if j["ghost"]:
                    res.notes.append(ghost_note(job_hist, found, res.fault_window[0] if res.fault_window else 0.0))
                if j["lost"]:  # which: request id, the job id the portal acknowledged, when
                    lost = [(h[5], h[7], h[1]) for h in job_hist if h[3] and h[7] != "-" and not found.get(h[5])]
                    res.notes.append("jobs lost: " + ", ".join(
                        f"{rid} (job {job}, acked {time.strftime('%H:%M:%S', time.gmtime(t))}"
                        f"{f', {t - res.fault_window[0]:+.1f}s from the fault' if res.fault_window else ''})"
                        for rid, job, t in lost[:5]))
                self.cancel_jobs(sorted({x for rid in tried for x in found.get(rid, set()) | unsettled.get(rid, set())}))
        res.lost_writes = sum(k["lost"] for k in kinds.values())
        res.duplicates = sum(k["duplicated"] for k in kinds.values())
        res.ghost_jobs = kinds["jobs"]["ghost"]
        res.acked_writes = sum(k["acked"] for k in kinds.values())
        if res.fault_window:
            a, b = res.fault_window
            res.acked_in_fault_window = sum(1 for h in hist if h[2] in WRITE_KINDS and h[3] and a <= h[1] <= b)

    def controllers_back(self, client: str, limit_s: float | None = None) -> float | None:
        """Seconds until `scontrol ping` from `client` says every controller is UP (the
        primary in control again, the backup back in standby), None if not within
        `limit_s`. A backup wedged by its hand-back answers no ping until hpc-slurm-fence
        --watch restarts it (WEDGED_S, 90 s). `limit_s` defaults to HANDBACK_LIMIT_S."""
        limit = HANDBACK_LIMIT_S if limit_s is None else limit_s
        t0 = time.time()
        while time.time() - t0 < limit:
            rc, ping = self.run(client, "scontrol ping", timeout=15)
            lines = [x for x in ping.splitlines() if x.startswith("Slurmctld(")]
            if rc == 0 and lines and all(x.rstrip().endswith("is UP") for x in lines):
                return time.time() - t0
            time.sleep(2)
        return None

    def portal_reconciles(self) -> bool:
        """Whether the portal keeps a job journal and reconciles (the reference portal:
        its api service has a database; the stand-in has none)."""
        return api_db(self.layout) is not None

    def resubmitted_jobs(self) -> dict[str, tuple[str, str]]:
        """request id -> (lost job id, new job id): what the portal's reconciler submitted
        again (the reference portal's journal, portal_jobs.resubmitted_from), read on the
        first data host whose MariaDB answers (as root through its socket: root has no
        network login); {} when the portal keeps no journal (the stand-in). A journal that
        no data host can read is an error: every resubmitted job would be judged a
        duplicate."""
        db = api_db(self.layout)
        if db is None:
            return {}
        if not re.fullmatch(r"[A-Za-z0-9_]+", db):
            raise RuntimeError(f"the api service's database name {db!r} is not a plain identifier")
        sql = f"SELECT request_id, resubmitted_from, job_id FROM {db}.portal_jobs WHERE resubmitted_from IS NOT NULL"
        errors = []
        for host in self.layout.topo.role_hosts["data"]:
            rc, out = self.run(host, f"mariadb -N -B --connect-timeout=3 -e '{sql}'", timeout=30)
            if rc == 0:
                return {p[0]: (p[1], p[2]) for p in (line.split("\t") for line in out.splitlines()) if len(p) == 3}
            errors.append(f"{host}: rc {rc} {out.strip()[-200:]}")
        raise RuntimeError("the portal's job journal could not be read: " + "; ".join(errors))

    def jobs_by_request_id(self, wait_s: float = READ_BACK_WAIT_S) -> dict[str, set[str]] | None:
        """request id (the job's comment) -> job ids, from squeue (every job slurmctld
        holds) and sacct (every job accounting has), asked on an app host; None when
        squeue does not answer within `wait_s`. Held attempts (the reference portal's
        two-phase submission: `sbatch --hold`, released once the request id is settled)
        are no jobs: they cannot run and nobody was told of them; they go to
        `self.held_attempts` (request id -> job ids) and must be gone by the read-back's
        end. Withdrawn attempts carry a withdrawn/<request id> comment and count for no
        request id.

        squeue must answer: it is the only one that knows an unfinished job's request id
        (sacct gets the comment with the job's completion record). A read-back while no
        controller is in charge fell back to sacct alone and called every unfinished job
        lost (measured on Slurm 24.11: a 29 s hand-back when the primary takes control
        back), so it waits for squeue."""
        app = self.layout.topo.role_hosts["app"][-1]
        out: dict[str, set[str]] = {}
        self.held_attempts = {}
        deadline = time.time() + wait_s
        while True:
            rc, text = self.run(app, "squeue --noheader --states=all -o '%i|%k|%T|%r' 2>/dev/null", timeout=60)
            if rc == 0:
                break
            if time.time() >= deadline:
                return None
            time.sleep(3)
        rc2, text2 = self.run(app, "sacct --noheader --parsable2 --allusers --allocations --starttime=now-1days "
                                   "--format=JobID,Comment 2>/dev/null", timeout=60)
        queued, self.held_attempts, not_jobs = read_queue(text)
        for job, comment in queued + (parse_jobs(text2, "|") if rc2 == 0 else []):
            if job not in not_jobs:
                out.setdefault(comment.removeprefix(ATTEMPT), set()).add(job)
        return out

    def cancel_jobs(self, jobs: list[str]) -> None:
        app = self.layout.topo.role_hosts["app"][-1]
        for i in range(0, len(jobs), 200):
            self.run(app, f"scancel {' '.join(jobs[i:i + 200])} 2>/dev/null", timeout=60)

    def keep_logs(self, name: str, since: float) -> None:
        """HAProxy's request log on every LB and the portal services' logs (gunicorn's
        access log, the stand-in's) on every app host from `since` on, next to the load's
        history (<workdir>/logs-<drill>/): what explains a failed request."""
        d = self.out_dir / f"logs-{name}"
        d.mkdir(parents=True, exist_ok=True)
        iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(since))
        topo = self.layout.topo.role_hosts
        # rsyslog's files (HAProxy logs through /dev/log in its chroot); journald for the units.
        cmds = {"lb": f"awk -v s={iso} 'substr($1, 1, 19) >= s' /var/log/haproxy.log",
                "app": f"journalctl --no-pager -o short-iso-precise -u 'hpc-portal-*' --since @{since:.0f}"}
        for role, cmd in cmds.items():
            for h in topo.get(role, []):
                if not H.alive(h) or frozen(h):
                    continue
                _rc, out = self.run(h, cmd, timeout=60)
                (d / f"{h}-{'haproxy' if role == 'lb' else 'portal'}.log").write_text(out)

    def tally(self, path: Path, t0: float, res: Result) -> None:
        tally(self.records(path), t0, res)
        hist = history(path)
        res.failures = failure_breakdown(hist, res.fault_window or (t0, t0))
        if res.failures:
            res.notes.append("failed requests (kind status phase: count): "
                             + ", ".join(f"{k}: {v}" for k, v in res.failures.items()))
        res.load_portal = load_portal_figures(hist, t0)
        if res.load_portal:
            res.notes.append("load's login and websocket: " + json.dumps(res.load_portal))

    def alerts(self) -> list[dict[str, Any]]:
        mon = self.layout.topo.role_hosts["monitoring"][0]
        if not H.alive(mon):
            return []
        rc, out = self.run(mon, "curl -s --max-time 5 http://127.0.0.1:9093/api/v2/alerts?active=true", timeout=15)
        try:
            return json.loads(out) if rc == 0 else []
        except ValueError:
            return []

    def rule_for(self, alert: str) -> float:
        """The alert's `for:` in seconds, from the rules the monitoring host runs, plus the
        longest range its expression averages over (`rate(x[30s])` crosses its line only
        once the window holds enough of the fault: measured, GaleraFlowControl with
        for: 15s reached Alertmanager 46.7 s after the slowdown began)."""
        mon = self.layout.topo.role_hosts["monitoring"][0]
        rules = self.wd / "hosts" / mon / "upper" / "etc" / "prometheus" / "rules"
        for f in sorted(rules.glob("*.yml")) if rules.exists() else []:
            m = re.search(rf"- alert: {alert}\n((?:.*\n)*?)\s+for: (\d+)([smh])", f.read_text())
            if m:
                ranges = [_seconds(n, u) for n, u in re.findall(r"\[(\d+)([smh])\]", m.group(1))]
                return _seconds(m.group(2), m.group(3)) + max(ranges, default=0.0)
        return 60.0

    def wait_alert(self, names: list[str], t0: float, match: Callable[[dict[str, Any]], bool], res: Result) -> None:
        if self.alert_checks_left is not None:
            if self.alert_checks_left <= 0:
                res.notes.append("alert not checked (smoke run checks one alert)")
                return
            self.alert_checks_left -= 1
        target = max(self.rule_for(n) for n in names) + 30
        res.alert_target_s = min(target, ALERT_TARGET_S)
        deadline = t0 + target * max(1.0, self.ceiling) + 15
        say(f"    waiting for alert {' or '.join(names)} (target {target:.0f}s)")
        while time.time() < deadline:
            if self.alert_seen(names, t0, match, res):
                return
            time.sleep(3)
        res.checks["alert"] = False
        res.notes.append(f"no {' or '.join(names)} alert within {target:.0f}s")

    @contextlib.contextmanager
    def watching_alerts(self) -> Iterator[AlertWatch]:
        """The alert watch for the block (alert_seen consults what it saw)."""
        with AlertWatch(self.alerts) as watch:
            self.alert_watch = watch
            try:
                yield watch
            finally:
                self.alert_watch = None

    def alert_seen(self, names: list[str], t0: float, match: Callable[[dict[str, Any]], bool], res: Result) -> bool:
        """One look at Alertmanager: True (and the alert recorded in `res`, judged against
        res.alert_target_s) when one of `names` matching `match` is active, or was at any
        look of the alert watch since the fault (the earliest to start is the one judged)."""
        now = self.alerts()
        earlier = list(self.alert_watch.seen.values()) if self.alert_watch is not None else []
        live = {json.dumps(a.get("labels", {}), sort_keys=True) for a in now}
        found = [a for a in now + earlier if a.get("labels", {}).get("alertname") in names and match(a)]
        found.sort(key=lambda a: epoch_of(a.get("startsAt")) or float("inf"))
        if not found:
            return False
        a = found[0]
        name = a.get("labels", {}).get("alertname")
        res.alert = name
        if json.dumps(a.get("labels", {}), sort_keys=True) not in live:
            res.notes.append(f"alert {name} was resolved before this look (seen by the alert watch)")
        # Prometheus's own firing time (Alertmanager's startsAt), not when this drill
        # looked: a drill busy meanwhile (the browser's 60 s wait) measured its own
        # delay (50.9 s seen for an alert that fired 22.8 s after the fault). An alert
        # active since before the fault has no latency of its own: the look's time then.
        started = epoch_of(a.get("startsAt"))
        if started is not None and started >= t0:
            res.alert_latency_s = round(started - t0, 1)
        else:
            res.alert_latency_s = round(time.time() - t0, 1)
            if started is not None:
                res.notes.append(f"alert {name} active since before the fault")
        res.checks["alert"] = res.alert_latency_s <= (res.alert_target_s or ALERT_TARGET_S) * self.ceiling
        res.notes.append(f"alert {name} {a.get('labels', {}).get('instance', '')} "
                         f"startsAt {a.get('startsAt', '')}")
        return True

    def finish(self, res: Result, rto_target: float | None) -> Result:
        return finish(res, rto_target, self.ceiling)

    # ------------------------------------------------------------------ drills
    def drill(self, name: str) -> Result:
        fn = REGISTRY.get(name)
        if fn is None:
            raise ValueError(f"unknown drill {name!r}; known: {', '.join(ORDER)}")
        t = time.time()
        say(f"drill {name}")
        # Every drill starts from a settled LB pair. Right after a boot both LBs may have
        # been MASTER for a moment (each starts keepalived on its own) and the Elastic IP
        # may sit on the one that became BACKUP until hpc-eip-reconcile moves it (30 s
        # after boot, then every 5 s): a drill choosing "the active LB" then would fault
        # the wrong one (a smoke run's lb drill killed the LB that had just lost the address).
        waited = self.settle(self.lb_pair_settled, timeout=LB_SETTLE_S)
        if waited is not None and waited < 1:  # settled at the first look (which takes a moment)
            waited = 0.0
        if waited:
            say(f"    waited {waited}s for one MASTER LB holding the Elastic IP")
        self.diagnoses = []
        res: Result = fn(self)
        res.notes.extend(self.diagnoses)
        if waited is None:
            res.checks["lb_pair_settled_before"] = False
            res.passed = False
            res.notes.insert(0, f"the LB pair had not settled {LB_SETTLE_S:.0f}s before the drill: "
                                f"VRRP {self.vrrp_states()}, Elastic IP on {self.host_by_ip(self.eip_target())}")
        elif waited:
            res.notes.append(f"waited {waited}s before the drill for one MASTER LB holding the Elastic IP")
        res.seconds = round(time.time() - t, 1)
        say(f"drill {name}: {'PASSED' if res.passed else 'FAILED'} rto={res.rto_s} "
            f"acked={res.acked_writes} lost={res.lost_writes} errors={res.errors} alert={res.alert} "
            f"({res.alert_latency_s}s) checks={res.checks}")
        return res

    def _under_load(self, name: str, inject: Callable[[], None], restore: Callable[[], None],
                    kinds: tuple[str, ...], rto_target: float | None, alert_names: list[str],
                    alert_match: Callable[[dict[str, Any]], bool], extra: Callable[[Result], None] | None = None) -> Result:
        res = Result(name)
        self.effect = None
        with self.load(name) as (p, path):
            if not self.wait_healthy(path):
                res.notes.append("the portal was not healthy before the fault")
            time.sleep(5)
            # >>> a browser logged in before the fault, measured after it (rehearsal/browser.py)
            from ..browser import around_fault
            with self.watching_alerts() if alert_names else contextlib.nullcontext():
                with around_fault(self, name, res) if name in ("app", "lb", "redis") else contextlib.nullcontext():
                    t0 = time.time()
                    inject()
                # <<< browser
                res.fault_window = (t0, t0)
                ceiling = max(60.0, (rto_target or 20.0) * 3 * max(1.0, self.ceiling))
                res.rto_s = self.rto(path, t0, kinds, ceiling) if kinds else None
                if res.rto_s is not None:
                    res.rto_s = round(res.rto_s, 2)
                if extra:
                    extra(res)
                if alert_names:
                    self.wait_alert(alert_names, t0, alert_match, res)
            # The window's load is checked (acked_in_fault_window): when no alert wait kept
            # it open (the smoke run checks one alert only), keep it open MIN_WINDOW_S.
            time.sleep(max(0.0, t0 + MIN_WINDOW_S - time.time()))
            res.fault_window = (t0, time.time())
            res.fault_effect = res.fault_effect or self.effect
            restore()
            self.finish_load(p, path)
            self.keep_logs(name, t0 - 60)
            self.tally(path, t0, res)
        self.verify(path, res)
        return self.finish(res, rto_target)

    def _reboot(self, host: str, wait_units: list[str] | None = None, timeout: float = 180) -> None:
        """Boot `host` again, as after a crash. An instance that was stopped meanwhile (a
        Slurm controller fenced by its peer while it was down: EC2 StopInstances) is
        started first, as the operator does (docs/slurm-cutover.md); rebooting the
        container alone left EC2 saying "stopped" and the instance metadata answering 404,
        so that host could fence nobody later (a full run's freeze-slurm after `az`)."""
        if host in self.deploy.get("hosts", {}) and self.instance_state(host) in ("stopping", "stopped"):
            ops_call(self.wd, "ec2", "start_instances", InstanceIds=[self.deploy["hosts"][host]["instance_id"]])
            say(f"    {host}: its instance was stopped (fenced): started, as the operator does")
        say(f"    restart {host} (a reboot: its init starts the enabled units)")
        st = read_state(self.wd)
        st.setdefault("hosts", {})[host] = {"unshare_pid": H.start(self.layout, self.layout.host(host))}
        write_state(self.wd, st)
        deadline = time.time() + timeout
        while time.time() < deadline and not H.call(self.layout, host, {"op": "status"}).get("boot_done"):
            time.sleep(0.5)
        for unit in wait_units or []:
            while time.time() < deadline:
                units = H.call(self.layout, host, {"op": "status"}).get("units", {})
                if units.get(unit, {}).get("state") == "active":
                    break
                time.sleep(1)

    def judge_partial_outage(self, res: Result, name: str, kinds: tuple[str, ...], rto: float | None,
                             ended: float | None, event: str) -> None:
        """A gray fault's RTO from its load log: settled_rto up to the fault's end (`ended`:
        the thaw, the heal; None when it did not end with the node back, e.g. fenced),
        then the return after it as an outage of its own (recovery_outage)."""
        recs = self.records(self.out_dir / f"load-{name}.log")
        settled_rto(res, recs, kinds, rto, self.ceiling, until=ended)
        if ended is not None:
            recovery_outage(res, recs, kinds, ended, event, rto, self.ceiling)

    def settle(self, cond: Callable[[], bool], timeout: float = SETTLE_S) -> float | None:
        """Seconds until cond() holds (checked every second), or None after `timeout`."""
        t = time.time()
        while time.time() - t < timeout:
            if cond():
                return round(time.time() - t, 1)
            time.sleep(1)
        return None

    # ------------------------------------------------------------------ probes more than one family uses
    def redis_master(self) -> str | None:
        pw = self.secret("redis_password")
        for n in self.layout.topo.role_hosts["data"]:
            if not H.alive(n) or frozen(n):
                continue
            ip = self.layout.host(n).ip
            rc, out = self.run(n, f"REDISCLI_AUTH='{pw}' redis-cli -h {ip} -p 26379 "
                                  "sentinel get-master-addr-by-name mymaster", timeout=10)
            if rc == 0 and out.strip():
                return self.host_by_ip(out.split()[0])
        return None

    def galera_only_node(self, writer: str) -> str:
        """A data host that is neither the Galera writer nor the Redis master, when there is
        one (else any but the writer): a Galera fault on it measures Galera alone."""
        others = [n for n in self.layout.topo.role_hosts["data"] if n != writer]
        master = self.redis_master()
        return next((n for n in others if n != master), others[0])

    def galera_writer(self) -> str:
        # Every DB client's writer HAProxy prefers the first Synced node in galera.nodes order.
        for n in self.layout.topo.role_hosts["data"]:
            if self.galera_status(n).get("wsrep_local_state") == "4":
                return n
        raise RuntimeError("no Synced Galera node")

    def lb_pair_settled(self) -> bool:
        """Exactly one LB is VRRP MASTER and the Elastic IP is associated with it."""
        if not self.layout.topo.role_hosts.get("lb"):
            return True
        masters = [n for n, st in self.vrrp_states().items() if st == "MASTER"]
        return len(masters) == 1 and self.host_by_ip(self.eip_target()) == masters[0]

    def vrrp_states(self) -> dict[str, str]:
        out = {}
        for lb in self.layout.topo.role_hosts["lb"]:
            if not H.alive(lb) or frozen(lb):
                out[lb] = "DOWN"
                continue
            rc, text = self.run(lb, "cat /run/hpc/vrrp-state 2>/dev/null || echo UNKNOWN", timeout=10)
            out[lb] = text.strip() or "UNKNOWN"
        return out

    def redis_roles(self) -> dict[str, str]:
        pw = self.secret("redis_password")
        out = {}
        for n in self.layout.topo.role_hosts["data"]:
            if not H.alive(n) or frozen(n):
                continue
            ip = self.layout.host(n).ip
            rc, text = self.run(n, f"REDISCLI_AUTH='{pw}' redis-cli -h {ip} role | head -1", timeout=10)
            out[n] = text.strip() if rc == 0 else "error"
        return out

    def db_clients(self) -> list[str]:
        return [n for n, h in self.deploy["hosts"].items() if "/etc/haproxy/dbwriter.cfg" in h.get("files", [])]

    def writers_seen(self) -> dict[str, str | None]:
        """Per DB client: the Galera node its writer HAProxy sends connections to."""
        out: dict[str, str | None] = {}
        probe = show_stat("/run/hpc-dbwriter/admin.sock")
        for c in self.db_clients():
            if not H.alive(c) or frozen(c):
                continue
            rc, text = self.run(c, probe, timeout=15)
            out[c] = haproxy_active(text) if rc == 0 else None
        return out

    def lb_downs(self, app_host: str) -> dict[str, int]:
        """Per LB: how often its HAProxy took a server of `app_host` out (UP to DOWN
        transitions, `chkdown` of `show stat`, summed over that host's servers)."""
        probe = show_stat("/run/haproxy/admin.sock")
        out: dict[str, int] = {}
        for lb in self.layout.topo.role_hosts["lb"]:
            if not H.alive(lb) or frozen(lb):
                continue
            rc, text = self.run(lb, probe, timeout=15)
            if rc != 0:
                raise RuntimeError(f"{lb}: HAProxy's show stat failed: {text.strip()[-200:]}")
            rows = list(csv.DictReader(io.StringIO(text.lstrip("# "))))
            out[lb] = sum(int(r.get("chkdown") or 0) for r in rows
                          if r.get("svname") == app_host or str(r.get("svname", "")).startswith(f"{app_host}-"))
        return out

    def instance_state(self, host: str) -> str:
        iid = self.deploy["hosts"][host]["instance_id"]
        r = ops_call(self.wd, "ec2", "describe_instances", InstanceIds=[iid])
        return str(r["Reservations"][0]["Instances"][0]["State"]["Name"])

    def global_status(self, host: str, names: tuple[str, ...], timeout: float = 15) -> dict[str, str]:
        """MariaDB's SHOW GLOBAL STATUS for `names` on a data host, as root (over its
        address, else its socket); {} when it does not answer."""
        ip = self.layout.host(host).ip
        pw = self.secret("mariadb_root_password")
        q = "SHOW GLOBAL STATUS WHERE Variable_name IN (" + ",".join(f"'{n}'" for n in names) + ")"
        rc, out = self.run(host, f"MYSQL_PWD='{pw}' mariadb -uroot -h{ip} -N -B --connect-timeout=3 -e \"{q}\" "
                                 f"|| mariadb -uroot -N -B --connect-timeout=3 -e \"{q}\"", timeout=timeout)
        return dict(line.split("\t", 1) for line in out.splitlines() if "\t" in line) if rc == 0 else {}

    def galera_status(self, host: str) -> dict[str, str]:
        if frozen(host):
            return {}
        return self.global_status(host, ("wsrep_cluster_size", "wsrep_local_state", "wsrep_cluster_status",
                                         "wsrep_ready"))

    def wait_synced(self, host: str, size: int | None, timeout: float = 240) -> bool:
        deadline = time.time() + timeout
        while time.time() < deadline:
            s = self.galera_status(host)
            if s.get("wsrep_local_state") == "4" and (size is None or s.get("wsrep_cluster_size") == str(size)):
                return True
            time.sleep(2)
        self.diagnoses.append(f"{host} not Synced in a cluster of {size or 'any size'} after {timeout:.0f}s: "
                              + self.galera_diagnosis(host))
        return False

    def galera_diagnosis(self, host: str) -> str:
        """Every data host's Galera state and mariadb.service state, and the last WSREP and
        error lines of `host`'s MariaDB journal since its boot: what a failed wait leaves."""
        parts = []
        for n in self.layout.topo.role_hosts["data"]:
            if frozen(n):
                parts.append(f"{n}: frozen")
                continue
            s = self.global_status(n, ("wsrep_local_state_comment", "wsrep_cluster_status", "wsrep_cluster_size",
                                       "wsrep_connected", "wsrep_ready"), timeout=10)
            _rc, unit = self.run(n, "systemctl is-active mariadb.service", timeout=10)
            parts.append(f"{n}: unit {unit.strip() or '?'}, " + (", ".join(
                f"{k.removeprefix('wsrep_')}={v}" for k, v in sorted(s.items())) or "no answer"))
        if not frozen(host):
            _rc, log = self.run(host, "journalctl -b -u mariadb.service -o cat --no-pager 2>/dev/null "
                                      "| grep -E 'WSREP|ERROR|SST|IST' | tail -n 8", timeout=20)
            lines = [ln.strip()[:200] for ln in log.splitlines() if ln.strip()]
            if lines:
                parts.append(f"{host}'s journal: " + " | ".join(lines))
            # What the host's systemd still waits for (a unit held by another's start).
            _rc, jobs = self.run(host, "systemctl list-jobs --no-legend --no-pager | head -n 6", timeout=10)
            if jobs.strip():
                parts.append(f"{host}'s pending jobs: " + " | ".join(" ".join(j.split()) for j in jobs.splitlines()))
        parts.append(f"{host}'s data volume: " + H.volume_status(self.layout, host))
        return "; ".join(parts)


History = tuple[float, float, str, bool, int, str, str, str]


def history(path: Path) -> list[History]:
    """The load's log: (start, end, kind, ok, status, request id, server, ref) per
    request; lines of the older six-field format get "-" for server and ref."""
    out: list[History] = []
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        p = line.split()
        if len(p) in (6, 8):
            server, ref = (p[6], p[7]) if len(p) == 8 else ("-", "-")
            out.append((float(p[0]), float(p[1]), p[2], p[3] == "1", int(p[4]), p[5], server, ref))
    return out


def job_waits(hist: list[History], a: float, b: float) -> dict[str, float | None]:
    """{request id: seconds from its first try to its acknowledgement, None if never} for
    the portal's job submissions first tried in [a, b]."""
    first: dict[str, float] = {}
    acked: dict[str, float] = {}
    for h in hist:
        if h[2] != "job":
            continue
        first.setdefault(h[5], h[0])
        if h[3]:
            acked.setdefault(h[5], h[1])
    return {rid: (acked[rid] - t if rid in acked else None) for rid, t in first.items() if a <= t <= b}


def tally(recs: list[tuple[float, float, str, bool, int, str]], t0: float, res: Result) -> None:
    recs = [r for r in recs if r[2] != "ws"]  # the websocket's round trips: load_portal_figures
    res.requests = len(recs)
    res.failed_reads = sum(1 for r in recs if r[2] not in FAILED_WRITE_KINDS and not r[3])
    res.failed_writes = sum(1 for r in recs if r[2] in FAILED_WRITE_KINDS and not r[3])
    res.in_flight_writes = sum(1 for r in recs if r[2] in FAILED_WRITE_KINDS and r[0] < t0 <= r[1])
    res.acked_writes = sum(1 for r in recs if r[2] in WRITE_KINDS and r[3])
    res.errors = res.failed_reads + max(0, res.failed_writes - res.in_flight_writes)


def failure_breakdown(hist: list[History], window: tuple[float, float]) -> dict[str, int]:
    """Failed requests counted by "kind status phase" (phase: before the fault, in its
    window, after it; status 0: no answer, a time-out or a reset), most frequent first."""
    out: dict[str, int] = {}
    for h in hist:
        if h[3] or h[2] == "ws":
            continue
        phase = "before" if h[0] < window[0] else "window" if h[0] <= window[1] else "after"
        key = f"{h[2]} {h[4]} {phase}"
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: (-kv[1], kv[0])))


def load_portal_figures(hist: list[History], t0: float) -> dict[str, Any]:
    """The load's logins and websocket subscription (the reference portal; {} for a load
    without them): logins, forced re-logins, websocket connections opened, reconnects,
    resyncs (the client caught up after a reconnect or a gap), failures, ws_back_s: from
    the fault to the first round trip that began after it (None: none did), and
    ws_live_back_s: the same for the first one answered from live state (not `-stale`:
    the server's copy following Redis again); ws_servers, ws_moves: the servers its
    stickiness cookie named and how often it changed (a reconnect stays on its server
    while that one is up)."""
    logins = [h for h in hist if h[2] == "login"]
    ws = [h for h in hist if h[2] == "ws"]
    if not logins and not ws:
        return {}
    ok = [h for h in ws if h[3]]
    # A connection's first round trip follows a failure line or nothing: an open.
    opened = sum(1 for i, h in enumerate(ws) if h[3] and (i == 0 or not ws[i - 1][3]))
    after = sorted(h[1] for h in ok if h[0] >= t0)
    live_after = sorted(h[1] for h in ok if h[0] >= t0 and not h[7].endswith("-stale"))
    # The ws server HAProxy's stickiness cookie placed the subscription on ("-": unknown).
    placed = [h[6] for h in ok if h[6] != "-"]
    return {"logins": sum(1 for h in logins if h[3] and h[7] != "relogin"),
            "forced_relogins": sum(1 for h in logins if h[3] and h[7] == "relogin"),
            "login_failures": sum(1 for h in logins if not h[3]),
            "ws_round_trips": len(ok), "ws_opened": opened, "ws_reconnects": max(0, opened - 1),
            "ws_resyncs": sum(1 for h in ok if h[7].startswith("resync")), "ws_failures": len(ws) - len(ok),
            "ws_back_s": round(after[0] - t0, 2) if after else None,
            "ws_live_back_s": round(live_after[0] - t0, 2) if live_after else None,
            "ws_servers": len(set(placed)), "ws_moves": sum(1 for a, b in zip(placed, placed[1:], strict=False) if a != b)}


def split_window(acked_at: dict[str, float], window: tuple[float, float] | None,
                 margin: tuple[float, float]) -> tuple[dict[str, float], dict[str, float]]:
    """(inside, outside) of [fault + margin[0], fault + margin[1]] by acknowledgement time."""
    if window is None:
        return {}, dict(acked_at)
    lo, hi = window[0] + margin[0], window[0] + margin[1]
    inside = {k: t for k, t in acked_at.items() if lo <= t <= hi}
    return inside, {k: t for k, t in acked_at.items() if k not in inside}


def parse_jobs(text: str, sep: str = "|") -> list[tuple[str, str]]:
    """(job id, comment) of squeue -o '%i|%k' or sacct --parsable2 JobID,Comment lines
    (steps and array tasks reduced to their job; no comment: skipped)."""
    out = []
    for line in text.splitlines():
        job, _, comment = line.strip().partition(sep)
        job = job.split(".")[0]
        comment = comment.strip()
        if job.split("_")[0].isdigit() and comment and comment not in ("(null)", "N/A"):
            out.append((job, comment))
    return out


def api_db(layout: Layout) -> str | None:
    """The portal api service's database (the reference portal's job journal lives
    there); None when it has none (the stand-in)."""
    api = next((svc for svc in layout.cfg.services if svc.name == "api"), None)
    return api.db if api is not None and api.db else None


def _seconds(n: str, unit: str) -> float:
    return float(n) * {"s": 1, "m": 60, "h": 3600}[unit]


def read_queue(text: str) -> tuple[list[tuple[str, str]], dict[str, set[str]], set[str]]:
    """squeue -o '%i|%k|%T|%r' lines, as the reference portal's two-phase submission
    leaves them (its portal/slurm.py): ((job id, comment) of every job, {request id: held
    attempts}, the job ids that are no job of any request id). An attempt carries
    pending/<request id>: still held and pending, it is waiting to be settled; cancelled,
    it never ran; otherwise it was released (its rename to the request id not done yet)
    and is a job. A withdrawn attempt (withdrawn/<request id>) is no job."""
    jobs: list[tuple[str, str]] = []
    held: dict[str, set[str]] = {}
    not_jobs: set[str] = set()
    for line in text.splitlines():
        parts = [p.strip() for p in line.split("|")]
        if len(parts) != 4:
            continue
        job, comment, state, reason = parts[0].split(".")[0], parts[1], parts[2], parts[3]
        if comment.startswith(WITHDRAWN) or (comment.startswith(ATTEMPT) and state == "CANCELLED"):
            not_jobs.add(job)
        elif comment.startswith(ATTEMPT) and state == "PENDING" and reason in HOLDS:
            not_jobs.add(job)
            held.setdefault(comment.removeprefix(ATTEMPT), set()).add(job)
        else:
            jobs.extend(parse_jobs(f"{job}|{comment.removeprefix(ATTEMPT)}", "|"))
    return jobs, held, not_jobs


def show_stat(sock: str) -> str:
    """A shell command that prints HAProxy's `show stat` (CSV) from its admin socket
    `sock` on a host (python3 is on every host; socat is not)."""
    return (f"python3 -c \"import socket;s=socket.socket(socket.AF_UNIX);s.connect('{sock}');"
            "s.sendall(b'show stat\\n');import sys;b=b''\n"
            "while True:\n  d=s.recv(65536)\n  if not d: break\n  b+=d\nsys.stdout.write(b.decode())\"")

def ghost_note(job_hist: list[History], found: dict[str, set[str]], t0: float) -> str:
    """Which request ids are ghosts (never acknowledged, yet Slurm holds a job for them):
    each with its jobs, its attempts and when the first began, seconds from t0."""
    acked = {h[5] for h in job_hist if h[3] and h[7] != "-"}
    ghosts = sorted(({h[5] for h in job_hist} - acked) & {rid for rid, jobs in found.items() if jobs})
    parts = []
    for rid in ghosts[:5]:
        tries = [h[0] for h in job_hist if h[5] == rid]
        parts.append(f"{rid} (jobs {', '.join(sorted(found[rid]))}; {len(tries)} attempts from {min(tries) - t0:+.1f}s)")
    return "ghost jobs (never acknowledged, held by Slurm): " + "; ".join(parts)


def judge_jobs(job_hist: list[History], found: dict[str, set[str]],
               resubmitted: dict[str, tuple[str, str]] | None = None) -> dict[str, int]:
    """Per request id of the load's job submissions: acknowledged (some attempt got a
    job id), lost (acknowledged, Slurm has no job for it), duplicated (Slurm has more
    than one job for it, or the id acknowledged is not the one Slurm holds), ghost (never
    acknowledged, yet Slurm has a job for it). A job the portal's reconciler submitted
    again (`resubmitted`: request id -> (the acknowledged job a controller crash lost,
    the new one)) counts as resubmitted when Slurm holds the new job, and no other but
    the lost one's stale accounting record."""
    resubmitted = resubmitted or {}
    acked: dict[str, str] = {}
    tried: set[str] = set()
    for h in job_hist:
        tried.add(h[5])
        if h[3] and h[7] != "-":
            acked.setdefault(h[5], h[7])
    out = {"acked": len(acked), "lost": 0, "duplicated": 0, "ghost": 0, "resubmitted": 0}
    for rid in tried:
        jobs = found.get(rid, set())
        if rid in acked:
            old, new = resubmitted.get(rid, ("", ""))
            if old and old == acked[rid]:
                if new not in jobs:
                    out["lost"] += 1
                elif jobs - {old, new}:
                    out["duplicated"] += 1
                else:
                    out["resubmitted"] += 1
            elif not jobs:
                out["lost"] += 1
            elif len(jobs) > 1 or acked[rid] not in jobs:
                out["duplicated"] += 1
        elif jobs:
            out["ghost"] += 1
    return out


def finish(res: Result, rto_target: float | None, ceiling: float = 1.0) -> Result:
    """The checks every drill shares, then `passed`: the RTO, nothing acknowledged lost,
    duplicated or ghost, enough acknowledged writes (records) overall and inside the
    fault window, and a fault that took effect."""
    res.target_rto_s = rto_target
    if rto_target is not None:
        res.checks["rto"] = res.rto_s is not None and res.rto_s <= rto_target * ceiling
    res.checks["lost_writes"] = res.lost_writes == 0
    res.checks["duplicates"] = res.duplicates == 0
    res.checks["ghost_jobs"] = res.ghost_jobs == 0
    acked_records = res.per_kind.get("records", {}).get("acked", res.acked_writes) if res.per_kind else res.acked_writes
    res.checks["acked_writes"] = acked_records >= MIN_ACKED
    if res.fault_window is not None:
        res.checks["acked_in_fault_window"] = res.acked_in_fault_window >= res.min_in_window
    res.checks["fault_effect"] = bool(res.fault_effect)
    if not res.fault_effect:
        res.notes.append("no sign that the fault took effect: the drill injected nothing")
    res.passed = all(res.checks.values())
    return res


def settled_rto(res: Result, recs: list[tuple[float, float, str, bool, int, str]], kinds: tuple[str, ...],
                target: float | None, ceiling: float = 1.0, until: float | None = None) -> None:
    """For faults that fail only part of the traffic (a paused or cut node behind a
    balancer, some clients on the wrong side): ten successes in a row come at once, so
    the RTO is also at least the start of the last failed request of those kinds that
    began inside the fault window (a request begun then still failed: the service was
    not back; its end would add the client's own time-out). `until`: the fault ended
    then (a thaw, a heal) and what follows is measured on its own (recovery_outage).
    Updates rto_s and the rto check."""
    if res.fault_window is None or res.rto_s is None or not kinds:
        return
    t0, t1 = res.fault_window
    t1 = min(t1, until) if until is not None else t1
    fails = [r[0] for r in recs if r[2] in kinds and not r[3] and t0 <= r[0] <= t1]
    if fails:
        last = round(max(fails) - t0, 2)
        if last > res.rto_s:
            res.notes.append(f"RTO {res.rto_s}s by ten successes in a row; the last failed request began {last}s "
                             "after the fault")
            res.rto_s = last
    if target is not None:
        res.checks["rto"] = res.rto_s <= target * ceiling


def recovery_outage(res: Result, recs: list[tuple[float, float, str, bool, int, str]], kinds: tuple[str, ...],
                    since: float, event: str, target: float | None, ceiling: float = 1.0) -> None:
    """The end of a gray fault is an event of its own: a thawed or healed VRRP master has
    the higher priority and takes the Elastic IP back (one more move, which resets the
    connections made through it), a preferred Galera writer takes the writes back. Its
    failed requests (of `kinds`, begun from `since` to the window's end) are an outage
    of their own, which begins when the system acts (the move back comes seconds after
    the thaw, at the next reconcile), not at the thaw: from the start of the first of
    them to the start of the last (what settled_rto takes for the fault's own outage),
    against the same target. Noted, and checked as `rto_after_<event>`."""
    if res.fault_window is None:
        return
    fails = sorted(r[0] for r in recs if r[2] in kinds and not r[3] and since <= r[0] <= res.fault_window[1])
    if not fails:
        res.notes.append(f"after the {event}: no failed request")
        return
    took = round(fails[-1] - fails[0], 2)
    res.notes.append(f"after the {event}: {len(fails)} failed requests, begun {fails[0] - since:.2f}s to "
                     f"{fails[-1] - since:.2f}s after it: an outage of {took}s (measured on its own)")
    if target is not None:
        res.checks[f"rto_after_{event}"] = took <= target * ceiling


def epoch_of(stamp: Any) -> float | None:
    """An RFC 3339 time (Alertmanager's `2026-12-03T13:29:49.848Z`) as epoch seconds, or
    None when it is not one."""
    try:
        return datetime.datetime.fromisoformat(str(stamp)).timestamp()
    except ValueError:
        return None


def frozen(host: str) -> bool:
    """The host's processes are paused by the cgroup freezer (nothing can run inside)."""
    from .. import container as C

    try:
        return (C.cgroup_dirs(host)["freezer"] / "freezer.state").read_text().strip() == "FROZEN"
    except OSError:
        return False


def rto_of(recs: list[tuple[float, float, str, bool, int, str]], t0: float, run_length: int = 10) -> float | None:
    """First of `run_length` consecutive successes among requests started at or after t0
    (in start order): its start time minus t0. None while there is no such run."""
    run = 0
    ordered = sorted((r for r in recs if r[0] >= t0), key=lambda r: r[0])
    for i, r in enumerate(ordered):
        run = run + 1 if r[3] else 0
        if run == run_length:
            return max(0.0, ordered[i - run_length + 1][0] - t0)
    return None


def write_report(path: Path, stack: str, results: list[Result], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    keys = ["name", "rto_s", "target_rto_s", "requests", "failed_reads", "failed_writes", "in_flight_writes", "errors",
            "acked_writes", "lost_writes", "duplicates", "ghost_jobs", "per_kind", "acked_in_fault_window",
            "fault_effect", "alert", "alert_latency_s", "load_portal", "failures", "browser", "passed"]
    doc = {"stack": stack, "drills": [{**{k: getattr(r, k) for k in keys},
                                       "checks": r.checks, "notes": r.notes, "seconds": r.seconds} for r in results]}
    if extra:
        doc.update(extra)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return doc


def table(results: list[Result]) -> str:
    head = f"{'drill':<19}{'RTO s':>7}{'target':>7}{'reqs':>7}{'f.read':>7}{'f.write':>8}{'inflt':>6}{'acked':>7}" \
           f"{'lost':>5}{'dup':>4}{'ghost':>6}{'in fw':>6}  {'alert (latency s)':<26}{'result':>7}"
    lines = [head, "-" * len(head)]
    for r in results:
        alert = f"{r.alert} ({r.alert_latency_s})" if r.alert else "-"
        rto = "-" if r.rto_s is None else f"{r.rto_s:.1f}"
        tgt = "-" if r.target_rto_s is None else f"{r.target_rto_s:.0f}"
        lines.append(f"{r.name:<19}{rto:>7}{tgt:>7}{r.requests:>7}{r.failed_reads:>7}{r.failed_writes:>8}"
                     f"{r.in_flight_writes:>6}{r.acked_writes:>7}{r.lost_writes:>5}{r.duplicates:>4}{r.ghost_jobs:>6}"
                     f"{r.acked_in_fault_window:>6}  {alert:<26}{'PASS' if r.passed else 'FAIL':>7}")
        if r.fault_effect:
            lines.append(f"{'':<19}fault: {r.fault_effect[:100]}")
        failed = [k for k, v in r.checks.items() if not v]
        if failed:
            lines.append(f"{'':<19}failed checks: {', '.join(failed)}")
    return "\n".join(lines)
