"""The front door: the active load balancer (HAProxy + keepalived, the Elastic IP moves
to the other) and a web/app host behind it (HAProxy's checks take it out of service)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from .. import hosts as H
from ..stack import say
from .base import TARGETS, DrillBase, Result, register


class LbNetworkDrills(DrillBase):
    @register("lb")
    def drill_lb(self) -> Result:
        active = self.host_by_ip(self.eip_target())
        if active is None:
            raise RuntimeError("the Elastic IP is not associated: is an LB master?")
        other = [h for h in self.layout.topo.role_hosts["lb"] if h != active]
        ip = self.layout.host(active).ip

        def inject() -> None:
            holder = self.host_by_ip(self.eip_target())
            if holder != active:  # the address moved with no fault: the drill is void, and says so
                self.moved_before = f"the Elastic IP moved from {active} to {holder} before the fault"
                say(f"    {self.moved_before}")
            say(f"    kill -9 every process of {active} (active LB: HAProxy + keepalived)")
            H.kill(active)
            self.killed(active)

        def extra(res: Result) -> None:
            moved = self._eip_moved_after(res)
            if moved is not None:
                res.notes.append(f"EIP moved to {self.host_by_ip(self.eip_target())} {moved:.2f}s after the fault")
                res.checks["eip_moved"] = bool(other) and self.host_by_ip(self.eip_target()) in other
                if res.checks["eip_moved"] and self.effect:
                    res.fault_effect = f"{self.effect}; EIP moved to {self.host_by_ip(self.eip_target())}"
            else:
                res.checks["eip_moved"] = False
            if self.moved_before:
                res.notes.insert(0, self.moved_before)

        def restore() -> None:
            self._reboot(active)

        self._t_fault = 0.0
        self.moved_before = ""
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

    @register("app")
    def drill_app(self) -> Result:
        victim = self.layout.topo.role_hosts["app"][0]
        ip = self.layout.host(victim).ip

        def inject() -> None:
            say(f"    kill -9 every process of {victim} (a web/app host)")
            H.kill(victim)
            self.killed(victim)

        def restore() -> None:
            self._reboot(victim)

        res = self._under_load("app", inject, restore, TARGETS["app"]["kinds"], None, TARGETS["app"]["alerts"],
                               lambda a: ip in json.dumps(a.get("labels", {})) or victim in json.dumps(a.get("labels", {})))
        res.checks["no_failed_reads"] = res.failed_reads == 0
        res.passed = all(res.checks.values())
        return res
