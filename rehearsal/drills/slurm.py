"""Slurm: the primary slurmctld dies with jobs queued through the portal; the backup
takes control, the jobs stay pending (and, with an on-prem site, its compute nodes see
the backup through the VPN)."""

from __future__ import annotations

import json
import time
from typing import Any

from .. import hosts as H
from ..stack import say
from .base import TARGETS, URL, DrillBase, Result, register


class SlurmDrills(DrillBase):
    def slurm_jobs(self, host: str) -> tuple[bool, set[str]]:
        rc, out = self.run(host, "squeue -h -o %i 2>&1", timeout=30)
        return rc == 0, {x.strip() for x in out.split() if x.strip().isdigit()}

    def portal_jobs(self, *args: str) -> dict[str, Any]:
        """Slurm jobs through the portal from the client namespace (rehearsal.load jobs)."""
        return self.client_tool("jobs", "--url", URL, *args)

    @register("slurm")
    def drill_slurm(self) -> Result:
        from .. import onprem

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
                    res.fault_effect = f"slurmctld on {primary} killed; {backup} in control"
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
        res.checks["fault_effect"] = bool(res.fault_effect)
        res.passed = all(res.checks.values())
        self.run(client, f"scancel {' '.join(sorted(jobs))} 2>/dev/null", timeout=30)
        return res
