"""Regenerate components/data/instance_types.json from moto's copy of EC2's
DescribeInstanceTypes data (vCPUs, memory, architectures, auto-recovery support).

The program validates instance types against this table (a role's minimum, the chosen
architecture) without calling AWS. Run after a moto upgrade:
    .venv/bin/python tools/update_instance_types.py
tests/test_instance_types.py checks that the committed table matches moto's data.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "components" / "data" / "instance_types.json"


def build() -> dict[str, dict[str, object]]:
    import moto

    src = Path(moto.__file__).parent / "ec2" / "resources" / "instance_types.json.gz"
    raw = json.loads(gzip.decompress(src.read_bytes()))
    table: dict[str, dict[str, object]] = {}
    for name, info in sorted(raw.items()):
        if not info.get("CurrentGeneration") or info.get("BareMetal"):
            continue
        table[name] = {
            "vcpus": info["VCpuInfo"]["DefaultVCpus"],
            "memory_mib": info["MemoryInfo"]["SizeInMiB"],
            "archs": sorted(info["ProcessorInfo"]["SupportedArchitectures"]),
            "auto_recovery": bool(info.get("AutoRecoverySupported", False)),
        }
    return table


def render(table: dict[str, dict[str, object]]) -> str:
    lines = ["{"]
    items = sorted(table.items())
    for i, (name, info) in enumerate(items):
        sep = "," if i < len(items) - 1 else ""
        lines.append(f"  {json.dumps(name)}: {json.dumps(info, sort_keys=True)}{sep}")
    lines.append("}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    OUT.write_text(render(build()))
    print(f"wrote {OUT} ({len(build())} instance types)", file=sys.stderr)
