"""Print Canonical's current Ubuntu 24.04 LTS AMI ids (hvm, ebs-gp3) for a region, from
Canonical's public SSM parameters, as the lines to paste into Pulumi.<stack>.yaml.
Needs AWS credentials. Changing a stack's pin is a deliberate rolling change.

    .venv/bin/python tools/ami_latest.py --region ap-northeast-2
"""

from __future__ import annotations

import argparse

PARAM = "/aws/service/canonical/ubuntu/server/24.04/stable/current/{arch}/hvm/ebs-gp3/ami-id"
ARCHS = {"x86_64": "amd64", "arm64": "arm64"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--region", default="ap-northeast-2")
    args = ap.parse_args()
    import boto3

    ssm = boto3.client("ssm", region_name=args.region)
    print("  hpc-portal:ami:")
    for ours, canonical in ARCHS.items():
        value = ssm.get_parameter(Name=PARAM.format(arch=canonical))["Parameter"]["Value"]
        print(f"    {ours}: {value}")


if __name__ == "__main__":
    main()
