"""Render contexts of every host of a stack, from the real config model and topology,
with fixed stand-ins for the values AWS assigns (the same ones the Pulumi mocks return).
Template tests render from these, so they check what the program would render.
"""

from __future__ import annotations

import functools
from typing import Any

from components.config import load_config
from components.hostctx import Deployed, host_context
from components.stackfile import namespace, project_name, read_stack
from components.topology import build_topology

# What the mocks answer for resources whose ids AWS picks (see tests/mocks.py).
FAKE_DEPLOYED = Deployed(
    efs_dns_name="fs-0123456789abcdef0.efs.ap-northeast-2.amazonaws.com",
    efs_access_points={"data": "fsap-0000000000000data", "dist": "fsap-0000000000000dist",
                       "slurm": "fsap-000000000000slurm"},
    eip_allocation_id="eipalloc-0123456789abcdef0",
    eip_public_ip="203.0.113.10",
    bundle_bucket="hpc-portal-bundles",
    backup_bucket="hpc-portal-backups",
)


@functools.cache
def _load(stack: str):  # type: ignore[no-untyped-def]
    config, _secrets = read_stack(stack)
    ns = namespace(config, project_name())
    cfg = load_config(ns, stack=stack, project=project_name(), region=config.get("aws:region", "ap-northeast-2"),
                      configured_secrets=frozenset({"tls_cert", "tls_key"}))
    return cfg, build_topology(cfg)


def contexts(stack: str) -> dict[str, dict[str, Any]]:
    cfg, topo = _load(stack)
    return {h.name: host_context(cfg, topo, h, FAKE_DEPLOYED) for h in topo.hosts}
