"""Instance roles with least privilege, one per host group.

Every host: SSM core (Session Manager, send-command) plus reading only its stack's
parameters and its own bundle object. LB hosts may move only the stack's EIP onto their
own network interfaces. Data hosts also create the Galera bootstrap marker and write
their own backup object. No `*` in any action or resource of these policies, except the
EC2 Describe actions that AWS only grants on every resource.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pulumi
import pulumi_aws as aws

from .config import StackConfig

SSM_CORE = "arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore"


def policy_document(
    *,
    partition: str,
    region: str,
    account: str,
    ssm_path: str,
    roles: tuple[str, ...],
    eip_allocation_id: str | None = None,
    lb_eni_ids: list[str] | None = None,
    backup_bucket: str | None = None,
    backup_keys: list[str] | None = None,
) -> str:
    """The inline policy of one host group as JSON (pure, so tests can read it)."""
    param = f"arn:{partition}:ssm:{region}:{account}:parameter{ssm_path}"
    statements: list[dict[str, Any]] = [
        {
            "Sid": "ReadStackSecrets",
            "Effect": "Allow",
            # GetParametersByPath is authorised on the path itself.
            "Action": ["ssm:GetParametersByPath", "ssm:GetParameter", "ssm:GetParameters"],
            "Resource": [f"{param}/secrets"] + [f"{param}/secrets/{n}" for n in _secret_names()],
        },
    ]
    if "lb" in roles and eip_allocation_id and lb_eni_ids:
        statements += [
            {
                "Sid": "MoveTheStackEip",
                "Effect": "Allow",
                "Action": ["ec2:AssociateAddress"],
                "Resource": [f"arn:{partition}:ec2:{region}:{account}:elastic-ip/{eip_allocation_id}"]
                + sorted(f"arn:{partition}:ec2:{region}:{account}:network-interface/{e}" for e in lb_eni_ids),
            },
            {
                "Sid": "DescribeOnly",
                "Effect": "Allow",
                # Describe actions have no resource-level permissions in EC2.
                "Action": ["ec2:DescribeAddresses", "ec2:DescribeNetworkInterfaces"],
                "Resource": "*",
            },
        ]
    if "data" in roles:
        marker = f"{param}/galera/bootstrapped"
        statements.append({
            "Sid": "GaleraBootstrapMarker",
            "Effect": "Allow",
            "Action": ["ssm:PutParameter", "ssm:GetParameter"],
            "Resource": [marker],
        })
        if backup_bucket and backup_keys:
            statements += [
                {
                    "Sid": "WriteOwnBackups",
                    "Effect": "Allow",
                    "Action": ["s3:PutObject", "s3:GetObject", "s3:GetObjectVersion"],
                    "Resource": sorted(f"arn:{partition}:s3:::{backup_bucket}/{k}" for k in backup_keys),
                },
                {
                    "Sid": "ListBackups",
                    "Effect": "Allow",
                    "Action": ["s3:ListBucket", "s3:ListBucketVersions"],
                    "Resource": [f"arn:{partition}:s3:::{backup_bucket}"],
                },
            ]
    return json.dumps({"Version": "2012-10-17", "Statement": statements}, sort_keys=True)


def fence_policy_document(partition: str, region: str, account: str, instance_ids: list[str]) -> str:
    """What a Slurm controller that takes control needs to fence its peer
    (cloud_init/scripts/hpc-slurm-fence): stop exactly the controllers' instances, and
    find them (DescribeInstances has no resource-level permissions)."""
    return json.dumps({"Version": "2012-10-17", "Statement": [
        {
            "Sid": "FenceThePeerController",
            "Effect": "Allow",
            "Action": ["ec2:StopInstances"],
            "Resource": sorted(f"arn:{partition}:ec2:{region}:{account}:instance/{i}" for i in instance_ids),
        },
        {
            "Sid": "FindThePeerController",
            "Effect": "Allow",
            "Action": ["ec2:DescribeInstances"],
            "Resource": "*",
        },
    ]}, sort_keys=True)


def bundle_policy_document(partition: str, bundle_bucket: str, bundle_keys: list[str]) -> str:
    """Read access to exactly these hosts' bundle objects."""
    return json.dumps({"Version": "2012-10-17", "Statement": [{
        "Sid": "ReadOwnBundle",
        "Effect": "Allow",
        "Action": ["s3:GetObject"],
        "Resource": sorted(f"arn:{partition}:s3:::{bundle_bucket}/{k}" for k in bundle_keys),
    }]}, sort_keys=True)


# IAM limits: a managed policy holds 6,144 characters, and a role takes 10 managed
# policies by default. Bundle grants are split so each chunk stays under the limit even
# with the longest bucket name S3 allows (63 characters).
MANAGED_POLICY_LIMIT = 6144
MAX_BUNDLE_POLICIES = 9  # plus AmazonSSMManagedInstanceCore


