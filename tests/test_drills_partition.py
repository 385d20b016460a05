"""The asymmetric partitions: the nftables that make the cut (checked by nft itself),
the probe's verdict, and a drill's flow with fakes for the host operations."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from rehearsal import netns
from rehearsal.drills import partition
from rehearsal.drills.base import Result, finish


def test_the_cut_drops_both_directions_and_nft_accepts_it() -> None:
    rules = netns.partition_rules(["10.40.16.10", "10.40.24.10"])
    assert "hook input" in rules and "ip saddr { 10.40.16.10, 10.40.24.10 } drop" in rules
    assert "hook output" in rules and "ip daddr { 10.40.16.10, 10.40.24.10 } drop" in rules
    nft = shutil.which("nft") or "/usr/sbin/nft"
    cp = subprocess.run([nft, "--check", "-f", "-"], input=rules, capture_output=True, text=True)
    assert cp.returncode == 0, cp.stderr
    with pytest.raises(ValueError):
        netns.partition_rules([])


def test_the_probe_script_tells_open_refused_and_cut_apart() -> None:
    import socket

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    out = subprocess.run(["python3", "-c", netns.PROBE, "127.0.0.1", str(port), "1"], capture_output=True, text=True)
    assert out.stdout.strip() == "open"
    srv.close()
    out = subprocess.run(["python3", "-c", netns.PROBE, "127.0.0.1", str(port), "1"], capture_output=True, text=True)
    assert out.stdout.strip() == "refused"
    # a namespace with no route anywhere: unreachable, a cut path
    ns = "dr-probe-test"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        out = subprocess.run(netns.in_ns(ns, ["python3", "-c", netns.PROBE, "192.0.2.1", "9", "0.5"]),
                             capture_output=True, text=True)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=True)
    assert out.stdout.strip().startswith("cut"), out


def test_probe_report_needs_every_cut_path_silent_and_the_open_path_answering() -> None:
    assert partition.probe_report({"a->b": False, "b->a": False}, {"c->a": True})[0]
    assert not partition.probe_report({"a->b": False, "b->a": True}, {"c->a": True})[0]  # one way only
    assert not partition.probe_report({"a->b": False, "b->a": False}, {"c->a": False})[0]  # a full isolation
    assert not partition.probe_report({}, {"c->a": True})[0]  # nothing probed
    assert partition.probe_report({}, {"c->a": True}, cut_probed=False)[0]  # the LBs: split brain proves it


class FakePartition(partition.PartitionDrills):
    def __init__(self, tmp: Path, reach: dict[tuple[str, str], bool]) -> None:
        self.out_dir, self.ceiling, self.effect = tmp, 1.0, None
        self.layout = None  # type: ignore[assignment]  # the fakes of netns never look at it
        self.reach = reach
        self.log: list[str] = []

    def _under_load(self, name: str, inject: Any, restore: Any, kinds: Any, rto: Any, alerts: Any, match: Any,
                    extra: Any = None) -> Result:
        res = Result(name, rto_s=1.0, fault_window=(0.0, 1.0), acked_in_fault_window=40,
                     per_kind={"records": {"acked": 600}})
        inject()
        extra(res)
        restore()
        return finish(res, rto)


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakePartition:
    d = FakePartition(tmp_path, {})
    monkeypatch.setattr(partition, "CUT_S", {k: 0.0 for k in partition.CUT_S})
    monkeypatch.setattr(netns, "cut_from", lambda layout, h, peers: d.log.append(f"cut {h} from {','.join(peers)}"))
    monkeypatch.setattr(netns, "heal", lambda layout, h: d.log.append(f"heal {h}"))
    monkeypatch.setattr(netns, "reaches", lambda layout, s, t, port, timeout=2.0: d.reach.get((s, t), True))
    return d


def test_a_partition_is_cut_probed_held_and_healed(fake: FakePartition) -> None:
    fake.reach = {("data-1", "data-2"): False, ("data-2", "data-1"): False}
    seen: list[str] = []
    res = fake._partition("p", "redis", "data-1", ["data-2"], ["app-1"], ("session",), 5.0,
                          lambda r, t0: seen.append("during"), lambda r: seen.append("after"))
    assert fake.log[0] == "cut data-1 from data-2" and "heal data-1" in fake.log
    assert seen[-1] == "after" and res.checks["partition_probed_both_ways"]
    assert res.fault_effect and "data-1 cut from data-2" in res.fault_effect and res.passed


def test_a_cut_that_did_not_take_fails_the_drill(fake: FakePartition) -> None:
    fake.reach = {}  # every path still answers: the rules did nothing
    res = fake._partition("p", "redis", "data-1", ["data-2"], ["app-1"], ("session",), 5.0,
                          lambda r, t0: None, lambda r: None)
    assert res.checks["partition_probed_both_ways"] is False and res.fault_effect is None and not res.passed
