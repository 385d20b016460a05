"""The DNS cutover: the public record of the portal, pointed at the VIP (`target: vip`)
or back at the old server (`target: old`), in a zone this stack does not own. Built only
when the stack sets `cutover` (phase 6) and the VIP exists.
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_aws as aws

from .config_model import CutoverConfig


@dataclass
class CutoverArgs:
    cutover: CutoverConfig
    vip_public_ip: pulumi.Output[str]


class Cutover(pulumi.ComponentResource):
    value: pulumi.Output[str]  # the address the record points at

    def __init__(self, name: str, args: CutoverArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("hpc:cutover:Cutover", name, None, opts)
        c = args.cutover
        self.value = args.vip_public_ip if c.target == "vip" else pulumi.Output.from_input(c.old_server_ip)
        self.record = aws.route53.Record(
            f"{name}-cutover",
            zone_id=c.zone_id,
            name=c.record_name,
            type="A",
            ttl=c.ttl,
            records=[self.value],
            opts=pulumi.ResourceOptions(
                parent=self,
                # Created at the stack's top level before this component existed: the
                # alias keeps its URN, so existing stacks do not recreate the record.
                aliases=[pulumi.Alias(parent=pulumi.ROOT_STACK_RESOURCE)],
            ),
        )
        self.register_outputs({"name": c.record_name, "value": self.value})
