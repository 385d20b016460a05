"""Security groups built from the named port catalog and the committed matrix.

One group per role, plus `efs` (mount targets) and `endpoints` (VPC interface
endpoints). Each matrix cell becomes one ingress rule on the target group and one egress
rule on the source group, each naming the other group (never a CIDR). pulumi-aws removes
AWS's default allow-all egress when it creates a group; the matrix's egress rules are
all the egress there is.
"""

from __future__ import annotations

import pulumi
import pulumi_aws as aws

from .catalog import GROUPS, Rule, expand_matrix
from .config import StackConfig


class SecurityGroups(pulumi.ComponentResource):
    groups: dict[str, aws.ec2.SecurityGroup]
    rules: list[Rule]

    def __init__(self, name: str, cfg: StackConfig, vpc_id: pulumi.Input[str], tags: dict[str, str],
                 opts: pulumi.ResourceOptions | None = None):
        super().__init__("hpc:security:SecurityGroups", name, None, opts)
        self.groups = {}
        for g in GROUPS:
            self.groups[g] = aws.ec2.SecurityGroup(
                f"{name}-{g}",
                vpc_id=vpc_id,
                description=f"{cfg.project} {cfg.stack} {g}: rules from security_matrix.yaml",
                tags={**tags, "Name": f"{name}-{g}", "Role": g},
                opts=pulumi.ResourceOptions(parent=self),
            )
        self.rules = expand_matrix(cfg)
        for r in self.rules:
            sg = self.groups[r.group]
            ported = r.protocol in ("tcp", "udp")
            peer_group = self.groups[r.peer].id if r.peer in self.groups else None
            rule_cls = aws.vpc.SecurityGroupIngressRule if r.direction == "ingress" else aws.vpc.SecurityGroupEgressRule
            rule_cls(
                f"{name}-{r.key}",
                security_group_id=sg.id,
                ip_protocol=r.protocol,
                from_port=r.from_port if ported else None,
                to_port=r.to_port if ported else None,
                referenced_security_group_id=peer_group,
                cidr_ipv4=None if peer_group is not None else r.peer,
                description=f"{r.port_name} {'from' if r.direction == 'ingress' else 'to'} {r.peer}",
                tags={**tags, "Name": f"{name}-{r.key}"},
                opts=pulumi.ResourceOptions(parent=sg),
            )
        self.register_outputs({g: sg.id for g, sg in self.groups.items()})

    def for_roles(self, roles: tuple[str, ...]) -> list[pulumi.Output[str]]:
        return [self.groups[r].id for r in roles]
