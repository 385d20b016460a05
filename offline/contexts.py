"""Render contexts of every host of a stack, from the real config model and topology,
with the values the Pulumi mocks assign to the resources hosts render (EFS, access
points, the VIP, the buckets), built by the same `Deployed.from_outputs` the program
uses. Template tests render from these, so they check what the program would render
(tests/test_program.py holds the two to the same bytes).
"""

from __future__ import annotations

import functools
from typing import Any

import pulumi

from components.hostctx import Deployed, host_context, stack_context
from components.stackfile import load_stack
from components.storage import EFS_ACCESS_POINTS
from components.topology import ROLE_PHASE
from offline.mocks import StrictMocks

_load = functools.cache(load_stack)


def _mocked(typ: str, name: str, **inputs: Any) -> tuple[str, dict[str, Any]]:
    """The id and outputs the offline mocks give a resource of this type and name."""
    rid, outputs = StrictMocks().new_resource(pulumi.runtime.MockResourceArgs(typ, name, inputs, custom=True))
    assert rid is not None, f"the mocks gave {typ} {name} no id"
    return rid, outputs


@functools.cache
def mocked_deployed(stack: str) -> Deployed:
    """What the mocks assign to the resources the program names for `stack`: its storage
    component `<stack>-storage` and its VIP `<stack>-vip` (from the LB phase on)."""
    cfg, _topo = _load(stack)
    storage = f"{stack}-storage"
    _, efs = _mocked("aws:efs/fileSystem:FileSystem", f"{storage}-efs")
    access_points = {n: _mocked("aws:efs/accessPoint:AccessPoint", f"{storage}-efs-ap-{n}")[0]
                     for n in EFS_ACCESS_POINTS}
    bundles = f"{storage}-bundles"
    backups = f"{storage}-backups"
    vip = None
    if cfg.phase >= ROLE_PHASE["lb"]:
        _, eip = _mocked("aws:ec2/eip:Eip", f"{stack}-vip", domain="vpc")
        vip = {"allocation_id": eip["allocationId"], "public_ip": eip["publicIp"]}
    return Deployed.from_outputs({
        "efs": {"dns_name": efs["dnsName"], "access_points": access_points},
        "vip": vip,
        "buckets": {"bundles": _mocked("aws:s3/bucket:Bucket", bundles, bucketPrefix=f"{bundles}-")[1]["bucket"],
                    "backups": _mocked("aws:s3/bucket:Bucket", backups, bucketPrefix=f"{backups}-")[1]["bucket"]},
    })


# For renders outside a stack's own contexts (e.g. the rehearsal's on-prem hosts).
FAKE_DEPLOYED = mocked_deployed("prod")


def contexts(stack: str) -> dict[str, dict[str, Any]]:
    """Every host's context, fresh on each call; the hosts of one call share the stack's
    values (components.hostctx.stack_context), so copy a context before changing it."""
    cfg, topo = _load(stack)
    dep = mocked_deployed(stack)
    shared = stack_context(cfg, topo, dep)
    return {h.name: host_context(cfg, topo, h, dep, shared) for h in topo.hosts}
