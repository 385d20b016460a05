"""Deploy-time drills: the phased rolling replacement of the web/app hosts under load,
with tools/rolling.py's own plan, and what `pulumi up --replace` does to one host."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

from components.server import DATA_DEVICE, STATEFUL_ROLES

from .. import hosts as H
from ..awsd import ops_call
from ..stack import _python, read_state, say, write_state
from .base import REPO, DrillBase, Result, history, register


class DeployDrills(DrillBase):
    def replace_instance(self, host: str, keep_volume: bool = False) -> str:
        """What `pulumi up --replace` does to one host (delete before replace): its
        dependents go first (a data volume's attachment stops the instance, then detaches),
        the old instance is terminated (EC2 refuses while termination protection is on)
        and shuts down, a new one gets the same interface (the same private IP), the same
        user-data and a fresh root disk and boots through cloud-init. `keep_volume`: the
        data volume outlives the instance and is attached to the new one."""
        old = ops_call(self.wd, "ec2", "describe_instances", Filters=[
            {"Name": "private-ip-address", "Values": [self.layout.host(host).ip]},
            {"Name": "instance-state-name", "Values": ["running", "pending"]}])["Reservations"][0]["Instances"][0]
        ud = ops_call(self.wd, "ec2", "describe_instance_attribute", InstanceId=old["InstanceId"],
                      Attribute="userData")["UserData"]["Value"]
        volumes: list[dict[str, Any]] = []
        if keep_volume:
            vols = ops_call(self.wd, "ec2", "describe_volumes", Filters=[
                {"Name": "attachment.instance-id", "Values": [old["InstanceId"]]}])["Volumes"]
            volumes = [a for v in vols for a in v.get("Attachments", []) if a.get("Device") == DATA_DEVICE]
            if not volumes:
                raise RuntimeError(f"{host} ({old['InstanceId']}): no data volume attached at {DATA_DEVICE}")
            clean = H.stop(host)
            for a in volumes:
                ops_call(self.wd, "ec2", "detach_volume", VolumeId=a["VolumeId"], InstanceId=old["InstanceId"])
        ops_call(self.wd, "ec2", "terminate_instances", InstanceIds=[old["InstanceId"]])
        if not keep_volume:
            clean = H.stop(host)
        say(f"    {host}: {old['InstanceId']} terminated ({'clean shutdown' if clean else 'killed after the shutdown time-out'})")
        eni = old["NetworkInterfaces"][0]["NetworkInterfaceId"]
        # The program's tags, as its replacement gets them: SSM (the agent stand-in) finds
        # the host by its Name tag; without them the deploy drill's gate waited out its
        # 900 s on InvalidInstanceId.
        tags: dict[str, Any] = {"TagSpecifications": [{"ResourceType": "instance", "Tags": old["Tags"]}]} \
            if old.get("Tags") else {}
        new = ops_call(self.wd, "ec2", "run_instances", ImageId=old["ImageId"], MinCount=1, MaxCount=1,
                       InstanceType=old["InstanceType"], UserData_b64=ud,
                       NetworkInterfaces=[{"DeviceIndex": 0, "NetworkInterfaceId": eni}],
                       Placement={"AvailabilityZone": old["Placement"]["AvailabilityZone"]},
                       IamInstanceProfile={"Arn": old["IamInstanceProfile"]["Arn"]}, **tags)["Instances"][0]
        for a in volumes:
            ops_call(self.wd, "ec2", "attach_volume", VolumeId=a["VolumeId"], InstanceId=new["InstanceId"],
                     Device=DATA_DEVICE)
        deploy = json.loads((self.wd / "deploy.json").read_text())
        # Later drills find the host's instance by this id (a fenced controller started
        # again, EC2's state of a host): it is the replacement's now.
        deploy["hosts"][host]["instance_id"] = new["InstanceId"]
        tmp = self.wd / "deploy.json.tmp"
        tmp.write_text(json.dumps(deploy, indent=2, sort_keys=True))
        tmp.rename(self.wd / "deploy.json")
        self.deploy = deploy
        h = self.layout.host(host)
        H.prepare(self.layout, h, deploy, keep_volume=keep_volume)
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

    def protect(self, host: str, on: bool) -> None:
        """What the program's `disable_api_termination` does to a data host's instance: the
        rolling command's first `pulumi up` lifts it (HPC_ROLL_STEP=unprotect), its last
        one sets it again."""
        ops_call(self.wd, "ec2", "modify_instance_attribute", InstanceId=self.deploy["hosts"][host]["instance_id"],
                 DisableApiTermination={"Value": on})

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

    def roll_candidates(self) -> tuple[str, str]:
        """The data host and the Slurm controller the drill rolls: a Galera node that is
        neither the writer nor the Redis master (moving those first is not part of
        tools/rolling.py), and the backup controller (slurm.conf's second)."""
        busy = {self.galera_writer(), self.redis_master()}
        data = [n for n in self.layout.topo.role_hosts["data"] if n not in busy]
        if not data:
            raise RuntimeError(f"every data host is the Galera writer or the Redis master: {sorted(b for b in busy if b)}")
        return data[-1], self.layout.topo.role_hosts["slurm"][1]

    def controllers_up(self) -> tuple[bool, str]:
        """`scontrol ping` from an app host: every controller UP."""
        app = next(n for n in self.layout.topo.role_hosts["app"] if H.alive(n))
        rc, out = self.run(app, "scontrol ping", timeout=30)
        lines = [line for line in out.splitlines() if line.startswith("Slurmctld(")]
        return len(lines) == len(self.layout.topo.role_hosts["slurm"]) and all(" is UP" in x for x in lines), \
            " / ".join(lines) or out.strip()[-200:]

    @register("rolling")
    def drill_rolling(self) -> Result:
        """Roll hosts one at a time with tools/rolling.py's own plan, executed here: every
        web/app host (drain on every LB, replace, readiness gate, back into service), then
        one Galera node (termination protection lifted, replaced with its data volume
        attached to the new instance, the role gate tools/gate.py runs through SSM,
        protection back) and the backup Slurm controller (replaced, gated)."""
        import shlex
        import sys as _sys

        _sys.path.insert(0, str(REPO / "tools"))
        import gate  # tools/gate.py: the drain script's wait
        import rolling  # tools/rolling.py: the phased rollout's command

        data_host, backup = self.roll_candidates()
        steps = (rolling.plan(self.layout.stack, "app") + rolling.plan(self.layout.stack, "data", [data_host])
                 + rolling.plan(self.layout.stack, "slurm", [backup]))
        res = Result("rolling")
        res.notes.append(f"rolled every app host, {data_host} (neither Galera writer nor Redis master) and {backup} "
                         "(backup controller)")
        replaced: list[str] = []
        protection: list[str] = []
        gates: dict[str, float] = {}

        def run_step(step: Any) -> int:
            if step.kind in ("drain", "ready"):
                lb, cmd = step.argv
                if not H.alive(lb):
                    return 0
                # A drain waits up to gate.DRAIN_WAIT_S for the server's open sessions to
                # end (websockets are closed at once, after the others): the step gets that
                # and half a minute.
                rc, out = self.run(lb, cmd, timeout=gate.DRAIN_WAIT_S + 30)
                if rc == 0 and step.kind == "drain":
                    time.sleep(3)  # let in-flight requests on the drained server finish
                return rc
            if step.kind == "pulumi":
                if "--replace" in step.argv:
                    iid = self.replace_instance(step.host, keep_volume=bool(self.layout.topo.host(step.host).data_gb))
                    replaced.append(f"{step.host}={iid}")
                    return 0
                # The data host's other two updates: termination protection off, then on.
                on = step.env.get("HPC_ROLL_STEP") != "unprotect"
                self.protect(step.host, on)
                protection.append(f"{step.host} {'on' if on else 'off'}")
                return 0
            if step.kind == "gate":
                t = time.time()
                if any(r in STATEFUL_ROLES for r in self.layout.host(step.host).roles):
                    # The role gate as the rolling command runs it: tools/gate.py through
                    # SSM (the agent stand-in), with the replacement's instance id.
                    argv = [self.deploy["hosts"][a[1:]]["instance_id"] if a.startswith("@") else a
                            for a in step.argv]
                    rc, out = self.program_command(shlex.join(argv), timeout=1300)
                    if rc != 0:
                        res.notes.append(f"gate {step.host}: exit {rc}: {out.strip()[-300:]}")
                else:
                    rc = 0 if self.gate(step.host) else 1
                gates[step.host] = round(time.time() - t, 1)
                return rc
            return 1

        with self.load("rolling") as (p, path):
            if not self.wait_healthy(path):
                res.notes.append("the portal was not healthy before the roll")
            time.sleep(3)
            t0 = time.time()
            rc = rolling.execute(steps, run_step)
            res.checks["roll_completed"] = rc == 0
            res.notes.append(f"replaced {', '.join(replaced)}; termination protection {', '.join(protection)}; "
                             f"gates passed after {gates} s")
            res.fault_window = (t0, time.time())
            if replaced:
                res.fault_effect = f"replaced {', '.join(replaced)}"
            self.finish_load(p, path)
            self.tally(path, t0, res)
        self.verify(path, res)
        res.checks["no_failed_reads"] = res.failed_reads == 0
        # The stateful replacements, afterwards: the Galera node back in a cluster of
        # three, one Redis master with its replicas, every Slurm controller answering,
        # and the data host protected again.
        size = len(self.layout.topo.role_hosts["data"])
        res.checks["galera_node_rejoined"] = self.wait_synced(data_host, size, timeout=300)
        roles = self.redis_roles()
        res.checks["redis_one_master"] = sorted(roles.values()) == sorted(["master"] + ["slave"] * (size - 1))
        ok, ping = self.controllers_up()
        res.checks["slurm_controllers_up"] = ok
        res.notes.append(f"after: Redis roles {roles}; scontrol ping: {ping}")
        rc, out = self.run(data_host, "journalctl -u mariadb --no-pager -o cat | "
                                      "grep -E 'IST received|SST (received|complete)|State transfer' | tail -3", timeout=30)
        res.notes.append(f"{data_host} rejoined: {' | '.join(out.strip().splitlines()) or 'no state-transfer line'}")
        inst = ops_call(self.wd, "ec2", "describe_instance_attribute", InstanceId=self.deploy["hosts"][data_host]["instance_id"],
                        Attribute="disableApiTermination")
        res.checks["data_host_protected_again"] = bool(inst.get("DisableApiTermination", {}).get("Value"))
        return self.finish(res, None)

    # ------------------------------------------------------------------ deploy
    def program_command(self, cmd: str, timeout: float = 1200) -> tuple[int, str]:
        """Run one of the program's command resources (pulumi-command's `create`) as `pulumi
        up` would on the operator's machine: from the checkout, with the operator's Python
        (this venv's) first on PATH, AWS's API at the stand-ins (the SSM agent stand-in runs
        what reaches the hosts)."""
        import os

        from ..awsd import ENDPOINT_URL
        from ..layout import NS_AWS

        env = {**os.environ, "PATH": f"{Path(_python()).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
               "AWS_ENDPOINT_URL": ENDPOINT_URL, "AWS_ACCESS_KEY_ID": "rehearsal",
               "AWS_SECRET_ACCESS_KEY": "rehearsal", "AWS_EC2_METADATA_DISABLED": "true"}
        cp = subprocess.run(["nsenter", f"--net=/run/netns/{NS_AWS}", "--", "sh", "-c", cmd], cwd=str(REPO),
                            env=env, capture_output=True, text=True, timeout=timeout)
        return cp.returncode, cp.stdout + cp.stderr

    @register("deploy")
    def drill_deploy(self) -> Result:
        """An app-template change applied as `pulumi up` applies it: the replacement-plan
        model (tools/replacement_plan.py: the program's resource graph + the replacement
        table) gives the steps; each drain, gate and put-back runs the program's own command
        text (tools/gate.py through SSM, the agent stand-in running it on the LBs and the
        new host), each instance step replaces the host."""
        res = Result("deploy")
        cp = subprocess.run([_python(), "tools/replacement_plan.py", "--stack", self.layout.stack, "--role", "app",
                             "--change", "template"], cwd=str(REPO), capture_output=True, text=True, timeout=600)
        if cp.returncode != 0:
            raise RuntimeError(f"tools/replacement_plan.py: {cp.stderr.strip()[-500:]}")
        plan = json.loads(cp.stdout)["app"]["template"]
        if plan.get("mechanism") != "pulumi up" or plan.get("action") != "replace":
            raise RuntimeError(f"an app-template change is not a replacement by `pulumi up` here: {plan}")
        steps = [name for wave in plan["steps"] for name in wave]
        if any(len(wave) != 1 for wave in plan["steps"]):
            res.notes.append(f"the plan has parallel waves: {plan['steps']}")
        res.checks["plan_one_step_at_a_time"] = all(len(wave) == 1 for wave in plan["steps"])
        prefix = f"{self.layout.stack}-"
        observed: list[str] = []
        out_of_service: dict[str, list[float]] = {}
        new_ids: dict[str, str] = {}
        with self.load("deploy") as (p, path):
            if not self.wait_healthy(path):
                res.notes.append("the portal was not healthy before the deploy")
            time.sleep(3)
            t0 = time.time()
            failed = ""
            for name in steps:
                m = re.fullmatch(rf"{re.escape(prefix)}(.+)-(lb-drain|instance|gate-ready|lb-ready)", name)
                if m is None:
                    raise RuntimeError(f"plan step {name!r}: not a drain, instance, gate or put-back of a host")
                host, kind = m.groups()
                say(f"    {name}")
                if kind == "instance":
                    new_ids[host] = self.replace_instance(host)
                    rc, out = 0, new_ids[host]
                else:
                    cmd = plan["commands"][name]
                    if kind == "gate-ready":  # the new instance's id, as the Output resolves it
                        cmd = re.sub(r"--instance-id \S+", f"--instance-id {new_ids[host]}", cmd)
                    if kind == "lb-ready" and host in out_of_service:
                        # Out of service until the put-back begins: it makes the host
                        # ready on one LB after the other, and from the first it serves
                        # (measured: every request counted against the drain in the
                        # first run was answered during the put-back).
                        out_of_service[host].append(time.time())
                    rc, out = self.program_command(cmd)
                    if kind == "lb-drain":
                        out_of_service[host] = [time.time()]
                observed.append(name)
                if rc != 0:
                    failed = f"{name}: exit {rc}: {out.strip()[-400:]}"
                    break
            res.fault_window = (t0, time.time())
            self.finish_load(p, path)
            self.tally(path, t0, res)
        res.checks["plan_completed"] = not failed and observed == steps
        if failed:
            res.notes.append(f"stopped at {failed}")
        if new_ids:
            res.fault_effect = f"replaced {', '.join(f'{h}={i}' for h, i in new_ids.items())}"
        # What reached the hosts, in order (the SSM agent stand-in's log): each host's
        # drain and put-back on every LB, one host after the other.
        from ..awsd import ssm_log

        ran = [e for e in ssm_log(self.wd) if e["t"] >= t0]
        res.notes.append(f"SSM commands run: {len(ran)} on {sorted({e['host'] for e in ran})}")
        # Never more than one host out of service, and none answered while it was out.
        spans = sorted((v[0], v[1] if len(v) > 1 else time.time(), h) for h, v in out_of_service.items())
        res.checks["one_host_out_at_a_time"] = all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))
        hist = history(path)
        served_while_out = [r for r in hist for s, e, h in spans if r[6] == h and s + 1.0 < r[0] and r[1] < e]
        res.checks["no_request_to_a_drained_host"] = not served_while_out
        if served_while_out:
            res.notes.append(f"{len(served_while_out)} requests answered by a host while it was out of service")
        self.verify(path, res)
        res.checks["no_failed_reads"] = res.failed_reads == 0
        return self.finish(res, None)
