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

    def redis_master(self) -> str:
        return "data-2"

    def flow_control(self, host: str) -> dict[str, int]:
        if self.throttles and (self.cg / "cpu.cfs_quota_us").read_text() != "-1":
            (self.cg / "cpu.stat").write_text("nr_periods 90\nnr_throttled 80\n")
            self.paused += 7_000_000_000
        return {"wsrep_flow_control_paused_ns": self.paused, "wsrep_flow_control_sent": 3 if host == "data-3" else 0}

    def _under_load(self, name: str, inject: Any, restore: Any, kinds: Any, rto: Any, alerts: Any, match: Any,
                    extra: Any = None) -> Result:
        res = Result(name)
        self.alerts_asked = list(alerts)
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
    assert set(victims) == {"data-3"}  # neither the writer nor the Redis master
    # The cause's alert or the users' errors at the LBs (measured: with the node evicted
    # rather than pausing the cluster, no flow-control pause at all, writes still failed).
    assert d.alerts_asked == ["GaleraFlowControl", "PortalErrors"]
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


# ------------------------------------------------------------------ efs-stall
class FakeEfs(slow.SlowDrills):
    """efs-stall against fakes: the layer's status, a controller's probe, Alertmanager,
    EC2 and scontrol ping; the load's log is written by the test."""

    def __init__(self, tmp: Path, *, stalls: bool = True, alert_at: int | None = 2, fenced: bool = False,
                 back_after: float | None = 4.0) -> None:
        from types import SimpleNamespace

        self.out_dir = tmp
        self.ceiling = 1.0
        self.effect = None
        self.alert_checks_left = None
        self.layout = SimpleNamespace(topo=SimpleNamespace(  # type: ignore[assignment]
            role_hosts={"slurm": ["slurm-1", "slurm-2"], "app": ["app-1", "app-2"]}))
        self.stalls, self.alert_at, self.fenced, self.back_after = stalls, alert_at, fenced, back_after
        self.calls: list[tuple[str, Any]] = []
        self.looks = 0
        self.now: list[float] = [0.0]  # the test's clock
        self.t_resume = 0.0

    def rule_for(self, alert: str) -> float:
        return 10.0

    def run(self, host: str, cmd: str, timeout: float = 30) -> tuple[int, str]:
        self.calls.append(("run", (host, cmd)))
        if "touch /slurm/" in cmd:
            return 0, "rc=137\n" if self.stalls else "rc=0\n"
        if cmd == "scontrol ping":
            return 0, ("Slurmctld(primary) at slurm-1 is UP\nSlurmctld(backup) at slurm-2 is UP\n" if not self.fenced
                       else "Slurmctld(primary) at slurm-1 is DOWN\nSlurmctld(backup) at slurm-2 is UP\n")
        raise AssertionError(f"unexpected command {cmd!r}")

    def alerts(self) -> list[dict[str, Any]]:
        self.looks += 1
        if self.alert_at is not None and self.looks >= self.alert_at:
            return [{"labels": {"alertname": "SlurmStateDirStalled", "host": "slurm-1"}, "startsAt": "x"}]
        return []

    def instance_state(self, host: str) -> str:
        return "stopped" if self.fenced and host == "slurm-1" else "running"

    def _under_load(self, name: str, inject: Any, restore: Any, kinds: Any, rto: Any, alerts: Any, match: Any,
                    extra: Any = None) -> Result:
        res = Result(name)
        inject()
        t0 = self.now[0]
        extra(res)
        res.fault_window = (t0, self.now[0])
        restore()
        t1 = self.t_resume
        rows = [f"{t0 - 5} {t0 - 4.5} job 1 200 r-before"]
        rows.append(f"{t0 + 2} {t0 + 2 + 5} job 0 0 r-stall")
        if self.back_after is not None:  # the stalled request's retry, then a new one
            rows += [f"{t1 + 1} {t1 + 2} job 1 200 r-stall", f"{t1 + 1} {t1 + self.back_after} job 1 200 r-after"]
        rows += [f"{t0 + 1} {t0 + 1.1} write 1 200 w1", f"{t0 + 3} {t0 + 3.1} session 1 200 s1"]
        (self.out_dir / f"load-{name}.log").write_text("\n".join(rows) + "\n")
        res.acked_in_fault_window = 50
        res.per_kind = {"records": {"acked": 600}}
        return finish(res, rto)


