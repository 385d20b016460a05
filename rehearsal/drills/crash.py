"""Crashes in quick succession: two of the three Galera nodes' mariadbd killed within one
second (kill -9; systemd restarts them, as after a crash). The survivor must refuse
writes (it is no longer in a Primary component), the two must come back and the
cluster re-form without an operator, and no acknowledged write may be lost.

All three at once is the `galera-full` drill: there the runbook's recovery
(hpc-galera-recover report/choose) picks the node with the highest seqno.
"""

from __future__ import annotations

import threading
import time

from .. import hosts as H
from ..stack import say
from .base import DrillBase, Result, register

REFORM_S = 240.0  # the two restarted nodes rejoin (IST from the survivor) within this


def kill_within(kill: list[threading.Thread]) -> float:
    """Start every kill at once; the spread between the first and the last start."""
    starts: list[float] = []
    lock = threading.Lock()

    def wrap(t: threading.Thread) -> threading.Thread:
        run = t.run

        def timed() -> None:
            with lock:
                starts.append(time.time())
            run()
        t.run = timed  # type: ignore[method-assign]
        return t

    threads = [wrap(t) for t in kill]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return max(starts) - min(starts) if starts else float("inf")


class CrashDrills(DrillBase):
    @register("crash-burst")
    def drill_crash_burst(self) -> Result:

        data = self.layout.topo.role_hosts["data"]
        writer = self.galera_writer()
        victims = [writer] + [n for n in data if n != writer][:1]
        survivor = [n for n in data if n not in victims][0]
        seen: dict[str, str] = {}

        def inject() -> None:
            say(f"    kill -9 mariadbd on {' and '.join(victims)} within a second (systemd restarts them)")
            spread = kill_within([threading.Thread(target=H.call, args=(
                self.layout, v, {"op": "kill", "unit": "mariadb.service", "signal": 9})) for v in victims])
            seen["spread"] = f"{spread:.2f}"

        def extra(res: Result) -> None:
            t0 = res.fault_window[0] if res.fault_window else time.time()
            deadline = time.time() + 60
            while time.time() < deadline and "status" not in seen:
                st = self.galera_status(survivor).get("wsrep_cluster_status", "")
                if st and st != "Primary":
                    seen["status"] = st
                    seen["at"] = f"{time.time() - t0:.1f}"
                time.sleep(0.3)
            res.checks["survivor_refuses_writes"] = "status" in seen
            if "status" in seen and float(seen["spread"]) <= 1.0:
                res.fault_effect = (f"mariadbd killed on {', '.join(victims)} {seen['spread']}s apart; "
                                    f"{survivor} {seen['status']} {seen['at']}s after")
            res.checks["killed_within_1s"] = float(seen["spread"]) <= 1.0
            t = time.time()
            res.checks["cluster_reformed_by_itself"] = all(self.wait_synced(n, len(data), REFORM_S) for n in data)
            res.notes.append(f"cluster of {len(data)} Synced again {time.time() - t0:.0f}s after the kills"
                             if res.checks["cluster_reformed_by_itself"] else
                             f"cluster not re-formed {time.time() - t:.0f}s after the kills")

        res = self._under_load("crash-burst", inject, lambda: None, ("write", "record"), None, [], lambda a: False,
                               extra)
        res.min_in_window = 0  # no Primary component: refusing writes is the point
        res.checks.pop("acked_in_fault_window", None)
        res.checks["fault_effect"] = bool(res.fault_effect)
        res.passed = all(res.checks.values())
        return res
