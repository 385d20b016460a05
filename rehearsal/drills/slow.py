"""Slow, not dead. `slow-galera` throttles one Galera node's CPU (the CFS
quota of its host's cgroup) under load. A node that cannot apply the cluster's writes as
fast as they come sends flow-control pauses, and every node, the writer too, stops
committing while they last; a node too starved to answer the group in time is evicted
from the view and readmitted instead, sometimes before any pause. Either way, measured,
30-60 % of the portal's writes fail while it lasts, with no host or daemon down. The
drill reports what users see (write latency and failures before and during), whether
flow control engaged, and the alert: GaleraFlowControl (the cause, when flow control is
the path) or PortalErrors (the users' errors at the LBs, whatever the path); it fails
only on lost writes, an injection that did not take, or neither alert.

`efs-stall`: the Slurm share (slurmctld's StateSaveLocation on EFS) stops answering for
30 s under load (rehearsal/lazyfs.py's stall: every operation waits, as on an NFS mount
`hard` whose server is gone), then answers again. It reports what users see (the
portal's job submissions started during the stall: how many were acknowledged and how
late; records and sessions beside them) and the SlurmStateDirStalled alert, and fails on
a lost, duplicated or ghost job, a stall that did not take, no alert, a controller fenced
or taken over because of the stall, or submissions not answered again within the Slurm
RTO of the share's return.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from .. import container as C
from .. import hosts as H
from ..stack import say
from .base import ALERT_TARGET_S, TARGETS, DrillBase, Result, history, job_waits, register

QUOTA_US, PERIOD_US = 1000, 100000  # 1 % of one CPU for the whole host
SAMPLE_AFTER_S = 20.0  # flow-control counters are compared over this much of the throttle
EFS_STALL_S = 30.0  # how long the Slurm share does not answer
EFS_STALL_CAP_S = 150.0  # the layer ends the stall by itself after this, whatever happens here
EFS_ALERT = "SlurmStateDirStalled"
SLOW_GALERA_ALERTS = ["GaleraFlowControl", "PortalErrors"]


def cpu_dir(host: str) -> Path:
    d = C.cgroup_dirs(host).get("cpu")
    if d is None or not (d / "cpu.cfs_quota_us").exists():
        raise RuntimeError(f"{host}: no cgroup v1 cpu controller with a CFS quota on this machine")
    return d


def throttled_periods(host: str) -> int:
    for line in (cpu_dir(host) / "cpu.stat").read_text().splitlines():
        k, _, v = line.partition(" ")
        if k == "nr_throttled":
            return int(v)
    return 0


def latencies(path: Path, a: float, b: float) -> tuple[int, int, float | None, float | None]:
    """(acknowledged writes, failed writes, median and 95th percentile seconds of the
    acknowledged ones) for record writes started in [a, b)."""
    rows = [h for h in history(path) if h[2] == "write" and a <= h[0] < b]
    ok = sorted(h[1] - h[0] for h in rows if h[3])
    p95 = ok[min(len(ok) - 1, int(0.95 * len(ok)))] if ok else None
    return len(ok), len(rows) - len(ok), (statistics.median(ok) if ok else None), p95


def first_ack_after(hist: list[Any], kind: str, t: float) -> float | None:
    """Seconds after `t` of the first acknowledged request of `kind` that started after `t`."""
    ends = [h[1] for h in hist if h[2] == kind and h[3] and h[0] >= t]
    return min(ends) - t if ends else None


class SlowDrills(DrillBase):
    def flow_control(self, host: str) -> dict[str, int]:
        """wsrep_flow_control_paused_ns (time this node was paused) and _sent (pauses it asked for)."""
        vals = self.global_status(host, ("wsrep_flow_control_paused_ns", "wsrep_flow_control_sent",
                                         "wsrep_local_recv_queue"), timeout=30)
        return {k: int(float(v)) for k, v in vals.items()}

    @register("slow-galera")
    def drill_slow_galera(self) -> Result:
        writer = self.galera_writer()
        # Throttling the Redis master too would measure Redis's slowness in the same breath.
        victim = self.galera_only_node(writer)
        seen: dict[str, float] = {}
        before: dict[str, dict[str, int]] = {}

        def inject() -> None:
            say(f"    {victim}: CPU quota {QUOTA_US / PERIOD_US:.0%} of one CPU (CFS) under load; writer {writer}")
            before["writer"], before["victim"] = self.flow_control(writer), self.flow_control(victim)
            seen["throttled0"] = throttled_periods(victim)
            d = cpu_dir(victim)
            (d / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (d / "cpu.cfs_quota_us").write_text(str(QUOTA_US))
            seen["t0"] = time.time()

        def restore() -> None:
            (cpu_dir(victim) / "cpu.cfs_quota_us").write_text("-1")
            say(f"    {victim}: CPU quota lifted")

        def extra(res: Result) -> None:
            time.sleep(max(0.0, seen["t0"] + SAMPLE_AFTER_S - time.time()))
            w, v = self.flow_control(writer), self.flow_control(victim)
            paused = (w.get("wsrep_flow_control_paused_ns", 0) - before["writer"].get("wsrep_flow_control_paused_ns", 0)) / 1e9
            sent = v.get("wsrep_flow_control_sent", 0) - before["victim"].get("wsrep_flow_control_sent", 0)
            throttled = throttled_periods(victim) - int(seen["throttled0"])
            res.notes.append(f"first {SAMPLE_AFTER_S:.0f}s: {victim} CPU-throttled in {throttled} periods, sent {sent} "
                             f"flow-control pauses (recv queue {v.get('wsrep_local_recv_queue', '?')}); the writer "
                             f"{writer} was paused {paused:.1f}s")
            seen["flow_paused_s"] = paused
            if throttled > 0:
                res.fault_effect = (f"{victim} held to {QUOTA_US / PERIOD_US:.0%} CPU (throttled {throttled}x); "
                                    f"flow control paused the writer {paused:.1f}s of {SAMPLE_AFTER_S:.0f}s")

        res = self._under_load("slow-galera", inject, restore, (), None, SLOW_GALERA_ALERTS, lambda a: True, extra)
        if res.fault_window:
            path = self.out_dir / "load-slow-galera.log"
            a, b = res.fault_window
            for label, (x, y) in (("before", (a - 30, a)), ("during", (a, b))):
                n, failed, p50, p95 = latencies(path, x, y)
                res.notes.append(f"record writes {label}: {n} acknowledged, {failed} failed, median "
                                 f"{'-' if p50 is None else f'{p50 * 1000:.0f}ms'}, p95 {'-' if p95 is None else f'{p95 * 1000:.0f}ms'}")
        res.checks["fault_effect"] = bool(res.fault_effect)
        res.passed = all(res.checks.values())
        return res

    @register("efs-stall")
    def drill_efs_stall(self) -> Result:
        ctl = self.layout.topo.role_hosts["slurm"]
        primary = ctl[0]
        seen: dict[str, Any] = {}

        def inject() -> None:
            seen["before"] = H.efs_status(self.layout)
            say(f"    the Slurm share (EFS, slurmctld's state directory) stops answering for {EFS_STALL_S:.0f}s")
            H.efs_stall(self.layout, EFS_STALL_CAP_S)
            seen["t0"] = time.time()

        def restore() -> None:
            H.efs_resume(self.layout)  # again: a drill that failed half-way leaves no stall

        def alert_match(a: dict[str, Any]) -> bool:
            return True

        def extra(res: Result) -> None:
            t0 = seen["t0"]
            res.alert_target_s = min(self.rule_for(EFS_ALERT) + 30, ALERT_TARGET_S)
            time.sleep(3)
            # The stall seen from a controller: a write there waits (SIGKILLed after 3 s: 137).
            rc, out = self.run(primary, "timeout -s KILL 3 touch /slurm/.efs-stall-probe; echo rc=$?", timeout=30)
            blocked = "rc=137" in out
            while time.time() < t0 + EFS_STALL_S:
                if res.alert is None:
                    self.alert_seen([EFS_ALERT], t0, alert_match, res)
                time.sleep(2)
            st = H.efs_resume(self.layout)
            seen["t_resume"] = time.time()
            waited = int(st.get("stalled_ops", 0)) - int(seen["before"].get("stalled_ops", 0))
            res.notes.append(f"the share answered again {seen['t_resume'] - t0:.1f}s after the stall began; "
                             f"{waited} file operations had waited on it; a write from {primary} "
                             f"{'waited' if blocked else 'did NOT wait'} ({out.strip()[-40:]})")
            if blocked and waited > 0:
                res.fault_effect = (f"Slurm share stalled {seen['t_resume'] - t0:.1f}s: {waited} operations "
                                    f"waited, a write from {primary} waited")
            if res.alert is None:  # pending at the resume: it may still fire until the next probe
                self.wait_alert([EFS_ALERT], t0, alert_match, res)
            # The controllers after the stall: nobody fenced, nobody took over.
            time.sleep(10)
            states = {h: self.instance_state(h) for h in ctl}
            _rc, ping = self.run(self.layout.topo.role_hosts["app"][-1], "scontrol ping", timeout=30)
            up = [line for line in ping.splitlines() if "is UP" in line]
            res.checks["no_fence_no_takeover"] = all(v == "running" for v in states.values()) and \
                len(up) == len(ctl) and "primary" in ping.split("is UP")[0]
            res.notes.append(f"after the stall: instances {states}; scontrol ping: "
                             f"{' / '.join(ping.strip().splitlines())}")

        res = self._under_load("efs-stall", inject, restore, (), None, [], alert_match, extra)
        res.checks.setdefault("alert", False)
        if res.alert is None:
            res.notes.append(f"no {EFS_ALERT} alert")
        hist = history(self.out_dir / "load-efs-stall.log")
        if "t0" in seen and "t_resume" in seen:
            t0, t1 = seen["t0"], seen["t_resume"]
            waits = job_waits(hist, t0, t1)
            acked = sorted(w for w in waits.values() if w is not None)
            res.notes.append(f"job submissions first tried during the stall: {len(waits)}, acknowledged "
                             f"{len(acked)}" + (f" (median {statistics.median(acked):.1f}s, worst {acked[-1]:.1f}s "
                                                f"after their first try)" if acked else ""))
            back = first_ack_after(hist, "job", t1)
            res.rto_s = None if back is None else round(t1 - t0 + back, 1)
            res.notes.append(f"job submissions answered again {'-' if back is None else f'{back:.1f}s'} after the "
                             "share returned")
            res.checks["jobs_back_within_slurm_rto"] = back is not None and \
                back <= TARGETS["slurm"]["rto"] * self.ceiling
            for kind in ("write", "session"):
                rows = [h for h in hist if h[2] == kind and t0 <= h[0] < t1]
                res.notes.append(f"{kind} requests during the stall: {sum(1 for h in rows if h[3])} acknowledged, "
                                 f"{sum(1 for h in rows if not h[3])} failed")
        res.checks["fault_effect"] = bool(res.fault_effect)
        res.passed = all(res.checks.values())
        return res
