"""Readiness gates on by default where it matters, and the HAProxy drain around every
web/app replacement, proven over the program's resource graph under the strict mocks:
drain(N) -> instance(N) -> gate(N) -> put-back(N) -> drain(N+1), so never more than one
web/app host is out of service. The drain script itself runs against a live HAProxy's
runtime API."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from components.stackfile import load_stack
from offline.harness import ProgramRun
from tests.conftest import STACKS, program_run
from tests.loadfile import load_tool

gate = load_tool("gate")


# The resource graph the replacement-plan model orders by (one implementation of it).
graph = load_tool("replacement_plan").graph


def before(deps: dict[str, set[str]], first: str, then: str) -> bool:
    """`then` waits (transitively) for `first`."""
    seen, todo = set(), [then]
    while todo:
        n = todo.pop()
        for d in deps.get(n, ()):
            if d == first:
                return True
            if d not in seen:
                seen.add(d)
                todo.append(d)
    return False


def web_app(run: ProgramRun) -> list[str]:
    stateful = {"lb", "data", "slurm", "monitoring"}
    return [n for n, h in run.outputs["hosts"].items() if not set(h["roles"]) & stateful]


@pytest.mark.parametrize("stack", STACKS)
def test_prod_like_stacks_have_gates_on(stack, tally):
    """A stack of the ha profile, or the production stack, without gates would let an
    approved `pulumi up` replace every web/app host back to back."""
    cfg, _ = load_stack(stack)
    if cfg.profile == "ha" or stack == "prod":
        tally.check(cfg.gates.enabled, f"Pulumi.{stack}.yaml: gates must be on for a production-like stack")
        tally.check(program_run(stack).outputs["gates"], stack)
    else:
        tally.check(cfg.profile == "minimal", stack)


@pytest.mark.parametrize("stack", [s for s in STACKS if load_stack(s)[0].gates.enabled])
def test_each_web_app_host_is_drained_replaced_gated_and_put_back_before_the_next(stack, tally):
    run = program_run(stack)
    deps = graph(run)
    s = run.stack
    hosts = web_app(run)
    lbs = [n for n, h in run.outputs["hosts"].items() if "lb" in h["roles"]]
    tally.expect(3 * len(hosts))
    for n in hosts:
        drain, inst, gate_, ready = (f"{s}-{n}-lb-drain", f"{s}-{n}-instance", f"{s}-{n}-gate-ready", f"{s}-{n}-lb-ready")
        tally.check(before(deps, drain, inst), f"{n}: drained before its instance is touched")
        tally.check(before(deps, inst, gate_) and before(deps, gate_, ready), f"{n}: put back after its gate")
        for lb in lbs:
            tally.check(before(deps, f"{s}-{lb}-gate-ready", drain), f"{n}: drained only once {lb} serves")
    # total order of the out-of-service windows [drain, put-back]
    for prev, cur in zip(hosts, hosts[1:], strict=False):
        tally.check(before(deps, f"{s}-{prev}-lb-ready", f"{s}-{cur}-lb-drain"), (prev, cur))
    for a in hosts:
        for b in hosts:
            if a < b:
                tally.check(before(deps, f"{s}-{a}-lb-ready", f"{s}-{b}-lb-drain")
                            or before(deps, f"{s}-{b}-lb-ready", f"{s}-{a}-lb-drain"),
                            f"{a} and {b} could be out of service together")


def test_drain_and_put_back_name_every_lb_and_every_server_and_are_keyed_to_re_run(prod, tally):
    ids = {n: h["instance_id"] for n, h in prod.outputs["hosts"].items()}
    cfg, _ = load_stack("prod")
    drain = prod.named("prod-app-2-lb-drain")
    ready = prod.named("prod-app-2-lb-ready")
    servers = ",".join([f"be_{s.name}/app-2-{p}" for s in cfg.services for p in s.ports] + ["be_web/app-2"])
    for cmd, state in ((drain, "drain"), (ready, "ready")):
        c = cmd.inputs["create"]
        tally.check(f"--lb-state {state} --stack prod --lb-hosts lb-1,lb-2 --servers {servers}" in c, c)
        tally.check(not any(i in c for i in ids.values()), "no instance id: an LB replacement must not change the text")
    tally.check(drain.inputs["update"] == gate_update(), "an update of the drain drains nothing")
    tally.check("update" not in ready.inputs or ready.inputs["update"] in ("", None), "a put-back may run again")
    user_data_sha = prod.named("prod-app-2-gate-ready").inputs["triggers"][1]
    tally.check(drain.inputs["triggers"] == [user_data_sha, prod.outputs["hosts"]["app-2"]["instance_type"]],
                "a new user-data or instance type drains the host first")
    tally.check(ready.inputs["triggers"] == [ids["app-2"], drain.id], "every drain and every new instance is followed by a put-back")


def gate_update() -> str:
    from components.gates import DRAIN_UPDATE

    return DRAIN_UPDATE


def test_lb_instances_are_looked_up_by_stack_and_name_tags(tally):
    """moto's EC2: the running instance tagged Stack and Name, the terminated one not."""
    import boto3
    from moto import mock_aws

    with mock_aws():
        ec2 = boto3.client("ec2", region_name="ap-northeast-2", aws_access_key_id="x", aws_secret_access_key="x")
        image = ec2.describe_images()["Images"][0]["ImageId"]

        def launch(name: str, stack: str) -> str:
            return ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1, TagSpecifications=[
                {"ResourceType": "instance", "Tags": [{"Key": "Name", "Value": name}, {"Key": "Stack", "Value": stack}]}],
            )["Instances"][0]["InstanceId"]

        old = launch("lb-1", "prod")
        ec2.terminate_instances(InstanceIds=[old])
        lb1, lb2, _ = launch("lb-1", "prod"), launch("lb-2", "prod"), launch("lb-1", "dev")
        tally.check(gate.lb_instance_ids(ec2, "prod", ["lb-1", "lb-2"]) == [lb1, lb2])
        with pytest.raises(SystemExit) as info:
            gate.lb_instance_ids(ec2, "prod", ["lb-3"])
        tally.check("Name=lb-3" in str(info.value))


