"""tools/bench_rehearsal.py's memory readings (the run itself is measured by hand, not
here: it boots the whole rehearsal)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_rehearsal", ROOT / "tools" / "bench_rehearsal.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_each_containers_cgroup_peak_is_read_and_unreadable_ones_are_left_out(tmp_path: Path, tally) -> None:
    b = _bench()
    for host, peak in (("app-1", "1048576\n"), ("data-1", "3145728\n"), ("broken", "n/a\n")):
        (tmp_path / host).mkdir()
        (tmp_path / host / "memory.max_usage_in_bytes").write_text(peak)
    (tmp_path / "memory.max_usage_in_bytes").write_text("999\n")  # the parent's: not a host
    tally.check(b.cgroup_peaks(tmp_path) == {"app-1": 1048576, "data-1": 3145728}, b.cgroup_peaks(tmp_path))
    tally.check(b.cgroup_peaks(tmp_path / "absent") == {})
    tally.check(b.read_int(tmp_path / "memory.max_usage_in_bytes") == 999)
    tally.check(b.read_int(tmp_path / "absent") == 0)


def test_this_process_is_a_stand_in_not_a_host(tally) -> None:
    b = _bench()
    tally.check(b.in_container(os.getpid()) is False)
    tally.check(b.in_container(2**22 + 7) is False)  # gone: not in a container


def test_the_cgroup_parent_is_the_one_the_rehearsal_puts_its_hosts_in(tally) -> None:
    from rehearsal import container

    tally.check(_bench().CGROUP_MEMORY == container.CGROUP_ROOT / "memory" / container.CGROUP_PARENT)
