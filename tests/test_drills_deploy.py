"""The `deploy` drill without a rehearsal: it runs the replacement-plan model's steps in
order (the program's command text for drains, gates and put-backs, with the new instance's
id in the gate), and its checks fail on what they guard."""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from rehearsal.drills import deploy
from rehearsal.drills.base import Result

PLAN: dict[str, Any] = {"app": {"template": {
    "action": "replace", "mechanism": "pulumi up", "hosts": ["app-1", "app-2"],
    "steps": [[f"prod-{h}-{k}"] for h in ("app-1", "app-2") for k in ("lb-drain", "instance", "gate-ready", "lb-ready")],
    "commands": {f"prod-{h}-{k}": f"python3 tools/gate.py --host {h} {arg}" for h in ("app-1", "app-2")
                 for k, arg in (("lb-drain", "--lb-state drain"), ("gate-ready", "--instance-id i-mock --roles app"),
                                ("lb-ready", "--lb-state ready"))}}}}


class FakeDeploy(deploy.DeployDrills):
    def __init__(self, tmp: Path, plan: dict[str, Any], fail: str = "") -> None:
        self.out_dir = self.wd = tmp
        self.ceiling = 1.0
        self.layout = SimpleNamespace(stack="prod")  # type: ignore[assignment]
        self.plan, self.fail = plan, fail
        self.ran: list[str] = []
        self.hist: list[str] = []

    @contextlib.contextmanager
    def load(self, name: str) -> Iterator[tuple[Any, Path]]:
        yield None, self.out_dir / f"load-{name}.log"

    def wait_healthy(self, path: Path, kinds: Any = None, timeout: float = 0) -> bool:
        return True

    def finish_load(self, p: Any, path: Path, min_acked: int = 0, max_s: float = 0) -> None:
        path.write_text("\n".join(self.hist) + "\n")

    def tally(self, path: Path, t0: float, res: Result) -> None:
        res.failed_reads = 0

    def verify(self, path: Path, res: Result) -> None:
        res.acked_in_fault_window = 100
        res.per_kind = {"records": {"acked": 600, "lost": 0, "duplicated": 0, "ghost": 0}}
        res.acked_writes = 600

    def replace_instance(self, host: str, keep_volume: bool = False) -> str:
        self.ran.append(f"replace {host}" + (" keeping its volume" if keep_volume else ""))
        return f"i-new-{host}"

    def program_command(self, cmd: str, timeout: float = 0) -> tuple[int, str]:
        self.ran.append(cmd)
        deploy.time.time()  # a command takes time: one tick of a test's clock
        return (1, "gate failed: host app-2 check portal") if self.fail and self.fail in cmd else (0, "ok")


@pytest.fixture
def patched(monkeypatch: pytest.MonkeyPatch) -> None:
    real_run = subprocess.run

    def run(argv: Any, **kw: Any) -> Any:
        if "tools/replacement_plan.py" in argv:
            return subprocess.CompletedProcess(argv, 0, json.dumps(PLAN), "")
        return real_run(argv, **kw)

    monkeypatch.setattr(deploy.subprocess, "run", run)
    monkeypatch.setattr(deploy.time, "sleep", lambda s: None)
    monkeypatch.setattr("rehearsal.awsd.ssm_log", lambda wd: [])
    monkeypatch.setattr(deploy, "say", lambda m: None)


def test_the_plans_steps_run_in_order_with_the_new_instance_in_the_gate(tmp_path: Path, patched: None) -> None:
    d = FakeDeploy(tmp_path, PLAN)
    res = d.drill_deploy()
    assert d.ran == [
        "python3 tools/gate.py --host app-1 --lb-state drain", "replace app-1",
        "python3 tools/gate.py --host app-1 --instance-id i-new-app-1 --roles app",
        "python3 tools/gate.py --host app-1 --lb-state ready",
        "python3 tools/gate.py --host app-2 --lb-state drain", "replace app-2",
        "python3 tools/gate.py --host app-2 --instance-id i-new-app-2 --roles app",
        "python3 tools/gate.py --host app-2 --lb-state ready"]
    assert res.checks["plan_completed"] and res.checks["one_host_out_at_a_time"], res.checks
    assert res.passed, res


def test_a_failed_gate_stops_the_deploy_before_the_next_host(tmp_path: Path, patched: None) -> None:
    d = FakeDeploy(tmp_path, PLAN, fail="--host app-1 --instance-id")
    res = d.drill_deploy()
    assert d.ran[-1].startswith("python3 tools/gate.py --host app-1 --instance-id")
    assert not any("app-2" in r for r in d.ran)  # the next host is never touched
    assert res.checks["plan_completed"] is False and not res.passed
    assert any("gate failed" in n for n in res.notes)


def test_a_host_answering_while_drained_fails(tmp_path: Path, patched: None, monkeypatch: pytest.MonkeyPatch) -> None:
    d = FakeDeploy(tmp_path, PLAN)
    ticks: list[float] = []

    def clock() -> float:
        ticks.append(1000.0 + 10 * len(ticks))
        return ticks[-1]
    monkeypatch.setattr(deploy.time, "time", clock)
    # t0 1000; app-1's drain runs 1010 and it is out from 1020; its gate runs 1030; its
    # put-back begins 1040 and runs 1050. A request it answered while out fails the
    # check; one it answered once the put-back had begun (ready on the first LB) does not.
    d.hist = ["1025.0 1025.1 read 1 200 r1 app-1 -", "1025.0 1025.1 read 1 200 r2 app-2 -",
              "1045.0 1045.1 read 1 200 r3 app-1 -"]
    res = d.drill_deploy()
    assert ticks[:6] == [1000.0, 1010.0, 1020.0, 1030.0, 1040.0, 1050.0]
    assert res.checks["no_request_to_a_drained_host"] is False and not res.passed, res.checks
    assert any("1 requests answered by a host while it was out" in n for n in res.notes), res.notes


