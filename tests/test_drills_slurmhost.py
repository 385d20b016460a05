"""slurm-host without a rehearsal: the host is cut and killed, accounting and control
are polled from an app host, and the drill fails when either does not come back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from rehearsal.drills import slurmhost
from rehearsal.drills.base import Result, finish


class D(slurmhost.SlurmHostDrills):
    def __init__(self, tmp: Path, sacct_ok: bool, ping: str) -> None:
        self.out_dir, self.ceiling, self.effect = tmp, 1.0, None
        self.layout = type("L", (), {"topo": type("T", (), {"role_hosts": {"slurm": ["slurm-1", "slurm-2"],
                                                                            "app": ["app-1", "app-2"]}})()})()
        self.sacct_ok, self.ping = sacct_ok, ping
        self.ops: list[str] = []
        self.handback_ok = True

    def run(self, host: str, cmd: str, timeout: float = 30) -> tuple[int, str]:
        assert host == "app-2"
        if cmd.startswith("sacct"):
            return (0, "101\n") if self.sacct_ok else (1, "sacct: error: Problem talking to the database")
        if self.ops and self.handback_ok:  # the primary rebooted: in control again, the backup in standby
            return 0, "Slurmctld(primary) at slurm-1 is UP\nSlurmctld(backup) at slurm-2 is UP\n"
        return 0, self.ping

    def killed(self, *hosts: str) -> None:
        self.effect = f"no process left on {', '.join(hosts)}"

    def _reboot(self, host: str, wait_units: Any = None, timeout: float = 0) -> None:
        self.ops.append(f"reboot {host}")

    def _under_load(self, name: str, inject: Any, restore: Any, kinds: Any, rto: Any, alerts: Any, match: Any,
                    extra: Any = None) -> Result:
        res = Result(name, fault_window=(0.0, 1.0), acked_in_fault_window=30, per_kind={"records": {"acked": 600}})
        inject()
        extra(res)
        restore()
        return finish(res, rto)


UP = "Slurmctld(primary) at slurm-1 is DOWN\nSlurmctld(backup) at slurm-2 is UP\n"


@pytest.fixture
def ops(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    log: list[str] = []

    def kill(h: str) -> list[int]:
        log.append(f"kill {h}")
        return []

    monkeypatch.setattr(slurmhost.netns, "set_link", lambda layout, h, up: log.append(f"link {h} {up}"))
    monkeypatch.setattr(slurmhost.H, "kill", kill, raising=False)
    monkeypatch.setattr(slurmhost, "SACCT_TARGET_S", 0.01)
    monkeypatch.setattr(slurmhost, "POLL_S", 120.0)
    monkeypatch.setattr(slurmhost.time, "sleep", lambda s: None)
    return log


def test_the_primary_host_dies_and_accounting_and_control_come_back(tmp_path: Path, ops: list[str]) -> None:
    d = D(tmp_path, True, UP)
    d.ceiling = 1000.0  # the fake answers at once; the real bound is 60 s
    res = d.drill_slurm_host()
    assert ops[:2] == ["link slurm-1 False", "kill slurm-1"] and "link slurm-1 True" in ops
    assert d.ops == ["reboot slurm-1"]
    assert res.checks["sacct_within_60s"] and res.checks["backup_in_control"] and res.passed, res.checks
    assert res.checks["both_controllers_back"] and "both controllers answer ping" in " ".join(res.notes)


def test_a_backup_wedged_by_its_hand_back_fails_the_drill(tmp_path: Path, ops: list[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The primary is back but the backup never returns to standby (no ping answer): the
    drill fails on both_controllers_back after HANDBACK_LIMIT_S."""
    from rehearsal.drills import base

    monkeypatch.setattr(base, "HANDBACK_LIMIT_S", 0.0)
    d = D(tmp_path, True, UP)
    d.ceiling, d.handback_ok = 1000.0, False
    res = d.drill_slurm_host()
    assert res.checks["backup_in_control"] and res.checks["both_controllers_back"] is False and not res.passed
    assert "not within 150 s" in " ".join(res.notes)


def test_no_accounting_or_no_control_fails(tmp_path: Path, ops: list[str]) -> None:
    d = D(tmp_path, False, "Slurmctld(primary) at slurm-1 is DOWN\nSlurmctld(backup) at slurm-2 is DOWN\n")
    d.ceiling = 0.0001
    slurmhost.POLL_S = 0.0  # the polling gives up at once (restored below)
    res = d.drill_slurm_host()
    assert res.checks["sacct_within_60s"] is False and res.checks["backup_in_control"] is False
    assert res.fault_effect is None and not res.passed
