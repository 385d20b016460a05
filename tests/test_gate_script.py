"""tools/gate.py against a fake SSM and a fake clock: every SSM status and every cloud-init
status is read as what it is, and each case checks the outcome and how long the gate took
(a failure that is already known must not wait out the timeout; a host that is only late
must be waited for). Failures name the host, the check and its last output."""

from __future__ import annotations

import sys
import types

import pytest
from botocore.exceptions import ClientError

from tests.loadfile import load_tool

gate = load_tool("gate")
POLL, RETRY = gate.POLL_S, gate.RETRY_S

# `cloud-init status --wait --long` as cloud-init 24.x prints it (the dots are --wait's).
CI_DONE = """....
status: done
extended_status: done
boot_status_code: enabled-by-generator
last_update: Wed, 02 Dec 2026 00:41:07 +0000
detail: DataSourceEc2Local
errors: []
recoverable_errors: {}
"""
CI_DEGRADED = """..
status: done
extended_status: degraded done
boot_status_code: enabled-by-generator
last_update: Wed, 02 Dec 2026 00:41:07 +0000
detail: DataSourceEc2Local
errors: []
recoverable_errors:
WARNING:
\t- Failed to run module apt-configure (apt-configure)
\t- Running module ntp failed
DEPRECATED:
\t- Deprecated cloud-config provided: chpasswd.list: Deprecated in version 22.2.
"""
CI_ERROR = """...
status: error
extended_status: error - done
boot_status_code: enabled-by-generator
last_update: Wed, 02 Dec 2026 00:41:07 +0000
detail: DataSourceEc2Local
errors:
\t- ('scripts_user', RuntimeError('Runparts: 1 failures (part-001) in 1 attempted commands'))
recoverable_errors:
WARNING:
\t- Failed to run module scripts_user (scripts in /var/lib/cloud/instance/scripts)
"""


def inv(status, out="", details=None, rc=None):
    """One get_command_invocation answer; `details` is StatusDetails (the finer status)."""
    answer = {"Status": status, "StandardOutputContent": out, "StandardErrorContent": ""}
    if details is not None:
        answer["StatusDetails"] = details
    if rc is not None:
        answer["ResponseCode"] = rc
    return answer


def api_error(code, op="SendCommand"):
    return ClientError({"Error": {"Code": code, "Message": f"{code} (fake)"}}, op)


class FakeSSM:
    """Answers send_command/get_command_invocation from a script: command substring -> list
    of answers, one per command sent (the last repeats). An answer is an exception (raised
    by send_command), a (status, output) pair, an inv(...) dict, or a list of dicts that
    successive polls of that one command return (the last repeats)."""

    def __init__(self, script):
        self.script = {k: list(v) for k, v in script.items()}
        self.sent = []
        self.pending = {}

    def send_command(self, InstanceIds, DocumentName, Parameters, TimeoutSeconds):
        cmd = Parameters["commands"][0]
        self.sent.append(cmd)
        for key, answers in self.script.items():
            if key in cmd:
                answer = answers.pop(0) if len(answers) > 1 else answers[0]
                break
        else:
            raise AssertionError(f"unexpected command {cmd}")
        if isinstance(answer, Exception):
            raise answer
        if isinstance(answer, tuple):
            answer = inv(*answer)
        cid = f"c{len(self.sent)}"
        self.pending[cid] = list(answer) if isinstance(answer, list) else [answer]
        return {"Command": {"CommandId": cid}}

    def get_command_invocation(self, CommandId, InstanceId):
        polls = self.pending[CommandId]
        return polls.pop(0) if len(polls) > 1 else polls[0]


class Clock:
    def __init__(self):
        self.t = 0.0

    def now(self):
        return self.t

    def sleep(self, s):
        self.t += s


def run(ssm, host="data-1", roles=("data",), timeout=900, **kw):
    clock = Clock()
    logs: list[str] = []
    gate.run_gate(ssm, host, "i-1", list(roles), timeout, sleep=clock.sleep, clock=clock.now, log=logs.append, **kw)
    return clock.t, logs


def fails(ssm, host="app-2", roles=("web", "app"), timeout=900, **kw):
    clock = Clock()
    with pytest.raises(gate.GateFailed) as info:
        gate.run_gate(ssm, host, "i-2", list(roles), timeout, sleep=clock.sleep, clock=clock.now,
                      log=lambda m: None, **kw)
    return clock.t, info.value


DATA_OK = {"9200": [("Success", "Galera node is synced")], "redis-cli": [("Success", "PONG")]}


