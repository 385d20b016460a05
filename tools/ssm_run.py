#!/usr/bin/env python3
"""Run one shell command on a stack's host through SSM and print its output.

    .venv/bin/python tools/ssm_run.py --stack prod --host lb-1 -- 'echo show stat | socat stdio /run/haproxy/admin.sock'
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stack", required=True)
    ap.add_argument("--host", required=True)
    ap.add_argument("command", nargs="+")
    args = ap.parse_args()
    out = json.loads(subprocess.run(["pulumi", "stack", "output", "--stack", args.stack, "--json"],
                                    capture_output=True, text=True, check=True, cwd=ROOT).stdout)
    import boto3

    ssm = boto3.client("ssm", region_name=out["region"])
    iid = out["hosts"][args.host]["instance_id"]
    cid = ssm.send_command(InstanceIds=[iid], DocumentName="AWS-RunShellScript",
                           Parameters={"commands": [" ".join(args.command)]})["Command"]["CommandId"]
    for _ in range(150):
        time.sleep(2)
        try:
            inv = ssm.get_command_invocation(CommandId=cid, InstanceId=iid)
        except ssm.exceptions.InvocationDoesNotExist:
            continue
        if inv["Status"] not in ("Pending", "InProgress", "Delayed"):
            sys.stdout.write(inv.get("StandardOutputContent", ""))
            sys.stderr.write(inv.get("StandardErrorContent", ""))
            return 0 if inv["Status"] == "Success" else 1
    print(f"{args.host}: no result after 300 s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
