"""The portal's public address: one Elastic IP, allocated here and never associated here.
keepalived's MASTER associates it at start and at every promotion, so no `pulumi up` or
refresh moves it back after a failover. Protected: a replacement would change the
address the DNS record and every client point at.
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_aws as aws


@dataclass
class VipArgs:
    tags: dict[str, str]


class Vip(pulumi.ComponentResource):
    eip: aws.ec2.Eip

    def __init__(self, name: str, args: VipArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("hpc:vip:Vip", name, None, opts)
        self.eip = aws.ec2.Eip(
            f"{name}-vip",
            domain="vpc",
            tags={**args.tags, "Name": f"{name}-vip"},
            opts=pulumi.ResourceOptions(
                parent=self,
                protect=True,
                # Created at the stack's top level before this component existed: the
                # alias keeps its URN, so existing stacks keep the address (no replace).
                aliases=[pulumi.Alias(parent=pulumi.ROOT_STACK_RESOURCE)],
            ),
        )
        self.allocation_id: pulumi.Output[str] = self.eip.allocation_id
        self.public_ip: pulumi.Output[str] = self.eip.public_ip
        self.register_outputs({"allocation_id": self.allocation_id, "public_ip": self.public_ip})
