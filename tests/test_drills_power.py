"""power-loss without a rehearsal: the three data hosts are killed together, then every
data volume drops what was not fsynced (the layer's own answer is the fault's effect),
the runbook's recovery runs, and the checks judge what the load's history shows."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rehearsal.drills import ORDER, power
from rehearsal.drills.base import Result

DATA = ["data-1", "data-2", "data-3"]


class FakePower(power.PowerDrills):
    def __init__(self, tmp: Path, dropped_bytes: int = 4096, reformed: bool = True, lost: int = 0,
                 before_cut: int = 18) -> None:
        self.out_dir, self.ceiling, self.effect = tmp, 1.0, None
        self.layout = type("L", (), {"topo": type("T", (), {"role_hosts": {"data": tuple(DATA)}})(),
                                     "hostdir": lambda self, n: tmp / n})()
        self.dropped_bytes, self.reformed, self.lost, self.before_cut = dropped_bytes, reformed, lost, before_cut
        self.recovered = False
        self.log = tmp / "load-power-loss.log"

    @contextlib.contextmanager
    def load(self, name: str) -> Iterator[tuple[Any, Path]]:
        yield None, self.log

    def wait_healthy(self, path: Path, kinds: Any = (), timeout: float = 0) -> bool:
        return True

    def recover(self, res: Result) -> None:
        self.recovered = True
        res.checks["cluster_back"] = self.reformed

    def rto(self, path: Path, t0: float, kinds: Any, timeout: float) -> float | None:
        # the history: writes acknowledged just before the cut, and after the recovery
        lines = [f"{t0 - 0.9 + i * 0.04:.3f} {t0 - 0.85 + i * 0.04:.3f} write 1 200 rh-b{i} data-1 -"
                 for i in range(self.before_cut)]
        lines += [f"{t0 + 1 + i * 0.05:.3f} {t0 + 1.01 + i * 0.05:.3f} write 1 200 rh-a{i} data-1 -" for i in range(40)]
        self.log.write_text("\n".join(lines) + "\n")
        return 20.0

    def finish_load(self, p: Any, path: Path, min_acked: int = 0, max_s: float = 0) -> None:
        pass

    def tally(self, path: Path, t0: float, res: Result) -> None:
        res.requests = 58

    def verify(self, path: Path, res: Result) -> None:
        res.per_kind = {"records": {"acked": 600, "lost": self.lost, "duplicated": 0, "ghost": 0}}
        res.lost_writes = self.lost
        a, b = res.fault_window or (0, 0)
        res.acked_in_fault_window = sum(1 for line in self.log.read_text().splitlines()
                                        if a <= float(line.split()[1]) <= b)


@pytest.fixture
def cut(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[Any]]:
    seen: dict[str, list[Any]] = {"killed": [], "off": [], "order": []}
    alive = set(DATA)

    def kill(host: str, timeout: float = 10) -> list[int]:
        seen["killed"].append((host, time.time()))
        seen["order"].append(("kill", host))
        alive.discard(host)
        return [1]

    monkeypatch.setattr(power.H, "kill", kill)
    monkeypatch.setattr(power.H, "alive", lambda h: h in alive)
    monkeypatch.setattr(power.lazyfs, "mounted", lambda p: True)
    clock = [time.time()]  # sleeping moves this clock on at once

    def sleep(s: float) -> None:
        clock[0] += max(0.0, s)

    monkeypatch.setattr(power.time, "sleep", sleep)
    monkeypatch.setattr(power.time, "time", lambda: clock[0])
    return seen


def _off(seen: dict[str, list[Any]], nbytes: int) -> Any:
    def off(layout: Any, host: str) -> dict[str, Any]:
        assert not [h for h in DATA if ("kill", h) not in seen["order"]], "a volume powered off before every host died"
        seen["off"].append(host)
        seen["order"].append(("off", host))
        return {"files": 2 if nbytes else 0, "bytes": nbytes, "paths": ["/mysql/ib_logfile0", "/mysql/ibdata1"]}
    return off


def test_registered_in_the_order() -> None:
    assert "power-loss" in ORDER


def test_all_three_die_together_then_lose_their_unsynced_writes_then_recover(
        tmp_path: Path, cut: dict[str, list[Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(power.H, "volume_power_off", _off(cut, 4096))
    d = FakePower(tmp_path)
    res = d.drill_power_loss()
    assert sorted(h for h, _ in cut["killed"]) == DATA
    stamps = [t for _, t in cut["killed"]]
    assert max(stamps) - min(stamps) < 1.0
    assert sorted(cut["off"]) == DATA and d.recovered
    assert res.fault_effect and "no process left on data-1, data-2, data-3" in res.fault_effect
    assert "12288 bytes in 6 files not fsynced were dropped" in res.fault_effect
    assert "ib_logfile0" in res.fault_effect
    assert res.checks["cluster_reformed_3_synced"] and "cluster_back" not in res.checks
    assert res.checks["acked_just_before_cut"] and res.acked_in_fault_window >= 20
    assert res.passed, res.checks


@pytest.mark.parametrize("what, kw, check", [
    ("nothing dropped: the layer did not cut power", {"dropped_bytes": 0}, "unsynced_writes_dropped"),
    ("an acknowledged write lost", {"lost": 1}, "lost_writes"),
    ("the cluster did not re-form", {"reformed": False}, "cluster_reformed_3_synced"),
    ("an idle database at the cut", {"before_cut": 2}, "acked_just_before_cut"),
])
def test_each_failure_fails_the_drill(tmp_path: Path, cut: dict[str, list[Any]], monkeypatch: pytest.MonkeyPatch,
                                      what: str, kw: dict[str, Any], check: str) -> None:
    monkeypatch.setattr(power.H, "volume_power_off", _off(cut, kw.get("dropped_bytes", 4096)))
    res = FakePower(tmp_path, **kw).drill_power_loss()
    assert res.checks[check] is False and not res.passed, what
    if check == "unsynced_writes_dropped":
        assert res.fault_effect is None and res.checks["fault_effect"] is False


def test_a_volume_not_behind_the_layer_stops_the_drill_before_any_kill(
        tmp_path: Path, cut: dict[str, list[Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(power.lazyfs, "mounted", lambda p: not str(p).startswith(str(tmp_path / "data-2")))
    with pytest.raises(RuntimeError, match="data-2"):
        FakePower(tmp_path).drill_power_loss()
    assert cut["killed"] == []


def test_summarize_adds_up_every_host() -> None:
    files, total, per = power.summarize({"data-1": {"files": 1, "bytes": 10, "paths": ["/mysql/ib_logfile0"]},
                                         "data-2": {"files": 0, "bytes": 0, "paths": []}})
    assert (files, total) == (1, 10) and per.startswith("data-1: 10 bytes in 1 files (ib_logfile0)")


def test_a_data_host_sees_its_volume_through_the_layer_unless_turned_off(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from rehearsal import hosts as H

    host = type("Th", (), {"data_gb": 20})()
    layout = type("L", (), {"topo": type("T", (), {"host": lambda self, n: host})(), "shared": tmp_path / "efs",
                            "hostdir": lambda self, n: tmp_path / "hosts" / n})()
    h = type("RH", (), {"name": "data-1", "roles": ["data"]})()
    monkeypatch.delenv("HPC_REHEARSAL_LAZYFS", raising=False)
    assert (str(tmp_path / "hosts/data-1/lazy"), H.DATA_VOLUME_MOUNT) in H.binds(layout, h)  # type: ignore[arg-type]
    mon = type("RH", (), {"name": "mon-1", "roles": ["monitoring"]})()
    assert (str(tmp_path / "hosts/mon-1/volume"), H.DATA_VOLUME_MOUNT) in H.binds(layout, mon)  # type: ignore[arg-type]
    monkeypatch.setenv("HPC_REHEARSAL_LAZYFS", "0")
    assert (str(tmp_path / "hosts/data-1/volume"), H.DATA_VOLUME_MOUNT) in H.binds(layout, h)  # type: ignore[arg-type]
