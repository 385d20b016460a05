"""Slurm: the primary slurmctld dies with jobs running on the on-prem compute nodes and
more queued through the portal; the backup takes control, the running jobs keep running
and finish with their output, the queued ones stay known (and start once nodes free up),
and the primary takes control back when it returns, with no job record lost."""

from __future__ import annotations

import json
import time
from typing import Any

from .. import hosts as H
from ..stack import say
from .base import TARGETS, URL, DrillBase, Result, register

RUN_JOBS = 4  # short jobs that are RUNNING on the nodes when the primary dies
RUN_SECONDS = 75
DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


class SlurmDrills(DrillBase):
    def slurm_jobs(self, host: str) -> tuple[bool, set[str]]:
        rc, out = self.run(host, "squeue -h -o %i 2>&1", timeout=30)
        return rc == 0, {x.strip() for x in out.split() if x.strip().isdigit()}

    def portal_jobs(self, *args: str) -> dict[str, Any]:
        """Slurm jobs through the portal from the client namespace (rehearsal.load jobs)."""
        return self.client_tool("jobs", "--url", URL, *args)

    def job_states(self, client: str, jobs: set[str]) -> dict[str, dict[str, str]]:
        from .. import onprem

        return {j: onprem.job_info(self.layout, client, j) for j in sorted(jobs, key=int)}

    def start_running_jobs(self, client: str) -> set[str]:
        """RUN_JOBS short jobs through sbatch on an app host (as the portal's user), each
        with a small memory request so they share the nodes; returns once all RUN."""
        from .. import onprem

        script = f"echo start $(hostname); sleep {RUN_SECONDS}; echo done $(hostname)"
        jobs = {onprem.submit(self.layout, client, script, "--mem=100") for _ in range(RUN_JOBS)}
        deadline = time.time() + 90
        states: dict[str, dict[str, str]] = {}
        while time.time() < deadline:
            states = self.job_states(client, jobs)
            if all(s.get("JobState") == "RUNNING" for s in states.values()):
                break
            time.sleep(1)
        running = {j for j, s in states.items() if s.get("JobState") == "RUNNING"}
        say(f"    jobs {', '.join(sorted(jobs, key=int))} submitted with sbatch on {client}; RUNNING: "
            + ", ".join(f"{j} on {states[j].get('NodeList')}" for j in sorted(running, key=int)))
        if running != jobs:
            raise RuntimeError(f"jobs did not start on the on-prem nodes within 90 s: "
                               f"{ {j: s.get('JobState', '?') + ' ' + s.get('Reason', '') for j, s in states.items()} }")
        return jobs

    @register("slurm")
    def drill_slurm(self) -> Result:
        from .. import onprem

        ctl = self.layout.topo.role_hosts["slurm"]
        primary, backup = ctl[0], ctl[1]
        client = self.layout.topo.role_hosts["app"][0]
        nodes = onprem.node_names(self.layout)
        running = self.start_running_jobs(client) if nodes else set()
        doc = self.portal_jobs("submit", "--count", "5")
        queued = set(doc.get("job_ids", []))
        if len(queued) != 5:
            raise RuntimeError(f"could not queue jobs through the portal: {doc}")
        say(f"    queued jobs {', '.join(sorted(queued, key=int))} through the portal (POST /api/jobs on the Elastic IP)")
        jobs = running | queued
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
                if ok and queued <= seen and "is UP" in ping.split("backup")[-1]:
                    state["control"] = time.time() - state["t0"]
                    res.notes.append(f"backup in control after {state['control']:.1f}s, queued jobs intact: {len(queued)}")
                    res.fault_effect = f"slurmctld on {primary} killed; {backup} in control"
                    break
                time.sleep(1)
            res.rto_s = round(state["control"], 1) if "control" in state else None
            res.checks["jobs_intact"] = "control" in state
            # The portal's jobs as it reports them to its users: still there, pending or
            # started on a node the running jobs left.
            states = self.portal_jobs("states", "--ids", ",".join(sorted(queued))).get("states", {})
            res.checks["queued_jobs_known_via_portal"] = sorted(states) == sorted(queued) and \
                all(v in ("PENDING", "RUNNING") for v in states.values())
            res.notes.append(f"portal's jobs through the portal: {states}")
            # The alert is awaited here, before the running jobs' end: its window starts at
            # the kill.
            self.wait_alert(TARGETS["slurm"]["alerts"], state["t0"], alert_match, res)
            if running:
                # The jobs that were running when the primary died finish under the backup.
                deadline = time.time() + RUN_SECONDS + 60
                final: dict[str, dict[str, str]] = {}
                while time.time() < deadline:
                    final = self.job_states(client, running)
                    if all((s.get("JobState") or "?").split()[0] in DONE for s in final.values() if s) and \
                            len([s for s in final.values() if s]) == len(running):
                        break
                    time.sleep(2)
                outputs = {j: onprem.job_output(s.get("NodeList", ""), j) for j, s in final.items()}
                res.checks["running_jobs_completed"] = all(
                    s.get("JobState") == "COMPLETED" and s.get("ExitCode") == "0:0" for s in final.values()) and \
                    len(final) == len(running)
                res.checks["running_jobs_output_intact"] = all(
                    f"start {final[j].get('NodeList')}" in o and f"done {final[j].get('NodeList')}" in o
                    for j, o in outputs.items())
                res.notes.append("jobs running across the failover: " + ", ".join(
                    f"{j} {s.get('JobState')} {s.get('ExitCode')} on {s.get('NodeList')}" for j, s in final.items()))
            if self.layout.onprem:
                # What the compute nodes see through the VPN: the backup answers.
                seen_site = onprem.controllers_seen_from_site(self.layout)
                res.checks["onprem_sees_backup"] = seen_site.get(backup) == "UP" and seen_site.get(primary) == "DOWN"
                res.notes.append(f"scontrol ping from on-prem: {seen_site}")

        def restore() -> None:
            H.call(self.layout, primary, {"op": "hold", "unit": "slurmctld.service", "hold": False})
            H.call(self.layout, primary, {"op": "systemctl", "argv": ["start", "slurmctld.service"]})

        def alert_match(a: dict[str, Any]) -> bool:
            return primary in json.dumps(a.get("labels", {}))

        res = self._under_load("slurm", inject, restore, (), None, [], alert_match, extra)
        res.target_rto_s = TARGETS["slurm"]["rto"]
        res.checks["rto"] = res.rto_s is not None and res.rto_s <= TARGETS["slurm"]["rto"] * self.ceiling
        # The primary back: it takes control again (REQUEST_CONTROL), every job record kept.
        deadline = time.time() + 90
        back, lost = False, sorted(jobs)
        while time.time() < deadline:
            _rc, ping = self.run(client, "scontrol ping", timeout=15)
            back = "primary" in ping and "is UP" in ping.split("backup")[0]
            lost = sorted(j for j, s in self.job_states(client, jobs).items() if not s)
            if back and not lost:
                break
            time.sleep(2)
        res.checks["primary_takes_control_back"] = back
        res.checks["no_job_record_lost"] = not lost
        res.notes.append(f"after the primary's return: primary UP {back}; job records lost: {len(lost)} of {len(jobs)}"
                         + (f" ({', '.join(lost)})" if lost else ""))
        res.checks["fault_effect"] = bool(res.fault_effect)
        res.passed = all(res.checks.values())
        self.run(client, f"scancel {' '.join(sorted(jobs))} 2>/dev/null", timeout=30)
        return res
