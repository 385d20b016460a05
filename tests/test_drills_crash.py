"""crash-burst without a rehearsal: the kills start together, the survivor's
non-Primary state is the proof, and the cluster must re-form by itself."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from rehearsal.drills import crash
from rehearsal.drills.base import Result, finish


def test_the_kills_start_within_a_fraction_of_a_second() -> None:
    spread = crash.kill_within([threading.Thread(target=time.sleep, args=(0.3,)) for _ in range(3)])
    assert 0 <= spread < 0.2


class FakeCrash(crash.CrashDrills):
    def __init__(self, tmp: Path, survivor_states: list[str], synced: bool) -> None:
        self.out_dir, self.ceiling, self.effect = tmp, 1.0, None
        self.states = survivor_states
        self.synced = synced
        self.layout = type("L", (), {"topo": type("T", (), {"role_hosts": {"data": ["data-1", "data-2", "data-3"]}})()})()

    def galera_status(self, host: str) -> dict[str, str]:
        if host == "data-1":  # the writer before the fault
            return {"wsrep_local_state": "4"}
        return {"wsrep_cluster_status": self.states.pop(0) if self.states else "Primary"}

    def wait_synced(self, host: str, size: int | None, timeout: float = 0) -> bool:
        return self.synced

    def _under_load(self, name: str, inject: Any, restore: Any, kinds: Any, rto: Any, alerts: Any, match: Any,
                    extra: Any = None) -> Result:
        res = Result(name, rto_s=8.0, fault_window=(time.time(), time.time()), per_kind={"records": {"acked": 600}})
        inject()
        extra(res)
        restore()
        return finish(res, rto)


@pytest.fixture
def patched(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, Any]]]:
    calls: list[tuple[str, dict[str, Any]]] = []

    def call(layout: Any, host: str, req: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
        calls.append((host, req))
        return {"rc": 0}

    monkeypatch.setattr(crash.H, "call", call, raising=False)
    return calls


def test_two_nodes_killed_the_survivor_non_primary_and_the_cluster_back(tmp_path: Path, patched: Any) -> None:
    d = FakeCrash(tmp_path, ["non-Primary"], synced=True)
    res = d.drill_crash_burst()
    assert sorted(h for h, _ in patched) == ["data-1", "data-2"]
    assert all(r == {"op": "kill", "unit": "mariadb.service", "signal": 9} for _, r in patched)  # Restart= not held
    assert res.fault_effect and "data-3 non-Primary" in res.fault_effect
    assert res.passed, res.checks


def test_a_survivor_that_stays_primary_or_a_cluster_that_stays_down_fails(tmp_path: Path, patched: Any,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    t = [0.0]

    def clock() -> float:
        t[0] += 30
        return t[0]

    monkeypatch.setattr(crash.time, "sleep", lambda s: None)
    d = FakeCrash(tmp_path, [], synced=True)
    monkeypatch.setattr(crash.time, "time", clock)
    res = d.drill_crash_burst()
    assert res.checks["survivor_refuses_writes"] is False and not res.passed
    monkeypatch.setattr(crash.time, "time", time.time)
    d = FakeCrash(tmp_path, ["non-Primary"], synced=False)
    res = d.drill_crash_burst()
    assert res.checks["cluster_reformed_by_itself"] is False and not res.passed
