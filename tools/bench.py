"""How long the offline plan and the unit suite take, how the plan grows with hosts, and
how far the plan is from the cost of the Pulumi SDK itself.

Times `tools/plan.py` (a fresh process, as `make plan` runs it, no diagram) for the prod
stack with 3, 30 and 300 web/app hosts (overrides {"roles": {"app": {"count": N}}}),
and the unit suite (`pytest -q -m "not daemons"`).

Next to each plan run it times the SDK's floor for that size: a fresh process with the
program's imports (the components, pulumi_aws and the class of every resource type the
plan registered, e.g. pulumi_aws.ec2.Instance) that registers as many resources as the plan did
(component resources included), each a trivial `aws.ssm.Parameter`, through the same
harness and strict mocks (`offline.harness.run_stack(..., program=...)`). Plan and
floor runs alternate, so both see the same load on a shared machine.

Prints medians of wall time and of CPU time (user + sys of the child, less sensitive to
other processes on the machine), the plan/floor ratios, the ratios against 3 hosts, the
cost per extra host, and the budgets: prod <= 3 s and <= 1.5x its floor, 300 hosts
<= 20 s. Not a test: numbers depend on the machine.

    .venv/bin/python tools/bench.py                 # 3 plan runs per size, 1 suite run
    .venv/bin/python tools/bench.py --runs 5 --no-suite
    .venv/bin/python tools/bench.py --sizes 3 --runs 7 --no-suite
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIZES = (3, 30, 300)
BUDGETS = {3: 3.0, 300: 20.0}
FLOOR_RATIO_BUDGET = {3: 1.5}  # plan wall / floor wall
# The program's unit tests: the real __main__.py under mocks, config validation, security
# groups, IAM, phases/gates/hybrid, rolling, the StackReference example.
PROGRAM_SUITE = [f"tests/{n}.py" for n in (
    "test_program", "test_config_validation", "test_security", "test_iam", "test_phases_gates_hybrid",
    "test_rolling", "test_example_next_phase", "test_gate_script")]


# The floor's program: the imports of __main__.py, the resource classes the plan used,
# then as many trivial resources as the plan registered.
FLOOR_PROGRAM = """\
import importlib
import os

import pulumi_aws as aws

from components.config import load_config  # noqa: F401  (the program's imports)
from components.stack import build_stack  # noqa: F401
from components.topology import build_topology  # noqa: F401

for cls in filter(None, os.environ["HPC_FLOOR_CLASSES"].split(",")):
    module, _, name = cls.partition(":")
    getattr(importlib.import_module(module), name)
for i in range(int(os.environ["HPC_FLOOR_COUNT"])):
    aws.ssm.Parameter(f"floor-{i}", type="String", value="x")
