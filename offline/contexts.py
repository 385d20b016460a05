"""Render contexts of every host of a stack, from the real config model and topology,
with fixed stand-ins for the values AWS assigns (the same ones the Pulumi mocks return).
Template tests render from these, so they check what the program would render.
"""

from __future__ import annotations

import functools
from typing import Any

from components.hostctx import Deployed, host_context
from components.stackfile import load_stack

# What the mocks answer for resources whose ids AWS picks (see offline/mocks.py).
FAKE_DEPLOYED = Deployed(
    efs_dns_name="fs-0123456789abcdef0.efs.ap-northeast-2.amazonaws.com",
    efs_access_points={"data": "fsap-0000000000000data", "dist": "fsap-0000000000000dist",
                       "slurm": "fsap-000000000000slurm"},
    eip_allocation_id="eipalloc-0123456789abcdef0",
    eip_public_ip="203.0.113.10",
    bundle_bucket="hpc-portal-bundles",
    backup_bucket="hpc-portal-backups",
)


_load = functools.cache(load_stack)


def contexts(stack: str) -> dict[str, dict[str, Any]]:
    cfg, topo = _load(stack)
    return {h.name: host_context(cfg, topo, h, FAKE_DEPLOYED) for h in topo.hosts}
