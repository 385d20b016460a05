"""Build each host's plain render context for `cloud_init/` from the config model, the
topology and the few values only known once AWS created them (EFS name, EIP allocation,
bucket names: `Deployed`). Pure: no Pulumi here; `build_stack` resolves the Outputs into
a `Deployed` first, the offline render contexts take the mocks' values the same way.

The stack-wide values (every host, the endpoints, the services...) are built once per
stack (`stack_context`) and shared by every host's context, not copied into each: a
stack's contexts and renders grow linearly with its hosts (`render_hosts`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cloud_init.render import RenderedHost, render_host

from .config import StackConfig
from .topology import Host, Topology, slurmdbd_placement

# EFS directories, and which roles mount each (the NFS client mounts subdirectories;
# the access points are for clients that use amazon-efs-utils, which Ubuntu lacks).
EFS_MOUNTS = (
    ("data", "/data", ("app", "web")),
    ("dist", "/dist", ("app", "web")),
    ("slurm", "/slurm", ("slurm",)),
)

SECRET_NAMES = (
    "redis_password", "mariadb_root_password", "mariadb_app_password",
    "mariadb_slurm_password", "galera_sst_password", "clustercheck_password",
    "munge_key", "grafana_admin_password", "tls_pem", "slack_webhook_url",
)


@dataclass(frozen=True)
class Deployed:
    """Values AWS assigns at creation, resolved before rendering."""

    efs_dns_name: str
    efs_access_points: dict[str, str]
    eip_allocation_id: str
    eip_public_ip: str
    bundle_bucket: str
    backup_bucket: str

    @classmethod
    def from_outputs(cls, outputs: Mapping[str, Any]) -> Deployed:
        """The one way to build it: from the resolved values in the shape of the stack
        outputs (`efs`, `vip`, `buckets`; `vip` is None before the LB phase). The program
        passes its resources' values through here, the offline contexts the mocks'."""
        efs, vip, buckets = outputs["efs"], outputs["vip"], outputs["buckets"]
        return cls(
            efs_dns_name=efs["dns_name"],
            efs_access_points=dict(efs["access_points"]),
            eip_allocation_id=vip["allocation_id"] if vip else "",
            eip_public_ip=vip["public_ip"] if vip else "",
            bundle_bucket=buckets["bundles"],
            backup_bucket=buckets["backups"],
        )


# MariaDB connections (max_connections on every Galera node, 65-hpc-galera.cnf). Every
# app host reaches the one writer through its local DB writer, so the writer holds the
# connections of all app hosts at once; MariaDB's default of 151 is used up by one writer
# move with one connection per portal thread (measured: 135 after a freeze-galera drill,
# 3 app hosts x 16 threads x 12 processes). So each app host gets a share, announced in
# /etc/hpc/portal.env (DB_CONNECTIONS_PER_HOST) for the portal to size its pools by, and
# the nodes allow the sum plus a reserve for slurmdbd, clustercheck, the exporter, the
# backup and an operator (MariaDB keeps one more for SUPER, extra_max_connections).
DB_CONNECTIONS_PER_APP_HOST = 100
DB_CONNECTIONS_RESERVED = 50
# An idle connection costs a thread (~300 KiB of stack and buffers); past this the shares
# shrink instead, down to 2 for each of a host's 12 portal processes (6 ports x 2 gunicorn
# workers); an app tier wider than ~160 hosts wants a connection pooler, not more threads.
DB_MAX_CONNECTIONS_CAP = 4000
DB_CONNECTIONS_PER_APP_HOST_MIN = 24


def db_connection_budget(app_hosts: int) -> tuple[int, int]:
    """(max_connections, each app host's share) for a stack with `app_hosts` app hosts."""
    share = DB_CONNECTIONS_PER_APP_HOST
    if app_hosts and DB_CONNECTIONS_RESERVED + app_hosts * share > DB_MAX_CONNECTIONS_CAP:
        share = max(DB_CONNECTIONS_PER_APP_HOST_MIN, (DB_MAX_CONNECTIONS_CAP - DB_CONNECTIONS_RESERVED) // app_hosts)
    # Never below MariaDB's own default (a stack or phase without app hosts).
    return max(151, DB_CONNECTIONS_RESERVED + app_hosts * share), share


def _brief(h: Host) -> dict[str, Any]:
    return {"name": h.name, "ip": h.ip}


# The keys of a host's render context, in order. HOST_KEYS differ between hosts (of "lb",
# only the priority: its peers are the stack's); every other value is the stack's, the
# same object in every host's context (see stack_context).
CONTEXT_KEYS = (
    "project", "stack", "region", "profile", "domain", "ssm_path", "vpc_cidr", "host", "hosts", "role_hosts",
    "endpoints", "loghost", "efs", "vip", "services", "web", "app", "lb", "galera", "redis", "slurm",
    "monitoring", "backup", "bundle", "secrets", "aws_endpoint_url",
)
HOST_KEYS = frozenset({"host", "efs", "lb", "bundle"})


def stack_context(cfg: StackConfig, topo: Topology, dep: Deployed) -> dict[str, Any]:
    """The part of every host's render context that is the same for all hosts of the
    stack (every key but HOST_KEYS, and the LB peers), built once. `host_context(...,
    shared=)` puts these very objects into each host's context instead of a copy per
    host, so a stack's contexts cost time and memory linear in its hosts (the templates
    only read them)."""
    d = cfg.domain
    by_name = {h.name: h for h in topo.hosts}
    data_hosts = [by_name[n] for n in topo.role_hosts["data"]]
    lb_hosts = [by_name[n] for n in topo.role_hosts["lb"]]
    ctl_hosts = [by_name[n] for n in topo.role_hosts["slurm"]]
    dbd_active, dbd_standby = slurmdbd_placement(topo.role_hosts["slurm"])
    mon = by_name[topo.role_hosts["monitoring"][0]]
    redis_master = by_name[topo.primaries["redis_master"]]
    services = [
        {
            "name": s.name, "ports": list(s.ports), "route": {"path_beg": s.path_beg, "websocket": s.websocket},
            "health": s.health, "balance": s.balance, "sticky": s.sticky, "websocket": s.websocket, "db": s.db,
        }
        for s in cfg.services
    ]
    databases = sorted({s.db for s in cfg.services}) + ["slurm_acct_db"]
    max_connections, app_share = db_connection_budget(len(topo.role_hosts.get("app", ())))
    return {
        "project": cfg.project,
        "stack": cfg.stack,
        "region": cfg.region,
        "profile": cfg.profile,
        "domain": d,
        "ssm_path": cfg.ssm_path,
        "vpc_cidr": cfg.network.vpc_cidr,
        "hosts": [
            {"name": h.name, "fqdn": f"{h.name}.{d}", "ip": h.ip, "az": h.az, "network": h.network,
             "roles": list(h.roles), "ordinal": h.ordinal}
            for h in sorted(topo.hosts, key=lambda h: h.name)
        ],
        "role_hosts": {r: list(v) for r, v in topo.role_hosts.items()},
        "endpoints": dict(topo.endpoints),
        "loghost": {"name": f"loghost.{d}", "ip": mon.ip, "port": 514},
        "vip": {"allocation_id": dep.eip_allocation_id, "public_ip": dep.eip_public_ip},
        "services": services,
        "web": {"port": 8080, "dist_root": "/dist", "health": "/health"},
        "app": {"artifact": cfg.app_artifact, "portal_uid": cfg.portal_uid},
        "lb": {"peers": [_brief(h) for h in lb_hosts], "stats_port": 8404, "vrrp_router_id": 51},
        "galera": {
            "cluster_name": "hpc_cluster",
            "bootstrap_host": topo.primaries["galera_bootstrap"],
            "nodes": [_brief(h) for h in data_hosts],
            "writer_port": 3306,
            "clustercheck_port": 9200,
            "databases": databases,
            "max_connections": max_connections,
            "app_connections_per_host": app_share,
            "bootstrap_marker": f"{cfg.ssm_path}/galera/bootstrapped",
        },
        "redis": {
            "master_name": "mymaster",
            "quorum": 2 if len(data_hosts) >= 3 else 1,
            "initial_master": _brief(redis_master),
            "nodes": [_brief(h) for h in data_hosts],
            "port": 6379,
            "sentinel_port": 26379,
        },
        "slurm": {
            "cluster_name": cfg.slurm.cluster_name,
            "controllers": [_brief(h) for h in ctl_hosts],
            "slurmdbd_host": _brief(by_name[dbd_active]),
            "slurmdbd_standby": _brief(by_name[dbd_standby]) if dbd_standby else None,
            "state_dir": "/slurm/state",
            "nodes": [dict(n) for n in cfg.slurm.nodes],
            "partitions": [dict(p) for p in cfg.slurm.partitions],
            "srun_port_range": cfg.slurm.srun_port_range,
            "ctld_timeout": cfg.slurm.ctld_timeout,
            "settings": dict(cfg.slurm.settings),
        },
        "monitoring": {
            "host": _brief(mon),
            "slack_channel": cfg.slack_channel,
            "runbook_base": "https://github.com/hpc-center/hpc-portal-infra/blob/main/docs/runbooks",
            "expected_galera_size": len(data_hosts),
        },
        "backup": {"bucket": dep.backup_bucket, "retention_days": cfg.backup_retention_days},
        "secrets": {"path": f"{cfg.ssm_path}/secrets", "names": list(SECRET_NAMES)},
        # Never set by the program (a rehearsal host reads its endpoint from
        # /etc/hpc/aws-endpoint); the templates still test it, and a template test sets
        # it in the context to check the override.
        "aws_endpoint_url": None,
    }


def host_values(cfg: StackConfig, topo: Topology, host: Host, dep: Deployed,
                shared: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a host's render context that is its own (the HOST_KEYS)."""
    d = cfg.domain
    data_volume = None
    if host.data_gb:
        mount = "/var/lib/hpc-data"
        data_volume = {"device": "/dev/sdf", "mount": mount, "size_gb": host.data_gb}
    mounts = [
        {"name": n, "path": p, "ap": dep.efs_access_points.get(n, "")}
        for n, p, roles in EFS_MOUNTS
        if any(r in host.roles for r in roles)
    ]
    lb = shared["lb"]
    return {
        "host": {
            "name": host.name, "fqdn": f"{host.name}.{d}", "ip": host.ip, "az": host.az,
            "network": host.network, "roles": list(host.roles), "ordinal": host.ordinal,
            "arch": host.arch, "instance_type": host.instance_type, "data_volume": data_volume,
            "nic": "ens5",
        },
        "efs": {"dns_name": dep.efs_dns_name, "mounts": mounts},
        "lb": {
            "peers": lb["peers"],
            "priority": 101 if host.name == topo.primaries["active_lb"] else 100,
            "stats_port": lb["stats_port"],
            "vrrp_router_id": lb["vrrp_router_id"],
        },
        "bundle": {"bucket": dep.bundle_bucket, "key": f"{cfg.stack}/{host.name}/bundle.tar.gz"},
    }


def host_context(cfg: StackConfig, topo: Topology, host: Host, dep: Deployed,
                 shared: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Everything the templates of one host read. `shared` is the stack's
    `stack_context` (built here when not given): its objects are taken as they are, so
    the contexts of one stack share them and a caller must copy before changing one."""
    if shared is None:
        shared = stack_context(cfg, topo, dep)
    own = host_values(cfg, topo, host, dep, shared)
    return {k: own[k] if k in HOST_KEYS else shared[k] for k in CONTEXT_KEYS}


def render_hosts(cfg: StackConfig, topo: Topology, hosts: Iterable[Host], dep: Deployed) -> dict[str, RenderedHost]:
    """Every host's render, from one stack context. Memoized by the digest of the stack's
    part and the JSON of each host's own, so the key costs what the host's part does,
    not what every host's context holds."""
    shared = stack_context(cfg, topo, dep)
    digest = hashlib.sha256(json.dumps(shared, sort_keys=True).encode()).hexdigest()
    out: dict[str, RenderedHost] = {}
    for h in hosts:
        own = host_values(cfg, topo, h, dep, shared)
        ctx = {k: own[k] if k in HOST_KEYS else shared[k] for k in CONTEXT_KEYS}
        out[h.name] = render_host(ctx, key=f"{digest} {json.dumps(own, sort_keys=True)}")
    return out
