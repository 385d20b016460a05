"""The stand-in portal's Slurm health check: `scontrol ping` in the background, never a
bare TCP connection (slurmctld logs an error for each) and never on the request path."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tests.loadfile import load_script

UP = "Slurmctld(primary) at slurm-1 is DOWN\nSlurmctld(backup) at slurm-2 is UP\n"
DOWN = "Slurmctld(primary) at slurm-1 is DOWN\nSlurmctld(backup) at slurm-2 is DOWN\n"


def _fake_scontrol(d: Path, out: str, rc: int) -> None:
    p = d / "scontrol"
    p.write_text(f"#!/bin/sh\necho \"$*\" >> '{d}/calls'\nprintf '%s' '{out}'\nexit {rc}\n")
    p.chmod(p.stat().st_mode | stat.S_IEXEC)


@pytest.mark.parametrize("out,rc,want", [
    (UP, 1, "ok"),  # scontrol ping exits 1 when one controller is down: one UP is enough
    (DOWN, 1, "error: no slurmctld answers scontrol ping (rc 1: Slurmctld(backup) at slurm-2 is DOWN)"),
])
def test_slurm_health_comes_from_scontrol_ping(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, out: str, rc: int,
                                                want: str) -> None:
    _fake_scontrol(tmp_path, out, rc)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    mod = load_script("portal_standin.py")
    assert mod.ping_slurm() == want
    assert (tmp_path / "calls").read_text() == "ping\n"


def test_the_health_check_reads_the_last_ping_and_notices_when_it_is_stale(monkeypatch: pytest.MonkeyPatch) -> None:
    mod = load_script("portal_standin.py")
    monkeypatch.setattr(mod, "_slurm_ready", type("E", (), {"wait": lambda self, t: False})())
    assert mod.check_slurm() == "error: Slurm not checked yet"
    now = mod.time.monotonic()
    mod._slurm_state.update(value="ok", t=now)
    assert mod.check_slurm() == "ok"
    mod._slurm_state.update(value="ok", t=now - 4 * mod.SLURM_CHECK_S - 31)
    assert mod.check_slurm().startswith("error: Slurm check stale")
