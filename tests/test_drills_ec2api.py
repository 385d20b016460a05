"""The EC2 stand-in's API faults (the ec2-api drill): a real moto server on loopback
with the fault layer in front, called by boto3 as the hosts' scripts call it."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from rehearsal import awsd


@pytest.fixture
def server() -> Iterator[tuple[str, awsd.ApiFaults]]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    faults = awsd.ApiFaults()
    srv = awsd.faulty_moto_server("127.0.0.1", port, faults)
    srv.start()
    try:
        yield f"http://127.0.0.1:{port}", faults
    finally:
        srv.stop()


def ec2(url: str, agent: str = "") -> Any:
    return boto3.client("ec2", region_name="ap-northeast-2", endpoint_url=url, aws_access_key_id="x",
                        aws_secret_access_key="x", config=Config(retries={"max_attempts": 1}, user_agent_extra=agent))


def test_named_actions_are_throttled_until_the_deadline_others_and_the_rehearsals_own_calls_are_not(
        server: tuple[str, awsd.ApiFaults]) -> None:
    url, faults = server
    host = ec2(url)
    alloc = host.allocate_address(Domain="vpc")["AllocationId"]
    host.describe_instances()  # the client's models loaded before the clock starts
    faults.set(throttle=["AssociateAddress", "DescribeAddresses"], throttle_s=3.0)
    with pytest.raises(ClientError) as e:
        host.describe_addresses(AllocationIds=[alloc])
    assert e.value.response["Error"]["Code"] == "RequestLimitExceeded"
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    host.describe_instances()  # not named: answered
    ec2(url, awsd.OPS_AGENT).describe_addresses(AllocationIds=[alloc])  # the watcher's view: answered
    throttled = faults.state()["throttled"]
    assert throttled >= 1  # botocore's one retry may have been throttled too
    time.sleep(max(0.0, faults.state()["throttle_until"] - time.time()) + 0.1)
    assert host.describe_addresses(AllocationIds=[alloc])["Addresses"][0]["AllocationId"] == alloc
    assert faults.state()["throttled"] == throttled


def test_every_ec2_call_answers_late_while_the_delay_holds(server: tuple[str, awsd.ApiFaults]) -> None:
    url, faults = server
    host = ec2(url)
    faults.set(delay_s=0.5, delay_for_s=5)
    t = time.time()
    host.describe_instances()
    assert time.time() - t >= 0.5
    assert faults.set()["before"]["delayed"] == 1  # turning the faults off tells what they did
    t = time.time()
    host.describe_instances()
    assert time.time() - t < 0.5


def test_bad_fault_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="0..600"):
        awsd.ApiFaults().set(throttle_s=-1)


def test_the_drill_throttles_then_delays_and_reports_both_runs(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from rehearsal.drills import ec2api
    from rehearsal.drills.base import Result, finish

    set_calls: list[dict[str, Any]] = []

    def fake_faults(wd: Any, **kw: Any) -> dict[str, Any]:
        set_calls.append(kw)
        return {"before": {"throttled": 3}} if not kw and len(set_calls) < 3 else (
            {"before": {"delayed": 5}} if not kw else {})

    monkeypatch.setattr(ec2api, "api_faults", fake_faults)
    monkeypatch.setattr(ec2api.H, "kill", lambda h: [], raising=False)
    slept: list[float] = []
    monkeypatch.setattr(ec2api.time, "sleep", slept.append)

    class D(ec2api.Ec2ApiDrills):
        def __init__(self) -> None:
            self.wd, self.out_dir, self.ceiling, self.effect = tmp_path, tmp_path, 1.0, None
            self.eip = "lb-1"

        def killed(self, *hosts: str) -> None:
            self.effect = f"no process left on {', '.join(hosts)}"
            self.eip = "lb-2" if hosts == ("lb-1",) else "lb-1"

        def eip_target(self) -> str | None:
            return self.eip

        def host_by_ip(self, ip: str | None) -> str | None:
            return ip

        def _reboot(self, host: str, wait_units: Any = None, timeout: float = 0) -> None:
            pass

        def _under_load(self, name: str, inject: Any, restore: Any, kinds: Any, rto: Any, alerts: Any, match: Any,
                        extra: Any = None) -> Result:
            assert " " not in name  # it names the load's log and tags its request ids
            res = Result(name, rto_s=2.0, fault_window=(0.0, 1.0), acked_in_fault_window=30,
                         per_kind={"records": {"acked": 600, "lost": 0, "duplicated": 0, "ghost": 0}})
            inject()
            extra(res)
            restore()
            return finish(res, rto)

    res = D().drill_ec2_api()
    assert set_calls[0] == {"throttle": ["AssociateAddress", "DescribeAddresses"], "throttle_s": 20.0}
    assert {"delay_s": 2.0, "delay_for_s": 120.0} in set_calls
    assert set_calls[-1] == {}  # off at the end
    assert res.target_rto_s == 23.0 and ec2api.ec2_targets(3.0)["late"] == 13.0
    assert res.passed, res.checks
    assert "3 calls" in (res.fault_effect or "") and "5 calls" in (res.fault_effect or "")
    # each run keeps its window open while the load goes through the new master
    assert slept.count(ec2api.AFTER_MOVE_S) == 2, slept
