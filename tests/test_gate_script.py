"""tools/gate.py against a fake SSM: success, failure and timeout, and the failure names
the host, the check and its last output."""

from __future__ import annotations

import pytest

from tests.loadfile import load_tool

gate = load_tool("gate")


class FakeSSM:
    """Answers send_command/get_command_invocation from a script: command substring ->
    list of (status, output) returned on successive invocations."""

    def __init__(self, script):
        self.script = {k: list(v) for k, v in script.items()}
        self.sent = []
        self.pending = {}

    def send_command(self, InstanceIds, DocumentName, Parameters, TimeoutSeconds):
        cmd = Parameters["commands"][0]
        cid = f"c{len(self.sent)}"
        self.sent.append(cmd)
        for key, answers in self.script.items():
            if key in cmd:
                self.pending[cid] = answers.pop(0) if len(answers) > 1 else answers[0]
                break
        else:
            raise AssertionError(f"unexpected command {cmd}")
        return {"Command": {"CommandId": cid}}

    def get_command_invocation(self, CommandId, InstanceId):
        status, out = self.pending[CommandId]
        return {"Status": status, "StandardOutputContent": out, "StandardErrorContent": ""}


class Clock:
    def __init__(self):
        self.t = 0.0

    def now(self):
        return self.t

    def sleep(self, s):
        self.t += s


def test_gate_passes_when_cloud_init_and_role_checks_succeed():
    ssm = FakeSSM({"cloud-init": [("InProgress", "status: running"), ("Success", "status: done")],
                   "9200": [("Failed", "503 not synced"), ("Success", "Galera node is synced")],
                   "redis-cli": [("Success", "PONG")]})
    clock = Clock()
    gate.run_gate(ssm, "data-1", "i-1", ["data"], 900, sleep=clock.sleep, clock=clock.now, log=lambda m: None)
    assert any("9200" in c for c in ssm.sent) and any("redis-cli" in c for c in ssm.sent)


def test_gate_fails_at_once_when_cloud_init_reports_an_error():
    ssm = FakeSSM({"cloud-init": [("Failed", "status: error\nerrors: - package install failed")]})
    clock = Clock()
    with pytest.raises(gate.GateFailed) as info:
        gate.run_gate(ssm, "app-2", "i-2", ["web", "app"], 900, sleep=clock.sleep, clock=clock.now, log=lambda m: None)
    msg = str(info.value)
    assert "host app-2" in msg and "check cloud-init" in msg and "package install failed" in msg
    assert clock.t < 60


def test_gate_times_out_naming_the_check_and_its_last_output():
    ssm = FakeSSM({"cloud-init": [("Success", "status: done")],
                   "scontrol ping": [("Failed", "Slurmctld(primary) at slurm-1 is DOWN")]})
    clock = Clock()
    with pytest.raises(gate.GateFailed) as info:
        gate.run_gate(ssm, "slurm-1", "i-3", ["slurm"], 300, sleep=clock.sleep, clock=clock.now, log=lambda m: None)
    msg = str(info.value)
    assert "host slurm-1 check slurmctld" in msg and "not ready after 300s" in msg and "is DOWN" in msg
    assert 300 <= clock.t < 1000


def test_every_role_has_checks():
    from components.config import ROLES

    assert set(gate.ROLE_CHECKS) == set(ROLES)
