"""The freeze drills and the no-false-failover drill, without a rehearsal: the host
operations (freezer, EC2, probes) are fakes that record what the drill did."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from rehearsal.drills import base, gray
from rehearsal.drills.base import Result, finish

STAT = """# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,eresp,wretr,wredis,status,weight,act,bck
galera_writer,FRONTEND,,,0,0,4000,0,0,0,0,0,0,,,,,OPEN,,,
galera_writer,data-1,0,0,0,0,,0,0,0,,0,,0,0,0,0,{s1},1,1,0
galera_writer,data-2,0,0,0,0,,0,0,0,,0,,0,0,0,0,{s2},1,0,1
galera_writer,data-3,0,0,0,0,,0,0,0,,0,,0,0,0,0,UP,1,0,1
galera_writer,BACKEND,0,0,0,0,,0,0,0,,0,,0,0,0,0,UP,1,1,2
"""


def test_the_writer_is_the_first_up_active_else_the_first_up_backup() -> None:
    assert base.haproxy_active(STAT.format(s1="UP", s2="UP")) == "data-1"
    assert base.haproxy_active(STAT.format(s1="DOWN", s2="UP")) == "data-2"
    assert base.haproxy_active(STAT.format(s1="DOWN 1/2", s2="DOWN")) == "data-3"
    assert base.haproxy_active("") is None


def test_one_master_and_it_holds_the_eip() -> None:
    assert gray.one_master_holding({"lb-1": "MASTER", "lb-2": "BACKUP"}, "lb-1")
    assert not gray.one_master_holding({"lb-1": "MASTER", "lb-2": "BACKUP"}, "lb-2")  # the healed-cut case
    assert not gray.one_master_holding({"lb-1": "MASTER", "lb-2": "MASTER"}, "lb-1")
    assert gray.single_redis_master({"a": "master", "b": "slave", "c": "slave"})
    assert not gray.single_redis_master({"a": "master", "b": "master", "c": "slave"})


def test_job_submissions_during_the_freeze_are_judged_from_their_first_try() -> None:
    def h(t0: float, t1: float, rid: str, ok: bool) -> tuple[Any, ...]:
        return (t0, t1, "job", ok, 200 if ok else 503, rid, "app-1", "1" if ok else "-")

    hist = [h(100, 105, "quick", False), h(106, 120, "quick", True),   # 20 s after its first try
            h(110, 145, "slow", True),                                  # 35 s
            h(115, 116, "never", False),
            h(50, 51, "before", False), h(52, 200, "before", True)]     # first try before the window
    assert gray.slow_jobs(hist, (100.0, 130.0), 30.0) == ["never", "slow"]


class FakeDrill(gray.GrayDrills):
    """GrayDrills with every host operation replaced; _under_load runs inject, extra
    and restore in order, as the real one does around the load."""

    def __init__(self, tmp: Path) -> None:
        self.out_dir = tmp
        self.ceiling = 1.0
        self.effect = None
        self.calls: list[str] = []
        self.frozen: set[str] = set()
        self.eip = "lb-1"
        self.vrrp = {"lb-1": "MASTER", "lb-2": "BACKUP"}

    def _under_load(self, name: str, inject: Any, restore: Any, kinds: Any, rto: Any, alerts: Any, match: Any,
                    extra: Any = None) -> Result:
        res = Result(name)
        inject()
        res.rto_s = 1.0
        res.fault_window = (0.0, 1.0)
        if extra:
            extra(res)
        res.fault_effect = res.fault_effect or self.effect
        restore()
        res.acked_in_fault_window = 50
        res.per_kind = {"records": {"acked": 600}}
        return finish(res, rto)

    def host_by_ip(self, ip: str | None) -> str | None:
        return ip

    def eip_target(self) -> str | None:
        return self.eip

    def vrrp_states(self) -> dict[str, str]:
        return dict(self.vrrp)

    def settle(self, cond: Any, timeout: float = 0) -> float | None:
        return 0.0 if cond() else None


@pytest.fixture
def drill(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeDrill:
    d = FakeDrill(tmp_path)
    monkeypatch.setattr(gray, "FREEZE_S", {k: 0.01 for k in gray.FREEZE_S})

    def freeze(h: str) -> None:
        d.calls.append(f"freeze {h}")
        d.frozen.add(h)
        if h == "lb-1":  # the peer takes over while lb-1 is paused
            d.eip = "lb-2"

    def thaw(h: str) -> None:
        if h in d.frozen:
            d.calls.append(f"thaw {h}")
        d.frozen.discard(h)

    monkeypatch.setattr(gray, "freeze", freeze)
    monkeypatch.setattr(gray, "thaw", thaw)
    monkeypatch.setattr(gray, "frozen", lambda h: h in d.frozen)
    return d


def test_freeze_lb_freezes_the_eip_holder_thaws_it_and_demands_one_master_holding_the_eip(drill: FakeDrill) -> None:
    res = drill.drill_freeze_lb()
    assert drill.calls == ["freeze lb-1", "thaw lb-1"]
    assert res.fault_effect and "lb-1 FROZEN" in res.fault_effect and "EIP moved to lb-2" in res.fault_effect
    # lb-1 came back MASTER without a transition; the address stayed on lb-2: that fails
    assert res.checks["one_master_holds_eip"] is False and not res.passed


def test_freeze_lb_passes_when_the_master_holds_the_eip_after_the_thaw(drill: FakeDrill) -> None:
    drill.vrrp = {"lb-1": "BACKUP", "lb-2": "MASTER"}
    res = drill.drill_freeze_lb()
    assert res.checks["one_master_holds_eip"] and res.checks["eip_moved"] and res.passed, res


def test_a_freeze_that_did_not_hold_fails(drill: FakeDrill, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gray, "frozen", lambda h: False)  # the freezer never said FROZEN
    drill.vrrp = {"lb-1": "BACKUP", "lb-2": "MASTER"}
    res = drill.drill_freeze_lb()
    assert res.checks["freeze_held"] is False and res.checks["fault_effect"] is False and not res.passed


class NoFalseFailoverDrill(FakeDrill):
    """The probes the no-false-failover drill reads, answering from fields a test sets."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        from types import SimpleNamespace

        self.layout = SimpleNamespace(  # type: ignore[assignment]
            topo=SimpleNamespace(role_hosts={"lb": ["lb-1", "lb-2"], "data": ["data-1", "data-2", "data-3"],
                                             "slurm": ["slurm-1", "slurm-2"], "app": ["app-1", "app-2"]}),
            cfg=SimpleNamespace(slurm=SimpleNamespace(ctld_timeout=15)),
            host=lambda n: SimpleNamespace(ip="10.0.0.1"))
        self.ctl_state = "running"
        self.ping = "Slurmctld(primary) at slurm-1 is UP\nSlurmctld(backup) at slurm-2 is UP\n"
        self.paused: list[tuple[str, float]] = []
        self.downs = [{"lb-1": 2, "lb-2": 1}, {"lb-1": 2, "lb-2": 1}]  # chkdown before, after
        self.downs_asked: list[str] = []

    def lb_downs(self, app_host: str) -> dict[str, int]:
        self.downs_asked.append(app_host)
        return self.downs.pop(0)

    def redis_master(self) -> str | None:
        return "data-1"

    def galera_writer(self) -> str:
        return "data-2"

    def writers_seen(self) -> dict[str, str | None]:
        return {"app-1": "data-2"}

    def instance_state(self, host: str) -> str:
        return self.ctl_state

    def secret(self, name: str) -> str:
        return "pw"

    def run(self, host: str, cmd: str, timeout: float = 30) -> tuple[int, str]:
        if cmd == "scontrol ping":
            return 0, self.ping
        return 0, "Background saving started\nBackground append only file rewriting started"


