"""The whole stack from a validated config: which components, in which order, and the
stack outputs (the contract for the next phase of the migration). `__main__.py` calls
`build_stack` once; everything it registers hangs under one of the components.

  network, hybrid   the VPC, its zone and routes; the on-prem link when configured
  sg, vpce          security groups from the matrix; SSM/EC2/S3 endpoints
  storage, secrets  EFS, the bundle and backup buckets; generated and given secrets
  vip               the Elastic IP (from the LB phase on)
  amis              per architecture: the stack's pin, else Canonical's current Ubuntu 24.04
  per host          interface, bundle object, server, readiness gate; for web/app hosts
                    the HAProxy drain before and the put-back after (components/gates.py)
  per host group    instance role
  cutover           the public DNS record (phase 6)
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from typing import Any

import pulumi
import pulumi_aws as aws
import yaml

from cloud_init.render import RenderedHost, empty_bundle, render_summary

from .config import StackConfig
from .config_model import UBUNTU_AMI_PARAMETER, UBUNTU_ARCH
from .cutover import Cutover, CutoverArgs
from .gates import LbDrain, LbDrainArgs, ReadinessGate, ReadinessGateArgs
from .hostctx import Deployed, render_hosts
from .hybrid import Hybrid
from .iam import HostRole, HostRoleArgs
from .network import Endpoints, Network, NetworkArgs
from .secrets import Secrets, SecretsArgs
from .security import SecurityGroups
from .server import HostInterface, HostInterfaceArgs, Server, ServerArgs, is_stateful
from .storage import Storage, StorageArgs
from .topology import ROLE_PHASE, Host, Topology
from .vip import Vip, VipArgs

ENV_FILE = "/etc/hpc/portal.env"


def build_stack(cfg: StackConfig, topo: Topology, config: pulumi.Config,
                roll_host: str | None = None, roll_step: str = "replace",
                roll_ami: bool = False) -> dict[str, Any]:
    """Register every resource of the stack and return the outputs to export.
    `roll_host` is the one host that may take a change now (tools/rolling.py): in
    `roll_step` unprotect only its termination protection is lifted, in replace it takes
    its new user-data, and with `roll_ami` the current AMI."""
    tags = {"Project": cfg.project, "Stack": cfg.stack, "ManagedBy": "pulumi", **cfg.tags}
    hosts = [h for h in topo.hosts if h.phase <= cfg.phase]
    identity = aws.get_caller_identity_output()
    partition = aws.get_partition_output()

    network = Network(cfg.stack, NetworkArgs(cfg, topo, tags))
    if cfg.hybrid is not None:
        Hybrid(f"{cfg.stack}-hybrid", cfg, network, tags)
    sgs = SecurityGroups(f"{cfg.stack}-sg", cfg, network.vpc.id, tags)
    Endpoints(f"{cfg.stack}-vpce", cfg, network, sgs.groups["endpoints"].id)
    storage = Storage(f"{cfg.stack}-storage", StorageArgs(
        cfg, subnet_ids={az: s.id for az, s in network.subnets["internal"].items()},
        efs_sg=sgs.groups["efs"].id, tags=tags))
    secrets = Secrets(f"{cfg.stack}-secrets", SecretsArgs(
        cfg, config, tls_names=[f"portal.{cfg.domain}", f"*.{cfg.domain}"], tags=tags))
    vip = Vip(cfg.stack, VipArgs(tags)) if cfg.phase >= ROLE_PHASE["lb"] else None

    enis = {h.name: HostInterface(f"{cfg.stack}-{h.name}", HostInterfaceArgs(
        h, subnet_id=network.subnets[h.network][h.az].id,
        security_group_ids=[sgs.groups[r].id for r in h.roles], tags=tags)) for h in hosts}

    # One render of every host, once AWS's values are known. Pure and cached per run.
    rendered = _deployed(storage, vip).apply(
        lambda dep: render_hosts(cfg, topo, hosts, dep))

    amis = _amis(cfg, hosts)
    roles_by_group = _host_roles(cfg, hosts, storage, vip, enis, partition.partition, identity.account_id, tags)
    servers: dict[str, Server] = {}
    gates: dict[str, ReadinessGate] = {}
    # The resource after which the next web/app host of a group may be touched: its
    # put-back into HAProxy when gates are on, else its instance.
    previous_in_group: dict[str, pulumi.Resource] = {}
    lb_names = [h.name for h in hosts if "lb" in h.roles]
    for h in hosts:
        name = h.name
        aws.s3.BucketObjectv2(
            f"{cfg.stack}-{name}-bundle",
            bucket=storage.bundle_bucket.bucket,
            key=f"{cfg.stack}/{name}/bundle.tar.gz",
            content_base64=rendered.apply(_bundle_of(name)),
            content_type="application/gzip",
            server_side_encryption="aws:kms",
            opts=pulumi.ResourceOptions(parent=storage.bundle_bucket),
        )
        user_data_sha = rendered.apply(_user_data_sha_of(name))
        prev = previous_in_group.get(h.group)
        after: list[pulumi.Resource] = []
        drain: LbDrain | None = None
        if not is_stateful(h) and cfg.gates.enabled and lb_names:
            # Drained on every LB before it is touched, after the previous web/app host
            # is back in service and once the LBs themselves passed their gates.
            missing = [n for n in lb_names if n not in gates]
            if missing:
                raise ValueError(f"{name}: the LB hosts {missing} must come before web/app hosts in the topology")
            drain = LbDrain(f"{cfg.stack}-{name}-lb", LbDrainArgs(
                cfg, h, lb_hosts=lb_names,
                user_data_sha=user_data_sha,
                after=([prev] if prev is not None else []) + [gates[n].command for n in lb_names]))
            after = [drain.drain]
        elif prev is not None and not is_stateful(h):
            after = [prev]  # one after the other; without gates, after the previous host exists
        servers[name] = Server(f"{cfg.stack}-{name}", ServerArgs(
            host=h,
            ami=amis[h.arch],
            eni_id=enis[name].eni.id,
            instance_profile=roles_by_group[h.group].profile.name,
            user_data_gz=rendered.apply(_user_data_of(name)),
            tags=tags,
            roll_host=roll_host,
            roll_step=roll_step,
            roll_ami=roll_ami,
            after=after,
        ))
        if cfg.gates.enabled:
            gates[name] = ReadinessGate(f"{cfg.stack}-{name}-gate", ReadinessGateArgs(
                cfg, h, instance_id=servers[name].instance.id, user_data_sha=user_data_sha,
                instance_type=h.instance_type),
                opts=pulumi.ResourceOptions(parent=servers[name]))
        if not is_stateful(h):
            if drain is not None:
                previous_in_group[h.group] = drain.put_back(servers[name].instance.id, gates[name].command)
            elif name in gates:
                previous_in_group[h.group] = gates[name].command
            else:
                previous_in_group[h.group] = servers[name].instance

    # Two controllers: the one that takes control may stop the other (hpc-slurm-fence).
    controllers = [h for h in hosts if "slurm" in h.roles]
    if len(controllers) >= 2:
        roles_by_group[controllers[0].group].allow_fencing([servers[h.name].instance.id for h in controllers])

    cutover: dict[str, Any] | None = None
    if cfg.cutover is not None and vip is not None:
        record = Cutover(cfg.stack, CutoverArgs(cfg.cutover, vip.public_ip))
        c = cfg.cutover
        cutover = {"name": c.record_name, "target": c.target, "ttl": c.ttl, "value": record.value}

    host_names = [h.name for h in hosts]
    by_name = {h.name: h for h in hosts}
    return {
        "stack": cfg.stack,
        "profile": cfg.profile,
        "phase": cfg.phase,
        "region": cfg.region,
        "vip": {"public_ip": vip.public_ip, "allocation_id": vip.eip.id} if vip else None,
        "hosts": {
            n: {"roles": list(by_name[n].roles), "az": by_name[n].az, "network": by_name[n].network,
                "subnet_cidr": by_name[n].subnet, "private_ip": by_name[n].ip,
                "fqdn": f"{n}.{cfg.domain}", "instance_type": by_name[n].instance_type,
                "arch": by_name[n].arch, "instance_id": servers[n].instance.id,
                "network_interface_id": enis[n].eni.id}
            for n in host_names
        },
        "role_hosts": {r: [n for n in names if n in host_names] for r, names in topo.role_hosts.items()},
        "primaries": dict(topo.primaries),
        "network": {
            "vpc_id": network.vpc.id,
            "vpc_cidr": cfg.network.vpc_cidr,
            "subnets": {n: {az: s.id for az, s in subs.items()} for n, subs in network.subnets.items()},
            "subnet_cidrs": {n: dict(zip(cfg.network.azs, c, strict=True)) for n, c in cfg.network.subnets.items()},
            "private_route_tables": {az: rt.id for az, rt in network.private_route_tables.items()},
            "security_groups": {g: sg.id for g, sg in sgs.groups.items()},
            "zone_id": network.zone.zone_id,
            "domain": cfg.domain,
        },
        "efs": {"id": storage.efs.id, "dns_name": storage.efs.dns_name,
                "access_points": {n: ap.id for n, ap in storage.access_points.items()}},
        "buckets": {"bundles": storage.bundle_bucket.bucket, "backups": storage.backup_bucket.bucket},
        "secrets": {"path": secrets.path, "parameters": {k: p.name for k, p in secrets.parameters.items()}},
        "endpoints": {fqdn: ip for fqdn, ip in topo.endpoints.items()},
        "inventory": _inventory(cfg, topo, host_names),
        "env_files": rendered.apply(lambda r: {
            n: rh.file(ENV_FILE).content.decode() for n, rh in sorted(r.items())
            if any(f.path == ENV_FILE for f in rh.files)}),
        "rendered": rendered.apply(lambda r: {n: render_summary(rh) for n, rh in sorted(r.items())}),
        "cutover": cutover,
        "gates": sorted(gates),
        "amis": {a: amis[a] for a in sorted({h.arch for h in hosts})},
    }


def _amis(cfg: StackConfig, hosts: list[Host]) -> dict[str, pulumi.Input[str]]:
    """Per architecture the hosts use: the stack's verified pin, else the id Canonical's
    public SSM parameter names now (resolved at preview, shown by `make plan-diff`).
    Instances ignore a later change of it (components/server.py)."""
    amis: dict[str, pulumi.Input[str]] = {}
    for arch in sorted({h.arch for h in hosts}):
        if arch in cfg.amis:
            amis[arch] = cfg.amis[arch]
        else:
            amis[arch] = aws.ssm.get_parameter_output(
                name=UBUNTU_AMI_PARAMETER.format(arch=UBUNTU_ARCH[arch])).value
    return amis


def _deployed(storage: Storage, vip: Vip | None) -> pulumi.Output[Deployed]:
    """The values AWS assigns that hosts render, in the shape of the stack outputs."""
    return pulumi.Output.from_input({
        "efs": {"dns_name": storage.efs.dns_name,
                "access_points": {n: ap.id for n, ap in storage.access_points.items()}},
        "vip": {"allocation_id": vip.allocation_id, "public_ip": vip.public_ip} if vip else None,
        "buckets": {"bundles": storage.bundle_bucket.bucket, "backups": storage.backup_bucket.bucket},
    }).apply(Deployed.from_outputs)


def _host_roles(cfg: StackConfig, hosts: list[Host], storage: Storage, vip: Vip | None,
                enis: dict[str, HostInterface], partition: pulumi.Output[str], account: pulumi.Output[str],
                tags: dict[str, str]) -> dict[str, HostRole]:
    """One instance role per host group; an LB group's may move the VIP onto its interfaces."""
    groups: dict[str, list[str]] = {}
    for h in hosts:
        groups.setdefault(h.group, []).append(h.name)
    roles_by_group: dict[str, HostRole] = {}
    for gname, names in groups.items():
        group_roles = tuple(sorted({r for h in hosts if h.group == gname for r in h.roles}))
        lb = "lb" in group_roles
        roles_by_group[gname] = HostRole(f"{cfg.stack}-{gname}", HostRoleArgs(
            cfg, group_roles, names,
            bundle_bucket=storage.bundle_bucket.bucket, backup_bucket=storage.backup_bucket.bucket,
            partition=partition, account=account, tags=tags,
            eip_allocation_id=vip.allocation_id if (vip and lb) else None,
            lb_eni_ids=[enis[n].eni.id for n in names] if lb else []))
    return roles_by_group


