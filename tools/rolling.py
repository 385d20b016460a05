#!/usr/bin/env python3
"""Roll a template, AMI or OS change through one role, one host at a time.

    .venv/bin/python tools/rolling.py --stack prod --role data [--ami] [--dry-run]
    .venv/bin/python tools/rolling.py --stack prod --role app  [--hosts app-2,app-3]
    .venv/bin/python tools/rolling.py --stack prod --put-back app-2

Each host is ONE gated replacement, in this order:
  web/app hosts: drain it in HAProxy on every LB (tools/gate.py --lb-state drain through
    SSM: no new requests, open ones finish), replace it (`pulumi up --target <urn>
    --target-dependents --replace <urn>`), wait for its readiness gate (cloud-init done,
    health checks pass), put it back into service on every LB.
  stateful hosts (lb, data, slurm, monitoring):
    data hosts only: `HPC_ROLL_HOST=<host> HPC_ROLL_STEP=unprotect pulumi up --target <urn>`
      lifts termination protection and changes nothing else (user-data and AMI stay
      ignored, so nothing is applied in place and nothing is replaced);
    `HPC_ROLL_HOST=<host> HPC_ROLL_STEP=replace pulumi up --target <urn> --target-dependents
      --replace <urn>`: the one replacement, with the new user-data (its data volume is
      re-attached: the attachment is a dependent);
    the gate (Galera Synced, Redis replicating, slurmctld answering, Prometheus ready);
    data hosts only: `pulumi up --target <urn>` without HPC_ROLL_HOST restores protection.
`--ami` adds HPC_ROLL_AMI=1 to the replacement: the host takes the AMI the stack now
resolves or pins (hosts otherwise ignore a new image). A host that fails a step stops the
roll: nothing else is touched. `--put-back <host>` sets a host left drained (a failed or
cancelled run) back to ready on every LB; the next `pulumi up` past its gate does too.

tools/replacement_table.yaml says which change needs this (replacement_plan.py prints the
steps per role and kind of change). For OS patches of stateful packages without
replacing the host, run `hpc-rolling-patch` on each host in the same order through SSM
(see README).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
if str(ROOT / "tools") not in sys.path:
    sys.path.insert(0, str(ROOT / "tools"))

import gate  # noqa: E402  tools/gate.py: the runtime-API script and its SSM path


@dataclass
class Step:
    kind: str  # pulumi | drain | ready | gate
    argv: list[str]  # drain/ready: [LB host, the runtime-API script it runs]
    env: dict[str, str] = field(default_factory=dict)
    host: str = ""
    via: list[str] = field(default_factory=list)  # drain/ready: tools/gate.py --lb-state for that LB, through SSM

    def show(self) -> str:
        env = " ".join(f"{k}={v}" for k, v in self.env.items())
        return (env + " " if env else "") + shlex.join(self.via or self.argv)


def urn(project: str, stack: str, host: str) -> str:
    return (f"urn:pulumi:{stack}::{project}::hpc:server:Server$aws:ec2/instance:Instance::"
            f"{stack}-{host}-instance")


def _resolve_later(name: str) -> str:
    """A host's instance id, looked up from the stack outputs when the step runs (a
    replacement gives the host a new one)."""
    return "@" + name


def plan(stack: str, role: str | None = None, only: list[str] | None = None, ami: bool = False,
         put_back: str | None = None) -> list[Step]:
    from components.gates import haproxy_servers, lb_state_command, tunnel_backends
    from components.server import STATEFUL_ROLES
    from components.stackfile import load_stack, project_name

    project = project_name()
    cfg, topo = load_stack(stack)
    lbs = [h.name for h in topo.hosts if "lb" in h.roles]
    by_name = {h.name: h for h in topo.hosts}

    def lb_steps(kind: str, h: Any) -> list[Step]:
        """One step per LB: the script HAProxy's admin socket takes there, run through
        SSM by tools/gate.py --lb-state (retries, an unknown server fails now)."""
        script = gate.haproxy_state_script(haproxy_servers(cfg, h), kind, tunnels=tunnel_backends(cfg))
        return [Step(kind, [lb, script], host=h.name,
                     via=shlex.split(lb_state_command(cfg, h, kind, [lb]))) for lb in lbs]

    if put_back is not None:
        if put_back not in by_name or any(r in STATEFUL_ROLES for r in by_name[put_back].roles) or not lbs:
            raise SystemExit(f"--put-back {put_back}: not a web/app host behind the LBs of stack {stack}")
        return lb_steps("ready", by_name[put_back])
    hosts = [h for h in topo.hosts if role in h.roles and (not only or h.name in only)]
    if not hosts:
        raise SystemExit(f"no {role} hosts in stack {stack}" + (f" among {only}" if only else ""))
    steps: list[Step] = []
    base = ["pulumi", "up", "--yes", "--stack", stack, "--skip-preview"]
    for h in hosts:
        target = urn(project, stack, h.name)
        replace = Step("pulumi", base + ["--target", target, "--target-dependents", "--replace", target],
                       {"HPC_ROLL_HOST": h.name, "HPC_ROLL_STEP": "replace", **({"HPC_ROLL_AMI": "1"} if ami else {})},
                       h.name)
        gate_step = Step("gate", ["python3", "tools/gate.py", "--region", cfg.region, "--host", h.name,
                             "--instance-id", _resolve_later(h.name), "--roles", ",".join(h.roles),
                             "--timeout", "1200"], host=h.name)
        if any(r in STATEFUL_ROLES for r in h.roles):
            protected = "data" in h.roles  # components/server.py: disable_api_termination
            if protected:
                steps.append(Step("pulumi", base + ["--target", target],
                                  {"HPC_ROLL_HOST": h.name, "HPC_ROLL_STEP": "unprotect"}, h.name))
            steps += [replace, gate_step]
            if protected:
                steps.append(Step("pulumi", base + ["--target", target], {}, h.name))
        else:
            steps += lb_steps("drain", h)
            steps += [replace, gate_step]
            steps += lb_steps("ready", h)
    return steps


def execute(steps: list[Step], run: Callable[[Step], int]) -> int:
    for i, step in enumerate(steps, 1):
        print(f"[{i}/{len(steps)}] {step.host}: {step.show()}", flush=True)
        rc = run(step)
        if rc != 0:
            print(f"stopped: step {i} for {step.host} failed (exit {rc}); later hosts untouched", file=sys.stderr)
            return rc
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--stack", required=True)
    ap.add_argument("--role")
    ap.add_argument("--hosts", help="comma-separated subset, in this order")
    ap.add_argument("--ami", action="store_true", help="the replaced hosts take the AMI the stack now resolves or pins")
    ap.add_argument("--put-back", metavar="HOST", help="only set this web/app host back to ready on every LB")
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    if bool(args.role) == bool(args.put_back):
        ap.error("give --role (a roll) or --put-back HOST")
    steps = plan(args.stack, args.role, args.hosts.split(",") if args.hosts else None, ami=args.ami,
                 put_back=args.put_back)
    if args.dry_run:
        return execute(steps, lambda s: 0)

    def instance_ids() -> dict[str, str]:
        out = subprocess.run(["pulumi", "stack", "output", "--stack", args.stack, "--json", "hosts"],
                             capture_output=True, text=True, check=True, cwd=ROOT).stdout
        return {n: h["instance_id"] for n, h in json.loads(out).items()}

    def run(step: Step) -> int:
        if step.kind == "pulumi":
            return subprocess.run(step.argv, env={**os.environ, **step.env}, cwd=ROOT).returncode
        # gate / drain / ready: tools/gate.py with the instance ids the stack has now
        ids = instance_ids()

        def resolved(arg: str) -> str:
            return ",".join(ids[p[1:]] if p.startswith("@") else p for p in arg.split(","))

        return subprocess.run([resolved(a) for a in (step.via or step.argv)], cwd=ROOT).returncode

    return execute(steps, run)


if __name__ == "__main__":
    sys.exit(main())