def bundle_key_chunks(stack: str, host_names: list[str]) -> list[list[str]]:
    per_key = len('"arn:aws-us-gov:s3:::') + 63 + len(f"/{stack}/") + len('/bundle.tar.gz", ')
    overhead = 200
    chunks: list[list[str]] = [[]]
    size = overhead
    for h in host_names:
        cost = per_key + len(h)
        if chunks[-1] and size + cost > MANAGED_POLICY_LIMIT - 300:
            chunks.append([])
            size = overhead
        chunks[-1].append(h)
        size += cost
    return chunks


def _secret_names() -> list[str]:
    from .hostctx import SECRET_NAMES

    return sorted(SECRET_NAMES)


def _bundle_doc_for(keys: list[str]) -> Callable[[list[Any]], str]:
    return lambda v: bundle_policy_document(v[0], v[1], keys)


@dataclass
class HostRoleArgs:
    cfg: StackConfig
    roles: tuple[str, ...]  # every role of the group's hosts
    host_names: list[str]  # the group's hosts: their bundle and backup keys
    bundle_bucket: pulumi.Output[str]
    backup_bucket: pulumi.Output[str]
    partition: pulumi.Output[str]
    account: pulumi.Output[str]
    tags: dict[str, str]
    # LB groups only: the EIP they may move, and onto which interfaces
    eip_allocation_id: pulumi.Output[str] | None = None
    lb_eni_ids: list[pulumi.Output[str]] = field(default_factory=list)


class HostRole(pulumi.ComponentResource):
    """The instance role and profile shared by the hosts of one group."""

    def __init__(self, name: str, args: HostRoleArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("hpc:iam:HostRole", name, None, opts)
        cfg, roles, host_names, tags = args.cfg, args.roles, args.host_names, args.tags
        partition, account = args.partition, args.account
        bundle_bucket, backup_bucket = args.bundle_bucket, args.backup_bucket
        child = pulumi.ResourceOptions(parent=self)
        self.role = aws.iam.Role(
            f"{name}-role",
            assume_role_policy=json.dumps({
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole",
                               "Principal": {"Service": "ec2.amazonaws.com"}}],
            }),
            description=f"{cfg.project} {cfg.stack} {'+'.join(roles)} hosts",
            tags={**tags, "Role": "+".join(roles)},
            opts=child,
        )
        role_child = pulumi.ResourceOptions(parent=self.role)
        aws.iam.RolePolicyAttachment(f"{name}-ssm-core", role=self.role.name, policy_arn=SSM_CORE,
                                     opts=role_child)
        for i, chunk in enumerate(bundle_key_chunks(cfg.stack, host_names)):
            keys = [f"{cfg.stack}/{h}/bundle.tar.gz" for h in chunk]
            bundle_doc = pulumi.Output.all(partition, bundle_bucket).apply(_bundle_doc_for(keys))
            pol = aws.iam.Policy(f"{name}-bundles-{i}", policy=bundle_doc,
                                 description=f"{cfg.project} {cfg.stack}: read the bundles of {chunk[0]}..{chunk[-1]}",
                                 tags=tags, opts=child)
            aws.iam.RolePolicyAttachment(f"{name}-bundles-{i}", role=self.role.name, policy_arn=pol.arn,
                                         opts=role_child)
        backup_keys = [f"mariadb/{h}/latest.xbstream.gz" for h in host_names]
        eip = args.eip_allocation_id if args.eip_allocation_id is not None else pulumi.Output.from_input("")
        doc = pulumi.Output.all(partition, account, bundle_bucket, backup_bucket, eip,
                                pulumi.Output.all(*args.lb_eni_ids)).apply(
            lambda v: policy_document(
                partition=v[0], region=cfg.region, account=v[1], ssm_path=cfg.ssm_path,
                roles=roles,
                eip_allocation_id=v[4] or None, lb_eni_ids=list(v[5]),
                backup_bucket=v[3], backup_keys=backup_keys,
            ))
        self.policy = aws.iam.RolePolicy(f"{name}-policy", role=self.role.id, policy=doc, opts=role_child)
        self.profile = aws.iam.InstanceProfile(f"{name}-profile", role=self.role.name, tags=tags, opts=child)
        self._name, self._region = name, cfg.region
        self._partition, self._account = partition, account
        self.register_outputs({"role_arn": self.role.arn})

    def allow_fencing(self, instance_ids: list[pulumi.Output[str]]) -> aws.iam.RolePolicy:
        """Slurm controllers: may stop these instances (the controllers themselves), so the
        one that takes control can fence a paused or half-dead peer. A separate policy,
        registered once the instances exist (their profile is this role's)."""
        doc = pulumi.Output.all(self._partition, self._account, pulumi.Output.all(*instance_ids)).apply(
            lambda v: fence_policy_document(v[0], self._region, v[1], list(v[2])))
        return aws.iam.RolePolicy(f"{self._name}-fence", role=self.role.id, policy=doc,
                                  opts=pulumi.ResourceOptions(parent=self.role))
