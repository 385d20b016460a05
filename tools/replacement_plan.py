#!/usr/bin/env python3
"""What a change does to the hosts of each role, step by step: the replacement-plan model.

From the program's resource graph (the real program under the offline mocks) and
tools/replacement_table.yaml (what a property change does to a live instance), for each
role and each kind of change:

  template       the host's user-data (a rendered template, a service setting)
  instance_type  the host's instance type
  ami            a new AMI (a pin edited, or Canonical publishing a new image)

it says whether `pulumi up` applies the change and in which exact order (the drain,
instance, gate and put-back resources, each step after the ones it waits for in the
graph), or that the program ignores it and `tools/rolling.py` rolls it (its steps).
A deploy drill applies the plan of ("app", "template") and checks the order it observes
against it.

    .venv/bin/python tools/replacement_plan.py --stack prod [--role app] [--change template]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
for p in (str(ROOT), str(TOOLS)):
    if p not in sys.path:
        sys.path.insert(0, p)

import yaml  # noqa: E402

CHANGES = {"template": "userDataBase64", "instance_type": "instanceType", "ami": "ami"}
# the program's ignore_changes names (snake_case) of these inputs
IGNORE_NAMES = {"userDataBase64": "user_data_base64", "instanceType": "instance_type", "ami": "ami"}
TABLE_FILE = TOOLS / "replacement_table.yaml"
INSTANCE = "aws:ec2/instance:Instance"


def _ids_in(value: Any) -> set[str]:
    if isinstance(value, str):
        return {value}
    if isinstance(value, dict):
        return set().union(set(), *(_ids_in(v) for v in value.values()))
    if isinstance(value, (list, tuple)):
        return set().union(set(), *(_ids_in(v) for v in value))
    return set()


def graph(run: Any) -> dict[str, set[str]]:
    """resource name -> the resources it waits for: depends_on, and every resource whose
    id one of its inputs carries (a property dependency: Pulumi orders by both)."""
    by_id = {r.id: r.name for r in run.resources if r.id and len(r.id) > 6}
    deps: dict[str, set[str]] = {}
    for r in run.resources:
        d = set(r.opts.get("depends_on") or [])
        d |= {by_id[i] for i in _ids_in(r.inputs) if i in by_id and by_id[i] != r.name}
        deps[r.name] = d
    return deps


def instance_action(inputs: dict[str, Any], opts: dict[str, Any], prop: str, table: dict[str, Any]) -> str:
    """replace | restart | update | ignored, for a change of `prop` on an instance."""
    if IGNORE_NAMES[prop] in (opts.get("ignore_changes") or []):
        return "ignored"
    spec = table["types"][INSTANCE]
    for flag, props in (spec.get("replace_when_set") or {}).items():
        if prop in props and inputs.get(flag):
            return "replace"
    if prop in spec.get("replace", []):
        return "replace"
    if prop in spec.get("restart", []):
        return "restart"
    return "update"


def _order(deps: dict[str, set[str]], names: list[str]) -> list[list[str]]:
    """`names` in waves: each wave waits (transitively, through any resource) only for
    earlier waves; names in one wave may run at the same time."""
    memo: dict[str, set[str]] = {}

    def reach(n: str) -> set[str]:
        if n not in memo:
            memo[n] = set()
            out: set[str] = set()
            for d in deps.get(n, ()):
                out |= {d} | reach(d)
            memo[n] = out
        return memo[n]

    left, waves = list(names), []
    while left:
        wave = [n for n in left if not (reach(n) & (set(left) - {n}))]
        if not wave:
            raise ValueError(f"a cycle among {left}")
        waves.append(sorted(wave))
        left = [n for n in left if n not in wave]
    return waves


def model(run: Any, stack: str, table: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """role -> change -> {action, mechanism, steps (waves of resource names or rolling steps), hosts}."""
    import rolling

    table = table or yaml.safe_load(TABLE_FILE.read_text())
    deps = graph(run)
    hosts = run.outputs["hosts"]
    instances = {r.inputs["tags"]["Name"]: r for r in run.resources if r.type == INSTANCE}
    roles = sorted({r for h in hosts.values() for r in h["roles"]})
    out: dict[str, dict[str, Any]] = {}
    for role in roles:
        mine = [n for n in hosts if role in hosts[n]["roles"]]
        out[role] = {}
        for change, prop in CHANGES.items():
            actions = {instance_action(instances[n].inputs, instances[n].opts, prop, table) for n in mine}
            if len(actions) != 1:
                raise ValueError(f"{role} hosts disagree on a {change} change: {actions}")
            action = actions.pop()
            entry: dict[str, Any] = {"action": action, "hosts": mine}
            if action == "ignored":
                steps = rolling.plan(stack, role, ami=change == "ami")
                entry.update(mechanism="tools/rolling.py" + (" --ami" if change == "ami" else ""),
                             steps=[[f"{s.host}: {s.kind}" + (" (replace)" if "--replace" in s.argv else "")]
                                    for s in steps])
            else:
                s = run.stack
                names = [x for n in mine for x in (f"{s}-{n}-lb-drain", f"{s}-{n}-instance",
                                                    f"{s}-{n}-gate-ready", f"{s}-{n}-lb-ready") if x in deps]
                entry.update(mechanism="pulumi up", steps=_order(deps, names))
                # what each command resource runs (pulumi-command's `create`): a deploy drill runs these
                entry["commands"] = {n: str(run.named(n).inputs.get("create", "")) for n in names
                                     if not n.endswith("-instance")}
                stateful = set(role.split("+")) & set(table["stateful_instance_roles"])
                entry["one_at_a_time"] = all(
                    sum(1 for x in wave if x.endswith("-instance")) <= 1 for wave in entry["steps"])
                if stateful and not entry["one_at_a_time"]:
                    entry["warning"] = (f"{action} of several {role} hosts at once: roll it with tools/rolling.py "
                                        f"--role {role} instead of a plain `pulumi up`")
            out[role][change] = entry
    return out


def main(argv: list[str] | None = None) -> int:
    from offline.harness import run_stack

    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--stack", required=True)
    ap.add_argument("--role")
    ap.add_argument("--change", choices=sorted(CHANGES))
    args = ap.parse_args(argv)
    m = model(run_stack(args.stack), args.stack)
    if args.role:
        if args.role not in m:
            raise SystemExit(f"--role {args.role}: the stack's roles are {', '.join(m)}")
        m = {args.role: m[args.role]}
    if args.change:
        m = {r: {args.change: c[args.change]} for r, c in m.items()}
    print(json.dumps(m, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
