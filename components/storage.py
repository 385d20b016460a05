"""Shared and durable storage: EFS (one mount target per AZ, access points for /data,
/dist and /slurm, AWS Backup on), the private bucket for host-file bundles, the backup
bucket (versioned, encrypted, public access blocked, noncurrent versions expire after the
retention) and the EBS snapshot policy for data volumes. Everything stateful is
protected from accidental deletion.
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_aws as aws

from .config import StackConfig

EFS_ACCESS_POINTS = {
    # name -> (path on the share, owner uid/gid, mode). /slurm belongs to the slurm user
    # (uid 64030 on Ubuntu's slurm-wlm packages); /data and /dist to root, group-writable
    # by the deploy tooling.
    "data": ("/data", 0, 0, "0755"),
    "dist": ("/dist", 0, 0, "0755"),
    "slurm": ("/slurm", 64030, 64030, "0700"),
}
SNAPSHOT_TAG = {"Snapshot": "hpc-data"}


@dataclass
class StorageArgs:
    cfg: StackConfig
    subnet_ids: dict[str, pulumi.Input[str]]  # az -> subnet of the EFS mount target
    efs_sg: pulumi.Input[str]  # security group of the mount targets
    tags: dict[str, str]


class Storage(pulumi.ComponentResource):
    def __init__(self, name: str, args: StorageArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("hpc:storage:Storage", name, None, opts)
        cfg, tags = args.cfg, args.tags
        child = pulumi.ResourceOptions(parent=self)
        protected = pulumi.ResourceOptions(parent=self, protect=True)

        self.efs = aws.efs.FileSystem(
            f"{name}-efs",
            encrypted=True,
            performance_mode="generalPurpose",
            throughput_mode="elastic",
            lifecycle_policies=[{"transition_to_ia": "AFTER_30_DAYS"}],
            tags={**tags, "Name": f"{name}-efs"},
            opts=protected,
        )
        efs_child = pulumi.ResourceOptions(parent=self.efs)
        aws.efs.BackupPolicy(f"{name}-efs-backup", file_system_id=self.efs.id,
                             backup_policy={"status": "ENABLED"}, opts=efs_child)
        self.mount_targets = {
            az: aws.efs.MountTarget(f"{name}-efs-mt-{az[-1]}", file_system_id=self.efs.id, subnet_id=sid,
                                    security_groups=[args.efs_sg], opts=efs_child)
            for az, sid in args.subnet_ids.items()
        }
        self.access_points = {
            n: aws.efs.AccessPoint(
                f"{name}-efs-ap-{n}",
                file_system_id=self.efs.id,
                root_directory={"path": path, "creation_info": {"owner_uid": uid, "owner_gid": gid,
                                                                 "permissions": mode}},
                tags={**tags, "Name": f"{name}-efs-{n}"},
                opts=efs_child,
            )
            for n, (path, uid, gid, mode) in EFS_ACCESS_POINTS.items()
        }

        self.bundle_bucket = self._bucket(f"{name}-bundles", tags, versioned=True, retention_days=None,
                                          opts=child)
        self.backup_bucket = self._bucket(f"{name}-backups", tags, versioned=True,
                                          retention_days=cfg.backup_retention_days, opts=protected)

        dlm_role = aws.iam.Role(
            f"{name}-dlm-role",
            assume_role_policy=pulumi.Output.json_dumps({
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole",
                               "Principal": {"Service": "dlm.amazonaws.com"}}],
            }),
            tags=tags,
            opts=child,
        )
        aws.iam.RolePolicyAttachment(
            f"{name}-dlm-role-policy", role=dlm_role.name,
            policy_arn="arn:aws:iam::aws:policy/service-role/AWSDataLifecycleManagerServiceRole",
            opts=pulumi.ResourceOptions(parent=dlm_role),
        )
        self.snapshot_policy = aws.dlm.LifecyclePolicy(
            f"{name}-data-snapshots",
            description=f"{cfg.project} {cfg.stack}: daily snapshots of data volumes",
            execution_role_arn=dlm_role.arn,
            state="ENABLED",
            policy_details={
                "resource_types": ["VOLUME"],
                "target_tags": {**SNAPSHOT_TAG, "Stack": cfg.stack},
                "schedules": [{
                    "name": "daily",
                    "create_rule": {"interval": 24, "interval_unit": "HOURS", "times": "18:00"},
                    "retain_rule": {"count": cfg.backup_retention_days},
                    "copy_tags": True,
                }],
            },
            tags=tags,
            opts=child,
        )
        self.register_outputs({"efs_id": self.efs.id, "efs_dns_name": self.efs.dns_name})

    @staticmethod
    def _bucket(name: str, tags: dict[str, str], versioned: bool, retention_days: int | None,
                opts: pulumi.ResourceOptions) -> aws.s3.Bucket:
        bucket = aws.s3.Bucket(name, bucket_prefix=f"{name}-", force_destroy=False,
                               tags={**tags, "Name": name}, opts=opts)
        child = pulumi.ResourceOptions(parent=bucket)
        aws.s3.BucketPublicAccessBlock(f"{name}-public-access", bucket=bucket.id, block_public_acls=True,
                                       block_public_policy=True, ignore_public_acls=True,
                                       restrict_public_buckets=True, opts=child)
        aws.s3.BucketOwnershipControls(f"{name}-ownership", bucket=bucket.id,
                                       rule={"object_ownership": "BucketOwnerEnforced"}, opts=child)
        aws.s3.BucketServerSideEncryptionConfiguration(
            f"{name}-sse", bucket=bucket.id,
            rules=[{"apply_server_side_encryption_by_default": {"sse_algorithm": "aws:kms"},
                    "bucket_key_enabled": True}],
            opts=child,
        )
        if versioned:
            aws.s3.BucketVersioning(f"{name}-versioning", bucket=bucket.id,
                                    versioning_configuration={"status": "Enabled"}, opts=child)
        if retention_days:
            # Backups are written to one fixed key per host (so hosts need no wildcard
            # permission); older backups live on as noncurrent versions until this expires them.
            aws.s3.BucketLifecycleConfiguration(
                f"{name}-lifecycle", bucket=bucket.id,
                rules=[{"id": "retention", "status": "Enabled", "filter": {"prefix": ""},
                        "noncurrent_version_expiration": {"noncurrent_days": retention_days},
                        "abort_incomplete_multipart_upload": {"days_after_initiation": 2}}],
                opts=child,
            )
        return bucket
