"""The shared render context: every host's user-data, bundle and files are byte for byte
what the earlier per-host contexts (each embedding every host of the stack) rendered,
for every committed stack and for bigger ones; the stack's values are one set of
objects shared by all hosts; the render memo's keys tell different contexts apart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cloud_init.render import load_manifests, render_host
from components.config import StackConfig
from components.hostctx import (
    EFS_MOUNTS,
    SECRET_NAMES,
    Deployed,
    db_connection_budget,
    host_context,
    render_hosts,
    stack_context,
)
from components.stackfile import load_stack
from components.topology import Host, Topology
from offline.contexts import contexts, mocked_deployed

ROOT = Path(__file__).resolve().parent.parent
STACKS = sorted(p.name.split(".")[1] for p in ROOT.glob("Pulumi.*.yaml"))
# Committed stacks as they are, and grown ones (their loops over hosts at a larger n).
CASES = [(s, None) for s in STACKS] + [
    ("prod", {"roles": {"app": {"count": 30}}}),
    ("dev", {"roles": {"app": {"count": 7}}}),
]


def old_host_context(cfg: StackConfig, topo: Topology, host: Host, dep: Deployed) -> dict[str, Any]:
    """The context as it was built before the stack's part was shared: every value,
    every host's entry included, built anew for each host. Kept here only as the
    reference the shared contexts must render identically to."""
    d = cfg.domain
    by_name = {h.name: h for h in topo.hosts}
    data_hosts = [by_name[n] for n in topo.role_hosts["data"]]
    lb_hosts = [by_name[n] for n in topo.role_hosts["lb"]]
    ctl_hosts = [by_name[n] for n in topo.role_hosts["slurm"]]
    mon = by_name[topo.role_hosts["monitoring"][0]]
    redis_master = by_name[topo.primaries["redis_master"]]
    brief = lambda h: {"name": h.name, "ip": h.ip}  # noqa: E731
    mounts = [{"name": n, "path": p, "ap": dep.efs_access_points.get(n, "")}
              for n, p, roles in EFS_MOUNTS if any(r in host.roles for r in roles)]
    data_volume = None
    if host.data_gb:
        data_volume = {"device": "/dev/sdf", "mount": "/var/lib/hpc-data", "size_gb": host.data_gb}
    services = [{"name": s.name, "ports": list(s.ports), "route": {"path_beg": s.path_beg, "websocket": s.websocket},
                 "health": s.health, "balance": s.balance, "sticky": s.sticky, "websocket": s.websocket, "db": s.db}
                for s in cfg.services]
    return {
        "project": cfg.project, "stack": cfg.stack, "region": cfg.region, "profile": cfg.profile, "domain": d,
        "ssm_path": cfg.ssm_path, "vpc_cidr": cfg.network.vpc_cidr,
        "host": {"name": host.name, "fqdn": f"{host.name}.{d}", "ip": host.ip, "az": host.az,
                 "network": host.network, "roles": list(host.roles), "ordinal": host.ordinal, "arch": host.arch,
                 "instance_type": host.instance_type, "data_volume": data_volume, "nic": "ens5"},
        "hosts": [{"name": h.name, "fqdn": f"{h.name}.{d}", "ip": h.ip, "az": h.az, "network": h.network,
                   "roles": list(h.roles), "ordinal": h.ordinal} for h in sorted(topo.hosts, key=lambda h: h.name)],
        "role_hosts": {r: list(v) for r, v in topo.role_hosts.items()},
        "endpoints": dict(topo.endpoints),
        "loghost": {"name": f"loghost.{d}", "ip": mon.ip, "port": 514},
        "efs": {"dns_name": dep.efs_dns_name, "mounts": mounts},
        "vip": {"allocation_id": dep.eip_allocation_id, "public_ip": dep.eip_public_ip},
        "services": services,
        "web": {"port": 8080, "dist_root": "/dist", "health": "/health"},
        "app": {"artifact": cfg.app_artifact, "portal_uid": cfg.portal_uid},
        "lb": {"peers": [brief(h) for h in lb_hosts],
               "priority": 101 if host.name == topo.primaries["active_lb"] else 100,
               "stats_port": 8404, "vrrp_router_id": 51},
        "galera": {"cluster_name": "hpc_cluster", "bootstrap_host": topo.primaries["galera_bootstrap"],
                   "nodes": [brief(h) for h in data_hosts], "writer_port": 3306, "clustercheck_port": 9200,
                   "databases": sorted({s.db for s in cfg.services}) + ["slurm_acct_db"],
                   "bootstrap_marker": f"{cfg.ssm_path}/galera/bootstrapped",
                   **dict(zip(("max_connections", "app_connections_per_host"),
                              db_connection_budget(len(topo.role_hosts["app"])), strict=True))},
        "redis": {"master_name": "mymaster", "quorum": 2 if len(data_hosts) >= 3 else 1,
                  "initial_master": brief(redis_master), "nodes": [brief(h) for h in data_hosts],
                  "port": 6379, "sentinel_port": 26379},
        "slurm": {"cluster_name": cfg.slurm.cluster_name, "controllers": [brief(h) for h in ctl_hosts],
                  "slurmdbd_host": brief(ctl_hosts[-1]),
                  "slurmdbd_standby": brief(ctl_hosts[0]) if len(ctl_hosts) > 1 else None, "state_dir": "/slurm/state",
                  "nodes": [dict(n) for n in cfg.slurm.nodes], "partitions": [dict(p) for p in cfg.slurm.partitions],
                  "srun_port_range": cfg.slurm.srun_port_range, "ctld_timeout": cfg.slurm.ctld_timeout,
                  "settings": dict(cfg.slurm.settings)},
        "monitoring": {"host": brief(mon), "slack_channel": cfg.slack_channel,
                       "runbook_base": "https://github.com/hpc-center/hpc-portal-infra/blob/main/docs/runbooks",
                       "expected_galera_size": len(data_hosts)},
        "backup": {"bucket": dep.backup_bucket, "retention_days": cfg.backup_retention_days},
        "bundle": {"bucket": dep.bundle_bucket, "key": f"{cfg.stack}/{host.name}/bundle.tar.gz"},
        "secrets": {"path": f"{cfg.ssm_path}/secrets", "names": list(SECRET_NAMES)},
        "aws_endpoint_url": None,
    }


def test_the_cases_cover_every_committed_stack() -> None:
    assert {"prod", "dev"} <= set(STACKS), STACKS


@pytest.mark.parametrize(("stack", "overlay"), CASES, ids=[f"{s}-{'grown' if o else 'as-committed'}" for s, o in CASES])
def test_shared_contexts_render_every_host_byte_for_byte_as_the_per_host_ones(stack: str, overlay: Any) -> None:
    cfg, topo = load_stack(stack, overlay)
    dep = mocked_deployed(stack)
    new = render_hosts(cfg, topo, topo.hosts, dep)
    assert sorted(new) == sorted(h.name for h in topo.hosts)
    manifests = load_manifests()
    for h in topo.hosts:
        old_ctx = old_host_context(cfg, topo, h, dep)
        assert host_context(cfg, topo, h, dep) == old_ctx, h.name
        # manifests= renders without the memo: the reference is rendered anew
        old = render_host(old_ctx, manifests=manifests)
        got = new[h.name]
        assert got.user_data == old.user_data, f"{stack}/{h.name}: user-data differs"
        assert got.bundle == old.bundle, f"{stack}/{h.name}: bundle differs"
        assert got.bundle_files == old.bundle_files
        assert [(f.path, f.content, f.mode, f.owner) for f in got.files] == \
            [(f.path, f.content, f.mode, f.owner) for f in old.files], f"{stack}/{h.name}: files differ"
        assert (got.packages, got.commands) == (old.packages, old.commands)


def test_the_hosts_of_a_stack_share_one_set_of_stack_values() -> None:
    ctxs = list(contexts("prod").values())
    first, others = ctxs[0], ctxs[1:]
    assert others
    for key in ("hosts", "endpoints", "role_hosts", "services", "galera", "slurm"):
        assert all(c[key] is first[key] for c in others), key
    assert all(c["lb"]["peers"] is first["lb"]["peers"] for c in others)
    # ... and each host still has its own
    assert len({id(c["host"]) for c in ctxs}) == len(ctxs)
    assert len({c["bundle"]["key"] for c in ctxs}) == len(ctxs)


def test_a_context_built_alone_equals_one_built_from_the_stack_context() -> None:
    cfg, topo = load_stack("dev")
    dep = mocked_deployed("dev")
    shared = stack_context(cfg, topo, dep)
    for h in topo.hosts:
        assert host_context(cfg, topo, h, dep) == host_context(cfg, topo, h, dep, shared)


def test_the_render_memo_tells_different_stack_values_apart() -> None:
    # The backup bucket is a stack value (not in any host's own part of the key).
    cfg, topo = load_stack("dev")
    dep = mocked_deployed("dev")
    other = Deployed(**{**dep.__dict__, "backup_bucket": dep.backup_bucket + "-other"})
    a = render_hosts(cfg, topo, topo.hosts, dep)
    b = render_hosts(cfg, topo, topo.hosts, other)
    using = [n for n, r in a.items() if any(dep.backup_bucket.encode() in f.content for f in r.files)]
    assert using
    for n in using:
        assert a[n].user_data != b[n].user_data or a[n].bundle != b[n].bundle, \
            f"{n}: the memo returned the render of another backup bucket"
        assert any((dep.backup_bucket + "-other").encode() in f.content for f in b[n].files)