@pytest.fixture
def nff(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> NoFalseFailoverDrill:
    d = NoFalseFailoverDrill(tmp_path)
    sleeps: list[float] = []
    monkeypatch.setattr(gray.time, "sleep", lambda s: sleeps.append(s))

    def freeze(h: str) -> None:
        d.calls.append(f"freeze {h}")
        d.frozen.add(h)

    def thaw(h: str) -> None:
        if h in d.frozen:
            d.calls.append(f"thaw {h}")
            d.paused.append((h, sleeps[-1]))
        d.frozen.discard(h)

    monkeypatch.setattr(gray, "freeze", freeze)
    monkeypatch.setattr(gray, "thaw", thaw)
    monkeypatch.setattr(gray, "frozen", lambda h: h in d.frozen)
    return d


def test_no_false_failover_pauses_every_tier_below_its_detection_including_the_slurm_primary(
        nff: NoFalseFailoverDrill) -> None:
    res = nff.drill_no_false_failover()
    assert [h for h, _ in nff.paused] == ["lb-1", "data-1", "data-2", "slurm-1", "app-1"]
    pauses = dict(nff.paused)
    assert pauses["slurm-1"] == pytest.approx(0.7 * 15)  # 0.7 x SlurmctldTimeout of the stack
    assert pauses["lb-1"] == pytest.approx(0.7 * gray.DETECT_S["lb"])
    assert pauses["app-1"] == pytest.approx(0.7 * gray.DETECT_S["app"])
    assert nff.downs_asked == ["app-1", "app-1"]
    assert res.checks["no_slurm_takeover"] and res.checks["no_eip_move"] and res.passed, res
    assert res.checks["no_app_server_taken_out"]


def test_no_false_failover_fails_when_an_lb_took_the_paused_app_host_out(nff: NoFalseFailoverDrill) -> None:
    nff.downs = [{"lb-1": 2, "lb-2": 1}, {"lb-1": 2, "lb-2": 2}]
    res = nff.drill_no_false_failover()
    assert res.checks["no_app_server_taken_out"] is False and not res.passed


def test_no_false_failover_fails_when_the_backup_took_over_and_fenced_the_primary(
        nff: NoFalseFailoverDrill) -> None:
    nff.ctl_state = "stopped"
    nff.ping = "Slurmctld(primary) at slurm-1 is DOWN\nSlurmctld(backup) at slurm-2 is UP\n"
    res = nff.drill_no_false_failover()
    assert res.checks["no_slurm_takeover"] is False and not res.passed


@pytest.mark.parametrize("answers_again", [True, False])
def test_freeze_app_waits_for_the_thawed_host_to_answer_the_load_again(
        drill: FakeDrill, monkeypatch: pytest.MonkeyPatch, answers_again: bool) -> None:
    from types import SimpleNamespace

    drill.layout = SimpleNamespace(topo=SimpleNamespace(role_hosts={"app": ["app-1", "app-2"]}))  # type: ignore[assignment]
    monkeypatch.setattr(gray, "BACK_IN_SERVICE_S", 0.2)
    lines = ["9999999998.0 9999999998.1 read 1 200 r1 app-2 -"]  # another host only
    if answers_again:
        lines.append("9999999999.0 9999999999.1 read 1 200 r2 app-1 -")
    (drill.out_dir / "load-freeze-app.log").write_text("\n".join(lines) + "\n")
    res = drill.drill_freeze_app()
    assert drill.calls == ["freeze app-1", "thaw app-1"]
    assert res.checks["app_back_in_service"] is answers_again
    assert res.passed is answers_again, res.checks


def test_fence_log_lines_read_the_journal_and_syslog_in_time_order() -> None:
    """freeze-slurm's notes: slurmctld's journal lines (epoch stamps) and the fence
    program's syslog lines (RFC 3339), since the freeze, oldest first; the backup's
    fence lines were missing from the notes while only the journal was read."""
    from rehearsal.drills.gray import fence_log_lines

    text = ("1796220680.500000 slurm-2 slurmctld[990]: slurmctld: Terminate signal (SIGINT or SIGTERM) received\n"
            "2026-12-02T14:11:48.447356+00:00 slurm-2 hpc-slurm-fence[1352]: slurm-2 took control\n"
            "2026-12-02T14:01:48.000000+00:00 slurm-2 hpc-slurm-fence[1]: an older run\n"
            "-- No entries --\n")
    lines = fence_log_lines(text, 1796220652.0)
    assert [round(t, 1) for t, _ in lines] == [28.5, 56.4]
    assert lines[0][1].startswith("slurmctld[990]: ") and lines[1][1] == "hpc-slurm-fence[1352]: slurm-2 took control"


@pytest.mark.parametrize("state", ["stopped", "running"])
def test_a_reboot_starts_an_instance_a_fence_stopped_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           state: str) -> None:
    """A host whose EC2 instance a peer fenced (stopped) while it was down is started
    through EC2 before its reboot, as the operator does: a reboot alone left EC2 saying
    stopped and IMDS answering 404, so that controller could fence nobody later."""
    from types import SimpleNamespace

    from rehearsal.drills import base

    d = FakeDrill(tmp_path)
    d.wd = tmp_path  # type: ignore[attr-defined]
    d.deploy = {"hosts": {"slurm-2": {"instance_id": "i-2"}}}  # type: ignore[attr-defined]
    d.layout = SimpleNamespace(host=lambda n: SimpleNamespace(name=n))  # type: ignore[assignment]
    calls: list[tuple[str, Any]] = []
    monkeypatch.setattr(FakeDrill, "instance_state", lambda self, h: state)
    monkeypatch.setattr(base, "ops_call", lambda wd, svc, method, **kw: calls.append((method, kw)))
    monkeypatch.setattr(base, "read_state", lambda wd: {})
    monkeypatch.setattr(base, "write_state", lambda wd, st: None)
    monkeypatch.setattr(base.H, "start", lambda layout, h: 4242)
    monkeypatch.setattr(base.H, "call", lambda layout, h, req: {"boot_done": True})
    d._reboot("slurm-2")
    assert calls == ([("start_instances", {"InstanceIds": ["i-2"]})] if state == "stopped" else [])