@pytest.fixture
def efs(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The stall layer and the clock: efs_stall/efs_resume recorded, time advanced by sleeps."""
    state: dict[str, Any] = {"now": [10_000.0], "calls": [], "stalled_ops": 0}
    monkeypatch.setattr(slow, "say", lambda m: None)
    monkeypatch.setattr(slow.time, "time", lambda: state["now"][0])

    def sleep(s: float) -> None:
        state["now"][0] += max(s, 0.5)

    monkeypatch.setattr(slow.time, "sleep", sleep)
    monkeypatch.setattr(slow.H, "efs_status", lambda layout: {"stalled_ops": state["stalled_ops"]})

    def stall(layout: Any, seconds: float) -> dict[str, Any]:
        state["calls"].append(("stall", seconds))
        if state.get("takes", True):
            state["stalled_ops"] += 17
        return {"stalled": True}

    def resume(layout: Any) -> dict[str, Any]:
        state["calls"].append(("resume", state["now"][0]))
        return {"stalled": False, "stalled_ops": state["stalled_ops"]}

    monkeypatch.setattr(slow.H, "efs_stall", stall)
    monkeypatch.setattr(slow.H, "efs_resume", resume)
    return state


def _efs(tmp: Path, efs: dict[str, Any], **kw: Any) -> FakeEfs:
    d = FakeEfs(tmp, **kw)
    d.now = efs["now"]
    real_resume = slow.H.efs_resume

    def resume(layout: Any) -> dict[str, Any]:
        d.t_resume = efs["now"][0]
        return real_resume(layout)

    slow.H.efs_resume = resume  # type: ignore[assignment]  # restored by monkeypatch: efs() set it first
    return d


def test_efs_stall_holds_the_share_30s_reports_users_and_passes(tmp_path: Path, efs: dict[str, Any]) -> None:
    d = _efs(tmp_path, efs)
    t0 = efs["now"][0]
    res = d.drill_efs_stall()
    stalls = [c for c in efs["calls"] if c[0] == "stall"]
    resumes = [c[1] for c in efs["calls"] if c[0] == "resume"]
    assert stalls == [("stall", slow.EFS_STALL_CAP_S)], efs["calls"]  # the layer's own cap, not the drill's 30 s
    assert resumes and slow.EFS_STALL_S <= resumes[0] - t0 <= slow.EFS_STALL_S + 3, resumes
    assert len(resumes) == 2  # and again in restore(): a failed drill leaves no stall
    assert res.checks["fault_effect"] and "17 operations" in (res.fault_effect or "")
    assert res.alert == "SlurmStateDirStalled" and res.checks["alert"]
    assert res.checks["no_fence_no_takeover"] and res.checks["jobs_back_within_slurm_rto"]
    assert any("first tried during the stall: 1, acknowledged 1" in n for n in res.notes), res.notes
    assert any("write requests during the stall: 1 acknowledged, 0 failed" in n for n in res.notes), res.notes
    assert res.passed, res.checks


@pytest.mark.parametrize("kw, check", [
    ({"stalls": False}, "fault_effect"),
    ({"alert_at": None}, "alert"),
    ({"fenced": True}, "no_fence_no_takeover"),
    ({"back_after": None}, "jobs_back_within_slurm_rto"),
], ids=["no-stall", "no-alert", "fenced", "jobs-never-back"])
def test_efs_stall_fails_on_each_broken_promise(tmp_path: Path, efs: dict[str, Any], kw: dict[str, Any],
                                                check: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if kw.get("stalls") is False:
        efs["takes"] = False
    monkeypatch.setattr(slow.DrillBase, "wait_alert", lambda self, names, t0, match, res: None)
    res = _efs(tmp_path, efs, **kw).drill_efs_stall()
    assert res.checks[check] is False and not res.passed, res.checks
