"""slow-galera without a rehearsal: the CFS quota goes on the victim's cpu cgroup and
comes off again, a quota that throttled nothing fails the drill, and the latency report
reads the load's history."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from rehearsal.drills import slow
from rehearsal.drills.base import Result, finish


class FakeSlow(slow.SlowDrills):
    def __init__(self, tmp: Path, throttles: bool) -> None:
        from types import SimpleNamespace

        self.out_dir = tmp
        self.ceiling = 1.0
        self.effect = None
        self.layout = SimpleNamespace(topo=SimpleNamespace(role_hosts={"data": ["data-1", "data-2", "data-3"]}))  # type: ignore[assignment]
        self.throttles = throttles
        self.cg = tmp / "cpu"
        self.cg.mkdir()
        for f, v in (("cpu.cfs_quota_us", "-1"), ("cpu.cfs_period_us", "100000"), ("cpu.stat", "nr_periods 0\nnr_throttled 0\n")):
            (self.cg / f).write_text(v)
        self.quota_during: list[str] = []
        self.paused = 0

    def galera_writer(self) -> str:
        return "data-1"

    def flow_control(self, host: str) -> dict[str, int]:
        if self.throttles and (self.cg / "cpu.cfs_quota_us").read_text() != "-1":
            (self.cg / "cpu.stat").write_text("nr_periods 90\nnr_throttled 80\n")
            self.paused += 7_000_000_000
        return {"wsrep_flow_control_paused_ns": self.paused, "wsrep_flow_control_sent": 3 if host == "data-2" else 0}

    def _under_load(self, name: str, inject: Any, restore: Any, kinds: Any, rto: Any, alerts: Any, match: Any,
                    extra: Any = None) -> Result:
        res = Result(name)
        inject()
        self.quota_during.append((self.cg / "cpu.cfs_quota_us").read_text())
        extra(res)
        res.fault_window = (1000.0, 1060.0)
        res.fault_effect = res.fault_effect or self.effect
        restore()
        res.acked_in_fault_window = 50
        res.per_kind = {"records": {"acked": 600}}
        res.alert, res.alert_latency_s = "GaleraFlowControl", 48.0
        return finish(res, rto)


@pytest.fixture
def patched(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(slow.time, "sleep", lambda s: None)
    monkeypatch.setattr(slow, "say", lambda m: None)


@pytest.mark.parametrize("throttles", [True, False])
def test_the_quota_goes_on_a_replica_and_comes_off(tmp_path: Path, patched: None, monkeypatch: pytest.MonkeyPatch,
                                                   throttles: bool) -> None:
    d = FakeSlow(tmp_path, throttles)
    victims: list[str] = []

    def cpu_dir(host: str) -> Path:
        victims.append(host)
        return d.cg

    monkeypatch.setattr(slow, "cpu_dir", cpu_dir)
    res = d.drill_slow_galera()
    assert set(victims) == {"data-2"}  # not the writer
    assert d.quota_during == [str(slow.QUOTA_US)] and (d.cg / "cpu.cfs_quota_us").read_text() == "-1"
    assert res.checks["fault_effect"] is throttles and res.passed is throttles, res.checks
    if throttles:
        assert res.fault_effect and "throttled 80x" in res.fault_effect and "paused the writer 7.0s" in res.fault_effect


def test_latencies_are_read_from_the_history(tmp_path: Path) -> None:
    p = tmp_path / "load.log"
    p.write_text("\n".join([
        "10.0 10.1 write 1 200 a app-1 -", "11.0 11.5 write 1 200 b app-1 -", "12.0 15.0 write 0 0 c - -",
        "13.0 13.2 read 1 200 d app-1 -", "30.0 30.1 write 1 200 e app-1 -"]) + "\n")
    n, failed, p50, p95 = slow.latencies(p, 10.0, 20.0)
    assert (n, failed) == (2, 1) and p50 == pytest.approx(0.3) and p95 == pytest.approx(0.5)
    assert slow.latencies(p, 50.0, 60.0) == (0, 0, None, None)
