"""Build the whole portal from a validated config: the order of components and the stack
outputs (the contract for the next phase of the migration)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pulumi
import pulumi_aws as aws
import yaml

from cloud_init.render import RenderedHost, empty_bundle, render_host, render_summary

from .config import StackConfig
from .gates import ReadinessGate
from .hostctx import Deployed, host_context
from .hybrid import Hybrid
from .iam import HostRole
from .network import Endpoints, Network, NetworkArgs
from .secrets import Secrets
from .security import SecurityGroups
from .server import HostInterface, Server, ServerArgs, is_stateful
from .storage import Storage
from .topology import ROLE_PHASE, Topology

ENV_FILE = "/etc/hpc/portal.env"


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


def deploy(cfg: StackConfig, topo: Topology, config: pulumi.Config, roll_host: str | None = None) -> dict[str, Any]:
    """Register every resource of the stack and return the outputs to export."""
    tags = {"Project": cfg.project, "Stack": cfg.stack, "ManagedBy": "pulumi", **cfg.tags}
    hosts = [h for h in topo.hosts if h.phase <= cfg.phase]
    host_names = [h.name for h in hosts]
    identity = aws.get_caller_identity_output()
    partition = aws.get_partition_output()

    network = Network(cfg.stack, NetworkArgs(cfg, topo, tags))
    if cfg.hybrid is not None:
        Hybrid(f"{cfg.stack}-hybrid", cfg, network, tags)
    sgs = SecurityGroups(f"{cfg.stack}-sg", cfg, network.vpc.id, tags)
    Endpoints(f"{cfg.stack}-vpce", cfg, network, sgs.groups["endpoints"].id)
    storage = Storage(f"{cfg.stack}-storage", cfg,
                      {az: s.id for az, s in network.subnets["internal"].items()},
                      sgs.groups["efs"].id, tags)
    secrets = Secrets(f"{cfg.stack}-secrets", cfg, config, [f"portal.{cfg.domain}", f"*.{cfg.domain}"], tags)

    vip: aws.ec2.Eip | None = None
    if cfg.phase >= ROLE_PHASE["lb"]:
        # Allocated here, never associated here: keepalived's MASTER associates it at start
        # and at every promotion, so no `pulumi up` or refresh moves it back after a failover.
        vip = aws.ec2.Eip(f"{cfg.stack}-vip", domain="vpc", tags={**tags, "Name": f"{cfg.stack}-vip"},
                          opts=pulumi.ResourceOptions(protect=True))

    enis: dict[str, HostInterface] = {}
    for h in hosts:
        enis[h.name] = HostInterface(
            f"{cfg.stack}-{h.name}", h, network.subnets[h.network][h.az].id,
            [sgs.groups[r].id for r in h.roles], tags)

    # One render of every host, once AWS's values are known. Pure and cached per run.
    deployed = pulumi.Output.all(
        storage.efs.dns_name,
        storage.access_points["data"].id, storage.access_points["dist"].id, storage.access_points["slurm"].id,
        vip.allocation_id if vip else "", vip.public_ip if vip else "",
        storage.bundle_bucket.bucket, storage.backup_bucket.bucket,
    )

    def _render(v: list[Any]) -> dict[str, RenderedHost]:
        dep = Deployed(efs_dns_name=v[0], efs_access_points={"data": v[1], "dist": v[2], "slurm": v[3]},
                       eip_allocation_id=v[4], eip_public_ip=v[5], bundle_bucket=v[6], backup_bucket=v[7])
        return {h.name: render_host(host_context(cfg, topo, h, dep)) for h in hosts}

    rendered = deployed.apply(_render)

    groups: dict[str, list[str]] = {}
    for h in hosts:
        groups.setdefault(h.group, []).append(h.name)
    roles_by_group: dict[str, HostRole] = {}
    for gname, names in groups.items():
        group_roles = tuple(sorted({r for h in hosts if h.group == gname for r in h.roles}))
        roles_by_group[gname] = HostRole(
            f"{cfg.stack}-{gname}", cfg, group_roles, names,
            storage.bundle_bucket.bucket, storage.backup_bucket.bucket,
            vip.allocation_id if (vip and "lb" in group_roles) else None,
            [enis[n].eni.id for n in names] if "lb" in group_roles else [],
            partition.partition, identity.account_id, tags)

    servers: dict[str, Server] = {}
    gates: dict[str, ReadinessGate] = {}
    previous_in_group: dict[str, str] = {}
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
        after: list[pulumi.Resource] = []
        prev = previous_in_group.get(h.group)
        if prev is not None and not is_stateful(h):
            # web/app hosts are replaced one after the other: after the previous host's
            # readiness gate passed, or at least after it exists when gates are off
            after = [gates[prev].command] if prev in gates else [servers[prev].instance]
        servers[name] = Server(f"{cfg.stack}-{name}", ServerArgs(
            host=h,
            ami=cfg.amis[h.arch],
            eni_id=enis[name].eni.id,
            instance_profile=roles_by_group[h.group].profile.name,
            user_data_gz=rendered.apply(_user_data_of(name)),
            tags=tags,
            roll_host=roll_host,
            after=after,
        ))
        previous_in_group[h.group] = name
        if cfg.gates.enabled:
            gates[name] = ReadinessGate(
                f"{cfg.stack}-{name}-gate", cfg, h, servers[name].instance.id,
                rendered.apply(_user_data_sha_of(name)),
                opts=pulumi.ResourceOptions(parent=servers[name]))

    cutover: dict[str, Any] | None = None
    if cfg.cutover is not None and vip is not None:
        c = cfg.cutover
        value = vip.public_ip if c.target == "vip" else pulumi.Output.from_input(c.old_server_ip)
        aws.route53.Record(f"{cfg.stack}-cutover", zone_id=c.zone_id, name=c.record_name, type="A", ttl=c.ttl,
                           records=[value])
        cutover = {"name": c.record_name, "target": c.target, "ttl": c.ttl, "value": value}

    by_name = {h.name: h for h in hosts}
    outputs: dict[str, Any] = {
        "stack": cfg.stack,
        "profile": cfg.profile,
        "phase": cfg.phase,
        "region": cfg.region,
        "vip": {"public_ip": vip.public_ip, "allocation_id": vip.id} if vip else None,
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
    }
    return outputs


def _bundle_of(name: str) -> Callable[[dict[str, RenderedHost]], str]:
    return lambda r: _b64(r[name].bundle or _EMPTY_BUNDLE)


def _user_data_of(name: str) -> Callable[[dict[str, RenderedHost]], bytes]:
    return lambda r: r[name].user_data


def _user_data_sha_of(name: str) -> Callable[[dict[str, RenderedHost]], str]:
    import hashlib

    return lambda r: hashlib.sha256(r[name].user_data).hexdigest()


def _b64(b: bytes) -> str:
    import base64

    return base64.b64encode(b).decode()


_EMPTY_BUNDLE = empty_bundle()