# --- a host that gets ready ---------------------------------------------------------------

def test_ready_host_passes_after_exactly_the_polls_and_retries_it_needed():
    ssm = FakeSSM({"cloud-init": [[inv("InProgress", "..."), inv("InProgress", "...."), inv("Success", CI_DONE, rc=0)]],
                   "9200": [("Failed", "503 not synced"), ("Success", "Galera node is synced")],
                   "redis-cli": [("Success", "PONG")]})
    took, _ = run(ssm)
    # cloud-init: 3 polls; galera: failed attempt, retry, success; redis: 1 poll
    assert took == 3 * POLL + (POLL + RETRY + POLL) + POLL
    assert [c.split()[0] for c in ssm.sent] == ["cloud-init", "curl", "curl", "REDISCLI_AUTH=$(cat"]


# --- cloud-init: failures known now fail in one round ---------------------------------------

def test_cloud_init_status_error_fails_in_one_round_with_its_listed_errors():
    took, e = fails(FakeSSM({"cloud-init": [inv("Failed", CI_ERROR, rc=1)]}))
    assert took == POLL, "a reported error must not wait out the timeout"
    msg = str(e)
    assert "host app-2 check cloud-init: cloud-init reported an error" in msg
    assert "Runparts: 1 failures (part-001)" in e.why


def test_failed_cloud_init_without_status_line_fails_in_one_round_not_after_the_timeout():
    took, e = fails(FakeSSM({"cloud-init": [inv("Failed", "bash: cloud-init: command not found\n", rc=127)]}))
    assert took == POLL
    assert "host app-2 check cloud-init" in str(e)
    assert "ended Failed, exit 127 with no cloud-init status line" in e.why
    assert "command not found" in str(e)


@pytest.mark.parametrize("status,details", [("Cancelled", "Cancelled"), ("Failed", "Terminated"),
                                            ("Failed", "InvalidPlatform"), ("Failed", "AccessDenied")])
def test_other_terminal_ssm_statuses_fail_cloud_init_in_one_round(status, details):
    took, e = fails(FakeSSM({"cloud-init": [inv(status, "", details=details)]}))
    assert took == POLL
    assert f"SSM command ended {details}" in e.why


def test_success_without_a_status_line_is_not_taken_for_done():
    took, e = fails(FakeSSM({"cloud-init": [inv("Success", "something else printed this\n", rc=0)]}))
    assert took == POLL and "no cloud-init status line" in e.why


def test_cloud_init_disabled_fails_in_one_round():
    took, e = fails(FakeSSM({"cloud-init": [inv("Success", "status: disabled\n", rc=0)]}))
    assert took == POLL and "disabled" in e.why


# --- cloud-init: degraded done (exit 2, cloud-init >= 23.4) -----------------------------------

def test_degraded_done_fails_by_default_in_one_round_listing_the_recoverable_errors():
    took, e = fails(FakeSSM({"cloud-init": [inv("Failed", CI_DEGRADED, rc=2)]}))
    assert took == POLL
    assert "cloud-init finished degraded" in e.why
    assert "WARNING: Failed to run module apt-configure (apt-configure)" in e.why
    assert "WARNING: Running module ntp failed" in e.why
    assert "DEPRECATED: Deprecated cloud-config provided: chpasswd.list" in e.why
    assert "--accept-degraded" in e.why and gate.ACCEPT_DEGRADED_ENV in e.why


def test_exit_2_with_status_done_is_degraded_even_without_extended_status():
    took, e = fails(FakeSSM({"cloud-init": [inv("Failed", "status: done\n", rc=2)]}))
    assert took == POLL and "degraded" in e.why


def test_degraded_done_accepted_when_asked_logs_the_errors_and_still_runs_the_role_checks():
    ssm = FakeSSM({"cloud-init": [inv("Failed", CI_DEGRADED, rc=2)], **DATA_OK})
    took, logs = run(ssm, accept_degraded=True)
    assert took == 3 * POLL
    assert any("degraded (accepted)" in m and "Running module ntp failed" in m for m in logs)
    assert any("9200" in c for c in ssm.sent) and any("redis-cli" in c for c in ssm.sent)


def test_degraded_accepted_role_check_failure_still_fails():
    ssm = FakeSSM({"cloud-init": [inv("Failed", CI_DEGRADED, rc=2)],
                   "9200": [("Failed", "503 not synced")], "redis-cli": [("Success", "PONG")]})
    took, e = fails(ssm, host="data-1", roles=("data",), timeout=120, accept_degraded=True)
    assert e.check == "galera-synced" and "not ready after 120s" in e.why
    assert 120 < took <= 120 + POLL + RETRY


