#!/usr/bin/env python3
"""Readiness gate for one host, run by `pulumi up` (pulumi-command) after the host exists:
wait until cloud-init finished and the host's role health checks pass, through SSM
send-command, within a timeout.

    python3 tools/gate.py --region R --host data-1 --instance-id i-... --roles data --timeout 900

Exit 0 when ready. Exit 1 with `gate failed: host H check C: <last output>` when cloud-init
reports an error or the timeout passes (the message names the host, the check and what it
last printed). Credentials are the operator's (the same that run `pulumi up`).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# role -> (check name, shell command); each must exit 0 when the role is healthy.
ROLE_CHECKS: dict[str, list[tuple[str, str]]] = {
    "lb": [("haproxy", "curl -fsS -o /dev/null http://127.0.0.1:8404/metrics"),
           ("keepalived", "pidof keepalived")],
    "web": [("nginx", "curl -fsS http://127.0.0.1:8080/health")],
    "app": [("portal", "curl -fsS http://127.0.0.1:5010/api/health"),
            ("dbwriter", "curl -fsS -o /dev/null http://127.0.0.1:8405/ || pidof haproxy")],
    "data": [("galera-synced", "curl -fsS http://127.0.0.1:9200/"),
             ("redis", "REDISCLI_AUTH=$(cat /run/hpc/secrets/redis_password) redis-cli -h $(hostname -I | cut -d' ' -f1) ping")],
    "slurm": [("slurmctld", "scontrol ping")],
    "monitoring": [("prometheus", "curl -fsS http://127.0.0.1:9090/-/ready"),
                   ("alertmanager", "curl -fsS http://127.0.0.1:9093/-/ready")],
}
CLOUD_INIT = ("cloud-init", "cloud-init status --wait --long")
TERMINAL = {"Success", "Failed", "Cancelled", "TimedOut", "Undeliverable", "Terminated", "DeliveryTimedOut",
            "ExecutionTimedOut"}


class GateFailed(Exception):
    def __init__(self, host: str, check: str, output: str, why: str):
        self.host, self.check, self.output = host, check, output
        tail = "\n".join(output.strip().splitlines()[-15:])
        super().__init__(f"gate failed: host {host} check {check}: {why}; last output:\n{tail}")


@dataclass
class Result:
    ok: bool
    output: str
    status: str


def run_remote(ssm: Any, instance_id: str, cmd: str, sleep: Callable[[float], None], wait_s: float = 600) -> Result:
    sent = ssm.send_command(InstanceIds=[instance_id], DocumentName="AWS-RunShellScript",
                            Parameters={"commands": [cmd], "executionTimeout": [str(int(wait_s))]},
                            TimeoutSeconds=60)
    cid = sent["Command"]["CommandId"]
    status, out = "Pending", ""
    for _ in range(int(wait_s / 2) + 1):
        sleep(2)
        try:
            inv = ssm.get_command_invocation(CommandId=cid, InstanceId=instance_id)
        except Exception as e:  # noqa: BLE001 - InvocationDoesNotExist right after sending
            out = str(e)
            continue
        status = inv["Status"]
        out = (inv.get("StandardOutputContent") or "") + (inv.get("StandardErrorContent") or "")
        if status in TERMINAL:
            break
    return Result(status == "Success", out, status)


def run_gate(ssm: Any, host: str, instance_id: str, roles: list[str], timeout: float,
             sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
             log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> None:
    deadline = clock() + timeout
    checks = [CLOUD_INIT] + [c for r in roles for c in ROLE_CHECKS.get(r, [])]
    for name, cmd in checks:
        last = Result(False, "", "NotRun")
        while True:
            if clock() > deadline:
                raise GateFailed(host, name, last.output, f"not ready after {timeout:.0f}s (status {last.status})")
            try:
                last = run_remote(ssm, instance_id, cmd, sleep, wait_s=max(10.0, min(600.0, deadline - clock())))
            except Exception as e:  # noqa: BLE001 - agent not registered yet, throttling
                last = Result(False, str(e), "Error")
            if last.ok:
                log(f"gate: {host} {name}: ok")
                break
            if name == "cloud-init" and last.status == "Failed" and "status: error" in last.output:
                raise GateFailed(host, name, last.output, "cloud-init reported an error")
            log(f"gate: {host} {name}: {last.status}, retrying")
            sleep(10)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--region", required=True)
    ap.add_argument("--host", required=True)
    ap.add_argument("--instance-id", required=True)
    ap.add_argument("--roles", required=True)
    ap.add_argument("--timeout", type=float, default=900)
    args = ap.parse_args(argv)
    import boto3

    ssm = boto3.client("ssm", region_name=args.region)
    try:
        run_gate(ssm, args.host, args.instance_id, args.roles.split(","), args.timeout)
    except GateFailed as e:
        print(str(e), file=sys.stderr)
        return 1
    print(f"{args.host} ready")
    return 0


if __name__ == "__main__":
    sys.exit(main())
