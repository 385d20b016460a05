"""What every drill shares: the targets, the Result, load through the VIP and its
measurements, the alert check, the drill registry, and the report (table and JSON).

Per drill: RTO (fault injection -> first of 10 consecutive successful requests of the
kinds the fault touches), requests, failed reads and writes, writes in flight at the
fault, acknowledged writes and how many of them are lost (each one is read back after
the drill), duplicated writes (rows per request id > 1), the Alertmanager alert that
applies and its latency, and whether every target was met.

Faults are real: kill -9 of every process of a host (its PID namespace dies with them),
kill -9 of one daemon with its Restart= held back, or a link cut at the VPC router.
The drills themselves live with their family (lb_network, data, slurm, site, deploy);
each registers under its name with @register.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .. import hosts as H
from ..awsd import ops_call
from ..layout import EIP_PUBLIC_IP, NS_CLIENT, Layout
from ..stack import _python, read_state, say, write_state

REPO = Path(__file__).resolve().parents[2]  # the checkout: cwd of `python -m rehearsal.load`
URL = f"https://{EIP_PUBLIC_IP}"
ALL_KINDS = ("write", "session", "page", "record")
MIN_ACKED = 500
LOAD_RATE = 60.0

# name -> (target RTO s or None, alert names that apply, RTO kinds)
TARGETS: dict[str, dict[str, Any]] = {
    "lb": {"rto": 5.0, "alerts": ["ServerDown"], "kinds": ALL_KINDS},
    "app": {"rto": None, "alerts": ["ServerDown"], "kinds": ALL_KINDS},
    "redis": {"rto": 10.0, "alerts": ["RedisDown"], "kinds": ("session",)},
    "galera": {"rto": 10.0, "alerts": ["ServerDown", "DatabaseDown", "GaleraClusterSize"], "kinds": ("write", "record")},
    "slurm": {"rto": 40.0, "alerts": ["SlurmctldDown", "ServerDown"], "kinds": ALL_KINDS},
    "az": {"rto": 15.0, "alerts": ["ServerDown"], "kinds": ALL_KINDS},
}
ORDER = ["lb", "app", "redis", "galera", "slurm", "az", "galera-full", "rolling", "restore"]
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
    alert: str | None = None
    alert_latency_s: float | None = None
    passed: bool = False
    alert_target_s: float | None = None
    notes: list[str] = field(default_factory=list)
    checks: dict[str, bool] = field(default_factory=dict)
    seconds: float = 0.0

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


class DrillBase:
    def __init__(self, layout: Layout, out_dir: Path, ceiling: float = 1.0, alert_checks: int | None = None):
        self.layout = layout
        self.wd = layout.workdir
        self.out_dir = out_dir
        self.ceiling = ceiling  # targets x ceiling decide `passed` (the smoke test is generous)
        self.alert_checks_left = alert_checks  # None: every drill checks its alert
        self.deploy = json.loads((self.wd / "deploy.json").read_text())
        self._secrets: dict[str, str] = {}

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

    def start_load(self, name: str) -> tuple[subprocess.Popen[bytes], Path]:
        path = self.out_dir / f"load-{name}.log"
        path.unlink(missing_ok=True)
        p = subprocess.Popen(["nsenter", f"--net=/run/netns/{NS_CLIENT}", "--", _python(), "-m", "rehearsal.load", "run",
                              "--url", URL, "--out", str(path), "--rate", str(LOAD_RATE), "--duration", "900",
                              "--tag", name.replace("-", "")],
                             cwd=str(REPO), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, start_new_session=True)
        st = read_state(self.wd)
        st["load_pid"] = p.pid
        write_state(self.wd, st)
        return p, path

    @staticmethod
    def records(path: Path) -> list[tuple[float, float, str, bool, int, str]]:
        out: list[tuple[float, float, str, bool, int, str]] = []
        if not path.exists():
            return out
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 6:
                out.append((float(parts[0]), float(parts[1]), parts[2], parts[3] == "1", int(parts[4]), parts[5]))
        return out

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
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    @staticmethod
    def client_tool(*args: str, timeout: float = 300) -> dict[str, Any]:
        """`python -m rehearsal.load ARGS` in the client namespace: its last line of JSON,
        or {"error": ...} with what it printed."""
        cp = subprocess.run(["nsenter", f"--net=/run/netns/{NS_CLIENT}", "--", _python(), "-m", "rehearsal.load", *args],
                            cwd=str(REPO), capture_output=True, text=True,
                            timeout=timeout)
        try:
            return dict(json.loads(cp.stdout.strip().splitlines()[-1]))
        except (ValueError, IndexError):
            return {"error": cp.stdout[-300:] + cp.stderr[-300:]}

    def verify(self, path: Path, res: Result) -> None:
        ids = [r[5] for r in self.records(path) if r[2] == "write" and r[3]]
        ids_file = path.with_suffix(".acked")
        ids_file.write_text("\n".join(ids) + "\n")
        doc = self.client_tool("verify", "--url", URL, "--ids", str(ids_file))
        if "error" in doc:
            res.notes.append(f"read-back failed: {doc['error']}")
            res.lost_writes = len(ids)
            res.checks["read_back"] = False
            return
        res.lost_writes = len(doc["missing"])
        res.duplicates = int(doc["duplicates"])
        if doc["missing"]:
            res.notes.append(f"lost: {', '.join(doc['missing'][:5])}{' ...' if len(doc['missing']) > 5 else ''}")

    def tally(self, path: Path, t0: float, res: Result) -> None:
        recs = self.records(path)
        res.requests = len(recs)
        res.failed_reads = sum(1 for r in recs if r[2] != "write" and not r[3])
        res.failed_writes = sum(1 for r in recs if r[2] == "write" and not r[3])
        res.in_flight_writes = sum(1 for r in recs if r[2] == "write" and r[0] < t0 <= r[1])
        res.acked_writes = sum(1 for r in recs if r[2] == "write" and r[3])
        res.errors = res.failed_reads + max(0, res.failed_writes - res.in_flight_writes)

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
        """The alert's `for:` in seconds, from the rules the monitoring host runs."""
        mon = self.layout.topo.role_hosts["monitoring"][0]
        rules = self.wd / "hosts" / mon / "upper" / "etc" / "prometheus" / "rules"
        for f in sorted(rules.glob("*.yml")) if rules.exists() else []:
            text = f.read_text()
            m = re.search(rf"- alert: {alert}\n(?:.*\n)*?\s+for: (\d+)([smh])", text)
            if m:
                return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600}[m.group(2)]
        return 60.0

    def wait_alert(self, names: list[str], t0: float, match: Callable[[dict[str, Any]], bool], res: Result) -> None:
        if self.alert_checks_left is not None:
            if self.alert_checks_left <= 0:
                res.notes.append("alert not checked (smoke run checks one alert)")
                return
            self.alert_checks_left -= 1
        target = max(self.rule_for(n) for n in names) + 30
        res.alert_target_s = target
        deadline = t0 + target * max(1.0, self.ceiling) + 15
        say(f"    waiting for alert {' or '.join(names)} (target {target:.0f}s)")
        while time.time() < deadline:
            for a in self.alerts():
                name = a.get("labels", {}).get("alertname")
                if name in names and match(a):
                    starts = a.get("startsAt", "")
                    res.alert = name
                    res.alert_latency_s = round(time.time() - t0, 1)
                    res.checks["alert"] = res.alert_latency_s <= target * self.ceiling
                    res.notes.append(f"alert {name} {a.get('labels', {}).get('instance', '')} startsAt {starts}")
                    return
            time.sleep(3)
        res.checks["alert"] = False
        res.notes.append(f"no {' or '.join(names)} alert within {target:.0f}s")

    def finish(self, res: Result, rto_target: float | None) -> Result:
        res.target_rto_s = rto_target
        if rto_target is not None:
            res.checks["rto"] = res.rto_s is not None and res.rto_s <= rto_target * self.ceiling
        res.checks["lost_writes"] = res.lost_writes == 0
        res.checks["duplicates"] = res.duplicates == 0
        res.checks["acked_writes"] = res.acked_writes >= MIN_ACKED
        res.passed = all(res.checks.values())
        return res

    # ------------------------------------------------------------------ drills
    def drill(self, name: str) -> Result:
        fn = REGISTRY.get(name)
        if fn is None:
            raise ValueError(f"unknown drill {name!r}; known: {', '.join(ORDER)}")
        t = time.time()
        say(f"drill {name}")
        res: Result = fn(self)
        res.seconds = round(time.time() - t, 1)
        say(f"drill {name}: {'PASSED' if res.passed else 'FAILED'} rto={res.rto_s} "
            f"acked={res.acked_writes} lost={res.lost_writes} errors={res.errors} alert={res.alert} "
            f"({res.alert_latency_s}s) checks={res.checks}")
        return res

    def _under_load(self, name: str, inject: Callable[[], None], restore: Callable[[], None],
                    kinds: tuple[str, ...], rto_target: float | None, alert_names: list[str],
                    alert_match: Callable[[dict[str, Any]], bool], extra: Callable[[Result], None] | None = None) -> Result:
        res = Result(name)
        with self.load(name) as (p, path):
            if not self.wait_healthy(path):
                res.notes.append("the portal was not healthy before the fault")
            time.sleep(5)
            # >>> a browser logged in before the fault, measured after it (rehearsal/browser.py)
            from ..browser import around_fault
            with around_fault(self, name, res) if name in ("app", "lb", "redis") else contextlib.nullcontext():
                t0 = time.time()
                inject()
            # <<< browser
            ceiling = max(60.0, (rto_target or 20.0) * 3 * max(1.0, self.ceiling))
            res.rto_s = self.rto(path, t0, kinds, ceiling) if kinds else None
            if res.rto_s is not None:
                res.rto_s = round(res.rto_s, 2)
            if extra:
                extra(res)
            if alert_names:
                self.wait_alert(alert_names, t0, alert_match, res)
            restore()
            self.finish_load(p, path)
            self.tally(path, t0, res)
        self.verify(path, res)
        return self.finish(res, rto_target)

    def _reboot(self, host: str, wait_units: list[str] | None = None, timeout: float = 180) -> None:
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

    # ------------------------------------------------------------------ probes more than one family uses
    def galera_status(self, host: str) -> dict[str, str]:
        ip = self.layout.host(host).ip
        pw = self.secret("mariadb_root_password")
        rc, out = self.run(host, f"MYSQL_PWD='{pw}' mariadb -uroot -h{ip} -N -B --connect-timeout=3 -e "
                                 "\"SHOW GLOBAL STATUS WHERE Variable_name IN ('wsrep_cluster_size',"
                                 "'wsrep_local_state','wsrep_cluster_status','wsrep_ready')\" "
                                 "|| mariadb -uroot -N -B --connect-timeout=3 -e \"SHOW GLOBAL STATUS WHERE "
                                 "Variable_name IN ('wsrep_cluster_size','wsrep_local_state','wsrep_cluster_status',"
                                 "'wsrep_ready')\"", timeout=15)
        return dict(line.split("\t", 1) for line in out.splitlines() if "\t" in line) if rc == 0 else {}

    def wait_synced(self, host: str, size: int | None, timeout: float = 240) -> bool:
        deadline = time.time() + timeout
        while time.time() < deadline:
            s = self.galera_status(host)
            if s.get("wsrep_local_state") == "4" and (size is None or s.get("wsrep_cluster_size") == str(size)):
                return True
            time.sleep(2)
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
            "acked_writes", "lost_writes", "duplicates", "alert", "alert_latency_s", "passed"]
    doc = {"stack": stack, "drills": [{**{k: getattr(r, k) for k in keys},
                                       "checks": r.checks, "notes": r.notes, "seconds": r.seconds} for r in results]}
    if extra:
        doc.update(extra)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return doc


def table(results: list[Result]) -> str:
    head = f"{'drill':<12}{'RTO s':>8}{'target':>8}{'reqs':>7}{'f.read':>7}{'f.write':>8}{'inflt':>6}{'acked':>7}" \
           f"{'lost':>6}{'dup':>5}  {'alert (latency s)':<28}{'result':>7}"
    lines = [head, "-" * len(head)]
    for r in results:
        alert = f"{r.alert} ({r.alert_latency_s})" if r.alert else "-"
        rto = "-" if r.rto_s is None else f"{r.rto_s:.1f}"
        tgt = "-" if r.target_rto_s is None else f"{r.target_rto_s:.0f}"
        lines.append(f"{r.name:<12}{rto:>8}{tgt:>8}{r.requests:>7}{r.failed_reads:>7}{r.failed_writes:>8}"
                     f"{r.in_flight_writes:>6}{r.acked_writes:>7}{r.lost_writes:>6}{r.duplicates:>5}  {alert:<28}"
                     f"{'PASS' if r.passed else 'FAIL':>7}")
        failed = [k for k, v in r.checks.items() if not v]
        if failed:
            lines.append(f"{'':<12}failed checks: {', '.join(failed)}")
    return "\n".join(lines)
