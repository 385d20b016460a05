#!/usr/bin/env python3
"""Time and measure the rehearsal: run `python -m rehearsal run` (all drills, or
--drills) and sample, every 2 s, the memory of every process it started (the sum of
their proportional set sizes, so shared binaries count once) and the machine's used
memory (MemTotal - MemAvailable) above the baseline. Prints and writes
build/bench-rehearsal.json: boot and total seconds, peak memory, per-drill seconds.

    sudo .venv/bin/python tools/bench_rehearsal.py [--drills lb,redis,galera] [--budget-mib 4096]
Exit 1 when the peak of anonymous + shared memory (what cannot be reclaimed) exceeds the
budget or the run took longer than --max-seconds; the full PSS, including file-backed
mapped pages such as Galera's mmapped gcache, is reported beside it.

The memory cgroups give the hosts' own view (page cache included): each container's peak
(memory.max_usage_in_bytes of its cgroup under hpc-containers, the highest seen, also
across a host's restarts), their sum plus the peak PSS of the processes outside every
container (the stand-ins: moto, the metadata service, the power-loss layers, the load,
the browser) -- the measure the issue's 8 GiB budget names (--budget-cgroup-mib) -- and
the simultaneous peak of all containers (the parent cgroup's counter, reset at the start).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def meminfo() -> dict[str, int]:
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        k, v = line.split(":", 1)
        out[k] = int(v.split()[0]) * 1024
    return out


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(p.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def pss(pids: list[int]) -> tuple[int, int]:
    """(all proportional set size, its anonymous + shmem part). The rest is file-backed
    mapped pages (binaries, Galera's mmapped gcache): page cache the kernel can drop."""
    total = anon = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                elif line.startswith(("Pss_Anon:", "Pss_Shmem:")):
                    anon += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total, anon


# rehearsal/container.py's CGROUP_ROOT / "memory" / CGROUP_PARENT (tools/ may not import
# rehearsal/: tests/test_bench_rehearsal.py holds the two equal).
CGROUP_MEMORY = Path("/sys/fs/cgroup/memory/hpc-containers")


def in_container(pid: int) -> bool:
    """The process runs inside a rehearsal host (its memory cgroup is under hpc-containers/)."""
    try:
        return any(f"/{CGROUP_MEMORY.name}/" in line for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines())
    except OSError:
        return False


def cgroup_peaks(root: Path = CGROUP_MEMORY) -> dict[str, int]:
    """{host: its memory cgroup's peak usage in bytes} for the containers there now."""
    out = {}
    for f in sorted(root.glob("*/memory.max_usage_in_bytes")) if root.is_dir() else []:
        try:
            out[f.parent.name] = int(f.read_text())
        except (OSError, ValueError):
            continue
    return out


def read_int(path: Path) -> int:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--drills", default="")
    ap.add_argument("--stack", default="prod")
    ap.add_argument("--budget-mib", type=int, default=4096)
    ap.add_argument("--max-seconds", type=float, default=1800)
    ap.add_argument("--budget-cgroup-mib", type=int, default=8192,
                    help="containers' cgroup peaks summed plus the stand-ins' peak PSS")
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "bench-rehearsal.json")
    a = ap.parse_args()
    # The parent cgroup's peak counts from here (writing 0 resets it); the hosts' own
    # cgroups are made by this run.
    if (CGROUP_MEMORY / "memory.max_usage_in_bytes").exists():
        (CGROUP_MEMORY / "memory.max_usage_in_bytes").write_text("0\n")
    base = meminfo()
    base_used = base["MemTotal"] - base["MemAvailable"]
    cmd = [sys.executable, "-m", "rehearsal", "run", "--stack", a.stack, "--report", str(ROOT / "build" / "bench-report.json")]
    if a.drills:
        cmd += ["--drills", a.drills]
    (ROOT / "build").mkdir(exist_ok=True)
    t0 = time.time()
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = {"pss": 0, "anon": 0, "used": 0, "pss_at": 0.0, "anon_at": 0.0, "standins": 0, "together": 0}
    host_peaks: dict[str, int] = {}
    samples: list[tuple[float, int]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            pids = descendants(p.pid)
            inside: list[int] = []
            outside: list[int] = []
            for q in pids:
                (inside if in_container(q) else outside).append(q)
            (in_all, in_anon), (out_all, out_anon) = pss(inside), pss(outside)
            now, anon = in_all + out_all, in_anon + out_anon
            peak["standins"] = max(peak["standins"], out_all)
            for host, b in cgroup_peaks().items():
                host_peaks[host] = max(host_peaks.get(host, 0), b)
            peak["together"] = max(peak["together"], read_int(CGROUP_MEMORY / "memory.max_usage_in_bytes"))
            m = meminfo()
            used = m["MemTotal"] - m["MemAvailable"] - base_used
            samples.append((round(time.time() - t0, 1), now))
            if now > peak["pss"]:
                peak["pss"], peak["pss_at"] = now, time.time() - t0
            if anon > peak["anon"]:
                peak["anon"], peak["anon_at"] = anon, time.time() - t0
            peak["used"] = max(peak["used"], used)
            stop.wait(2)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    lines = []
    assert p.stdout is not None
    for line in p.stdout:
        sys.stdout.write(line)
        lines.append(line)
    rc = p.wait()
    stop.set()
    th.join(5)
    total = time.time() - t0
    text = "".join(lines)
    boot = re.search(r"booted in (\d+)s", text)
    drills: dict[str, float] = {}
    try:
        report = json.loads((ROOT / "build" / "bench-report.json").read_text())
        drills = {d["name"]: d.get("seconds") for d in report["drills"]}
    except (OSError, ValueError):
        report = {}
    cgroup_total = round((sum(host_peaks.values()) + peak["standins"]) / 2**20)
    doc = {
        "total_seconds": round(total, 1), "boot_seconds": int(boot.group(1)) if boot else None,
        "drill_seconds": drills, "peak_pss_mib": round(peak["pss"] / 2**20), "peak_at_s": round(peak["pss_at"]),
        "peak_anon_shmem_mib": round(peak["anon"] / 2**20), "anon_peak_at_s": round(peak["anon_at"]),
        # The machine's view counts every process on it (other test runs too): context only.
        "peak_machine_used_mib": round(peak["used"] / 2**20), "budget_mib": a.budget_mib, "exit": rc,
        "cgroup_peak_mib": {h: round(b / 2**20) for h, b in sorted(host_peaks.items())},
        "cgroup_peaks_sum_mib": round(sum(host_peaks.values()) / 2**20),
        "standins_peak_pss_mib": round(peak["standins"] / 2**20),
        "cgroup_peaks_plus_standins_mib": cgroup_total,
        "containers_simultaneous_peak_mib": round(peak["together"] / 2**20),
        "budget_cgroup_mib": a.budget_cgroup_mib,
        "passed": [d["name"] for d in report.get("drills", []) if d.get("passed")],
        "failed": [d["name"] for d in report.get("drills", []) if not d.get("passed")],
    }
    a.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))
    ok = (peak["anon"] <= a.budget_mib * 2**20 and total <= a.max_seconds
          and (not host_peaks or cgroup_total <= a.budget_cgroup_mib))
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