def test_a_plan_that_is_not_a_replacement_by_pulumi_up_is_refused(tmp_path: Path, patched: None) -> None:
    plan = json.loads(json.dumps(PLAN))
    plan["app"]["template"].update(mechanism="tools/rolling.py", action="ignored")
    PLAN_SAVED = dict(PLAN)
    PLAN.clear()
    PLAN.update(plan)
    try:
        with pytest.raises(RuntimeError, match="not a replacement"):
            FakeDeploy(tmp_path, plan).drill_deploy()
    finally:
        PLAN.clear()
        PLAN.update(PLAN_SAVED)


class FakeRolling(FakeDeploy):
    """The `rolling` drill over the prod stack's real tools/rolling.py plan: every step it
    takes is recorded; the stateful hosts' probes answer what the test says."""

    def __init__(self, tmp: Path, rejoined: bool = True, gate_fails: str = "") -> None:
        super().__init__(tmp, PLAN, fail=gate_fails)
        from components.stackfile import load_stack

        cfg, topo = load_stack("prod")
        self.layout = SimpleNamespace(stack="prod", cfg=cfg, topo=topo, host=topo.host)  # type: ignore[assignment]
        self.deploy = {"hosts": {h.name: {"instance_id": f"i-{h.name}"} for h in topo.hosts}}
        self.rejoined = rejoined
        self.protected: dict[str, bool] = {}

    def replace_instance(self, host: str, keep_volume: bool = False) -> str:
        iid = super().replace_instance(host, keep_volume)
        self.deploy["hosts"][host]["instance_id"] = iid
        return iid

    def run(self, host: str, cmd: str, timeout: float = 30) -> tuple[int, str]:
        self.ran.append(f"{host}: {cmd.split()[0]}")
        return 0, ""

    def gate(self, host: str, timeout: float = 180) -> bool:
        self.ran.append(f"gate {host}")
        return True

    def protect(self, host: str, on: bool) -> None:
        self.ran.append(f"protection {host} {'on' if on else 'off'}")
        self.protected[self.deploy["hosts"][host]["instance_id"]] = on

    def galera_writer(self) -> str:
        return "data-1"

    def redis_master(self) -> str | None:
        return "data-2"

    def wait_synced(self, host: str, size: int | None, timeout: float = 240) -> bool:
        return self.rejoined

    def redis_roles(self) -> dict[str, str]:
        return {"data-1": "slave", "data-2": "master", "data-3": "slave"}

    def controllers_up(self) -> tuple[bool, str]:
        return True, "Slurmctld(primary) at slurm-1 is UP / Slurmctld(backup) at slurm-2 is UP"


@pytest.fixture
def rolling_patched(patched: None, monkeypatch: pytest.MonkeyPatch) -> dict[str, bool]:
    protected: dict[str, bool] = {}

    def ops_call(wd: Path, service: str, method: str, **kw: Any) -> Any:
        assert (service, method) == ("ec2", "describe_instance_attribute"), (service, method)
        return {"DisableApiTermination": {"Value": protected.get(kw["InstanceId"], False)}}
    monkeypatch.setattr(deploy, "ops_call", ops_call)
    return protected


def test_rolling_replaces_a_galera_node_and_the_backup_controller_as_the_rolling_command_says(
        tmp_path: Path, rolling_patched: dict[str, bool]) -> None:
    d = FakeRolling(tmp_path)
    d.protected = rolling_patched
    res = d.drill_rolling()
    stateful = [r for r in d.ran[d.ran.index("protection data-3 off"):] if r != "data-3: journalctl"]
    # data-3: neither the writer (data-1) nor the Redis master (data-2). Protection off,
    # the one replacement with its volume, the role gate through SSM with the new id,
    # protection back; then the backup controller, replaced and gated the same way.
    assert [r.split(" --timeout")[0] for r in stateful] == [
        "protection data-3 off", "replace data-3 keeping its volume",
        "python3 tools/gate.py --region ap-northeast-2 --host data-3 --instance-id i-new-data-3 --roles data",
        "protection data-3 on", "replace slurm-2",
        "python3 tools/gate.py --region ap-northeast-2 --host slurm-2 --instance-id i-new-slurm-2 --roles slurm"]
    app = d.ran[:d.ran.index("protection data-3 off")]
    assert [r for r in app if r.startswith(("replace", "gate"))] == [
        x for h in ("app-1", "app-2", "app-3") for x in (f"replace {h}", f"gate {h}")]
    assert res.checks["galera_node_rejoined"] and res.checks["data_host_protected_again"], res.checks
    assert res.passed, res


def test_rolling_fails_when_the_galera_node_does_not_rejoin(tmp_path: Path, rolling_patched: dict[str, bool]) -> None:
    d = FakeRolling(tmp_path, rejoined=False)
    d.protected = rolling_patched
    res = d.drill_rolling()
    assert res.checks["galera_node_rejoined"] is False and not res.passed


def test_a_failed_stateful_gate_stops_the_roll_before_the_controller(tmp_path: Path,
                                                                    rolling_patched: dict[str, bool]) -> None:
    d = FakeRolling(tmp_path, gate_fails="--host data-3 --instance-id")
    d.protected = rolling_patched
    res = d.drill_rolling()
    assert not any("slurm-2" in r for r in d.ran) and "protection data-3 on" not in d.ran
    assert res.checks["roll_completed"] is False and not res.passed
    assert any("gate data-3: exit 1" in n for n in res.notes), res.notes
