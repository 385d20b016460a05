"""Jobs a controller crash lost, submitted again.

slurmctld writes its state (StateSaveLocation, on EFS) up to SAVE_MAX_WAIT = 5 s after a
change (Slurm's state_save.c), not before it answers sbatch. A job acknowledged in the
seconds before the primary controller crashed is not in the state the backup loads: the
user holds a job id that Slurm no longer knows (the rehearsal's `slurm` and `slurm-host`
drills each measured one). The portal journals every job it acknowledged (portal_jobs,
on Galera: on three nodes before the answer), so:

  one reconciler per cluster (every api process competes for the Redis lease
  portal:jobs:<cluster>:reconciler, as the websocket poller does for its own) looks the
  journal's jobs acknowledged between MIN_AGE_S and MAX_AGE_S ago up in squeue, which
  holds every job for MinJobAge (300 s) after it ended. A request id squeue does not know
  (and squeue answered: the controller in charge is up) is submitted again under the same
  request id, holding the submission lock of that id (portal:submit:<id>, so a client's
  retry cannot run at the same time) and after looking once more; the journal keeps the
  new job id and the lost one (resubmitted_from) before the new job is released, and the
  log says so.

sacct is not asked: a lost job's submit record may have reached slurmdbd and stay there
PENDING forever, although no controller will ever run it.

It also settles held attempts (slurm.py's two phases) that no submission settled: a
straggler sbatch that became a job after its retry had settled the request id, or an
attempt whose client gave up. Seen held for HELD_MIN_S while another job answers its
request id: withdrawn. Held alone for ORPHAN_S: withdrawn too (its client was never
told of a job, so it must not run; a later retry submits afresh). Both under the
request id's submission lock, so a client's retry in progress is left alone.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import time
import uuid
from typing import TYPE_CHECKING

from . import slurm
from .redisha import ERRORS, LEAD, SubmitLock

if TYPE_CHECKING:
    from .app import Backends

INTERVAL_S = 10.0
MIN_AGE_S = 15   # younger: its submission may still be on its way into squeue
MAX_AGE_S = 240  # older: it may have ended and left squeue (MinJobAge 300 s)
HELD_MIN_S = 15  # a held attempt seen for less may be a submission between its two phases
ORPHAN_S = 60    # a held attempt alone this long: its client gave up


def log(msg: str) -> None:
    print(f"hpc-portal reconcile: {msg}", file=sys.stderr, flush=True)


class Reconciler:
    def __init__(self, b: Backends) -> None:
        self.b = b
        self.key = f"portal:jobs:{b.s.cluster}:reconciler"
        self.me = f"{b.s.server_id}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.stop = threading.Event()
        self._started = False
        self._lock = threading.Lock()
        self.seen: dict[str, float] = {}  # held attempt -> when this process first saw it held

    def start(self) -> None:
        """Lazily, in the worker process (gunicorn forks after import)."""
        with self._lock:
            if not self._started:
                threading.Thread(target=self.run, daemon=True, name="job-reconciler").start()
                self._started = True

    def lead(self) -> bool:
        ttl = int(3 * INTERVAL_S * 1000)
        return bool(self.b.redis.call(lambda r: r.eval(LEAD, 1, self.key, self.me, ttl)))

    def recorded(self, request_id: str) -> str | None:
        """The job the portal recorded for request_id, None if none (the database's error
        when it cannot tell: nothing is withdrawn then)."""
        n, rows = self.b.db.query("SELECT job_id FROM portal_jobs WHERE request_id = %s", (request_id,))
        return str(rows[0][0]) if n else None

    def journaled(self, request_id: str) -> bool:
        return self.recorded(request_id) is not None

    def settle_held(self, now: float | None = None) -> list[tuple[str, str]]:
        """Held attempts nobody settled, withdrawn (a lone one the portal recorded is released
        instead: its release failed after the record); returns (request id, job id) withdrawn.
        SlurmError when squeue fails."""
        now = time.monotonic() if now is None else now
        jobs = slurm.queued_jobs()
        waiting = {j.job_id: j for j in jobs if j.waiting}
        self.seen = {job: self.seen.get(job, now) for job in waiting}
        released = {j.request_id for j in jobs if j.job}
        for rid in sorted({j.request_id for j in jobs if j.job and j.attempt}):
            with SubmitLock(self.b.redis, rid, self.me) as mine:
                if mine:  # released, not renamed yet (a settle interrupted): finished
                    slurm.settle(rid)
        done = []
        for rid in sorted({j.request_id for j in waiting.values()}):
            oldest = max(now - self.seen[job] for job, j in waiting.items() if j.request_id == rid)
            if not (rid in released and oldest >= HELD_MIN_S or oldest >= ORPHAN_S):
                continue
            with SubmitLock(self.b.redis, rid, self.me) as mine:
                if not mine:
                    continue  # a client's retry is settling it right now
                now_held = [j.job_id for j in slurm.queued_jobs() if j.request_id == rid and j.waiting]
                # A released job answers: settle withdraws every held attempt. None, but the
                # portal recorded one (then its release failed): settle releases it, the
                # portal owes it.
                if rid in released or self.journaled(rid):
                    winner = slurm.settle(rid, recorded=functools.partial(self.recorded, rid))
                    if rid not in released:
                        log(f"request {rid}: held job {winner} released (the portal had recorded it)")
                    done += [(rid, job) for job in now_held if job != winner]
                    continue
                for job in now_held:  # looked again under the lock: a retry may have released one
                    if now - self.seen.get(job, now) >= ORPHAN_S:
                        slurm.withdraw(rid, job)
                        done.append((rid, job))
        for job in slurm.withdrawn_waiting():  # renamed, not cancelled: an interrupted withdraw
            slurm.cancel_withdrawn(job)
        for rid, job in done:
            log(f"request {rid}: held attempt {job} withdrawn "
                f"({'another job answers the request' if rid in released else 'its client gave up'})")
        return done

    def once(self) -> list[tuple[str, str, str]]:
        """One pass: held attempts settled (settle_held), then lost jobs submitted again;
        returns (request id, lost job id, new job id) per job submitted again."""
        self.settle_held()
        _n, rows = self.b.db.query(
            "SELECT request_id, job_id, name, seconds FROM portal_jobs "
            "WHERE created < NOW(6) - INTERVAL %s SECOND AND created > NOW(6) - INTERVAL %s SECOND",
            (MIN_AGE_S, MAX_AGE_S))
        if not rows:
            return []
        held = slurm.queue_request_ids()  # SlurmError when no controller answers: judge nothing
        done = []
        for rid, job, name, seconds in rows:
            if rid in held:
                continue
            with SubmitLock(self.b.redis, rid, self.me) as mine:
                if not mine:
                    continue  # a client's retry is submitting it right now
                if rid in slurm.queue_request_ids():  # submitted between the look and the lock
                    continue
                slurm.sbatch(rid, name, int(seconds))  # an attempt, then settled: the two phases

                def journal(new_job: str, rid: str = rid, job: str = job) -> None:
                    # Recorded before the release, as an API submission is: a job the
                    # journal does not name never runs (a failed update leaves it held,
                    # and settle_held withdraws it; the next pass submits again).
                    self.b.db.query("UPDATE portal_jobs SET job_id = %s, resubmitted_from = %s "
                                    "WHERE request_id = %s AND job_id = %s", (new_job, job, rid, job))
                new = slurm.settle(rid, journal) or "?"
                log(f"request {rid}: job {job} is unknown to the controller in charge (lost with its "
                    f"unsaved state); submitted again as job {new}")
                done.append((rid, job, new))
        return done

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                if self.lead():
                    self.once()
            except (*ERRORS, slurm.SlurmError, Exception) as e:  # noqa: BLE001 - a pass may fail; the next one runs
                log(f"{type(e).__name__}: {e}")
            self.stop.wait(INTERVAL_S)
