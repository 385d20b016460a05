"""Whole-site failures: the availability zone of the active load balancer goes dark
(every host in it killed and cut off at once)."""

from __future__ import annotations

import json

from .. import hosts as H
from .. import netns
from ..stack import say
from .base import TARGETS, DrillBase, Result, register


class SiteDrills(DrillBase):
    @register("az")
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
            self.killed(*victims)

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
