"""Asymmetric partitions: one host cut from its peers (every packet to and from them
dropped in its namespace, established connections too) while everyone else still
reaches it. Each drill probes the cut in both directions and the path that must stay
open, holds the cut longer than the tier's detection, heals, and checks what must hold.

  partition-redis   the Redis master cut from the other data hosts; app hosts reach it
  partition-galera  the Galera writer cut from its peers; the DB clients reach it
  partition-lb      the two LBs cut from each other; both reachable from the internet
"""

from __future__ import annotations

import time
from collections.abc import Callable

from .. import netns
from ..stack import say
from .base import ALL_KINDS, TARGETS, DrillBase, Result, register

CUT_S = {"redis": 20.0, "galera": 20.0, "lb": 15.0}
# (port probed between the cut hosts, port probed on the path that stays open). The LBs
# share no TCP port (VRRP is IP protocol 112): their cut shows both ways when each one,
# no longer hearing the other, makes itself MASTER.
PORTS: dict[str, tuple[int | None, int]] = {"redis": (6379, 6379), "galera": (4567, 3306), "lb": (None, 8404)}


def probe_report(cut: dict[str, bool], open_: dict[str, bool], cut_probed: bool = True) -> tuple[bool, str]:
    """(the partition is what it should be, a note): every `cut` path unanswered (at
    least one each way, unless the cut is proven otherwise), every `open_` path answered."""
    ok = (not cut_probed or (bool(cut) and not any(cut.values()))) and bool(open_) and all(open_.values())
    parts = [f"{k} {'ANSWERED' if v else 'cut'}" for k, v in cut.items()] + \
            [f"{k} {'open' if v else 'NOT ANSWERED'}" for k, v in open_.items()]
    return ok, "; ".join(parts)


