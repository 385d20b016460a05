#!/usr/bin/env python3
"""Readiness gate for one host, run by `pulumi up` (pulumi-command) after the host exists:
wait until cloud-init finished and the host's role health checks pass, through SSM
send-command, within a timeout.

    python3 tools/gate.py --region R --host data-1 --instance-id i-... --roles data --timeout 900 \\
        [--accept-degraded]

Exit 0 when ready. Exit 1 with `gate failed: host H check C: <why>; last output: ...` (the
host, the check and what it last printed) as soon as the answer is known to be no, or when
the timeout passes. Credentials are the operator's (the same that run `pulumi up`).

How an answer is read. The SSM invocation status is `StatusDetails` when the API gives it
(it tells a delivery time-out from an execution time-out), else `Status`.

cloud-init check (`cloud-init status --wait --long`, which prints `status: <s>` and, from
cloud-init 23.4 on, `extended_status:`, `errors:` and `recoverable_errors:`):

- `Undeliverable`, `DeliveryTimedOut`, or the SSM call itself raising (e.g. InvalidInstanceId
  while the agent registers): the agent was not there yet. Retried until the deadline.
- `status: error` (exit 1): fails now, with cloud-init's listed errors.
- `status: done` with `extended_status: degraded done` (exit 2, cloud-init >= 23.4, so every
  Ubuntu 24.04 host): cloud-init ran the config but recorded recoverable errors (a module
  that raised and was skipped, a warning, a deprecated key). By default this FAILS now,
  listing the recoverable errors: a host whose configuration ran with errors is not called
  ready, because the next step of `pulumi up` (replacing the next web/app host, handing
  traffic over) would build on it. `--accept-degraded` (or HPC_GATE_ACCEPT_DEGRADED=1 in the
  environment of `pulumi up`) accepts it, logs the recoverable errors and goes on to the
  role checks, which still have to pass.
- `status: done`, SSM `Success`: cloud-init is done.
- `status: running` / `status: not started` (the command hit its execution time-out while
  `--wait` was still waiting), or an `ExecutionTimedOut`/`TimedOut` that printed no status
  line (only `--wait`'s dots): not yet, retried until the deadline.
- `status: disabled`: fails now (the user-data never runs).
- Any other terminal status (`Failed` without a status line, e.g. exit 127 when there is no
  cloud-init, `Cancelled`, `Terminated`, `AccessDenied`, ...) or `Success` without a status
  line: fails now; waiting would not change the answer.

Role checks (each a shell command that exits 0 when the role is healthy): anything but
`Success` is a failed attempt, retried every RETRY_S seconds until the deadline; the message
then names the host, the check and its last output.

LB state (`--lb-state drain|ready --stack S --lb-hosts lb-1,lb-2 --servers be_api/app-2-5010,...`):
instead of a gate, set a web/app host's HAProxy servers to `drain` (no new requests; the
gate waits up to DRAIN_WAIT_S for its open sessions to end; with --stack, the websocket
services' servers then go to `maint` and their sessions are closed, so clients reconnect
to another server) or back to `ready` on every LB,
through HAProxy's runtime API (the admin socket) by the same SSM path. A server or backend
HAProxy does not know fails now (exit 3 of the script: the command names a server the LB's
config lacks); an unreachable agent or admin socket is retried until the timeout. The LB
instances are looked up when the command runs (EC2, running instances tagged Stack=S and
Name=<lb>), so the command text, and with it the program's drain resource, does not change
when an LB is replaced (`--lb-instance-ids` names them directly instead).

An SSM call that raises with a credential or permission error (AccessDenied, expired token)
fails now for every check: retrying with the same credentials gives the same answer.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# role -> (check name, shell command); each must exit 0 when the role is healthy.
ROLE_CHECKS: dict[str, list[tuple[str, str]]] = {
    "lb": [("haproxy", "curl -fsS -o /dev/null http://127.0.0.1:8404/metrics"),
           ("keepalived", "pidof keepalived")],
    "web": [("nginx", "curl -fsS http://127.0.0.1:8080/health")],
    "app": [("portal", "curl -fsS http://127.0.0.1:5010/api/health"),
            ("dbwriter", "curl -fsS -o /dev/null http://127.0.0.1:8405/ || pidof haproxy")],
    # hpc-clustercheck listens on the host's private address only (HAProxy asks it there).
    "data": [("galera-synced", "curl -fsS http://$(hostname -I | cut -d' ' -f1):9200/"),
             ("redis", "REDISCLI_AUTH=$(cat /run/hpc/secrets/redis_password) redis-cli -h $(hostname -I | cut -d' ' -f1) ping")],
    "slurm": [("slurmctld", "scontrol ping")],
    "monitoring": [("prometheus", "curl -fsS http://127.0.0.1:9090/-/ready"),
                   ("alertmanager", "curl -fsS http://127.0.0.1:9093/-/ready")],
}
CLOUD_INIT = ("cloud-init", "cloud-init status --wait --long")
ACCEPT_DEGRADED_ENV = "HPC_GATE_ACCEPT_DEGRADED"

POLL_S = 2.0    # between get_command_invocation calls for one command
RETRY_S = 10.0  # between two attempts of a check

# SSM invocation statuses (Status and StatusDetails, spaces removed) that are not final yet.
IN_FLIGHT = {"Pending", "InProgress", "Delayed", "Cancelling"}
# The command never reached the agent: right after boot the agent is not registered yet.
NOT_DELIVERED = {"Undeliverable", "DeliveryTimedOut", "Error"}
# The command ran into the execution time-out the gate itself set.
TIMED_OUT = {"ExecutionTimedOut", "TimedOut"}
# Error codes of a raising SSM call that no retry will change.
FATAL_API_ERRORS = {"AccessDenied", "AccessDeniedException", "UnrecognizedClientException", "InvalidClientTokenId",
                    "ExpiredToken", "ExpiredTokenException", "InvalidDocument", "InvalidDocumentVersion"}


class GateFailed(Exception):
    def __init__(self, host: str, check: str, output: str, why: str):
        self.host, self.check, self.output, self.why = host, check, output, why
        tail = "\n".join(output.strip().splitlines()[-15:])
        super().__init__(f"gate failed: host {host} check {check}: {why}; last output:\n{tail}")


@dataclass
class Result:
    ok: bool
    output: str
    status: str
    response_code: int | None = None
    fatal: bool = False  # the SSM call raised an error no retry changes


def run_remote(ssm: Any, instance_id: str, cmd: str, sleep: Callable[[float], None], wait_s: float = 600) -> Result:
    sent = ssm.send_command(InstanceIds=[instance_id], DocumentName="AWS-RunShellScript",
                            Parameters={"commands": [cmd], "executionTimeout": [str(int(wait_s))]},
                            TimeoutSeconds=60)
    cid = sent["Command"]["CommandId"]
    status, out, rc = "Pending", "", None
    for _ in range(int(wait_s / POLL_S) + 1):
        sleep(POLL_S)
        try:
            inv = ssm.get_command_invocation(CommandId=cid, InstanceId=instance_id)
        except Exception as e:  # noqa: BLE001 - InvocationDoesNotExist right after sending
            if _api_error_code(e) in FATAL_API_ERRORS:
                raise
            out = str(e)
            continue
        status = str(inv.get("StatusDetails") or inv["Status"]).replace(" ", "")
        out = (inv.get("StandardOutputContent") or "") + (inv.get("StandardErrorContent") or "")
        code = inv.get("ResponseCode")
        rc = code if isinstance(code, int) and code >= 0 else None
        if status not in IN_FLIGHT:
            break
    return Result(status == "Success", out, status, rc)


def _api_error_code(e: Exception) -> str:
    """The error code of a botocore ClientError ('' for anything else)."""
    response = getattr(e, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


@dataclass
class CloudInitStatus:
    """What `cloud-init status --long` printed (tabular format)."""
    status: str | None  # done | error | running | not started | disabled | None (no status line)
    extended: str = ""
    errors: list[str] = field(default_factory=list)
    recoverable: dict[str, list[str]] = field(default_factory=dict)

    @property
    def degraded(self) -> bool:
        return self.extended.startswith("degraded")

    def listed(self, which: str) -> str:
        if which == "errors":
            items = self.errors
        else:
            items = [f"{kind}: {msg}" for kind, msgs in self.recoverable.items() for msg in msgs]
        return "; ".join(items) if items else "none listed"


_STATUS = re.compile(r"^\.*status:\s*(.*?)\s*$")


def parse_cloud_init(output: str) -> CloudInitStatus:
    parsed = CloudInitStatus(None)
    section = ""
    kind = ""
    for line in output.splitlines():
        m = _STATUS.match(line)
        if m and parsed.status is None:
            parsed.status = m.group(1)
            continue
        key, sep, rest = line.partition(":")
        if line.startswith("extended_status:"):
            parsed.extended = rest.strip()
        elif line.startswith("errors:"):
            section = "errors"
        elif line.startswith("recoverable_errors:"):
            section, kind = "recoverable", ""
        elif line[:1].isspace() and line.strip().startswith("- "):
            item = line.strip()[2:].strip()
            if section == "errors":
                parsed.errors.append(item)
            elif section == "recoverable":
                parsed.recoverable.setdefault(kind or "unknown", []).append(item)
        elif section == "recoverable" and sep and not rest.strip() and not line[:1].isspace():
            kind = key.strip()
        elif line.strip():
            section = ""
    return parsed


@dataclass
class Verdict:
    state: str  # ok | wait | fail
    why: str


def judge_cloud_init(r: Result, accept_degraded: bool) -> Verdict:
    if r.fatal:
        return Verdict("fail", f"the SSM call failed ({r.status})")
    if r.status in IN_FLIGHT:
        return Verdict("wait", f"SSM command still {r.status}")
    if r.status in NOT_DELIVERED:
        return Verdict("wait", f"SSM agent not reachable yet ({r.status})")
    ci = parse_cloud_init(r.output)
    if ci.status == "error":
        return Verdict("fail", f"cloud-init reported an error: {ci.listed('errors')}")
    if ci.status == "done":
        if ci.degraded or (r.response_code == 2 and r.status != "Success"):
            listed = ci.listed("recoverable")
            if accept_degraded:
                return Verdict("ok", f"cloud-init done, degraded (accepted): {listed}")
            return Verdict("fail", f"cloud-init finished degraded (recoverable errors: {listed}); "
                                   f"pass --accept-degraded or set {ACCEPT_DEGRADED_ENV}=1 to accept")
        if r.status == "Success":
            return Verdict("ok", "cloud-init done")
        return Verdict("fail", f"cloud-init says done but the command ended {r.status}"
                               f"{'' if r.response_code is None else f' (exit {r.response_code})'}")
    if ci.status in ("running", "not started"):
        return Verdict("wait", f"cloud-init {ci.status} ({r.status})")
    if ci.status == "disabled":
        return Verdict("fail", "cloud-init is disabled on the host, its user-data never runs")
    if ci.status is None and r.status in TIMED_OUT:
        return Verdict("wait", f"cloud-init status --wait still waiting ({r.status})")
    shown = "no cloud-init status line" if ci.status is None else f"unknown cloud-init status {ci.status!r}"
    code = "" if r.response_code is None else f", exit {r.response_code}"
    return Verdict("fail", f"SSM command ended {r.status}{code} with {shown}")


def judge_role_check(r: Result) -> Verdict:
    if r.fatal:
        return Verdict("fail", f"the SSM call failed ({r.status})")
    if r.ok:
        return Verdict("ok", "ok")
    return Verdict("wait", r.status)


def run_gate(ssm: Any, host: str, instance_id: str, roles: list[str], timeout: float,
             sleep: Callable[[float], None] | None = None, clock: Callable[[], float] | None = None,
             log: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
             accept_degraded: bool = False) -> None:
    sleep = sleep or time.sleep  # looked up per call, so a test can replace time.sleep
    clock = clock or time.monotonic
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
                code = _api_error_code(e)
                fatal = code in FATAL_API_ERRORS
                last = Result(False, str(e), code if fatal else "Error", fatal=fatal)
            verdict = judge_cloud_init(last, accept_degraded) if (name, cmd) == CLOUD_INIT else judge_role_check(last)
            if verdict.state == "ok":
                log(f"gate: {host} {name}: {verdict.why}")
                break
            if verdict.state == "fail":
                raise GateFailed(host, name, last.output, verdict.why)
            log(f"gate: {host} {name}: {verdict.why}, retrying")
            sleep(RETRY_S)


ADMIN_SOCKET = "/run/haproxy/admin.sock"
DRAIN_WAIT_S = 60  # at most this long for a drained server's open sessions to end
UNKNOWN_SERVER_EXIT = 3
LB_STATES = ("drain", "ready")


def haproxy_state_script(servers: list[str], state: str, wait_s: int = DRAIN_WAIT_S,
                         sock: str = ADMIN_SOCKET, tunnels: list[str] | None = None) -> str:
    """The shell script an LB runs: `set server <b>/<s> state <state>` for each server
    through the runtime API (an answer means an error: HAProxy answers nothing on
    success), then for `drain` wait until their current sessions (`show stat` scur) end.

    `tunnels`: backends whose sessions are websockets. Those never end by themselves,
    and a drained server still takes the clients whose cookie names it, so a reconnect
    would come back to it. Once the other servers' sessions have ended, such a server
    goes to `maint` (persistence no longer applies: the next connection goes to another
    server) and its sessions are shut down, so each client reconnects to another server
    now instead of after the wait and the host's deletion."""
    if state not in LB_STATES:
        raise ValueError(f"state {state!r}: allowed are {', '.join(LB_STATES)}")
    if not servers or any(s.count("/") != 1 or not re.fullmatch(r"[A-Za-z0-9_.:/-]+", s) for s in servers):
        raise ValueError(f"servers {servers!r}: <backend>/<server> names")
    if any(not re.fullmatch(r"[A-Za-z0-9_.:-]+", b) for b in tunnels or []):
        raise ValueError(f"tunnels {tunnels!r}: backend names")
    names = " ".join(servers)
    lines = [
        f"sock={sock}",
        f"for s in {names}; do",
        f'  out=$(echo "set server $s state {state}" | socat stdio "$sock") || {{ echo "$s: no runtime API at $sock"; exit 1; }}',
        f'  if [ -n "$out" ]; then echo "$s: $out"; exit {UNKNOWN_SERVER_EXIT}; fi',
        "done",
    ]
    ws = [s for s in servers if s.split("/")[0] in (tunnels or [])]
    waited = [s for s in servers if s not in ws]
    if state == "drain" and waited:
        lines += [
            f"end=$(( $(date +%s) + {int(wait_s)} ))",
            f"for s in {' '.join(waited)}; do",
            '  b=${s%%/*}; n=${s#*/}',
            "  while :; do",
            "    cur=$(echo 'show stat' | socat stdio \"$sock\" | awk -F, -v b=\"$b\" -v n=\"$n\" '$1==b && $2==n {print $5}')",
            '    [ "${cur:-0}" = 0 ] && break',
            f'    if [ "$(date +%s)" -ge "$end" ]; then echo "$s: $cur sessions still open after {int(wait_s)} s"; break; fi',
            "    sleep 1",
            "  done",
            "done",
        ]
    if state == "drain" and ws:
        lines += [
            f"for s in {' '.join(ws)}; do",
            # One connection, one line: the runtime API runs `;`-separated commands in turn.
            '  out=$(echo "set server $s state maint; shutdown sessions server $s" | socat stdio "$sock")',
            '  if [ -n "$(echo "$out" | tr -d \'[:space:]\')" ]; then echo "$s: $out"; exit 1; fi',
            '  echo "$s: maint, its websockets closed (clients reconnect to another server)"',
            "done",
        ]
    lines.append(f'echo "{state}: {names} on $(hostname)"')
    return "\n".join(lines)


