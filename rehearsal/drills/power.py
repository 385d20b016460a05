"""Power loss: the three data hosts lose power at once. Every process of the three hosts
is killed (as in `galera-full`) and their data volumes drop every write they had not made
durable: each data volume is behind the power-loss layer (rehearsal/lazyfs.py), which
keeps only what was fsynced. A kill -9 alone never loses the page cache, so `galera-full`
cannot show what a commit that was acknowledged but not flushed costs; this drill can.

The hosts then boot again and the runbook's recovery runs (hpc-galera-recover report on
each, choose = the highest seqno, mark-safe + galera_new_cluster there, the others join):
no write the portal acknowledged may be missing. That the layer can show a loss at all
is the positive control in tests/test_lazyfs.py (innodb_flush_log_at_trx_commit=2 loses
acknowledged commits on the same layer; the template's settings lose none).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from .. import hosts as H
from .. import lazyfs
from ..stack import say
from .base import MIN_WINDOW_S, DrillBase, Result, history, register
from .crash import kill_within

AT_RISK_S = 1.0  # writes acknowledged this long before the cut: their redo may not be synced yet
MIN_AT_RISK = 5  # ... at least this many, or the cut hit an idle database


def summarize(dropped: dict[str, dict[str, Any]]) -> tuple[int, int, str]:
    """(files, bytes, one line per host) of what the layers dropped."""
    files = sum(int(d.get("files", 0)) for d in dropped.values())
    total = sum(int(d.get("bytes", 0)) for d in dropped.values())
    per = "; ".join(f"{h}: {d.get('bytes', 0)} bytes in {d.get('files', 0)} files "
                    f"({', '.join(p.rsplit('/', 1)[-1] for p in d.get('paths', [])[:4])})"
                    for h, d in sorted(dropped.items()))
    return files, total, per


class PowerDrills(DrillBase):
    def volumes_ready(self, hosts: list[str]) -> list[str]:
        """The hosts whose data volume is NOT behind the power-loss layer."""
        return [n for n in hosts if not lazyfs.mounted(self.layout.hostdir(n) / H.LAZY_DIR)]

    def power_cut(self, hosts: list[str]) -> dict[str, dict[str, Any]]:
        """Kill every process of the hosts at once, then drop their volumes' unsynced
        writes (in parallel: a power cut is one instant for all)."""
        spread = kill_within([threading.Thread(target=H.kill, args=(n,)) for n in hosts])
        say(f"    every process of {', '.join(hosts)} killed within {spread:.2f}s; dropping what their disks "
            "had not made durable")
        self.killed(*hosts)
        dropped: dict[str, dict[str, Any]] = {}
        errors: dict[str, str] = {}

        def off(n: str) -> None:
            try:
                dropped[n] = H.volume_power_off(self.layout, n)
            except Exception as e:  # noqa: BLE001 - reported with the host's name
                errors[n] = str(e)

        threads = [threading.Thread(target=off, args=(n,)) for n in hosts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        if errors:
            raise RuntimeError(f"power-off of the data volumes failed: {errors}")
        return dropped

    def recover(self, res: Result) -> None:
        """The runbook's recovery of a whole-cluster outage, as galera-full runs it."""
        from .data import DataDrills

        DataDrills.recover_full_outage(self, res)  # type: ignore[arg-type]

    @register("power-loss")
    def drill_power_loss(self) -> Result:
        data = list(self.layout.topo.role_hosts["data"])
        plain = self.volumes_ready(data)
        if plain:
            raise RuntimeError(f"power-loss: the data volume of {', '.join(plain)} is not behind the power-loss "
                               "layer (rehearsal/lazyfs.py; HPC_REHEARSAL_LAZYFS=0 turns it off)")
        res = Result("power-loss")
        with self.load("power-loss") as (p, path):
            if not self.wait_healthy(path):
                res.notes.append("the portal was not healthy before the fault")
            time.sleep(5)
            t0 = time.time()
            self.effect = None
            say(f"    power cut: {', '.join(data)} at once")
            dropped = self.power_cut(data)
            files, total, per = summarize(dropped)
            res.checks["unsynced_writes_dropped"] = total > 0
            res.notes.append(f"dropped at the cut: {per}")
            if self.effect and total > 0:
                res.fault_effect = f"{self.effect}; {total} bytes in {files} files not fsynced were dropped ({per})"
            time.sleep(5)
            self.recover(res)
            res.checks["cluster_reformed_3_synced"] = res.checks.pop("cluster_back")
            rto = self.rto(path, t0, ("write",), 180)
            res.rto_s = round(rto, 1) if rto is not None else None
            # The window: from the cut until writes have been taken again for a while.
            time.sleep(max(0.0, t0 + (rto or 0.0) + MIN_WINDOW_S - time.time()))
            res.fault_window = (t0, time.time())
            self.finish_load(p, path)
            self.tally(path, t0, res)
        at_risk = sum(1 for h in history(path) if h[2] == "write" and h[3] and t0 - AT_RISK_S <= h[1] <= t0)
        res.notes.append(f"{at_risk} record writes acknowledged in the {AT_RISK_S:.0f} s before the cut")
        res.checks["acked_just_before_cut"] = at_risk >= MIN_AT_RISK
        self.verify(path, res)
        return self.finish(res, None)
