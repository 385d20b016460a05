"""Gray failures: a whole host paused (every process frozen by the cgroup freezer, its
kernel still completing TCP handshakes and its peers seeing silence) for longer than its
tier's detection, then thawed; and pauses and stalls shorter than detection, which must
cause no failover.

After each thaw the drill checks what must hold with a node that came back "alive":
one VRRP MASTER and it holds the Elastic IP, one Redis master, one Galera writer behind
every DB writer HAProxy, one slurmctld in control (the paused primary fenced by the
backup's SlurmctldPrimaryOnProg through EC2 StopInstances: the rehearsal's hypervisor,
this drill, ends a stopped instance's processes as EC2 would).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .. import hosts as H
from .. import netns
from ..awsd import ops_call
from ..stack import say
from .base import ALL_KINDS, TARGETS, DrillBase, Result, epoch_of, frozen, history, job_waits, register

# Detection of each tier (the templates' settings) and how long a freeze outlasts it.
DETECT_S = {
    "lb": 1.8,      # VRRPv3 advert_int 0.5: 3 missed adverts + skew
    "redis": 2.0,   # Sentinel down-after-milliseconds 2000
    # the DB writer's checks of a frozen writer: fall 2 checks of 1 s, fastinter 250ms
    # between (evs.suspect_timeout PT2S behind it)
    "galera": 2.25,
    "app": 1.25,    # the LBs' HAProxy checks of a web/app host: fall 2 checks of 500 ms, fastinter 250ms between
}
FREEZE_S = {"lb": 10.0, "redis": 12.0, "galera": 15.0, "app": 10.0}
FAILBACK_S = 60.0  # the preferred Galera writer takes the writes back within this of Synced
AFTER_FAILBACK_S = 5.0  # the load goes on this long after the failback
BACK_IN_SERVICE_S = 30.0  # a thawed app host answers the load again within this
SLURM_FREEZE_MAX_S = 120.0  # the primary stays paused until fenced, or this long
SHORT_PAUSE = 0.7  # no-false-failover: a pause of this fraction of the detection time


def freeze(host: str) -> None:
    H.freeze(host)


def thaw(host: str) -> None:
    if frozen(host):
        H.thaw(host)


def fence_log_lines(text: str, since: float, limit: int = 25) -> list[tuple[float, str]]:
    """(seconds after `since`, message) of journal lines (`-o short-unix`: epoch first)
    and syslog lines (RFC 3339 first), oldest first, the last `limit` from `since` on."""
    out: list[tuple[float, str]] = []
    for line in text.splitlines():
        stamp, _, rest = line.partition(" ")
        try:
            t = float(stamp)
        except ValueError:
            parsed = epoch_of(stamp)
            if parsed is None:
                continue
            t = parsed
        if t >= since - 1:
            out.append((t - since, rest.partition(" ")[2]))  # without the host name
    return sorted(out)[-limit:]


def one_master_holding(states: dict[str, str], eip_holder: str | None) -> bool:
    """Exactly one load balancer in VRRP state MASTER, and the Elastic IP on it."""
    masters = [h for h, s in states.items() if s == "MASTER"]
    return len(masters) == 1 and masters[0] == eip_holder


def single_redis_master(roles: dict[str, str]) -> bool:
    return sum(1 for r in roles.values() if r == "master") == 1


def slow_jobs(hist: list[Any], window: tuple[float, float], limit: float) -> list[str]:
    """Job request ids first tried inside the window and not acknowledged within `limit`
    seconds of that first try."""
    return sorted(rid for rid, w in job_waits(hist, *window).items() if w is None or w > limit)


class GrayDrills(DrillBase):
    # ------------------------------------------------------------------ the drill shape
    def _freeze(self, name: str, host: str, hold_s: float, kinds: tuple[str, ...], rto: float | None,
                after_thaw: Callable[[Result], None], while_frozen: Callable[[Result, float], bool] | None = None
                ) -> Result:
        """Freeze `host` under load, hold it `hold_s` (or until while_frozen says the
        freeze is over: fenced), thaw, then after_thaw's checks."""
        state: dict[str, float] = {}

        def inject() -> None:
            say(f"    freeze every process of {host} (cgroup freezer) for {hold_s:.0f}s")
            state["t0"] = time.time()
            freeze(host)
            if frozen(host):
                self.effect = f"{host} FROZEN"

        def extra(res: Result) -> None:
            t0 = state["t0"]
            ended_early = False
            while time.time() < t0 + hold_s:
                if while_frozen is not None and while_frozen(res, t0):
                    ended_early = True
                    break
                if not frozen(host):
                    res.notes.append(f"{host} was thawed early, {time.time() - t0:.1f}s after the freeze")
                    break
                time.sleep(0.5)
            held = ended_early or frozen(host)
            res.checks["freeze_held"] = held
            if held and res.fault_effect is None and self.effect:
                res.fault_effect = f"{self.effect} {time.time() - t0:.1f}s"
            thaw(host)
            if not ended_early:  # a node back alive (not fenced): its return is measured on its own
                state["thawed"] = time.time()
            res.notes.append(f"thawed {host} {time.time() - t0:.1f}s after the freeze")
            after_thaw(res)

        try:
            res = self._under_load(name, inject, lambda: thaw(host), kinds, rto, [], lambda a: False, extra)
        finally:
            thaw(host)
        self.judge_partial_outage(res, name, kinds, rto, state.get("thawed"), "thaw")
        return res

    # ------------------------------------------------------------------ drills
    @register("freeze-lb")
    def drill_freeze_lb(self) -> Result:
        active = self.host_by_ip(self.eip_target())
        if active is None:
            raise RuntimeError("the Elastic IP is not associated")

        def after(res: Result) -> None:
            moved = self.host_by_ip(self.eip_target())
            res.notes.append(f"EIP on {moved} before the settle")
            if moved != active and res.fault_effect:
                res.fault_effect += f"; EIP moved to {moved}"
            t = self.settle(lambda: one_master_holding(self.vrrp_states(), self.host_by_ip(self.eip_target())))
            res.checks["one_master_holds_eip"] = t is not None
            res.notes.append(f"after the thaw: VRRP {self.vrrp_states()}, EIP on {self.host_by_ip(self.eip_target())}"
                             f"{'' if t is None else f' (settled in {t}s)'}")

        res = self._freeze("freeze-lb", active, FREEZE_S["lb"], ALL_KINDS, TARGETS["lb"]["rto"], after)
        res.checks["eip_moved"] = "EIP moved" in (res.fault_effect or "")
        return self._repass(res)

    @register("freeze-redis")
    def drill_freeze_redis(self) -> Result:

        master = self.redis_master()
        if master is None:
            raise RuntimeError("no Redis master known to the sentinels")

        def while_frozen(res: Result, t0: float) -> bool:
            if "promoted" not in (res.fault_effect or ""):
                m = self.redis_master()
                if m and m != master:
                    res.fault_effect = f"{master} FROZEN; Sentinel promoted {m} {time.time() - t0:.1f}s after"
            return False

        def after(res: Result) -> None:
            t = self.settle(lambda: single_redis_master(self.redis_roles()) and
                            self.redis_roles().get(master) == "slave")
            res.checks["one_redis_master"] = t is not None
            res.notes.append(f"after the thaw: roles {self.redis_roles()}")

        res = self._freeze("freeze-redis", master, FREEZE_S["redis"], TARGETS["redis"]["kinds"],
                           TARGETS["redis"]["rto"], after, while_frozen)
        res.checks["failover"] = "promoted" in (res.fault_effect or "")
        return self._repass(res)

    @register("freeze-galera")
    def drill_freeze_galera(self) -> Result:

        writer = self.galera_writer()
        data = self.layout.topo.role_hosts["data"]

        def while_frozen(res: Result, t0: float) -> bool:
            if "writer now" not in (res.fault_effect or ""):
                seen = {w for w in self.writers_seen().values() if w}
                if seen and writer not in " ".join(seen):
                    res.fault_effect = f"{writer} FROZEN; writer now {sorted(seen)} {time.time() - t0:.1f}s after"
            return False

        def after(res: Result) -> None:
            synced = all(self.wait_synced(n, len(data), 240) for n in data)
            res.checks["cluster_synced"] = synced
            def back_on_writer() -> bool:
                # The frozen node was the preferred writer (the first Synced one in the
                # DB writers' order, galera_writer()): once Synced and past its
                # `rise`, every DB writer moves the writes back to it and cuts the
                # sessions on the backup. That failback is part of this fault's cost,
                # so the load runs through it (the window used to close before it).
                seen = self.writers_seen()  # one probe of every DB client per check
                return set(seen.values()) == {self.galera_writer()}

            t = self.settle(back_on_writer, FAILBACK_S * max(1.0, self.ceiling)) if synced else None
            res.checks["one_writer_behind_every_dbwriter"] = t is not None
            res.notes.append(f"after the thaw: writers {self.writers_seen()}"
                             f"{'' if t is None else f', all on the preferred writer {t}s after the cluster was Synced'}")
            if t is not None:
                time.sleep(AFTER_FAILBACK_S)  # what the cut sessions' reconnects cost, measured

        res = self._freeze("freeze-galera", writer, FREEZE_S["galera"], TARGETS["galera"]["kinds"],
                           TARGETS["galera"]["rto"], after, while_frozen)
        res.checks["writer_moved"] = "writer now" in (res.fault_effect or "")
        return self._repass(res)

    @register("freeze-app")
    def drill_freeze_app(self) -> Result:
        victim = self.layout.topo.role_hosts["app"][0]

        def after(res: Result) -> None:
            """Back in service: the load sees the thawed host answer again (its checks
            pass rise times), within BACK_IN_SERVICE_S."""
            thawed = time.time()
            path = self.out_dir / "load-freeze-app.log"
            while time.time() < thawed + BACK_IN_SERVICE_S * max(1.0, self.ceiling):
                back = [h for h in history(path) if h[6] == victim and h[3] and h[0] > thawed]
                if back:
                    res.notes.append(f"{victim} answered again {back[0][1] - thawed:.1f}s after the thaw")
                    res.checks["app_back_in_service"] = True
                    return
                time.sleep(1)
            res.checks["app_back_in_service"] = False
            res.notes.append(f"{victim} did not answer within {BACK_IN_SERVICE_S:.0f}s of the thaw")

        res = self._freeze("freeze-app", victim, FREEZE_S["app"], ALL_KINDS, TARGETS["lb"]["rto"], after)
        return self._repass(res)

    @register("freeze-slurm")
    def drill_freeze_slurm(self) -> Result:
        ctl = self.layout.topo.role_hosts["slurm"]
        primary, backup = ctl[0], ctl[1]
        client = self.layout.topo.role_hosts["app"][-1]
        fenced: dict[str, float] = {}

        froze: dict[str, float] = {}

        def while_frozen(res: Result, t0: float) -> bool:
            froze.setdefault("t0", t0)
            st = self.instance_state(primary)
            if st in ("stopping", "stopped"):
                # EC2 stopped the instance (Force): it vanishes from the network without a
                # FIN or a reset (link cut first), and its processes end, as on a
                # hypervisor. Killing alone closed its sockets with resets, which freed
                # whatever the backup waited on there at once, as AWS never does.
                netns.set_link(self.layout, primary, False)
                H.kill(primary)
                fenced["t"] = time.time() - t0
                res.fault_effect = (f"{primary} FROZEN; fenced by {backup}'s hpc-slurm-fence (EC2 {st}) "
                                    f"{fenced['t']:.1f}s after the freeze")
                return True
            return False

        def after(res: Result) -> None:
            res.checks["fenced"] = "t" in fenced
            # Where the time to the fence went: the backup's takeover and the fence
            # program's steps, seconds after the freeze (journal, epoch timestamps).
            t_freeze = froze.get("t0", time.time())
            # slurmctld's lines are in the journal; hpc-slurm-fence logs to /dev/log, which
            # is rsyslog's socket on these hosts (/var/log/syslog), journald's on others.
            _, journal = self.run(backup, "{ journalctl -o short-unix --no-pager -t slurmctld "
                                          f"--since=@{int(t_freeze) - 1}; journalctl -o short-unix --no-pager "
                                          f"-t hpc-slurm-fence --since=@{int(t_freeze) - 1}; "
                                          "grep -h hpc-slurm-fence /var/log/syslog 2>/dev/null; } | grep -iE "
                                          "'fenc|control|takeover|taking over|primary|stop|ping|persist'",
                                  timeout=30)
            for when, text in fence_log_lines(journal, t_freeze):
                res.notes.append(f"{backup} +{when:.1f}s {text[:200]}")
            rc, ping = self.run(client, "scontrol ping", timeout=30)
            res.notes.append(f"scontrol ping: {' / '.join(ping.strip().splitlines())}")
            up = [line for line in ping.splitlines() if "is UP" in line]
            res.checks["one_slurmctld_in_control"] = len(up) == 1 and backup in up[0]

        def reboot_fenced() -> None:
            if "t" in fenced:  # the operator's restart of a fenced controller (docs/slurm-cutover.md)
                netns.set_link(self.layout, primary, True)
                iid = self.deploy["hosts"][primary]["instance_id"]
                ops_call(self.wd, "ec2", "start_instances", InstanceIds=[iid])
                self._reboot(primary, ["slurmctld.service"])

        res = self._freeze("freeze-slurm", primary, SLURM_FREEZE_MAX_S, (), None, after, while_frozen)
        hist = history(self.out_dir / "load-freeze-slurm.log")
        if res.fault_window:
            slow = slow_jobs(hist, res.fault_window, TARGETS["slurm"]["rto"] * self.ceiling)
            res.checks["jobs_within_slurm_rto"] = not slow
            if slow:
                res.notes.append(f"{len(slow)} job submissions during the freeze not acknowledged within "
                                 f"{TARGETS['slurm']['rto']:.0f}s: {slow[:3]}")
        res.rto_s = round(fenced["t"], 1) if "t" in fenced else None
        res.target_rto_s = TARGETS["slurm"]["rto"]
        res.checks["rto"] = res.rto_s is not None and res.rto_s <= TARGETS["slurm"]["rto"] * self.ceiling
        reboot_fenced()
        return self._repass(res)

    @register("no-false-failover")
    def drill_no_false_failover(self) -> Result:
        """Pauses of 0.7x each tier's detection (LB, Redis master, Galera writer, primary
        Slurm controller: SlurmctldTimeout, a web/app host: the LBs' checks) and a Redis
        BGSAVE + AOF rewrite under load: no failover anywhere, no controller fenced, no
        web/app server taken out."""

        eip = self.host_by_ip(self.eip_target())
        master = self.redis_master()
        writer = self.galera_writer()
        if eip is None or master is None:
            raise RuntimeError("no EIP holder or no Redis master")
        ctl = self.layout.topo.role_hosts["slurm"][0]
        client = self.layout.topo.role_hosts["app"][-1]
        app = self.layout.topo.role_hosts["app"][0]
        detect = {**DETECT_S, "slurm": float(self.layout.cfg.slurm.ctld_timeout)}
        before = {"eip": eip, "redis": master, "writers": self.writers_seen()}
        downs_before = self.lb_downs(app)
        paused: list[str] = []

        def inject() -> None:
            for tier, host in (("lb", eip), ("redis", master), ("galera", writer), ("slurm", ctl), ("app", app)):
                pause = SHORT_PAUSE * detect[tier]
                say(f"    pause {host} ({tier}) for {pause:.2f}s")
                freeze(host)
                ok = frozen(host)
                time.sleep(pause)
                thaw(host)
                if ok:
                    paused.append(f"{host} {pause:.2f}s")
                time.sleep(6)
            pw = self.secret("redis_password")
            ip = self.layout.host(master).ip
            rc, out = self.run(master, f"REDISCLI_AUTH='{pw}' redis-cli -h {ip} bgsave; "
                                       f"REDISCLI_AUTH='{pw}' redis-cli -h {ip} bgrewriteaof", timeout=20)
            if rc == 0 and paused:
                self.effect = f"paused {', '.join(paused)}; BGSAVE + BGREWRITEAOF on {master}: {' '.join(out.split())}"

        def extra(res: Result) -> None:
            time.sleep(10)  # detection + failover would show by now
            after = {"eip": self.host_by_ip(self.eip_target()), "redis": self.redis_master(),
                     "writers": self.writers_seen()}
            res.checks["no_eip_move"] = after["eip"] == before["eip"]
            res.checks["no_redis_failover"] = after["redis"] == before["redis"]
            res.checks["no_writer_change"] = after["writers"] == before["writers"]
            downs = self.lb_downs(app)
            res.checks["no_app_server_taken_out"] = bool(downs) and all(
                downs[lb] == downs_before.get(lb, 0) for lb in downs)
            res.notes.append(f"{app}'s servers taken out by the LBs' checks: before {downs_before}, after {downs}")
            # A backup that took over would have fenced (stopped) the primary's instance.
            state = self.instance_state(ctl)
            rc, ping = self.run(client, "scontrol ping", timeout=30)
            up = [line for line in ping.splitlines() if "is UP" in line]
            res.checks["no_slurm_takeover"] = state == "running" and len(up) == 2
            res.notes.append(f"before {before}; after {after}; {ctl} {state}; "
                             f"scontrol ping: {' / '.join(ping.strip().splitlines())}")

        try:
            res = self._under_load("no-false-failover", inject, lambda: None, (), None, [], lambda a: False, extra)
        finally:
            for h in (eip, master, writer, ctl, app):
                thaw(h)
        res.notes.append("no RTO: nothing may fail over")
        return self._repass(res)

    @staticmethod
    def _repass(res: Result) -> Result:
        res.checks["fault_effect"] = bool(res.fault_effect)
        res.passed = all(res.checks.values())
        return res
