"""The HPC portal's HA layout on AWS: read and validate the stack config, build the
components in order, export the outputs that feed the next phase of the migration."""

import json
import os
import sys

import pulumi
from pulumi.runtime.config import CONFIG, get_config_env, is_config_secret

from components.config import load_config
from components.stack import build_stack
from components.topology import build_topology

# Web/app hosts are replaced one at a time: each host's drain waits for the previous
# host's put-back, which waits for its gate and instance, so N hosts make a dependency
# chain about 4 x N resources long. The SDK walks a new resource's dependencies
# recursively (pulumi/runtime/resource_cycle_breaker.py), one Python frame per link:
# at 400 hosts that passes Python's default limit of 1,000 and `up` dies with a
# RecursionError. The walk is plain Python (no C stack per frame on 3.11+).
sys.setrecursionlimit(max(sys.getrecursionlimit(), 20_000))

project = pulumi.get_project()
stack = pulumi.get_stack()
config = pulumi.Config(project)


def _project_config() -> tuple[dict, frozenset]:
    """Every key of the project's namespace (so a typo is reported, not ignored), and
    which of them hold secrets (their values are read only as Pulumi secrets)."""
    raw, secret = {}, set()
    for full_key, value in sorted({**get_config_env(), **CONFIG.get()}.items()):
        ns, _, key = full_key.partition(":")
        if ns != project:
            continue
        if is_config_secret(full_key):
            secret.add(key)
            continue
        try:
            raw[key] = json.loads(value)
        except (TypeError, ValueError):
            raw[key] = value
    return raw, frozenset(secret)


# Validate everything before a single resource is registered.
raw, configured_secrets = _project_config()
cfg = load_config(raw, stack=stack, project=project, region=pulumi.Config("aws").require("region"),
                  configured_secrets=configured_secrets)
topo = build_topology(cfg)

# HPC_ROLL_HOST names the one host that may take a change in this run (tools/rolling.py):
# HPC_ROLL_STEP=unprotect only lifts its termination protection, =replace (the default)
# lets it take its new user-data, and HPC_ROLL_AMI=1 the current AMI as well. Unset,
# stateful hosts keep what they run and no host takes a new image.
roll_host = os.environ.get("HPC_ROLL_HOST") or None
roll_step = os.environ.get("HPC_ROLL_STEP") or "replace"
if roll_step not in ("unprotect", "replace"):
    raise ValueError(f"HPC_ROLL_STEP={roll_step!r}: allowed are unprotect and replace")
roll_ami = os.environ.get("HPC_ROLL_AMI", "") not in ("", "0")
if roll_host is not None and roll_host not in {h.name for h in topo.hosts}:
    raise ValueError(f"HPC_ROLL_HOST={roll_host!r}: not a host of stack {stack}")
outputs = build_stack(cfg, topo, config, roll_host=roll_host, roll_step=roll_step, roll_ami=roll_ami)
for name, value in outputs.items():
    pulumi.export(name, value)
