"""The offline plan of a stack: run the real program under mocks (no cloud, no CLI) and
print every host with its roles, AZ, subnet, address and instance type. Also writes
build/plan-<stack>.json with the hosts, address plan, resource counts and outputs.

    .venv/bin/python tools/plan.py --stack prod
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from components.config import ConfigError  # noqa: E402
from tests.harness import ProgramFailed, run_stack  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stack", default="prod")
    ap.add_argument("--out", default=str(ROOT / "build"))
    args = ap.parse_args()
    try:
        run = run_stack(args.stack)
    except ProgramFailed as e:
        if isinstance(e.error, ConfigError):
            print(f"Pulumi.{args.stack}.yaml: {e.error}", file=sys.stderr)
            return 2
        raise
    o = run.outputs
    print(f"stack {args.stack}: profile {o['profile']}, phase {o['phase']}, region {o['region']}, "
          f"{len(run.resources)} resources (offline, under mocks)")
    if o.get("vip"):
        print(f"VIP: Elastic IP (allocated by the program, associated by keepalived's MASTER)")
    print()
    header = f"{'host':<9} {'roles':<24} {'AZ':<17} {'network':<11} {'subnet':<16} {'IP':<14} {'type':<12}"
    print(header)
    print("-" * len(header))
    for name, h in sorted(o["hosts"].items(), key=lambda kv: (kv[1]["network"], kv[0])):
        print(f"{name:<9} {'+'.join(h['roles']):<24} {h['az']:<17} {h['network']:<11} {h['subnet_cidr']:<16} "
              f"{h['private_ip']:<14} {h['instance_type']:<12}")
    print()
    print("primaries: " + ", ".join(f"{k}={v} ({o['hosts'][v]['az']})" for k, v in o["primaries"].items()))
    counts = Counter(r.type for r in run.resources if not r.type.startswith("hpc:"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plan = {
        "stack": args.stack,
        "hosts": o["hosts"],
        "address_plan": o["network"]["subnet_cidrs"],
        "primaries": o["primaries"],
        "resource_counts": dict(sorted(counts.items())),
        "outputs": {k: v for k, v in o.items() if k != "rendered"},
        "rendered": o["rendered"],
    }
    path = out / f"plan-{args.stack}.json"
    path.write_text(json.dumps(plan, indent=2, sort_keys=True) + "\n")
    print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
