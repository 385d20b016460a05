#!/usr/bin/env python3
"""Roll a template, AMI or OS change through one role, one host at a time.

    .venv/bin/python tools/rolling.py --stack prod --role data [--dry-run]
    .venv/bin/python tools/rolling.py --stack prod --role app  [--hosts app-2,app-3]

For each host, in order:
  web/app hosts: drain it in HAProxy on every LB (existing requests finish, new ones go
    elsewhere), replace it (`pulumi up --target <urn> --replace <urn>`), wait for its
    readiness gate (cloud-init done, health checks pass), put it back into service.
  stateful hosts (lb, data, slurm, monitoring): `HPC_ROLL_HOST=<host> pulumi up
    --target <urn>` lifts termination protection for that host only, then the same with
    `--replace`, wait for the gate (Galera Synced, Redis replicating, slurmctld answering),
    then a last `pulumi up --target <urn>` without HPC_ROLL_HOST restores protection.
A host that fails its gate stops the roll: nothing else is touched.

For OS patches of stateful packages without replacing the host, run
`hpc-rolling-patch` on each host in the same order through SSM (see README).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@dataclass
class Step:
    kind: str  # pulumi | drain | ready | gate
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    host: str = ""

    def show(self) -> str:
        env = " ".join(f"{k}={v}" for k, v in self.env.items())
        return (env + " " if env else "") + shlex.join(self.argv)


def urn(project: str, stack: str, host: str) -> str:
    return (f"urn:pulumi:{stack}::{project}::hpc:server:Server$aws:ec2/instance:Instance::"
            f"{stack}-{host}-instance")


def haproxy_cmd(state: str, host: str, services: list[tuple[str, list[int]]], web: bool) -> str:
    cmds = [f"set server be_{name}/{host}-{port} state {state}" for name, ports in services for port in ports]
    if web:
        cmds.append(f"set server be_web/{host} state {state}")
    return "; ".join(f"echo '{c}' | socat stdio /run/haproxy/admin.sock" for c in cmds)


def plan(stack: str, role: str, only: list[str] | None = None) -> list[Step]:
    from components.server import STATEFUL_ROLES
    from components.stackfile import load_stack, project_name

    project = project_name()
    cfg, topo = load_stack(stack)
    hosts = [h for h in topo.hosts if role in h.roles and (not only or h.name in only)]
    if not hosts:
        raise SystemExit(f"no {role} hosts in stack {stack}" + (f" among {only}" if only else ""))
    lbs = [h for h in topo.hosts if "lb" in h.roles]
    services = [(s.name, list(s.ports)) for s in cfg.services]
    steps: list[Step] = []
    base = ["pulumi", "up", "--yes", "--stack", stack, "--skip-preview"]
    for h in hosts:
        target = urn(project, stack, h.name)
        gate = Step("gate", ["python3", "tools/gate.py", "--region", cfg.region, "--host", h.name,
                             "--instance-id", "@" + h.name, "--roles", ",".join(h.roles), "--timeout", "1200"], host=h.name)
        if any(r in STATEFUL_ROLES for r in h.roles):
            env = {"HPC_ROLL_HOST": h.name}
            steps += [
                Step("pulumi", base + ["--target", target], env, h.name),
                Step("pulumi", base + ["--target", target, "--replace", target], env, h.name),
                gate,
                Step("pulumi", base + ["--target", target], {}, h.name),
            ]
        else:
            drain = haproxy_cmd("drain", h.name, services if "app" in h.roles else [], "web" in h.roles)
            ready = haproxy_cmd("ready", h.name, services if "app" in h.roles else [], "web" in h.roles)
            steps += [Step("drain", [lb.name, drain], host=h.name) for lb in lbs]
            steps.append(Step("pulumi", base + ["--target", target, "--replace", target], {}, h.name))
            steps.append(gate)
            steps += [Step("ready", [lb.name, ready], host=h.name) for lb in lbs]
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
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stack", required=True)
    ap.add_argument("--role", required=True)
    ap.add_argument("--hosts", help="comma-separated subset, in this order")
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    steps = plan(args.stack, args.role, args.hosts.split(",") if args.hosts else None)
    if args.dry_run:
        return execute(steps, lambda s: 0)

    def run(step: Step) -> int:
        if step.kind == "pulumi":
            return subprocess.run(step.argv, env={**os.environ, **step.env}, cwd=ROOT).returncode
        if step.kind == "gate":
            iid = subprocess.run(["pulumi", "stack", "output", "--stack", args.stack, "--json", "hosts"],
                                 capture_output=True, text=True, check=True, cwd=ROOT).stdout
            import json

            instance_id = json.loads(iid)[step.host]["instance_id"]
            argv = [a if a != "@" + step.host else instance_id for a in step.argv]
            return subprocess.run(argv, cwd=ROOT).returncode
        # drain / ready: a shell command on an LB host through SSM
        lb, cmd = step.argv
        return subprocess.run(["python3", "tools/ssm_run.py", "--stack", args.stack, "--host", lb, "--", cmd],
                              cwd=ROOT).returncode

    return execute(steps, run)


if __name__ == "__main__":
    sys.exit(main())
