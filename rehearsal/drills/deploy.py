"""Deploy-time drills: the phased rolling replacement of the web/app hosts under load,
with tools/rolling.py's own plan, and what `pulumi up --replace` does to one host."""

from __future__ import annotations

import json
import time
from typing import Any

from .. import hosts as H
from ..awsd import ops_call
from ..stack import read_state, write_state
from .base import REPO, DrillBase, Result, register


class DeployDrills(DrillBase):
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
                       IamInstanceProfile={"Arn": old["IamInstanceProfile"]["Arn"]})["Instances"][0]
        deploy = json.loads((self.wd / "deploy.json").read_text())
        h = self.layout.host(host)
        H.prepare(self.layout, h, deploy)
        from ..stack import STANDIN_DEST, install_standin

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

    @register("rolling")
    def drill_rolling(self) -> Result:
        """Replace the web/app hosts one at a time with tools/rolling.py's own plan (drain on
        every LB, replace, readiness gate, back into service), executed here."""
        import sys as _sys

        _sys.path.insert(0, str(REPO / "tools"))
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
            res.fault_window = (t0, time.time())
            if replaced:
                res.fault_effect = f"replaced {', '.join(replaced)}"
            self.finish_load(p, path)
            self.tally(path, t0, res)
        self.verify(path, res)
        res.checks["no_failed_reads"] = res.failed_reads == 0
        return self.finish(res, None)
