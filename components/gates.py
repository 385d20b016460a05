"""Readiness gates and the HAProxy drain around a web/app replacement.

Gate: after a host exists, `pulumi up` waits until its cloud-init finished and its role's
health check passes (tools/gate.py, through SSM send-command), with a timeout.

Drain: a web/app host that is about to be replaced (its user-data or instance type
changed) is first set to `drain` in HAProxy on every LB through the runtime API (the same
SSM path, `tools/gate.py --lb-state drain`), so new requests go to the others and the
ones in flight finish; after the new instance's gate passed it is set back to `ready` on
every LB. The next web/app host's drain waits for that, so at most one web/app host is
out of service at any time:

    drain(app-1) -> instance(app-1) -> gate(app-1) -> ready(app-1) -> drain(app-2) -> ...

Why a command resource and not a hook. Pulumi has no "before delete" step for a
delete-before-replace; the drain is a `command.local.Command` keyed (triggers) on the
host's user-data hash and instance type, and the instance depends on it, so a change that
replaces or restarts the instance re-creates the drain first, and Pulumi deletes the old
instance only after the drain command succeeded. It shows in the preview (the operator
sees which hosts will be drained), it is a node of the resource graph the offline tests
check, and it does not depend on the program's process staying alive to answer a
callback, as the resource hooks of the pinned pulumi SDK (3.272) do; a hook also would not
run for an in-place stop/start of an instance-type change, which takes a host out of
service too.

Failed `up`. The put-back command is keyed on the new instance's id and on the drain
command's id: every new drain is followed by a put-back, so the next `pulumi up` that gets
past the host's gate puts it back, whatever stopped the previous one (a failed gate, a
cancelled run, a template change reverted after the drain). Without waiting for an `up`:
`tools/rolling.py --stack <s> --put-back <host>`.

On by default for the `ha` profile (config `gates: {enabled: false}` switches them off,
e.g. when the operator's machine cannot reach SSM; tests refuse that for prod-like stacks).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

import pulumi
import pulumi_command as command

from .config import StackConfig
from .topology import Host

# Relative to the project directory, where `pulumi up` runs local commands, so the
# command text is the same on every operator's machine.
GATE_SCRIPT = "tools/gate.py"


def gate_command(cfg: StackConfig, host: Host, instance_id: str) -> str:
    return shlex.join([
        "python3", GATE_SCRIPT, "--region", cfg.region, "--host", host.name,
        "--instance-id", instance_id, "--roles", ",".join(host.roles),
        "--timeout", str(cfg.gates.timeout_s),
    ])


def haproxy_servers(cfg: StackConfig, host: Host) -> list[str]:
    """The `<backend>/<server>` names of a web/app host in every LB's HAProxy
    (cloud_init/templates/lb/haproxy.cfg): one per service port for app, be_web for web."""
    servers: list[str] = []
    if "app" in host.roles:
        servers += [f"be_{s.name}/{host.name}-{port}" for s in cfg.services for port in s.ports]
    if "web" in host.roles:
        servers.append(f"be_web/{host.name}")
    return servers


def tunnel_backends(cfg: StackConfig) -> list[str]:
    """The LBs' backends whose sessions are websockets (be_<service> of every websocket
    service): a drain closes them instead of waiting (tools/gate.py)."""
    return [f"be_{s.name}" for s in cfg.services if s.websocket]


def lb_state_command(cfg: StackConfig, host: Host, state: str, lb_hosts: list[str]) -> str:
    """Set the host's servers to `state` (drain | ready) on every LB, through SSM. The LBs
    are named by host, their instances looked up when it runs: the text stays the same
    when an LB is replaced, so that never re-runs a drain (pulumi-command runs `create`
    again on an update whose command text changed)."""
    return shlex.join([
        "python3", GATE_SCRIPT, "--region", cfg.region, "--host", host.name,
        "--lb-state", state, "--stack", cfg.stack, "--lb-hosts", ",".join(lb_hosts),
        "--servers", ",".join(haproxy_servers(cfg, host)),
        "--timeout", str(cfg.gates.timeout_s),
    ])


@dataclass
class ReadinessGateArgs:
    cfg: StackConfig
    host: Host
    instance_id: pulumi.Output[str]
    user_data_sha: pulumi.Output[str]  # sha256 of the host's user-data: a change re-runs the gate
    instance_type: str = ""  # a change stops and starts the host: the gate runs again


class ReadinessGate(pulumi.ComponentResource):
    def __init__(self, name: str, args: ReadinessGateArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("hpc:gates:ReadinessGate", name, None, opts)
        cfg, host, instance_id = args.cfg, args.host, args.instance_id
        self.command = command.local.Command(
            f"{name}-ready",
            create=instance_id.apply(lambda i: gate_command(cfg, host, i)),
            # re-run when the instance is replaced, restarted for a new type, or its user-data changes
            triggers=[instance_id, args.user_data_sha, args.instance_type],
            opts=pulumi.ResourceOptions(parent=self),
        )
        self.register_outputs({"stdout": self.command.stdout})


DRAIN_UPDATE = "echo 'drain command changed, host not replaced: nothing drained'"


@dataclass
class LbDrainArgs:
    cfg: StackConfig
    host: Host
    lb_hosts: list[str]
    user_data_sha: pulumi.Output[str]
    after: list[pulumi.Resource] = field(default_factory=list)  # the previous host's put-back, the LBs' gates


class LbDrain(pulumi.ComponentResource):
    """`drain` before the host's instance is replaced; `put_back` after its gate."""

    def __init__(self, name: str, args: LbDrainArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("hpc:gates:LbDrain", name, None, opts)
        self.args, self.name = args, name
        self.drain = command.local.Command(
            f"{name}-drain",
            create=lb_state_command(args.cfg, args.host, "drain", args.lb_hosts),
            # An update (a changed command text: a new timeout, a new service) must not
            # drain the host with no replacement and no put-back after it: only a new
            # trigger (a replacement of this resource) runs the drain.
            update=DRAIN_UPDATE,
            # what replaces (user-data) or restarts (instance type) the instance re-runs it first
            triggers=[args.user_data_sha, args.host.instance_type],
            opts=pulumi.ResourceOptions(parent=self, depends_on=args.after),
        )
        self.ready: command.local.Command | None = None

    def put_back(self, instance_id: pulumi.Output[str], gate: pulumi.Resource) -> command.local.Command:
        args = self.args
        self.ready = command.local.Command(
            f"{self.name}-ready",
            # an update runs it again: putting a serving host back is harmless
            create=lb_state_command(args.cfg, args.host, "ready", args.lb_hosts),
            # every drain (a new drain id) and every new instance is followed by a put-back
            triggers=[instance_id, self.drain.id],
            opts=pulumi.ResourceOptions(parent=self, depends_on=[gate]),
        )
        self.register_outputs({"drain": self.drain.id, "ready": self.ready.id})
        return self.ready
