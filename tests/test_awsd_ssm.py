"""The SSM Run Command agent stand-in (rehearsal/awsd.py SsmAgent) behind moto, spoken to
by boto3 and by tools/gate.py's own SSM loop: a command runs, its exit code and output
come back, and what the agent cannot do fails loudly."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError

from rehearsal.awsd import ApiFaults, SsmAgent, with_faults

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import gate  # noqa: E402

HOSTS = {"i-0aaaaaaaaaaaaaaa1": "lb-1", "i-0aaaaaaaaaaaaaaa2": "lb-2"}


@pytest.fixture
def endpoint() -> Iterator[tuple[str, SsmAgent, list[str]]]:
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    ran: list[str] = []

    def execute(host: str, script: str, timeout: float) -> tuple[int, str]:
        ran.append(host)
        try:
            cp = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return 124, ""
        return cp.returncode, cp.stdout + cp.stderr

    agent = SsmAgent(HOSTS.get, execute)
    app = with_faults(DomainDispatcherApplication(create_backend_app), ApiFaults(), agent)
    srv = make_server("127.0.0.1", 0, app, threaded=True)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_port}", agent, ran
    finally:
        srv.shutdown()


def ssm(url: str) -> Any:
    return boto3.client("ssm", region_name="ap-northeast-2", endpoint_url=url,
                        aws_access_key_id="t", aws_secret_access_key="t")


def wait(client: Any, cid: str, iid: str) -> dict[str, Any]:
    for _ in range(100):
        inv = client.get_command_invocation(CommandId=cid, InstanceId=iid)
        if inv["Status"] not in ("Pending", "InProgress"):
            return dict(inv)
        time.sleep(0.05)
    raise AssertionError("the command never ended")


def test_a_shell_script_runs_and_its_exit_code_and_output_come_back(endpoint: Any) -> None:
    url, agent, ran = endpoint
    c = ssm(url)
    cid = c.send_command(InstanceIds=["i-0aaaaaaaaaaaaaaa1"], DocumentName="AWS-RunShellScript",
                         Parameters={"commands": ["echo one", "echo two; exit 3"]})["Command"]["CommandId"]
    inv = wait(c, cid, "i-0aaaaaaaaaaaaaaa1")
    assert inv["Status"] == "Failed" and inv["ResponseCode"] == 3
    assert inv["StandardOutputContent"] == "one\ntwo\n"
    assert ran == ["lb-1"] and [e["host"] for e in agent.log] == ["lb-1"]
    cid = c.send_command(InstanceIds=["i-0aaaaaaaaaaaaaaa2"], DocumentName="AWS-RunShellScript",
                         Parameters={"commands": ["true"]})["Command"]["CommandId"]
    assert wait(c, cid, "i-0aaaaaaaaaaaaaaa2")["Status"] == "Success"


def test_what_the_agent_cannot_do_is_refused_not_pretended(endpoint: Any) -> None:
    url, _agent, ran = endpoint
    c = ssm(url)
    codes = []
    for kwargs in ({"InstanceIds": ["i-0aaaaaaaaaaaaaaa1"], "DocumentName": "AWS-RunPowerShellScript",
                    "Parameters": {"commands": ["x"]}},
                   {"InstanceIds": ["i-0ffffffffffffffff"], "DocumentName": "AWS-RunShellScript",
                    "Parameters": {"commands": ["true"]}}):
        with pytest.raises(ClientError) as e:
            c.send_command(**kwargs)
        codes.append(e.value.response["Error"]["Code"])
    with pytest.raises(ClientError) as e:
        c.get_command_invocation(CommandId="00000000-0000-0000-0000-000000000000", InstanceId="i-0aaaaaaaaaaaaaaa1")
    codes.append(e.value.response["Error"]["Code"])
    assert codes == ["InvalidDocument", "InvalidInstanceId", "InvocationDoesNotExist"] and ran == []


def test_an_execution_past_its_timeout_is_timed_out(endpoint: Any) -> None:
    url, _agent, _ran = endpoint
    c = ssm(url)
    cid = c.send_command(InstanceIds=["i-0aaaaaaaaaaaaaaa1"], DocumentName="AWS-RunShellScript",
                         Parameters={"commands": ["sleep 5"], "executionTimeout": ["1"]})["Command"]["CommandId"]
    inv = wait(c, cid, "i-0aaaaaaaaaaaaaaa1")
    assert inv["Status"] == "TimedOut" and inv["StatusDetails"] == "ExecutionTimedOut"


def test_the_gates_ssm_loop_reads_the_agents_answers(endpoint: Any) -> None:
    """tools/gate.py's run_remote, unchanged, against the stand-in."""
    url, _agent, _ran = endpoint
    c = ssm(url)
    ok = gate.run_remote(c, "i-0aaaaaaaaaaaaaaa2", "echo ready", lambda s: time.sleep(0.05), wait_s=10)
    assert ok.ok and ok.output == "ready\n" and ok.status == "Success"
    bad = gate.run_remote(c, "i-0aaaaaaaaaaaaaaa2", f"echo no; exit {gate.UNKNOWN_SERVER_EXIT}",
                          lambda s: time.sleep(0.05), wait_s=10)
    assert not bad.ok and bad.response_code == gate.UNKNOWN_SERVER_EXIT and bad.status == "Failed"