# --- cloud-init: not yet, retried within the deadline ---------------------------------------

@pytest.mark.parametrize("output", ["......", "status: running\nextended_status: running\n"])
def test_execution_timeout_while_cloud_init_still_runs_is_retried(output):
    ssm = FakeSSM({"cloud-init": [inv("TimedOut", output, details="ExecutionTimedOut"), inv("Success", CI_DONE, rc=0)],
                   **DATA_OK})
    took, logs = run(ssm)
    assert took == (POLL + RETRY + POLL) + 2 * POLL
    assert any("retrying" in m for m in logs)


@pytest.mark.parametrize("status,details", [("Failed", "Undeliverable"), ("TimedOut", "DeliveryTimedOut")])
def test_agent_not_there_yet_is_retried_then_passes(status, details):
    ssm = FakeSSM({"cloud-init": [inv(status, "", details=details), inv(status, "", details=details),
                                  inv("Success", CI_DONE, rc=0)], **DATA_OK})
    took, _ = run(ssm)
    assert took == 3 * POLL + 2 * RETRY + 2 * POLL


def test_agent_never_there_fails_at_the_deadline_naming_the_status():
    took, e = fails(FakeSSM({"cloud-init": [inv("Failed", "", details="Undeliverable")]}), timeout=120)
    assert 120 < took <= 120 + POLL + RETRY
    assert "host app-2 check cloud-init: not ready after 120s (status Undeliverable)" in str(e)


def test_instance_not_registered_yet_is_retried():
    ssm = FakeSSM({"cloud-init": [api_error("InvalidInstanceId"), inv("Success", CI_DONE, rc=0)], **DATA_OK})
    took, _ = run(ssm)
    assert took == RETRY + POLL + 2 * POLL


def test_a_credential_error_fails_at_once_instead_of_retrying():
    took, e = fails(FakeSSM({"cloud-init": [api_error("AccessDeniedException")]}))
    assert took == 0
    assert "the SSM call failed (AccessDeniedException)" in e.why


# --- role checks ---------------------------------------------------------------------------

@pytest.mark.parametrize("status,details", [("Failed", None), ("Cancelled", None), ("Failed", "Undeliverable"),
                                            ("TimedOut", "ExecutionTimedOut")])
def test_a_failed_role_check_attempt_is_retried(status, details):
    ssm = FakeSSM({"cloud-init": [inv("Success", CI_DONE, rc=0)],
                   "9200": [inv(status, "503 not synced", details=details), ("Success", "Galera node is synced")],
                   "redis-cli": [("Success", "PONG")]})
    took, _ = run(ssm)
    assert took == POLL + (POLL + RETRY + POLL) + POLL


def test_gate_times_out_naming_the_check_and_its_last_output():
    ssm = FakeSSM({"cloud-init": [inv("Success", CI_DONE, rc=0)],
                   "scontrol ping": [("Failed", "Slurmctld(primary) at slurm-1 is DOWN")]})
    took, e = fails(ssm, host="slurm-1", roles=("slurm",), timeout=300)
    msg = str(e)
    assert "host slurm-1 check slurmctld" in msg and "not ready after 300s (status Failed)" in msg and "is DOWN" in msg
    assert 300 < took <= 300 + POLL + RETRY


# --- the parser and the command line --------------------------------------------------------

def test_parse_cloud_init_long_output():
    done, deg, err = (gate.parse_cloud_init(o) for o in (CI_DONE, CI_DEGRADED, CI_ERROR))
    assert (done.status, done.extended, done.errors, done.recoverable) == ("done", "done", [], {})
    assert deg.status == "done" and deg.degraded
    assert deg.recoverable == {"WARNING": ["Failed to run module apt-configure (apt-configure)", "Running module ntp failed"],
                               "DEPRECATED": ["Deprecated cloud-config provided: chpasswd.list: Deprecated in version 22.2."]}
    assert err.status == "error" and len(err.errors) == 1 and list(err.recoverable) == ["WARNING"]
    assert gate.parse_cloud_init("").status is None


@pytest.fixture
def fake_boto3(monkeypatch):
    """main() with boto3.client returning a FakeSSM that answers degraded cloud-init, and no sleeping."""
    ssm = FakeSSM({"cloud-init": [inv("Failed", CI_DEGRADED, rc=2)], "nginx": [("Success", "ok")],
                   "8080": [("Success", "ok")]})
    monkeypatch.setitem(sys.modules, "boto3", types.SimpleNamespace(client=lambda *a, **k: ssm))
    clock = Clock()
    monkeypatch.setattr(gate.time, "sleep", clock.sleep)
    monkeypatch.setattr(gate.time, "monotonic", clock.now)
    return clock