def test_gates_can_be_refused_for_a_prod_like_override(tally):
    """The default follows the profile: switching them off is explicit."""
    from components.config import load_config
    from components.stackfile import namespace, project_name, read_stack

    config, _ = read_stack("prod")
    raw = namespace(config, project_name())
    raw.pop("gates", None)
    cfg = load_config(raw, stack="prod", project=project_name(), region="ap-northeast-2",
                      configured_secrets=frozenset({"tls_cert", "tls_key"}))
    tally.check(cfg.gates.enabled and cfg.gates.timeout_s == 900, "the ha profile's default")
    raw["gates"] = {"enabled": False}
    cfg = load_config(raw, stack="prod", project=project_name(), region="ap-northeast-2",
                      configured_secrets=frozenset({"tls_cert", "tls_key"}))
    tally.check(not cfg.gates.enabled)


# ------------------------------------------------------------------ the LB-state command


class FakeSsm:
    """send_command/get_command_invocation answering from a list per instance."""

    def __init__(self, answers: dict[str, list[dict[str, Any]]]):
        self.answers = answers
        self.sent: list[tuple[str, str]] = []

    def send_command(self, InstanceIds, DocumentName, Parameters, TimeoutSeconds):  # noqa: N803 - boto3's names
        self.sent.append((InstanceIds[0], Parameters["commands"][0]))
        return {"Command": {"CommandId": f"c{len(self.sent)}"}}

    def get_command_invocation(self, CommandId, InstanceId):  # noqa: N803
        queue = self.answers[InstanceId]
        return queue.pop(0) if len(queue) > 1 else queue[0]


def _inv(status: str, out: str = "", rc: int | None = None) -> dict[str, Any]:
    return {"Status": status, "StandardOutputContent": out, "StandardErrorContent": "",
            **({"ResponseCode": rc} if rc is not None else {})}


