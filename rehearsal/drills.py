"""The failover drills, each under load through the VIP, and what they measure.

Per drill: RTO (fault injection -> first of 10 consecutive successful requests of the
kinds the fault touches), requests, failed reads and writes, writes in flight at the
fault, acknowledged writes and how many of them are lost (each one is read back after
the drill), duplicated writes (rows per request id > 1), the Alertmanager alert that
applies and its latency, and whether every target was met.

Faults are real: kill -9 of every process of a host (its PID namespace dies with them),
kill -9 of one daemon with its Restart= held back, or a link cut at the VPC router.
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
from typing import Any

from . import hosts as H
from . import netns
from .awsd import ops_call
from .layout import EIP_PUBLIC_IP, NS_CLIENT, Layout
from .stack import _python, read_state, say, write_state

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


class Drills:
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
                             cwd=str(Path(__file__).resolve().parent.parent), stdout=subprocess.PIPE,
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
                            cwd=str(Path(__file__).resolve().parent.parent), capture_output=True, text=True,
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
        fn = getattr(self, "drill_" + name.replace("-", "_"), None)
        if fn is None:
            raise ValueError(f"unknown drill {name!r}; known: {', '.join(ORDER)}")
        t = time.time()
        say(f"drill {name}")
        res: Result = fn()
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
            t0 = time.time()
            inject()
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

    def drill_lb(self) -> Result:
        active = self.host_by_ip(self.eip_target())
        if active is None:
            raise RuntimeError("the Elastic IP is not associated: is an LB master?")
        other = [h for h in self.layout.topo.role_hosts["lb"] if h != active]
        ip = self.layout.host(active).ip

        def inject() -> None:
            say(f"    kill -9 every process of {active} (active LB: HAProxy + keepalived)")
            H.kill(active)

        def extra(res: Result) -> None:
            moved = self._eip_moved_after(res)
            if moved is not None:
                res.notes.append(f"EIP moved to {self.host_by_ip(self.eip_target())} {moved:.2f}s after the fault")
                res.checks["eip_moved"] = bool(other) and self.host_by_ip(self.eip_target()) in other

        def restore() -> None:
            self._reboot(active)

        self._t_fault = 0.0
        return self._under_load("lb", self._mark(inject), restore, TARGETS["lb"]["kinds"], TARGETS["lb"]["rto"],
                                TARGETS["lb"]["alerts"], lambda a: ip in a.get("labels", {}).get("instance", "")
                                or active in json.dumps(a.get("labels", {})), extra)

    def _mark(self, fn: Callable[[], None]) -> Callable[[], None]:
        def wrapped() -> None:
            self._t_fault = time.time()
            fn()
        return wrapped

    def _eip_moved_after(self, res: Result) -> float | None:
        log = self.wd / "eip-moves.log"
        for line in log.read_text().splitlines() if log.exists() else []:
            ev = json.loads(line)
            if ev["t"] >= self._t_fault and ev.get("private_ip"):
                return ev["t"] - self._t_fault
        return None

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

    def redis_master(self) -> str | None:
        pw = self.secret("redis_password")
        for n in self.layout.topo.role_hosts["data"]:
            if not H.alive(n):
                continue
            ip = self.layout.host(n).ip
            rc, out = self.run(n, f"REDISCLI_AUTH='{pw}' redis-cli -h {ip} -p 26379 "
                                  "sentinel get-master-addr-by-name mymaster", timeout=10)
            if rc == 0 and out.strip():
                return self.host_by_ip(out.split()[0])
        return None

    def drill_redis(self) -> Result:
        master = self.redis_master()
        if master is None:
            raise RuntimeError("no Redis master known to the sentinels")
        ip = self.layout.host(master).ip
        new_master: dict[str, str | None] = {}

        def inject() -> None:
            say(f"    kill -9 redis-server on {master} (the master); its Restart= is held back so Sentinel fails over")
            H.call(self.layout, master, {"op": "kill", "unit": "redis-server.service", "signal": 9, "hold": True})

        def extra(res: Result) -> None:
            deadline = time.time() + 60
            while time.time() < deadline:
                m = self.redis_master()
                if m and m != master:
                    new_master["name"] = m
                    res.notes.append(f"Sentinel promoted {m}")
                    break
                time.sleep(1)
            res.checks["failover"] = bool(new_master.get("name"))

        def restore() -> None:
            H.call(self.layout, master, {"op": "hold", "unit": "redis-server.service", "hold": False})
            H.call(self.layout, master, {"op": "systemctl", "argv": ["start", "redis-server.service"]})

        res = self._under_load("redis", inject, restore, TARGETS["redis"]["kinds"], TARGETS["redis"]["rto"],
                               TARGETS["redis"]["alerts"], lambda a: ip in json.dumps(a.get("labels", {}))
                               or master in json.dumps(a.get("labels", {})), extra)
        # The old master comes back as a replica of the new one.
        pw = self.secret("redis_password")
        role = ""
        for _ in range(30):
            rc, out = self.run(master, f"REDISCLI_AUTH='{pw}' redis-cli -h {ip} role | head -1", timeout=10)
            role = out.strip()
            if rc == 0 and role == "slave":
                break
            time.sleep(1)
        res.checks["old_master_rejoined_as_replica"] = role == "slave"
        res.passed = all(res.checks.values())
        return res

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

    def galera_writer(self) -> str:
        # Every DB client's writer HAProxy prefers the first Synced node in galera.nodes order.
        for n in self.layout.topo.role_hosts["data"]:
            if self.galera_status(n).get("wsrep_local_state") == "4":
                return n
        raise RuntimeError("no Synced Galera node")

    def drill_galera(self) -> Result:
        writer = self.galera_writer()
        data = self.layout.topo.role_hosts["data"]
        ip = self.layout.host(writer).ip

        def inject() -> None:
            say(f"    kill -9 every process of {writer} (the active Galera writer)")
            H.kill(writer)

        def restore() -> None:
            self._reboot(writer)
            ok = self.wait_synced(writer, len(data), 300)
            say(f"    {writer} rejoined: {'Synced' if ok else 'NOT synced'}")

        res = self._under_load("galera", inject, restore, TARGETS["galera"]["kinds"], TARGETS["galera"]["rto"],
                               TARGETS["galera"]["alerts"], lambda a: ip in json.dumps(a.get("labels", {}))
                               or writer in json.dumps(a.get("labels", {})))
        res.checks["writer_rejoined"] = self.wait_synced(writer, len(data), 60)
        # Partition: cut one non-writer node's link, it must refuse writes; heal, it resyncs.
        victim = [n for n in data if n != writer][0]
        say(f"    partition: cut {victim}'s link at the router")
        netns.set_link(self.layout, victim, False)
        try:
            refused = False
            deadline = time.time() + 60
            pw = self.secret("mariadb_root_password")
            while time.time() < deadline:
                rc, out = self.run(victim, f"MYSQL_PWD='{pw}' mariadb -uroot --connect-timeout=3 -e "
                                           "\"CREATE TABLE IF NOT EXISTS portal_api.partition_probe (id INT PRIMARY KEY); "
                                           "REPLACE INTO portal_api.partition_probe VALUES (1)\" 2>&1 || "
                                           "mariadb -uroot --connect-timeout=3 -e \"REPLACE INTO "
                                           "portal_api.partition_probe VALUES (1)\" 2>&1", timeout=20)
                if rc != 0:
                    refused = True
                    res.notes.append(f"partitioned {victim} refused a write: {out.strip().splitlines()[-1][:120] if out.strip() else rc}")
                    break
                time.sleep(2)
            res.checks["partitioned_node_refuses_writes"] = refused
        finally:
            netns.set_link(self.layout, victim, True)
        say(f"    healed {victim}'s link")
        res.checks["partitioned_node_resynced"] = self.wait_synced(victim, len(data), 180)
        res.passed = all(res.checks.values())
        return res


    # ------------------------------------------------------------------ app, slurm, az
    def drill_app(self) -> Result:
        victim = self.layout.topo.role_hosts["app"][0]
        ip = self.layout.host(victim).ip

        def inject() -> None:
            say(f"    kill -9 every process of {victim} (a web/app host)")
            H.kill(victim)

        def restore() -> None:
            self._reboot(victim)

        res = self._under_load("app", inject, restore, TARGETS["app"]["kinds"], None, TARGETS["app"]["alerts"],
                               lambda a: ip in json.dumps(a.get("labels", {})) or victim in json.dumps(a.get("labels", {})))
        res.checks["no_failed_reads"] = res.failed_reads == 0
        res.passed = all(res.checks.values())
        return res

    def slurm_jobs(self, host: str) -> tuple[bool, set[str]]:
        rc, out = self.run(host, "squeue -h -o %i 2>&1", timeout=30)
        return rc == 0, {x.strip() for x in out.split() if x.strip().isdigit()}

    def portal_jobs(self, *args: str) -> dict[str, Any]:
        """Slurm jobs through the portal from the client namespace (rehearsal.load jobs)."""
        return self.client_tool("jobs", "--url", URL, *args)

    def drill_slurm(self) -> Result:
        from . import onprem

        ctl = self.layout.topo.role_hosts["slurm"]
        primary, backup = ctl[0], ctl[1]
        client = self.layout.topo.role_hosts["app"][0]
        doc = self.portal_jobs("submit", "--count", "5")
        jobs = set(doc.get("job_ids", []))
        if len(jobs) != 5:
            raise RuntimeError(f"could not queue jobs through the portal: {doc}")
        say(f"    queued jobs {', '.join(sorted(jobs, key=int))} through the portal (POST /api/jobs on the Elastic IP)")
        state: dict[str, Any] = {}

        def inject() -> None:
            say(f"    kill -9 slurmctld on {primary} (the primary; its Restart= held back)")
            H.call(self.layout, primary, {"op": "kill", "unit": "slurmctld.service", "signal": 9, "hold": True})
            state["t0"] = time.time()

        def extra(res: Result) -> None:
            deadline = state["t0"] + 40 * 3 * max(1.0, self.ceiling)
            while time.time() < deadline:
                ok, seen = self.slurm_jobs(client)
                rc, ping = self.run(client, "scontrol ping", timeout=15)
                if ok and jobs <= seen and "is UP" in ping.split("backup")[-1]:
                    state["control"] = time.time() - state["t0"]
                    res.notes.append(f"backup in control after {state['control']:.1f}s, jobs intact: {len(jobs)}")
                    break
                time.sleep(1)
            res.rto_s = round(state["control"], 1) if "control" in state else None
            res.checks["jobs_intact"] = "control" in state
            # The same jobs as the portal reports them to its users: still pending.
            states = self.portal_jobs("states", "--ids", ",".join(sorted(jobs))).get("states", {})
            res.checks["jobs_pending_via_portal"] = sorted(states) == sorted(jobs) and \
                all(v == "PENDING" for v in states.values())
            res.notes.append(f"job states through the portal: {states}")
            if self.layout.onprem:
                # What the compute nodes see through the VPN: the backup answers.
                seen_site = onprem.controllers_seen_from_site(self.layout)
                res.checks["onprem_sees_backup"] = seen_site.get(backup) == "UP" and seen_site.get(primary) == "DOWN"
                res.notes.append(f"scontrol ping from on-prem: {seen_site}")

        def restore() -> None:
            H.call(self.layout, primary, {"op": "hold", "unit": "slurmctld.service", "hold": False})
            H.call(self.layout, primary, {"op": "systemctl", "argv": ["start", "slurmctld.service"]})

        res = self._under_load("slurm", inject, restore, (), None, TARGETS["slurm"]["alerts"],
                               lambda a: primary in json.dumps(a.get("labels", {})), extra)
        res.target_rto_s = TARGETS["slurm"]["rto"]
        res.checks["rto"] = res.rto_s is not None and res.rto_s <= TARGETS["slurm"]["rto"] * self.ceiling
        res.passed = all(res.checks.values())
        self.run(client, f"scancel {' '.join(sorted(jobs))} 2>/dev/null", timeout=30)
        return res

    def drill_az(self) -> Result:
        active = self.host_by_ip(self.eip_target())
        if active is None:
            raise RuntimeError("the Elastic IP is not associated")
        az = self.layout.host(active).az
        victims = [h.name for h in self.layout.hosts if h.az == az]
        mon = self.layout.topo.role_hosts["monitoring"][0]
        data = self.layout.topo.role_hosts["data"]

        def inject() -> None:
            say(f"    {az} goes dark: kill -9 and cut the links of {', '.join(victims)} at once")
            for v in victims:
                netns.set_link(self.layout, v, False)
            for v in victims:
                H.kill(v)

        def restore() -> None:
            for v in victims:
                netns.set_link(self.layout, v, True)
            for v in victims:
                self._reboot(v)
            for v in victims:
                if v in data:
                    self.wait_synced(v, len(data), 300)

        names = TARGETS["az"]["alerts"] if mon not in victims else []
        res = self._under_load("az", inject, restore, TARGETS["az"]["kinds"], TARGETS["az"]["rto"], names,
                               lambda a: any(v in json.dumps(a.get("labels", {})) for v in victims))
        if mon in victims:
            res.notes.append(f"no alert check: the monitoring host {mon} is in {az}")
        res.notes.append(f"{az}: {', '.join(victims)}")
        return res

    # ------------------------------------------------------------------ galera-full, restore
    def drill_galera_full(self) -> Result:
        data = self.layout.topo.role_hosts["data"]

        def inject() -> None:
            say(f"    kill -9 every process of {', '.join(data)} (the whole Galera cluster)")
            for n in data:
                H.kill(n)

        def restore_cluster(res: Result) -> None:
            st = read_state(self.wd)
            for n in data:  # all three come back at once, like after a power cut
                st.setdefault("hosts", {})[n] = {"unshare_pid": H.start(self.layout, self.layout.host(n))}
            write_state(self.wd, st)
            say(f"    rebooted {', '.join(data)}; their mariadb.service starts on its own (enabled)")
            deadline = time.time() + 60
            for n in data:
                while time.time() < deadline:
                    u = H.call(self.layout, n, {"op": "status"}).get("units", {}).get("mariadb.service", {})
                    if u.get("state") in ("activating", "active", "failed"):
                        break
                    time.sleep(0.5)
            # The nodes' own mariadb starts find no primary component; stop them, then the
            # documented recovery (runbook galera-full-outage, hpc-galera-recover).
            reports = {}
            for n in data:
                self.run(n, "systemctl stop mariadb.service", timeout=120)
            for n in data:  # the runbook's precondition: mariadbd stopped on every node
                rc, out = self.run(n, "pgrep -x mariadbd || true", timeout=10)
                if out.strip():
                    raise RuntimeError(f"mariadbd still runs on {n} after systemctl stop: {out.strip()}")
            for n in data:
                rc, out = self.run(n, "hpc-galera-recover report", timeout=300)
                line = [ln for ln in out.splitlines() if ln.strip().startswith("{")]
                if rc != 0 or not line:
                    raise RuntimeError(f"hpc-galera-recover report on {n}: {out.strip()[-300:]}")
                reports[n] = line[-1]
            chooser = data[0]
            files = " ".join(f"/tmp/galera-{n}.json" for n in data)
            for n, rep in reports.items():
                self.run(chooser, f"cat > /tmp/galera-{n}.json <<'EOF'\n{rep}\nEOF", timeout=10)
            rc, out = self.run(chooser, f"hpc-galera-recover choose {files}", timeout=30)
            m = re.search(r"bootstrap (\S+?):", out)
            chosen = m.group(1) if m and m.group(1) in data else None
            res.notes.append(f"hpc-galera-recover choose: {out.strip().splitlines()[-1][:160] if out.strip() else rc}")
            if rc != 0 or chosen is None:
                raise RuntimeError(f"hpc-galera-recover choose: {out.strip()[-300:]}")
            rc, out = self.run(chosen, "hpc-galera-recover mark-safe && galera_new_cluster", timeout=300)
            if rc != 0:
                raise RuntimeError(f"bootstrap of {chosen}: {out.strip()[-300:]}")
            for n in data:
                if n != chosen:
                    self.run(n, "systemctl start mariadb.service", timeout=600)
                    self.wait_synced(n, None, 120)
            for n in data:
                self.run(n, "systemctl restart hpc-clustercheck.service prometheus-mysqld-exporter.service", timeout=60)
            res.checks["cluster_back"] = all(self.wait_synced(n, len(data), 240) for n in data)

        state: dict[str, Any] = {}
        res = Result("galera-full")
        with self.load("galera-full") as (p, path):
            self.wait_healthy(path)
            time.sleep(5)
            t0 = time.time()
            inject()
            time.sleep(5)
            restore_cluster(res)
            state["rto"] = self.rto(path, t0, ("write",), 120)
            res.rto_s = round(state["rto"], 1) if state["rto"] is not None else None
            self.finish_load(p, path)
            self.tally(path, t0, res)
        self.verify(path, res)
        return self.finish(res, None)

    def drill_restore(self) -> Result:
        res = Result("restore")
        first = self.layout.topo.role_hosts["data"][0]
        g = json.loads((self.wd / "hosts" / first / "upper" / "etc" / "hpc" / "galera.json").read_text())
        node = g["backup"]["host"]
        g = json.loads((self.wd / "hosts" / node / "upper" / "etc" / "hpc" / "galera.json").read_text())
        with self.load("restore") as (p, path):
            self.wait_healthy(path)
            self.finish_load(p, path, min_acked=MIN_ACKED, max_s=240)
        self.tally(path, time.time(), res)
        pw = self.secret("mariadb_root_password")
        q = ("SELECT COUNT(*) FROM portal_api.records; CHECKSUM TABLE portal_api.records; "
             "SELECT COUNT(*) FROM mysql.user")
        rc, before = self.run(node, f"MYSQL_PWD='{pw}' mariadb -uroot -N -B -e \"{q}\" 2>&1 || mariadb -uroot -N -B "
                                    f"-e \"{q}\"", timeout=60)
        say(f"    backup on {node}: systemctl start hpc-mariadb-backup.service")
        rc, out = self.run(node, "systemctl start hpc-mariadb-backup.service", timeout=600)
        res.checks["backup"] = rc == 0
        if rc != 0:
            res.notes.append(f"backup failed: {out.strip()[-300:]}")
            return self.finish(res, None)
        key = g["backup"].get("key") or f"{g['backup'].get('prefix', 'mariadb')}/{node}/latest.xbstream.gz"
        objs = ops_call(self.wd, "s3", "list_objects_v2", Bucket=g["backup"]["bucket"])
        keys = [o["Key"] for o in objs.get("Contents", [])]
        if key not in keys:
            key = next((k for k in keys if k.endswith("latest.xbstream.gz")), key)
        res.notes.append(f"backup object s3://{g['backup']['bucket']}/{key}")
        body = ops_call(self.wd, "s3", "get_object", Bucket=g["backup"]["bucket"], Key=key, timeout=120)["Body"]
        # A fresh node: an empty datadir and its own mariadbd (no wsrep), on the monitoring host.
        fresh = self.layout.topo.role_hosts["monitoring"][0]
        blob = self.wd / "hosts" / fresh / "ctl" / "restore.xbstream.gz"
        import base64

        blob.write_bytes(base64.b64decode(body))
        say(f"    restore into a fresh mariadbd on {fresh}")
        script = (
            "set -e; rm -rf /var/tmp/restore && mkdir -p /var/tmp/restore && cd /var/tmp/restore && "
            "gunzip -c /run/rehearsal/restore.xbstream.gz | mbstream -x -C /var/tmp/restore && "
            "mariabackup --prepare --target-dir=/var/tmp/restore >/var/tmp/restore-prepare.log 2>&1 && "
            "chown -R mysql:mysql /var/tmp/restore && "
            "(setpriv --reuid=mysql --regid=mysql --init-groups mariadbd --no-defaults --datadir=/var/tmp/restore "
            "--socket=/var/tmp/restore.sock --skip-networking --wsrep-on=OFF --innodb-buffer-pool-size=64M "
            ">/var/tmp/restore-mariadbd.log 2>&1 &) && "
            "for i in $(seq 60); do mariadb --socket=/var/tmp/restore.sock -uroot -e 'SELECT 1' >/dev/null 2>&1 && break; "
            f"sleep 1; done; MYSQL_PWD='{pw}' mariadb --socket=/var/tmp/restore.sock -uroot -N -B -e \"{q}\" || "
            f"mariadb --socket=/var/tmp/restore.sock -uroot -N -B -e \"{q}\"; "
            "mariadb-admin --socket=/var/tmp/restore.sock -uroot shutdown 2>/dev/null || "
            f"MYSQL_PWD='{pw}' mariadb-admin --socket=/var/tmp/restore.sock -uroot shutdown")
        rc, after = self.run(fresh, script, timeout=600)
        norm = [ln.split("\t")[-1] for ln in before.strip().splitlines()]
        got = [ln.split("\t")[-1] for ln in after.strip().splitlines() if "\t" in ln or ln.strip().isdigit()]
        res.notes.append(f"source {norm}, restored {got}")
        res.checks["restored_equal"] = rc == 0 and bool(norm) and norm == got[:len(norm)]
        res.lost_writes = 0
        res.checks["lost_writes"] = True
        return self.finish(res, None)

    def replace_instance(self, host: str) -> str:
        """What `pulumi up --replace` does to one host: a new instance with the same private
        IP and the same user-data, on a fresh disk, booting through cloud-init."""

        old = ops_call(self.wd, "ec2", "describe_instances", Filters=[
            {"Name": "private-ip-address", "Values": [self.layout.host(host).ip]},
            {"Name": "instance-state-name", "Values": ["running", "pending"]}])["Reservations"][0]["Instances"][0]
        ud = ops_call(self.wd, "ec2", "describe_instance_attribute", InstanceId=old["InstanceId"],
                      Attribute="userData")["UserData"]["Value"]
        H.kill(host)
        ops_call(self.wd, "ec2", "terminate_instances", InstanceIds=[old["InstanceId"]])
        eni = old["NetworkInterfaces"][0]["NetworkInterfaceId"]
        new = ops_call(self.wd, "ec2", "run_instances", ImageId=old["ImageId"], MinCount=1, MaxCount=1,
                       InstanceType=old["InstanceType"], UserData_b64=ud,
                       NetworkInterfaces=[{"DeviceIndex": 0, "NetworkInterfaceId": eni}],
                       Placement={"AvailabilityZone": old["Placement"]["AvailabilityZone"]},
                       IamInstanceProfile={"Name": "hpc-portal-host"})["Instances"][0]
        deploy = json.loads((self.wd / "deploy.json").read_text())
        h = self.layout.host(host)
        H.prepare(self.layout, h, deploy)
        from .stack import STANDIN_DEST, install_standin

        if "app" in h.roles and not self.layout.cfg.app_artifact and \
                "/" + STANDIN_DEST not in deploy["hosts"][host].get("files", []):
            install_standin(self.layout, host)
        st = read_state(self.wd)
        st.setdefault("hosts", {})[host] = {"unshare_pid": H.start(self.layout, h)}
        write_state(self.wd, st)
        r = H.call(self.layout, host, {"op": "cloud-init"}, timeout=1800)
        failed = r.get("result", {}).get("failed", []) if r.get("rc") == 0 else ["cloud-init"]
        if failed:
            raise RuntimeError(f"replacement {host} ({new['InstanceId']}): {len(failed)} boot commands failed")
        return str(new["InstanceId"])

    def gate(self, host: str, timeout: float = 180) -> bool:
        """Readiness: every portal health endpoint and nginx on the host answer 200, asked
        from a load balancer (the path HAProxy's checks take)."""
        lb = next(n for n in self.layout.topo.role_hosts["lb"] if H.alive(n))
        h = self.layout.host(host)
        urls = []
        if "app" in h.roles:
            urls += [f"http://{h.ip}:{port}{svc.health}" for svc in self.layout.cfg.services for port in svc.ports]
        if "web" in h.roles:
            urls.append(f"http://{h.ip}:8080/health")
        deadline = time.time() + timeout
        while time.time() < deadline:
            codes = [self.run(lb, f"curl -s -o /dev/null -w %{{http_code}} --max-time 2 {u}", timeout=10)[1]
                     for u in urls]
            if all(c == "200" for c in codes):
                return True
            time.sleep(2)
        return False

    def drill_rolling(self) -> Result:
        """Replace the web/app hosts one at a time with tools/rolling.py's own plan (drain on
        every LB, replace, readiness gate, back into service), executed here."""
        import sys as _sys

        _sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
        import rolling  # tools/rolling.py: the phased rollout's command

        steps = rolling.plan(self.layout.stack, "app")
        res = Result("rolling")
        replaced: list[str] = []

        def run_step(step: Any) -> int:
            if step.kind in ("drain", "ready"):
                lb, cmd = step.argv
                if not H.alive(lb):
                    return 0
                rc, out = self.run(lb, cmd, timeout=30)
                if rc == 0 and step.kind == "drain":
                    time.sleep(3)  # let in-flight requests on the drained server finish
                return rc
            if step.kind == "pulumi":
                if "--replace" not in step.argv:
                    return 0
                iid = self.replace_instance(step.host)
                replaced.append(f"{step.host}={iid}")
                return 0
            if step.kind == "gate":
                return 0 if self.gate(step.host) else 1
            return 1

        with self.load("rolling") as (p, path):
            if not self.wait_healthy(path):
                res.notes.append("the portal was not healthy before the roll")
            time.sleep(3)
            t0 = time.time()
            rc = rolling.execute(steps, run_step)
            res.checks["roll_completed"] = rc == 0
            res.notes.append(f"replaced {', '.join(replaced)}")
            self.finish_load(p, path)
            self.tally(path, t0, res)
        self.verify(path, res)
        res.checks["no_failed_reads"] = res.failed_reads == 0
        return self.finish(res, None)


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
