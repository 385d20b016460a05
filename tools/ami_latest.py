"""Canonical's current Ubuntu 24.04 LTS AMI ids (hvm, ebs-gp3) for a region, from
Canonical's public SSM parameters, each checked with EC2 DescribeImages (owned by
Canonical's account, available, an Ubuntu 24.04 "noble" server image of that
architecture). Needs AWS credentials (ssm:GetParameter, ec2:DescribeImages).

    .venv/bin/python tools/ami_latest.py --region ap-northeast-2            # print the pin block
    .venv/bin/python tools/ami_latest.py --region ap-northeast-2 --write Pulumi.prod.yaml ...
    .venv/bin/python tools/ami_latest.py --region ap-northeast-2 --summary  # markdown table

`--write` sets `hpc-portal:ami` in each stack file (replacing the block or the
"No AMI pin" comment, keeping every other line): the scheduled ami-pins workflow opens a
pull request with it, and a reviewer's approval is what makes a pin verified. Changing a
stack's pin changes no running host: they take it through `tools/rolling.py --ami`.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from components.config_model import UBUNTU_AMI_PARAMETER, UBUNTU_ARCH  # noqa: E402

CANONICAL_OWNER = "099720109477"  # Canonical's AWS account, the owner of its public images
AMI_RE = re.compile(r"^ami-(?:[0-9a-f]{8}|[0-9a-f]{17})$")


def check_image(image: dict[str, Any], arch: str) -> str | None:
    """Why `image` (a DescribeImages entry) is not Canonical's Ubuntu 24.04 server for
    `arch`, or None when it is."""
    name = str(image.get("Name", ""))
    if image.get("OwnerId") != CANONICAL_OWNER:
        return f"owner {image.get('OwnerId')} is not Canonical ({CANONICAL_OWNER})"
    if image.get("State") != "available":
        return f"state {image.get('State')}"
    if image.get("Architecture") != arch:
        return f"architecture {image.get('Architecture')}, expected {arch}"
    if "ubuntu-noble-24.04" not in name or "server" not in name:
        return f"name {name!r} is not an Ubuntu 24.04 (noble) server image"
    return None


def resolve(ssm: Any, ec2: Any) -> dict[str, dict[str, str]]:
    """arch -> {id, name, parameter}; SystemExit naming the parameter when a check fails."""
    found: dict[str, dict[str, str]] = {}
    for arch, canonical in UBUNTU_ARCH.items():
        param = UBUNTU_AMI_PARAMETER.format(arch=canonical)
        value = ssm.get_parameter(Name=param)["Parameter"]["Value"]
        if not AMI_RE.match(value):
            raise SystemExit(f"{param}: {value!r} is not an AMI id")
        images = ec2.describe_images(ImageIds=[value]).get("Images", [])
        why = "not found by DescribeImages" if not images else check_image(images[0], arch)
        if why:
            raise SystemExit(f"{param} -> {value}: {why}")
        found[arch] = {"id": value, "name": images[0]["Name"], "parameter": param}
    return found


PIN_BLOCK = re.compile(r"^  hpc-portal:ami:\n(?:    \S.*\n)+", re.M)
NO_PIN = re.compile(r"^  # No AMI pin:.*\n(?:  #.*\n)*", re.M)


def pin_block(found: dict[str, dict[str, str]]) -> str:
    lines = ["  # Canonical Ubuntu 24.04 LTS (hvm, ebs-gp3), checked by tools/ami_latest.py:"]
    lines += [f"  #   {a}: {v['name']}" for a, v in found.items()]
    lines.append("  hpc-portal:ami:")
    lines += [f"    {a}: {v['id']}" for a, v in found.items()]
    return "\n".join(lines) + "\n"


def write_pins(text: str, found: dict[str, dict[str, str]]) -> str:
    """The stack file with its AMI pins set to `found` (every other line kept)."""
    block = pin_block(found)
    old_comment = re.compile(r"^  # Canonical Ubuntu 24.04 LTS \(hvm, ebs-gp3\), checked.*\n(?:  #   .*\n)*", re.M)
    text = old_comment.sub("", text)
    if PIN_BLOCK.search(text):
        return PIN_BLOCK.sub(block, text, count=1)
    if NO_PIN.search(text):
        return NO_PIN.sub(block, text, count=1)
    if not text.rstrip().endswith(("config:",)) and "\nconfig:\n" not in text:
        raise SystemExit("no `config:` section to add the pins to")
    return text.rstrip("\n") + "\n" + block


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--region", default="ap-northeast-2")
    ap.add_argument("--write", nargs="*", metavar="STACK_FILE", help="set the pins in these stack files")
    ap.add_argument("--summary", action="store_true", help="print a markdown table (for a job summary)")
    args = ap.parse_args(argv)
    import boto3

    found = resolve(boto3.client("ssm", region_name=args.region), boto3.client("ec2", region_name=args.region))
    if args.write:
        for f in args.write:
            path = Path(f)
            path.write_text(write_pins(path.read_text(), found))
            print(f"{path}: pinned " + ", ".join(f"{a} {v['id']}" for a, v in found.items()))
    elif args.summary:
        print(f"### Ubuntu 24.04 AMIs Canonical publishes now ({args.region})\n")
        print("| arch | AMI | image | parameter |\n|---|---|---|---|")
        for a, v in found.items():
            print(f"| {a} | **`{v['id']}`** | {v['name']} | `{v['parameter']}` |")
    else:
        print(pin_block(found), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