def test_lb_state_sets_every_lb_and_fails_now_on_an_unknown_server(tally):
    clock = [0.0]
    ok = FakeSsm({"i-a": [_inv("Failed", "no runtime API", 1), _inv("Success", "drain: ...")],
                  "i-b": [_inv("Success", "drain: ...")]})
    gate.set_lb_state(ok, "app-2", ["i-a", "i-b"], ["be_web/app-2"], "drain", 600,
                      sleep=lambda s: clock.__setitem__(0, clock[0] + s), clock=lambda: clock[0], log=lambda m: None)
    tally.check([i for i, _ in ok.sent] == ["i-a", "i-a", "i-b"], ok.sent)
    tally.check("set server $s state drain" in ok.sent[0][1] and "be_web/app-2" in ok.sent[0][1])
    clock[0] = 0.0
    bad = FakeSsm({"i-a": [_inv("Failed", "be_web/app-9: No such server.", gate.UNKNOWN_SERVER_EXIT)]})
    with pytest.raises(gate.GateFailed) as info:
        gate.set_lb_state(bad, "app-9", ["i-a"], ["be_web/app-9"], "ready", 600,
                          sleep=lambda s: clock.__setitem__(0, clock[0] + s), clock=lambda: clock[0], log=lambda m: None)
    tally.check("does not know these servers" in str(info.value) and clock[0] < 60, (str(info.value), clock[0]))
    with pytest.raises(ValueError):
        gate.haproxy_state_script(["be_web/app-2; reboot"], "drain")


HAPROXY_CFG = """global
    stats socket {sock} mode 600 level admin
defaults
    mode http
    timeout connect 1s
    timeout client 5s
    timeout server 5s
backend be_web
    server app-2 127.0.0.1:{port}
backend be_api
    server app-2-5010 127.0.0.1:{port}
frontend fe
    bind 127.0.0.1:{front}
    default_backend be_web
"""


def _state(sock: str, backend: str, server: str) -> str:
    out = subprocess.run(["socat", "stdio", sock], input="show servers state\n", capture_output=True, text=True,
                         check=True).stdout
    for line in out.splitlines():
        f = line.split()
        if len(f) > 6 and f[1] == backend and f[3] == server:
            return f[6]  # srv_admin_state: 0 ready, 8 drain
    raise AssertionError(f"{backend}/{server} not in {out}")


