"""EC2 hosts: a persistent network interface with the plan's fixed address, the
instance (Ubuntu 24.04: a verified pinned AMI, or Canonical's current one resolved at
preview; IMDSv2 only, encrypted gp3 root, automatic recovery) and, where the role keeps
state, a protected encrypted data volume.

How template changes reach hosts (Pulumi updates resources in parallel, so a change to
every Galera node's user-data must never stop them together):
- stateful roles (lb, data, slurm, monitoring) ignore user-data changes; the rolling
  command (`tools/rolling.py`) replaces them one host at a time: a first `pulumi up` with
  HPC_ROLL_HOST=<host> HPC_ROLL_STEP=unprotect only lifts that host's termination
  protection, a second with HPC_ROLL_STEP=replace and `--replace` is the one replacement
  (the new user-data, and with HPC_ROLL_AMI=1 the new image), then its gate, then
  protection comes back (a stop/start would not re-run cloud-init);
- web/app hosts are replaced on a user-data change (delete-before-replace, so the
  replacement takes over the same interface and address), one at a time, each drained on
  every LB before and put back after its readiness gate (components/gates.py);
- every host ignores a later change of the AMI (a pin edited, or Canonical publishing a
  new image): a new image reaches a host only through `tools/rolling.py --ami`.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

import pulumi
import pulumi_aws as aws

from .topology import Host

STATEFUL_ROLES = ("lb", "data", "slurm", "monitoring")
DATA_DEVICE = "/dev/sdf"


def is_stateful(host: Host) -> bool:
    return any(r in STATEFUL_ROLES for r in host.roles)


@dataclass
class HostInterfaceArgs:
    host: Host
    subnet_id: pulumi.Input[str]
    security_group_ids: list[pulumi.Output[str]]
    tags: dict[str, str]


class HostInterface(pulumi.ComponentResource):
    """The host's primary network interface: it keeps the fixed private address and the
    security groups when the instance is replaced."""

    def __init__(self, name: str, args: HostInterfaceArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("hpc:server:HostInterface", name, None, opts)
        host = args.host
        self.eni = aws.ec2.NetworkInterface(
            f"{name}-eni",
            subnet_id=args.subnet_id,
            private_ips=[host.ip],
            security_groups=args.security_group_ids,
            description=f"{host.name} primary interface ({'+'.join(host.roles)})",
            tags={**args.tags, "Name": host.name, "Role": "+".join(host.roles)},
            opts=pulumi.ResourceOptions(parent=self),
        )
        self.register_outputs({"id": self.eni.id})


@dataclass
class ServerArgs:
    host: Host
    ami: pulumi.Input[str]
    eni_id: pulumi.Input[str]
    instance_profile: pulumi.Input[str]
    user_data_gz: pulumi.Output[bytes]
    tags: dict[str, str]
    roll_host: str | None = None  # the one host allowed to take a change now
    roll_step: str = "replace"  # unprotect: only lift termination protection | replace
    roll_ami: bool = False  # the rolled host takes the current AMI too
    after: list[pulumi.Resource] | None = None  # replace only after these


class Server(pulumi.ComponentResource):
    instance: aws.ec2.Instance
    data_volume: aws.ebs.Volume | None

    def __init__(self, name: str, args: ServerArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("hpc:server:Server", name, None, opts)
        h = args.host
        stateful = is_stateful(h)
        tags = {**args.tags, "Name": h.name, "Role": "+".join(h.roles), "Phase": str(h.phase)}

        rolling = args.roll_host == h.name
        taking = rolling and args.roll_step == "replace"
        ignore = []
        if not (taking and args.roll_ami):
            ignore.append("ami")  # a new image only through `tools/rolling.py --ami`
        if stateful and not taking:
            ignore.append("user_data_base64")
        self.instance = aws.ec2.Instance(
            f"{name}-instance",
            ami=args.ami,
            instance_type=h.instance_type,
            primary_network_interface={"network_interface_id": args.eni_id},
            iam_instance_profile=args.instance_profile,
            metadata_options={
                "http_endpoint": "enabled",
                "http_tokens": "required",  # IMDSv2 only
                "http_put_response_hop_limit": 1,
                "instance_metadata_tags": "disabled",
            },
            root_block_device={
                "volume_type": "gp3",
                "volume_size": h.root_gb,
                "encrypted": True,
                "delete_on_termination": True,
                "tags": {**tags, "Name": f"{h.name}-root"},
            },
            maintenance_options={"auto_recovery": "default"},  # EC2 simplified automatic recovery
            # Termination protection would block the rolling replacement of a data host:
            # it is lifted only for the host named by HPC_ROLL_HOST (tools/rolling.py).
            disable_api_termination="data" in h.roles and not rolling,
            user_data_base64=args.user_data_gz.apply(lambda b: base64.b64encode(b).decode()),
            user_data_replace_on_change=not stateful,
            tags=tags,
            opts=pulumi.ResourceOptions(
                parent=self,
                delete_before_replace=True,  # the replacement takes over the same interface
                ignore_changes=ignore,
                depends_on=args.after or [],
            ),
        )

        self.data_volume = None
        if h.data_gb:
            self.data_volume = aws.ebs.Volume(
                f"{name}-data",
                availability_zone=h.az,
                size=h.data_gb,
                type="gp3",
                encrypted=True,
                tags={**tags, "Name": f"{h.name}-data", "Snapshot": "hpc-data", "Stack": args.tags.get("Stack", "")},
                opts=pulumi.ResourceOptions(parent=self, protect=True),
            )
            aws.ec2.VolumeAttachment(
                f"{name}-data-attach",
                device_name=DATA_DEVICE,
                volume_id=self.data_volume.id,
                instance_id=self.instance.id,
                stop_instance_before_detaching=True,
                opts=pulumi.ResourceOptions(parent=self.instance),
            )
        self.register_outputs({"instance_id": self.instance.id, "private_ip": h.ip})