"""


def timed(cmd: list[str], env: dict[str, str] | None = None) -> float:
    return timed_cpu(cmd, env)[0]


def timed_cpu(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + sys) of one child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])}... failed ({p.returncode}):\n{(p.stdout + p.stderr)[-3000:]}")
    return dt, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def plan_cmd(n: int, out: Path) -> list[str]:
    overrides = json.dumps({"roles": {"app": {"count": n}}})
    return [sys.executable, str(ROOT / "tools" / "plan.py"), "--stack", "prod", "--overrides", overrides,
            "--out", str(out), "--no-diagram", "--quiet"]


def plan_shape(out: Path) -> tuple[int, list[str]]:
    """How many resources the plan registered (components included) and the Python
    classes of their types ("pulumi_aws.ec2:Instance", "pulumi_random:RandomBytes")."""
    plan = json.loads((out / "plan-prod.json").read_text())
    classes = set()
    for r in plan["resources"]:
        pkg, _, rest = r["type"].partition(":")  # aws:ec2/instance:Instance
        mod, _, cls = rest.partition(":")
        mod = mod.split("/")[0]
        if pkg == "hpc":
            continue
        classes.add(f"pulumi_{pkg}:{cls}" if mod == "index" else f"pulumi_{pkg}.{mod}:{cls}")
    return len(plan["resources"]), sorted(classes)


def floor_cmd(count: int, classes: list[str], program: Path) -> tuple[list[str], dict[str, str]]:
    env = {**os.environ, "HPC_FLOOR_COUNT": str(count), "HPC_FLOOR_CLASSES": ",".join(classes)}
    return [sys.executable, str(Path(__file__).resolve()), "--floor-child", str(program)], env


def floor_child(program: str) -> int:
    """Run the floor program through the program's own harness and strict mocks."""
    sys.path.insert(0, str(ROOT))
    from offline.harness import run_stack

    run = run_stack("prod", program=program)
    want = int(os.environ["HPC_FLOOR_COUNT"])
    if len(run.resources) != want:
        raise SystemExit(f"floor registered {len(run.resources)} resources, expected {want}")
    return 0


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="plan runs per size (median reported)")
    ap.add_argument("--suite-runs", type=int, default=1, help="unit suite runs (median reported)")
    ap.add_argument("--no-suite", action="store_true")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)),
                    help="web/app host counts to plan, comma-separated (default: %(default)s)")
    ap.add_argument("--floor-child", metavar="PROGRAM", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.floor_child:
        return floor_child(args.floor_child)
    sizes = [int(x) for x in args.sizes.split(",")]

    # n -> what -> [(wall, cpu)]; what: plan, floor (trivial resources only), classes
    # (the same, with the plan's resource classes imported first)
    runs: dict[int, dict[str, list[tuple[float, float]]]] = {}
    counts: dict[int, int] = {}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        program = Path(tmp) / "floor_main.py"
        program.write_text(FLOOR_PROGRAM)
        for n in sizes:
            out = Path(tmp) / f"plan-{n}"
            series: dict[str, list[tuple[float, float]]] = {"plan": [], "floor": [], "classes": []}
            for _ in range(args.runs):
                series["plan"].append(timed_cpu(plan_cmd(n, out)))
                counts[n], classes = plan_shape(out)
                series["floor"].append(timed_cpu(*floor_cmd(counts[n], [], program)))
                series["classes"].append(timed_cpu(*floor_cmd(counts[n], classes, program)))
            runs[n] = series
            for what, xs in series.items():
                print(f"  {n:>3} web/app hosts, {what:<8} wall {', '.join(f'{w:.2f}' for w, _ in xs)} s; "
                      f"cpu {', '.join(f'{c:.2f}' for _, c in xs)} s", file=sys.stderr)
    program_suite: list[float] = []
    suite: list[float] = []
    if not args.no_suite:
        for _ in range(args.suite_runs):
            program_suite.append(timed([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                        *PROGRAM_SUITE], dict(os.environ)))
            print(f"  program unit suite: {program_suite[-1]:.1f} s", file=sys.stderr)
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
        for _ in range(args.suite_runs):
            suite.append(timed([sys.executable, "-m", "pytest", "-q", "-m", "not daemons", "-p", "no:cacheprovider"], env))
            print(f"  unit suite: {suite[-1]:.1f} s", file=sys.stderr)

    sys.stderr.flush()

    def med(n: int, what: str, i: int) -> float:
        return median([x[i] for x in runs[n][what]])

    rows = [(n, med(n, "plan", 0)) for n in sizes]
    base = rows[0][1]
    print(f"medians of {args.runs} runs (wall s; cpu = user + sys s). floor: as many trivial resources "
          f"(aws.ssm.Parameter) as the plan registers,\nthrough the same harness and mocks, with the "
          f"program's imports; +classes: the plan's resource classes imported too")
    head = (f"{'plan of prod with':<26} {'wall':>6} {'floor':>6} {'x':>5} {'+classes':>9} {'x':>5}   "
            f"{'cpu':>5} {'floor':>6} {'x':>5} {'+classes':>9} {'x':>5}   {'x ' + str(sizes[0]) + ' hosts':>10}  budget")
    print(head)
    print("-" * len(head))
    for n in sizes:
        w, fw, cw = med(n, "plan", 0), med(n, "floor", 0), med(n, "classes", 0)
        c, fc, cc = med(n, "plan", 1), med(n, "floor", 1), med(n, "classes", 1)
        budgets = []
        if n in BUDGETS:
            budgets.append(f"<= {BUDGETS[n]:.0f} s {'ok' if w <= BUDGETS[n] else 'OVER'}")
        if n in FLOOR_RATIO_BUDGET:
            b = FLOOR_RATIO_BUDGET[n]
            budgets.append(f"<= {b}x floor {'ok' if w / fw <= b else 'OVER'} (+classes {'ok' if w / cw <= b else 'OVER'})")
        label = f"{n} web/app, {counts[n]} resources"
        print(f"{label:<26} {w:>6.2f} {fw:>6.2f} {w / fw:>5.2f} {cw:>9.2f} {w / cw:>5.2f}   "
              f"{c:>5.2f} {fc:>6.2f} {c / fc:>5.2f} {cc:>9.2f} {c / cc:>5.2f}   {w / base:>10.2f}  {', '.join(budgets)}")
    if program_suite:
        print(f"{'program unit suite (mocks)':<36} {statistics.median(program_suite):>9.1f}              30 s  "
              f"{'ok' if statistics.median(program_suite) <= 30 else 'over'}")
    if suite:
        print(f"{'unit suite (not daemons)':<36} {statistics.median(suite):>9.1f}")
    if len(rows) >= 3:
        (n1, t1), (n2, t2) = rows[0], rows[-1]
        per_host = (t2 - t1) / (n2 - n1)
        mid = rows[1][1]
        slope_low = (mid - t1) / (rows[1][0] - n1)
        slope_high = (t2 - mid) / (n2 - rows[1][0])
        shape = "linear" if slope_high < 1.5 * max(slope_low, 1e-6) else "faster than linear"
        print(f"\ngrowth: {per_host * 1000:.1f} ms per extra web/app host over a fixed {t1 - n1 * per_host:.2f} s; "
              f"{slope_low * 1000:.1f} ms/host from {n1} to {rows[1][0]}, "
              f"{slope_high * 1000:.1f} ms/host from {rows[1][0]} to {n2} ({shape})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
