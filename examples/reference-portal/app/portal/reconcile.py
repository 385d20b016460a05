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
  new job id and the lost one (resubmitted_from), and the log says so.

sacct is not asked: a lost job's submit record may have reached slurmdbd and stay there
PENDING forever, although no controller will ever run it.
"""

from __future__ import annotations

import os
import sys
import threading
import uuid
from typing import TYPE_CHECKING

from . import slurm
from .redisha import ERRORS, LEAD, SubmitLock

if TYPE_CHECKING:
    from .app import Backends

INTERVAL_S = 10.0
MIN_AGE_S = 15   # younger: its submission may still be on its way into squeue
MAX_AGE_S = 240  # older: it may have ended and left squeue (MinJobAge 300 s)


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

    def start(self) -> None:
        """Lazily, in the worker process (gunicorn forks after import)."""
        with self._lock:
            if not self._started:
                threading.Thread(target=self.run, daemon=True, name="job-reconciler").start()
                self._started = True

    def lead(self) -> bool:
        ttl = int(3 * INTERVAL_S * 1000)
        return bool(self.b.redis.call(lambda r: r.eval(LEAD, 1, self.key, self.me, ttl)))

    def once(self) -> list[tuple[str, str, str]]:
        """One pass; returns (request id, lost job id, new job id) per job submitted again."""
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
                new = slurm.sbatch(rid, name, int(seconds))
                self.b.db.query("UPDATE portal_jobs SET job_id = %s, resubmitted_from = %s "
                                "WHERE request_id = %s AND job_id = %s", (new, job, rid, job))
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