def tunnel_backends(stack: str) -> list[str]:
    """The HAProxy backends of the stack's websocket services (cloud_init/templates/lb/
    haproxy.cfg: be_<service>)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    try:
        from components.gates import tunnel_backends as backends
        from components.stackfile import load_stack

        cfg, _topo = load_stack(stack)
    except Exception as e:  # noqa: BLE001 - the drain still works, only waits for websockets
        print(f"lb-state: stack {stack}'s services unreadable ({e}): websocket servers are drained like the "
              "others (their sessions wait out the drain)", file=sys.stderr)
        return []
    return backends(cfg)


def set_lb_state(ssm: Any, host: str, lb_instance_ids: list[str], servers: list[str], state: str,
                 timeout: float, sleep: Callable[[float], None] | None = None,
                 clock: Callable[[], float] | None = None,
                 log: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
                 tunnels: list[str] | None = None) -> None:
    """Set `servers` to `state` on every LB, one LB after the other; GateFailed as soon as
    an LB refuses (unknown server) or when the timeout passes."""
    sleep = sleep or time.sleep
    clock = clock or time.monotonic
    deadline = clock() + timeout
    script = haproxy_state_script(servers, state, tunnels=tunnels)
    check = f"haproxy-{state}"
    for lb in lb_instance_ids:
        last = Result(False, "", "NotRun")
        while True:
            if clock() > deadline:
                raise GateFailed(host, check, last.output, f"LB {lb} not set to {state} after {timeout:.0f}s (status {last.status})")
            try:
                last = run_remote(ssm, lb, script, sleep, wait_s=max(10.0, min(DRAIN_WAIT_S + 60.0, deadline - clock())))
            except Exception as e:  # noqa: BLE001 - agent not registered yet, throttling
                code = _api_error_code(e)
                fatal = code in FATAL_API_ERRORS
                last = Result(False, str(e), code if fatal else "Error", fatal=fatal)
            if last.fatal:
                raise GateFailed(host, check, last.output, f"the SSM call to LB {lb} failed ({last.status})")
            if last.ok:
                log(f"lb-state: {host} {state} on {lb}: {last.output.strip()}")
                break
            if last.response_code == UNKNOWN_SERVER_EXIT:
                raise GateFailed(host, check, last.output, f"LB {lb}'s HAProxy does not know these servers")
            log(f"lb-state: {host} {state} on {lb}: {last.status}, retrying")
            sleep(RETRY_S)


def lb_instance_ids(ec2: Any, stack: str, lb_hosts: list[str]) -> list[str]:
    """The running instances of these LB hosts (tags Stack and Name, as the program sets
    them); SystemExit naming the host that has none."""
    ids: list[str] = []
    for lb in lb_hosts:
        found = [i["InstanceId"]
                 for page in ec2.get_paginator("describe_instances").paginate(Filters=[
                     {"Name": "tag:Stack", "Values": [stack]}, {"Name": "tag:Name", "Values": [lb]},
                     {"Name": "instance-state-name", "Values": ["running"]}])
                 for r in page["Reservations"] for i in r["Instances"]]
        if not found:
            raise SystemExit(f"lb-state: no running instance tagged Stack={stack} Name={lb}")
        ids += sorted(found)
    return ids


def accept_degraded_from_env(environ: Mapping[str, str]) -> bool:
    raw = environ.get(ACCEPT_DEGRADED_ENV, "").strip().lower()
    if raw in ("", "0", "false", "no"):
        return False
    if raw in ("1", "true", "yes"):
        return True
    raise SystemExit(f"{ACCEPT_DEGRADED_ENV}={environ[ACCEPT_DEGRADED_ENV]!r}: allowed are 1/true/yes or 0/false/no")


def main(argv: list[str] | None = None, environ: Mapping[str, str] = os.environ) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--region", required=True)
    ap.add_argument("--host", required=True)
    ap.add_argument("--instance-id", help="the host's instance (gate)")
    ap.add_argument("--roles", help="the host's roles (gate)")
    ap.add_argument("--lb-state", choices=LB_STATES, help="instead of the gate: set the host's servers on every LB")
    ap.add_argument("--lb-instance-ids", help="the LB instances (with --lb-state), comma-separated")
    ap.add_argument("--lb-hosts", help="the LB hosts (with --lb-state and --stack), looked up when the command runs")
    ap.add_argument("--stack", help="the stack whose LB hosts --lb-hosts names")
    ap.add_argument("--servers", help="the host's HAProxy <backend>/<server> names (with --lb-state)")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--accept-degraded", action="store_true",
                    help="call a host ready when cloud-init finished 'degraded done' (recoverable errors)")
    args = ap.parse_args(argv)
    if args.lb_state:
        if not ((args.lb_instance_ids or (args.lb_hosts and args.stack)) and args.servers):
            ap.error("--lb-state needs --servers and --lb-instance-ids or --lb-hosts with --stack")
    elif not (args.instance_id and args.roles):
        ap.error("the gate needs --instance-id and --roles")
    accept = args.accept_degraded or accept_degraded_from_env(environ)
    import boto3

    ssm = boto3.client("ssm", region_name=args.region)
    if args.lb_state:
        lbs = (args.lb_instance_ids.split(",") if args.lb_instance_ids else
               lb_instance_ids(boto3.client("ec2", region_name=args.region), args.stack, args.lb_hosts.split(",")))
        try:
            set_lb_state(ssm, args.host, lbs, args.servers.split(","), args.lb_state, args.timeout,
                         tunnels=tunnel_backends(args.stack) if args.stack else [])
        except GateFailed as e:
            print(str(e), file=sys.stderr)
            return 1
        print(f"{args.host} {args.lb_state} on every LB")
        return 0
    try:
        run_gate(ssm, args.host, args.instance_id, args.roles.split(","), args.timeout, accept_degraded=accept)
    except GateFailed as e:
        print(str(e), file=sys.stderr)
        return 1
    print(f"{args.host} ready")
    return 0


if __name__ == "__main__":
    sys.exit(main())