class PartitionDrills(DrillBase):
    def _probe(self, victim: str, peers: list[str], keep: list[str], ports: tuple[int | None, int]
               ) -> tuple[bool, str]:
        cut = {}
        if ports[0] is not None:
            for p in peers:
                cut[f"{victim}->{p}:{ports[0]}"] = netns.reaches(self.layout, victim, p, ports[0])
                cut[f"{p}->{victim}:{ports[0]}"] = netns.reaches(self.layout, p, victim, ports[0])
        open_ = {f"{k}->{victim}:{ports[1]}": netns.reaches(self.layout, k, victim, ports[1]) for k in keep}
        return probe_report(cut, open_, ports[0] is not None)

    def _partition(self, name: str, tier: str, victim: str, peers: list[str], keep: list[str],
                   kinds: tuple[str, ...], rto: float | None, during: Callable[[Result, float], None],
                   after: Callable[[Result], None]) -> Result:
        state: dict[str, float] = {}

        def inject() -> None:
            say(f"    cut {victim} from {', '.join(peers)} (still reachable from {', '.join(keep)})")
            state["t0"] = time.time()
            netns.cut_from(self.layout, victim, peers)

        def extra(res: Result) -> None:
            ok, note = self._probe(victim, peers, keep, PORTS[tier])
            res.checks["partition_probed_both_ways"] = ok
            res.notes.append(f"probes: {note}")
            while time.time() < state["t0"] + CUT_S[tier]:
                during(res, state["t0"])
                time.sleep(1)
            if ok and res.fault_effect is None:
                res.fault_effect = f"{victim} cut from {', '.join(peers)} for {time.time() - state['t0']:.0f}s ({note})"
            elif ok and res.fault_effect:
                res.fault_effect = f"{res.fault_effect}; {note}"
            netns.heal(self.layout, victim)
            state["healed"] = time.time()
            res.notes.append(f"healed {time.time() - state['t0']:.1f}s after the cut")
            after(res)

        try:
            res = self._under_load(name, inject, lambda: netns.heal(self.layout, victim), kinds, rto, [],
                                   lambda a: False, extra)
        finally:
            netns.heal(self.layout, victim)
        self.judge_partial_outage(res, name, kinds, rto, state.get("healed"), "heal")
        return res

    @register("partition-redis")
    def drill_partition_redis(self) -> Result:
        from .gray import single_redis_master

        data = self.layout.topo.role_hosts["data"]
        master = self.redis_master()
        if master is None:
            raise RuntimeError("no Redis master known to the sentinels")
        peers = [n for n in data if n != master]
        apps = self.layout.topo.role_hosts["app"]
        pw = self.secret("redis_password")

        def majority_master() -> str | None:
            rc, out = self.run(peers[0], f"REDISCLI_AUTH='{pw}' redis-cli -h {self.layout.host(peers[0]).ip} "
                                         "-p 26379 sentinel get-master-addr-by-name mymaster", timeout=10)
            return self.host_by_ip(out.split()[0]) if rc == 0 and out.strip() else None

        def during(res: Result, t0: float) -> None:
            if not res.fault_effect:
                m = majority_master()
                if m and m != master:
                    res.fault_effect = f"the majority's Sentinels promoted {m} {time.time() - t0:.1f}s after the cut"

        def after(res: Result) -> None:

            t = self.settle(lambda: single_redis_master(self.redis_roles()))
            res.checks["one_redis_master"] = t is not None
            res.notes.append(f"after the heal: roles {self.redis_roles()}")

        res = self._partition("partition-redis", "redis", master, peers, list(apps[:1]), TARGETS["redis"]["kinds"],
                              TARGETS["redis"]["rto"], during, after)
        res.checks["failover"] = "promoted" in (res.fault_effect or "")
        return self._again(res)

    @register("partition-galera")
    def drill_partition_galera(self) -> Result:

        data = self.layout.topo.role_hosts["data"]
        writer = self.galera_writer()
        peers = [n for n in data if n != writer]
        apps = self.layout.topo.role_hosts["app"]

        def during(res: Result, t0: float) -> None:
            if "non-Primary" not in (res.fault_effect or ""):
                st = self.galera_status(writer).get("wsrep_cluster_status")
                if st and st != "Primary":
                    res.fault_effect = f"{writer} {st} (non-Primary) {time.time() - t0:.1f}s after the cut"

        def after(res: Result) -> None:
            res.checks["cluster_synced"] = all(self.wait_synced(n, len(data), 240) for n in data)
            seen = self.writers_seen()
            t = self.settle(lambda: len(set(self.writers_seen().values())) == 1)
            res.checks["one_writer_behind_every_dbwriter"] = t is not None and None not in seen.values()
            res.notes.append(f"after the heal: writers {self.writers_seen()}")

        res = self._partition("partition-galera", "galera", writer, peers, list(apps[:1]), TARGETS["galera"]["kinds"],
                              TARGETS["galera"]["rto"], during, after)
        res.checks["isolated_node_non_primary"] = "non-Primary" in (res.fault_effect or "")
        return self._again(res)

    @register("partition-lb")
    def drill_partition_lb(self) -> Result:
        from .gray import one_master_holding

        lbs = self.layout.topo.role_hosts["lb"]
        active = self.host_by_ip(self.eip_target())
        if active is None:
            raise RuntimeError("the Elastic IP is not associated")
        other = [h for h in lbs if h != active]

        def during(res: Result, t0: float) -> None:
            states = self.vrrp_states()
            if "both MASTER" not in (res.fault_effect or "") and all(v == "MASTER" for v in states.values()):
                res.fault_effect = f"both MASTER {time.time() - t0:.1f}s after the cut, EIP on " \
                                   f"{self.host_by_ip(self.eip_target())}"

        def after(res: Result) -> None:
            t = self.settle(lambda: one_master_holding(self.vrrp_states(),
                                                           self.host_by_ip(self.eip_target())))
            res.checks["one_master_holds_eip"] = t is not None
            res.notes.append(f"after the heal: VRRP {self.vrrp_states()}, EIP on "
                             f"{self.host_by_ip(self.eip_target())}{'' if t is None else f' (settled in {t}s)'}")

        # Both LBs stay reachable from outside the pair (the load keeps coming through the
        # one holding the EIP); the probe of the open path is the monitoring host's scrape
        # port. The cut itself shows both ways as split brain: both MASTER.
        res = self._partition("partition-lb", "lb", active, other, list(self.layout.topo.role_hosts["monitoring"][:1]), ALL_KINDS,
                              TARGETS["lb"]["rto"], during, after)
        res.checks["split_brain_seen"] = "both MASTER" in (res.fault_effect or "")
        return self._again(res)

    @staticmethod
    def _again(res: Result) -> Result:
        res.checks["fault_effect"] = bool(res.fault_effect)
        res.passed = all(res.checks.values())
        return res
