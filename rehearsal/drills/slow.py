"""A slow node, not a dead one: `slow-galera` throttles one Galera node's CPU (the CFS
quota of its host's cgroup) under load. A node that cannot apply the cluster's writes as
fast as they come sends flow-control pauses, and every node, the writer too, stops
committing while they last: the whole portal's writes slow down although nothing failed.
The drill reports what users see (write latency and failures before and during), whether
flow control engaged, and the GaleraFlowControl alert; it fails only on lost writes, an
injection that did not take, or no alert.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from .. import container as C
from ..stack import say
from .base import DrillBase, Result, history, register

QUOTA_US, PERIOD_US = 1000, 100000  # 1 % of one CPU for the whole host
SAMPLE_AFTER_S = 20.0  # flow-control counters are compared over this much of the throttle


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


class SlowDrills(DrillBase):
    def flow_control(self, host: str) -> dict[str, int]:
        """wsrep_flow_control_paused_ns (time this node was paused) and _sent (pauses it asked for)."""
        vals = self.global_status(host, ("wsrep_flow_control_paused_ns", "wsrep_flow_control_sent",
                                         "wsrep_local_recv_queue"), timeout=30)
        return {k: int(float(v)) for k, v in vals.items()}

    @register("slow-galera")
    def drill_slow_galera(self) -> Result:
        data = self.layout.topo.role_hosts["data"]
        writer = self.galera_writer()
        victim = next(n for n in data if n != writer)
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

        res = self._under_load("slow-galera", inject, restore, (), None, ["GaleraFlowControl"], lambda a: True, extra)
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
