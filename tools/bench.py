"""How long the offline plan and the unit suite take, and how the plan grows with hosts.

Times `tools/plan.py` (a fresh process, as `make plan` runs it, no diagram) for the prod
stack with 3, 30 and 300 web/app hosts (overrides {"roles": {"app": {"count": N}}}),
and the unit suite (`pytest -q -m "not daemons"`); prints medians of several runs, the
ratios against 3 hosts, the cost per extra host, and the budgets: prod <= 3 s,
300 hosts <= 30 s. Not a test: numbers depend on the machine.

    .venv/bin/python tools/bench.py                 # 3 plan runs per size, 1 suite run
    .venv/bin/python tools/bench.py --runs 5 --suite-runs 3
    .venv/bin/python tools/bench.py --no-suite
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIZES = (3, 30, 300)
BUDGETS = {3: 3.0, 300: 30.0}
# The program's unit tests: the real __main__.py under mocks, config validation, security
# groups, IAM, phases/gates/hybrid, rolling, the StackReference example.
PROGRAM_SUITE = [f"tests/{n}.py" for n in (
    "test_program", "test_config_validation", "test_security", "test_iam", "test_phases_gates_hybrid",
    "test_rolling", "test_example_next_phase", "test_gate_script")]


def timed(cmd: list[str], env: dict[str, str] | None = None) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])}... failed ({p.returncode}):\n{(p.stdout + p.stderr)[-3000:]}")
    return dt


def plan_time(n: int, runs: int, out: Path) -> list[float]:
    overrides = json.dumps({"roles": {"app": {"count": n}}})
    cmd = [sys.executable, str(ROOT / "tools" / "plan.py"), "--stack", "prod", "--overrides", overrides,
           "--out", str(out), "--no-diagram", "--quiet"]
    return [timed(cmd) for _ in range(runs)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="plan runs per size (median reported)")
    ap.add_argument("--suite-runs", type=int, default=1, help="unit suite runs (median reported)")
    ap.add_argument("--no-suite", action="store_true")
    args = ap.parse_args()

    rows: list[tuple[int, float, list[float]]] = []
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        for n in SIZES:
            times = plan_time(n, args.runs, Path(tmp))
            rows.append((n, statistics.median(times), times))
            print(f"  plan, {n:>3} web/app hosts: {', '.join(f'{t:.2f}' for t in times)} s", file=sys.stderr)
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

    base = rows[0][1]
    print(f"{'what':<36} {'median s':>9} {'x 3 hosts':>10} {'budget':>8}")
    print("-" * 66)
    for n, med, _ in rows:
        budget = f"{BUDGETS[n]:.0f} s" if n in BUDGETS else ""
        ok = "" if n not in BUDGETS else ("  ok" if med <= BUDGETS[n] else "  OVER")
        print(f"{'plan, ' + str(n) + ' web/app hosts (' + str(n + 8) + ' total)':<32} {med:>9.2f} {med / base:>10.2f} {budget:>8}{ok}")
    if program_suite:
        print(f"{'program unit suite (mocks)':<36} {statistics.median(program_suite):>9.1f}              30 s  "
              f"{'ok' if statistics.median(program_suite) <= 30 else 'over'}")
    if suite:
        print(f"{'unit suite (not daemons)':<36} {statistics.median(suite):>9.1f}")
    (n1, t1, _), (n2, t2, _) = rows[0], rows[-1]
    per_host = (t2 - t1) / (n2 - n1)
    mid = rows[1][1]
    slope_low = (mid - t1) / (rows[1][0] - n1)
    slope_high = (t2 - mid) / (n2 - rows[1][0])
    shape = "linear" if slope_high < 1.5 * max(slope_low, 1e-6) else "faster than linear"
    print(f"\ngrowth: {per_host * 1000:.1f} ms per extra web/app host over a fixed {t1 - 3 * per_host:.2f} s; "
          f"{slope_low * 1000:.1f} ms/host from 3 to 30, {slope_high * 1000:.1f} ms/host from 30 to 300 ({shape})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