def _inventory(cfg: StackConfig, topo: Topology, hosts: list[str]) -> str:
    """An Ansible-style YAML inventory: one group per role, host vars with the address."""
    children: dict[str, Any] = {}
    for role, names in topo.role_hosts.items():
        present = [n for n in names if n in hosts]
        if present:
            children[role] = {"hosts": {n: None for n in present}}
    hostvars = {
        h.name: {"ansible_host": h.ip, "private_ip": h.ip, "az": h.az, "roles": list(h.roles),
                 "fqdn": f"{h.name}.{cfg.domain}"}
        for h in topo.hosts if h.name in hosts
    }
    doc = {"all": {"hosts": hostvars, "children": children,
                   "vars": {"stack": cfg.stack, "ssm_path": cfg.ssm_path, "domain": cfg.domain}}}
    return yaml.safe_dump(doc, sort_keys=True)


def _bundle_of(name: str) -> Callable[[dict[str, RenderedHost]], str]:
    return lambda r: base64.b64encode(r[name].bundle or _EMPTY_BUNDLE).decode()


def _user_data_of(name: str) -> Callable[[dict[str, RenderedHost]], bytes]:
    return lambda r: r[name].user_data


def _user_data_sha_of(name: str) -> Callable[[dict[str, RenderedHost]], str]:
    return lambda r: hashlib.sha256(r[name].user_data).hexdigest()


_EMPTY_BUNDLE = empty_bundle()