@contextlib.contextmanager
def live_haproxy(tmp_path: Path, cfg: str, **fmt: Any) -> Iterator[str]:
    """HAProxy started from `cfg` (formatted with its admin socket's path as `sock` and
    `fmt`); yields the socket once HAProxy listens on it; stopped afterwards."""
    for tool in ("haproxy", "socat"):
        assert shutil.which(tool), f"{tool} is needed (tools/install-debian-deps.sh installs it)"
    sock = str(tmp_path / "admin.sock")
    (tmp_path / "h.cfg").write_text(cfg.format(sock=sock, **fmt))
    proc = subprocess.Popen(["haproxy", "-db", "-f", str(tmp_path / "h.cfg")], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                out = proc.stdout.read().decode() if proc.stdout and proc.poll() is not None else "still starting"
                raise AssertionError(f"HAProxy did not open {sock}: {out}")
            time.sleep(0.05)
        yield sock
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_the_drain_script_against_a_live_haproxy(tmp_path: Path, tally):
    port = 20000 + os.getpid() % 20000
    with live_haproxy(tmp_path, HAPROXY_CFG, port=port + 1, front=port) as sock:
        servers = ["be_web/app-2", "be_api/app-2-5010"]
        drain = subprocess.run(["sh", "-c", gate.haproxy_state_script(servers, "drain", wait_s=5, sock=sock)],
                               capture_output=True, text=True)
        tally.check(drain.returncode == 0, drain.stdout + drain.stderr)
        tally.check(_state(sock, "be_web", "app-2") == "8" and _state(sock, "be_api", "app-2-5010") == "8")
        ready = subprocess.run(["sh", "-c", gate.haproxy_state_script(servers, "ready", sock=sock)],
                               capture_output=True, text=True)
        tally.check(ready.returncode == 0 and _state(sock, "be_web", "app-2") == "0", ready.stdout)
        unknown = subprocess.run(["sh", "-c", gate.haproxy_state_script(["be_web/app-9"], "drain", sock=sock)],
                                 capture_output=True, text=True)
        tally.check(unknown.returncode == gate.UNKNOWN_SERVER_EXIT and "app-9" in unknown.stdout, unknown.stdout)


HAPROXY_WS_CFG = """global
    stats socket {sock} mode 600 level admin
defaults
    mode http
    timeout connect 1s
    timeout client 60s
    timeout server 60s
backend be_api
    server app-2-5010 127.0.0.1:{dead}
backend be_ws
    server app-2-5011 127.0.0.1:{held}
frontend fe
    bind 127.0.0.1:{front}
    default_backend be_ws
"""


def test_a_drain_closes_a_websocket_servers_sessions_instead_of_waiting_them_out(tmp_path: Path, tally):
    """A websocket's session never ends by itself: the drain sets its server to maint and
    shuts its sessions down (the client reconnects elsewhere) instead of waiting the whole
    DRAIN_WAIT_S and leaving it to the host's deletion; without `tunnels` it waits."""
    import socket

    held = socket.create_server(("127.0.0.1", 0))  # accepts, never answers: an open websocket
    held.settimeout(10)
    front = held.getsockname()[1] + 1
    servers = ["be_api/app-2-5010", "be_ws/app-2-5011"]
    with held, live_haproxy(tmp_path, HAPROXY_WS_CFG, held=held.getsockname()[1], dead=front + 1,
                            front=front) as sock:
        def open_client() -> tuple[socket.socket, socket.socket]:
            c = socket.create_connection(("127.0.0.1", front), timeout=10)
            # A request the server never answers holds the session open, as an upgraded
            # websocket does (HAProxy wants a real handshake before it tunnels).
            c.sendall(b"GET /ws/ HTTP/1.1\r\nHost: portal\r\n\r\n")
            conn, _ = held.accept()  # HAProxy reached the server: the session is open
            conn.settimeout(10)
            return c, conn  # both ends held: the session stays open

        c, server_end = open_client()
        # Without tunnels: the drain waits for the session, which does not end.
        t = time.monotonic()
        waited = subprocess.run(["sh", "-c", gate.haproxy_state_script(servers, "drain", wait_s=3, sock=sock)],
                                capture_output=True, text=True)
        tally.check(waited.returncode == 0 and "be_ws/app-2-5011: 1 sessions still open after 3 s" in waited.stdout
                    and time.monotonic() - t >= 3, waited.stdout)
        # With tunnels: maint, the session shut down at once.
        t = time.monotonic()
        closed = subprocess.run(["sh", "-c", gate.haproxy_state_script(servers, "drain", wait_s=30, sock=sock,
                                                                       tunnels=["be_ws"])],
                                capture_output=True, text=True)
        took = time.monotonic() - t
        tally.check(closed.returncode == 0 and "be_ws/app-2-5011: maint, its websockets closed" in closed.stdout
                    and took < 15, (closed.stdout + closed.stderr, took))
        tally.check(_state(sock, "be_ws", "app-2-5011") == "1" and _state(sock, "be_api", "app-2-5010") == "8")
        # The server's end is closed; the client gets the close (an upgraded websocket) or,
        # for this unanswered request, HAProxy's 502 on its kept-alive connection.
        got = b""
        while chunk := server_end.recv(4096):
            got += chunk
        tally.check(got.startswith(b"GET /ws/"), got)
        answer = c.recv(4096)
        tally.check(answer == b"" or answer.startswith(b"HTTP/1.1 502"), answer)
        ready = subprocess.run(["sh", "-c", gate.haproxy_state_script(servers, "ready", sock=sock)],
                               capture_output=True, text=True)
        tally.check(ready.returncode == 0 and _state(sock, "be_ws", "app-2-5011") == "0", ready.stdout)


def test_the_websocket_backends_come_from_the_stacks_services(tally, capsys):
    tally.check(gate.tunnel_backends("prod") == ["be_ws"], gate.tunnel_backends("prod"))
    tally.check(gate.tunnel_backends("no-such-stack") == [])
    tally.check("websocket servers are drained like the others" in capsys.readouterr().err)
    script = gate.haproxy_state_script(["be_api/app-2-5010", "be_ws/app-2-5011"], "drain", tunnels=["be_ws"])
    tally.check("for s in be_api/app-2-5010; do" in script and "state maint; shutdown sessions server $s" in script
                and "for s in be_ws/app-2-5011; do" in script, script)
    ready = gate.haproxy_state_script(["be_ws/app-2-5011"], "ready", tunnels=["be_ws"])
    tally.check("maint" not in ready and "shutdown" not in ready, ready)
