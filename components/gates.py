"""Readiness gates: after a host exists, `pulumi up` waits until its cloud-init finished
and its role's health check passes (tools/gate.py, through SSM send-command), with a
timeout. The next web/app host is only replaced after the previous one's gate passed.
Switch off with `gates: {enabled: false}` (the default for stacks without AWS access to
the instances, e.g. when the operator's machine cannot reach SSM).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

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


@dataclass
class ReadinessGateArgs:
    cfg: StackConfig
    host: Host
    instance_id: pulumi.Output[str]
    user_data_sha: pulumi.Output[str]  # sha256 of the host's user-data: a change re-runs the gate


class ReadinessGate(pulumi.ComponentResource):
    def __init__(self, name: str, args: ReadinessGateArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("hpc:gates:ReadinessGate", name, None, opts)
        cfg, host, instance_id = args.cfg, args.host, args.instance_id
        self.command = command.local.Command(
            f"{name}-ready",
            create=instance_id.apply(lambda i: gate_command(cfg, host, i)),
            # re-run when the instance is replaced or its user-data changes
            triggers=[instance_id, args.user_data_sha],
            opts=pulumi.ResourceOptions(parent=self),
        )
        self.register_outputs({"stdout": self.command.stdout})