ARGS = ["--region", "eu-west-1", "--host", "web-1", "--instance-id", "i-9", "--roles", "web"]


@pytest.mark.parametrize("argv,environ,rc,took", [
    ([], {}, 1, POLL),                                   # degraded fails in one round
    (["--accept-degraded"], {}, 0, 2 * POLL),            # cloud-init + nginx
    ([], {gate.ACCEPT_DEGRADED_ENV: "1"}, 0, 2 * POLL),
    ([], {gate.ACCEPT_DEGRADED_ENV: "0"}, 1, POLL),
])
def test_main_fails_degraded_by_default_and_accepts_it_by_flag_or_environment(fake_boto3, capsys, argv, environ, rc, took):
    assert gate.main(ARGS + argv, environ=environ) == rc
    assert fake_boto3.t == took
    err = capsys.readouterr().err
    assert ("gate failed: host web-1 check cloud-init: cloud-init finished degraded" in err) == (rc == 1)


def test_real_botocore_client_accepts_the_gate_calls_and_answers():
    """The same calls through a real boto3 SSM client with botocore's Stubber, which checks
    every request parameter and every answer against the SSM API model."""
    import boto3
    from botocore.stub import ANY, Stubber

    client = boto3.client("ssm", region_name="eu-west-1", aws_access_key_id="x", aws_secret_access_key="x")
    clock = Clock()
    with Stubber(client) as stub:
        for answer in ({"Status": "Failed", "StatusDetails": "Undeliverable"},
                       {"Status": "Failed", "StatusDetails": "Failed", "ResponseCode": 2,
                        "StandardOutputContent": CI_DEGRADED, "StandardErrorContent": ""}):
            stub.add_response("send_command", {"Command": {"CommandId": "0123456789abcdef0123456789abcdef0123"}},
                              {"InstanceIds": ["i-0123456789abcdef0"], "DocumentName": "AWS-RunShellScript",
                               "Parameters": {"commands": ["cloud-init status --wait --long"], "executionTimeout": [ANY]},
                               "TimeoutSeconds": ANY})
            stub.add_response("get_command_invocation", answer,
                              {"CommandId": "0123456789abcdef0123456789abcdef0123", "InstanceId": "i-0123456789abcdef0"})
        with pytest.raises(gate.GateFailed) as info:
            gate.run_gate(client, "web-1", "i-0123456789abcdef0", ["web"], 900, sleep=clock.sleep, clock=clock.now,
                          log=lambda m: None)
        stub.assert_no_pending_responses()
    assert "cloud-init finished degraded" in info.value.why
    assert clock.t == POLL + RETRY + POLL


def test_main_rejects_an_unclear_accept_degraded_value(fake_boto3):
    with pytest.raises(SystemExit) as info:
        gate.main(ARGS, environ={gate.ACCEPT_DEGRADED_ENV: "maybe"})
    assert fake_boto3.t == 0, "rejected before any SSM call"
    assert gate.ACCEPT_DEGRADED_ENV in str(info.value) and "'maybe'" in str(info.value)


def test_every_role_has_checks():
    from components.config import ROLES

    assert set(gate.ROLE_CHECKS) == set(ROLES)


def test_role_checks_ask_where_the_daemons_listen(tally):
    """A role check that asks a port on 127.0.0.1 fails on a daemon bound to the host's
    private address only: the data gate asked hpc-clustercheck there and would have failed
    every data host's roll after its whole time-out (found by the rolling drill). Each
    check's address is compared with the rendered unit of the daemon it asks."""
    import re

    from cloud_init.render import render_host
    from offline.contexts import contexts

    ctx = next(c for c in contexts("prod").values() if "data" in c["host"]["roles"])
    raw = {f.path: f.content for f in render_host(ctx).files}["/etc/systemd/system/hpc-clustercheck.service"]
    unit = raw.decode() if isinstance(raw, bytes) else str(raw)
    bind = re.search(r"--bind (\S+)", unit)
    tally.check(bind is not None and bind.group(1) == ctx["host"]["ip"], unit)
    cmd = dict(gate.ROLE_CHECKS["data"])["galera-synced"]
    tally.check("127.0.0.1" not in cmd and "$(hostname -I | cut -d' ' -f1):9200/" in cmd, cmd)
