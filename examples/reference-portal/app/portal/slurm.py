"""Slurm through its client commands (sbatch, squeue, sacct, scontrol): slurm.conf and
munge on the app host do the rest, and a controller failover is Slurm's business.

Idempotent submission: the portal's request id goes into the job's comment
(`sbatch --comment=<request id>`, as the stand-in portal does; slurm.conf keeps it in
accounting with AccountingStoreFlags=job_comment). Looking the id up before submitting
is not enough: an sbatch the portal gave up on (its time-out, a controller taking over)
may still be in the controller's backlog and become a job after the retry's lookup
(measured in the rehearsal's `slurm` drill: the first attempt timed out at 20 s, the
backup took control at 21 s and created it, the retry found nothing and submitted a
second job). So a submission has two phases:

  1. look the id up (squeue, then sacct); if unknown, submit an attempt: `sbatch --hold
     --comment=pending/<request id>`: the job exists but cannot run (priority 0);
  2. settle the id: of the jobs squeue holds for it, the one already released wins,
     else the lowest job id; every other held attempt is withdrawn (comment
     withdrawn/<request id>, then scancel); the caller records the winner (its journal,
     `journal`), and only then is it released (`scontrol release`, then its comment
     becomes the request id) and the client gets the job id. A job the portal could not
     record stays held and never runs: its client got an error and retries, or gives up
     and the reconciler withdraws it (measured: with the release before the record, the
     galera-full drill's database outage left a running job whose client had given up).

Controller round trips: every client command is a process of its own, and the Slurm
client library remembers which controller answered only within a process, so while the
primary is dead (frozen, then fenced) each squeue, sbatch and scontrol first pays a
connect time-out (about MessageTimeout) before it reaches the backup (measured: a
submission during the failover took 34.2 s). submit() makes as few as its guarantees
allow: a fresh submission four (squeue, sbatch, scontrol release, scontrol update), a
retry that finds a held attempt three (squeue, release, update; two more for each other
held attempt it withdraws), a retry that finds a settled job one (squeue); sacct asks
slurmdbd, not the controller. Phase 2 of submit() settles from its own lookup's squeue
plus the job id its sbatch returned, with no squeue of its own: an attempt that reaches
the controller after that lookup (a straggler) is not seen, but it is held, so it cannot
run, and the next settle of the id withdraws it (a retry's, or the reconciler's once it
has seen it held HELD_MIN_S next to the released job): the same as for a straggler that
arrives after a settle. Release and rename stay two calls: see settle().

An attempt is known by its comment, not by its hold: a user's or an admin's own hold on
a settled job is theirs. A straggler that arrives after its retry settled stays held, so
it never runs; the reconciler (reconcile.py) withdraws attempts nobody settled. Both
prefixes hold a '/', outside REQUEST_ID, so no lookup of a request id takes one for a
job of it. Concurrent attempts of one id are serialised by the caller (a short Redis
lock), not here."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .background import Background

REQUEST_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
JOB_ID = re.compile(r"\d+(?:_\d+)?")
TIMEOUT = 20.0
ATTEMPT = "pending/"      # comment prefix of an attempt not settled yet
WITHDRAWN = "withdrawn/"  # comment prefix of an attempt that lost
HOLDS = ("JobHeldUser", "JobHeldAdmin")  # squeue's reasons of a held job (--hold by a user / by root)


class SlurmError(RuntimeError):
    pass


@dataclass(frozen=True)
class QueuedJob:
    job_id: str
    request_id: str
    state: str
    reason: str
    attempt: bool  # its comment is still pending/<request id>

    @property
    def waiting(self) -> bool:
        """An attempt still held: not settled, it cannot run."""
        return self.attempt and self.state == "PENDING" and self.reason in HOLDS

    @property
    def dead(self) -> bool:
        """An attempt cancelled before it was released: it never ran."""
        return self.attempt and self.state == "CANCELLED"

    @property
    def job(self) -> bool:
        """A job of its request id: released (an attempt released whose rename did not
        happen yet included)."""
        return not (self.waiting or self.dead)


class ControllerOrder:
    """Which controller Slurm's client commands ask first.

    Every client command is a process of its own and tries slurm.conf's SlurmctldHost
    lines in their order, so while the primary is stopped (fenced: EC2 keeps its address,
    nothing answers) each one first waits TCPTimeout (2 s) to connect to it, then asks
    the backup. A submission is four commands: measured in the freeze-slurm drill, the
    first submission after the fence took 8.1 s and ended 32.2 s after it began, past
    the tier's 30 s. So while `scontrol ping` (PingWatcher) finds the first controller
    DOWN and another UP, commands run with SLURM_CONF naming a copy of slurm.conf whose
    SlurmctldHost lines put the one that answers first: the same file otherwise, in a
    directory of its own whose other entries link to those beside slurm.conf (anything
    Slurm looks up next to it is found). Once the first one answers again, the original.
    A slurm.conf changed meanwhile (a node added by the next `pulumi up`) is copied
    again before the next command."""

    HOST_LINE = re.compile(r"^\s*SlurmctldHost\s*=\s*([^(\s#]+)", re.I | re.M)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._first: str | None = None  # the controller put first, None: slurm.conf's order
        self._dir: str | None = None
        self._copied: tuple[int, int, int] | None = None  # slurm.conf's (inode, size, mtime) when copied
        self.on_trouble: list[Callable[[], None]] = []  # PingWatcher: look again now

    def trouble(self) -> None:
        """A command could not reach a controller: the watchers ping now, not in 15 s."""
        for wake in list(self.on_trouble):
            wake()

    @staticmethod
    def source() -> str:
        return os.environ.get("SLURM_CONF") or "/etc/slurm/slurm.conf"

    def env(self) -> dict[str, str] | None:
        """The environment for a client command: None (this process's) in slurm.conf's order."""
        with self._lock:
            if self._first is None or self._dir is None:
                return None
            if self._stat() != self._copied:
                try:
                    self._write(self._first)
                except OSError as e:
                    # The controller gone from slurm.conf, or slurm.conf unreadable: its own order.
                    print(f"hpc-portal slurm: cannot copy the changed slurm.conf with {self._first} first: {e}",
                          file=sys.stderr, flush=True)
                    self._first = None
                    return None
            return {**os.environ, "SLURM_CONF": os.path.join(self._dir, "slurm.conf")}

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.source())
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def first(self) -> str | None:
        with self._lock:
            return self._first

    def update(self, status: list[tuple[str, bool]]) -> None:
        """`status`: (controller, answers) in slurm.conf's order, from scontrol ping."""
        up = [name for name, ok in status if ok]
        if not up:
            return  # none answers: nothing to prefer, the order stays
        want = None if status[0][1] else up[0]
        with self._lock:
            if want == self._first:
                return
            if want is not None:
                try:
                    self._write(want)
                except OSError as e:
                    print(f"hpc-portal slurm: cannot write a slurm.conf with {want} first: {e}", file=sys.stderr)
                    return
            why = f"{want} first ({status[0][0]} does not answer scontrol ping)" if want else "in slurm.conf's order"
            print(f"hpc-portal slurm: client commands ask the controllers {why}", file=sys.stderr, flush=True)
            self._first = want

    def _write(self, first: str) -> None:
        src = self.source()
        copied = self._stat()
        with open(src) as f:
            text = f.read()
        lines = text.splitlines(keepends=True)
        hosts = [(i, m.group(1)) for i, m in enumerate(map(self.HOST_LINE.match, lines)) if m]
        idx = [i for i, _name in hosts]
        if first not in (name for _i, name in hosts):
            raise OSError(f"{src} has no SlurmctldHost={first}")
        # `first` in the first slot, the rest in their order
        ordered = [i for i, name in hosts if name == first] + [i for i, name in hosts if name != first]
        new = list(lines)
        for slot, i in zip(idx, ordered, strict=True):
            new[slot] = lines[i]
        if self._dir is None:
            self._dir = tempfile.mkdtemp(prefix="hpc-portal-slurm-")
        here = os.path.dirname(os.path.abspath(src))
        for entry in os.listdir(here):
            link = os.path.join(self._dir, entry)
            if entry != "slurm.conf" and not os.path.lexists(link):
                os.symlink(os.path.join(here, entry), link)
        tmp = os.path.join(self._dir, ".slurm.conf.new")
        with open(tmp, "w") as f:
            f.write("".join(new))
        os.replace(tmp, os.path.join(self._dir, "slurm.conf"))
        self._copied = copied


ORDER = ControllerOrder()
# What a client command says when the controller it asked did not answer.
UNREACHABLE = re.compile(r"Socket timed out|Unable to contact slurm controller|Connection (refused|timed out)", re.I)


def run(argv: list[str], timeout: float = TIMEOUT, ordered: bool = True) -> tuple[int, str]:
    """A Slurm client command: (rc, stdout, or stdout and stderr when it failed).
    `ordered=False`: with slurm.conf itself, whatever ControllerOrder prefers."""
    try:
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                            env=ORDER.env() if ordered else None)
    except subprocess.TimeoutExpired as e:
        ORDER.trouble()
        return 1, f"{argv[0]}: {e}"
    except OSError as e:
        return 1, f"{argv[0]}: {e}"
    if cp.returncode and UNREACHABLE.search(cp.stdout + cp.stderr):
        ORDER.trouble()
    return cp.returncode, (cp.stdout + cp.stderr).strip() if cp.returncode else cp.stdout.strip()


def _job_key(job_id: str) -> tuple[int, int]:
    base, _, task = job_id.partition("_")
    return int(base), int(task or 0)


def queued_jobs() -> list[QueuedJob]:
    """Every job the controller in charge holds whose comment is a portal request id or
    an attempt for one (squeue --states=all: also those that ended less than MinJobAge
    ago), in squeue's order. SlurmError when squeue fails: then nothing can be said about
    a job's absence."""
    rc, out = run(["squeue", "-h", "--states=all", "-o", "%i|%k|%T|%r"])
    if rc != 0:
        raise SlurmError(f"squeue failed (rc {rc}): {out[-300:]}")
    jobs = []
    for line in out.splitlines():
        parts = [p.strip() for p in line.split("|")]
        if len(parts) != 4 or not JOB_ID.fullmatch(parts[0]):
            continue
        job, comment, state, reason = parts
        attempt = comment.startswith(ATTEMPT)
        rid = comment[len(ATTEMPT):] if attempt else comment
        if REQUEST_ID.fullmatch(rid):  # no comment ("(null)"), a withdrawn attempt: skipped
            jobs.append(QueuedJob(job, rid, state, reason, attempt))
    return jobs


def _request_ids(jobs: Sequence[QueuedJob]) -> dict[str, str]:
    ids: dict[str, str] = {}
    for j in jobs:
        if not j.dead:
            ids.setdefault(j.request_id, j.job_id)
    return ids


def queue_request_ids() -> dict[str, str]:
    """{request id: job id} of every job the controller in charge holds, attempts still
    held included (a retry must not submit while one waits to be settled). SlurmError
    when squeue fails."""
    return _request_ids(queued_jobs())


def find_by_request_id(request_id: str) -> tuple[str | None, str]:
    """(a job whose comment is request_id or None, where it was looked up). squeue
    --states=all first (every job the controller holds, also those that ended less than
    MinJobAge ago), then sacct. A failing squeue raises: nothing may be submitted then (a
    duplicate could follow). A failing sacct (slurmdbd down) only narrows the lookup to
    squeue, so submissions do not stop with accounting."""
    found, where, _queue = _look_up(request_id)
    return found, where


def _look_up(request_id: str) -> tuple[str | None, str, list[QueuedJob]]:
    """find_by_request_id's answer and the queue its squeue read (submit settles from it)."""
    try:
        queue = queued_jobs()
    except SlurmError as e:
        raise SlurmError(f"cannot tell whether request {request_id} was already submitted: {e}; "
                         "retry with the same request id") from e
    ids = _request_ids(queue)
    if request_id in ids:
        return ids[request_id], "squeue", queue
    rc, out = run(["sacct", "-n", "-X", "-P", "-a", "-S", "now-7days", "-o", "JobID,Comment"])
    if rc != 0:
        print(f"hpc-portal: sacct failed (rc {rc}), request {request_id} looked up in squeue only: {out[-200:]}",
              file=sys.stderr, flush=True)
        return None, "squeue (sacct failed)", queue
    for line in out.splitlines():
        job, _, comment = line.partition("|")
        if comment.strip() == request_id and job.strip():
            return job.strip(), "sacct", queue
    return None, "squeue+sacct", queue


def submit(request_id: str, name: str, seconds: int,
           journal: Callable[[str], None] | None = None,
           recorded: Callable[[], str | None] | None = None) -> dict[str, Any]:
    """The stand-in's answer: {"job_id", "request_id", "created"} (created false: an
    earlier attempt's job was found, and "found_in" says where). `journal(job id)` records
    the job before it is released (an exception from it leaves the job held). See the
    module's docstring for the two phases and its controller round trips."""
    found, where, queue = _look_up(request_id)
    if found and where != "squeue":
        if journal is not None:
            journal(found)
        return {"job_id": found, "request_id": request_id, "created": False, "found_in": where}
    mine = None if found else sbatch(request_id, name, seconds)
    # Settled from the lookup's squeue, not from one more (a connect time-out more in a
    # failover): sbatch --hold made `mine` an attempt held by its user. A straggler that
    # arrived since is not in `queue`: it stays held and the next settle withdraws it.
    known = queue if mine is None else [*queue, QueuedJob(mine, request_id, "PENDING", HOLDS[0], True)]
    winner = settle(request_id, journal, known, recorded)
    if winner is None:  # not with `known` holding `mine` or `found`; a job cancelled since fails its release
        raise SlurmError(f"request {request_id}: job {mine or found} left the queue before it was released; "
                         "retry with the same request id")
    if mine is not None and winner == mine:
        return {"job_id": winner, "request_id": request_id, "created": True}
    return {"job_id": winner, "request_id": request_id, "created": False, "found_in": "squeue"}


def settle(request_id: str, journal: Callable[[str], None] | None = None,
           queue: Sequence[QueuedJob] | None = None,
           recorded: Callable[[], str | None] | None = None) -> str | None:
    """Phase 2: the one job of request_id (None if squeue holds none): a released job if
    there is one (the lowest id), else the lowest held attempt, which is recorded
    (`journal`) and then released; every other held attempt is withdrawn. `queue`: the
    jobs to settle from (submit's: its lookup's squeue and its own attempt), else squeue
    is read (the reconciler's, under the submission lock). SlurmError when squeue,
    scontrol or scancel fail (then a retry settles again: every step is repeatable)."""
    jobs = [j for j in (queued_jobs() if queue is None else queue) if j.request_id == request_id and not j.dead]
    if not jobs:
        return None
    released = sorted((j for j in jobs if j.job), key=lambda j: _job_key(j.job_id))
    waiting = sorted((j for j in jobs if j.waiting), key=lambda j: _job_key(j.job_id))
    if len(released) > 1:
        print(f"hpc-portal: request {request_id} has {len(released)} released jobs "
              f"{[j.job_id for j in released]}: submitted outside the two phases?", file=sys.stderr, flush=True)
    winner = released[0] if released else waiting[0]
    if not released and len(waiting) > 1 and recorded is not None:
        # An earlier settle recorded one of them, then failed before its release; a
        # straggler may have a lower job id. The record names the job that runs (the
        # journal keeps the first record of a request id), so that one wins.
        journaled = recorded()
        winner = next((j for j in waiting if j.job_id == journaled), winner)
    for j in waiting:
        if j is not winner:
            withdraw(request_id, j.job_id)
    if journal is not None:
        journal(winner.job_id)  # before it can run: a job nobody recorded never runs
    # Two controller calls, not one, and the rename only once the release succeeded.
    # slurmctld releases a job its owner held only on an update whose priority is
    # INFINITE, which `scontrol release` sends and `scontrol update Priority=` cannot
    # (it takes numbers below NO_VAL; raising a priority is for operators, any other one
    # on a held job is refused with ESLURM_JOB_HELD), so no single RPC releases and
    # renames. One scontrol reading both commands from stdin would pay the dead
    # primary's time-out once (the client library remembers the backup within a process),
    # but it goes on after a failed command: a rename after a failed release leaves a job
    # held under the plain request id, which reads as settled and never runs (or a
    # cancelled one that reads as the request's job).
    if winner.waiting:
        _scontrol(request_id, "release", winner.job_id)
    if winner.attempt:  # released: its comment becomes the request id
        _scontrol(request_id, "update", f"JobId={winner.job_id}", f"Comment={request_id}")
    return winner.job_id


def _scontrol(request_id: str, *args: str) -> None:
    rc, out = run(["scontrol", *args])
    if rc != 0:
        raise SlurmError(f"request {request_id}: scontrol {' '.join(args)} failed (rc {rc}): {out[-300:]}; "
                         "retry with the same request id")


def withdraw(request_id: str, job_id: str) -> None:
    """A held attempt that lost: renamed first (so no lookup of the request id finds it
    again, in squeue or in accounting), then cancelled. One renamed but not cancelled
    (scancel failed) is still held: the reconciler cancels it."""
    _scontrol(request_id, "update", f"JobId={job_id}", f"Comment={WITHDRAWN}{request_id}")
    cancel_withdrawn(job_id)
    print(f"hpc-portal: request {request_id}: held attempt {job_id} withdrawn", file=sys.stderr, flush=True)


def cancel_withdrawn(job_id: str) -> None:
    rc, out = run(["scancel", job_id])
    if rc != 0:
        raise SlurmError(f"scancel {job_id} failed (rc {rc}): {out[-300:]}")


def withdrawn_waiting() -> list[str]:
    """Jobs renamed withdrawn/... but not cancelled (a withdraw interrupted between its
    two steps). SlurmError when squeue fails."""
    rc, out = run(["squeue", "-h", "--states=PENDING", "-o", "%i|%k"])
    if rc != 0:
        raise SlurmError(f"squeue failed (rc {rc}): {out[-300:]}")
    return [job.strip() for job, _, comment in (line.partition("|") for line in out.splitlines())
            if comment.strip().startswith(WITHDRAWN)]


def sbatch(request_id: str, name: str, seconds: int) -> str:
    """Phase 1: submit an attempt (held, comment pending/<request id>); its job id."""
    rc, out = run(["sbatch", "--parsable", "--hold", f"--comment={ATTEMPT}{request_id}", f"--job-name={name}",
                   "--output=/dev/null", f"--wrap=sleep {seconds}"])
    job = out.split(";")[0].strip()
    if rc != 0 or not JOB_ID.fullmatch(job):
        raise SlurmError(f"sbatch failed (rc {rc}): {out[-300:]}; the job may exist: retry with the same request id")
    return job


def job_state(job_id: str) -> str | None:
    rc, out = run(["squeue", "-h", "-j", job_id, "-o", "%T"])
    if rc == 0 and out:
        return out.splitlines()[0].strip()
    rc, out = run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"])
    if rc == 0 and out:
        return out.splitlines()[0].split()[0]
    return None


def queue_states() -> dict[str, str]:
    """Every released job in the queue with a portal request id as its comment: {job id:
    state} (attempts not settled are no jobs anyone was told of)."""
    return {j.job_id: j.state for j in queued_jobs() if j.job}


def final_states(job_ids: list[str]) -> dict[str, str]:
    """Jobs that left the queue: their final state from accounting (COMPLETED, FAILED...)."""
    if not job_ids:
        return {}
    rc, out = run(["sacct", "-n", "-X", "-P", "-j", ",".join(job_ids), "-o", "JobID,State"])
    found = {}
    if rc == 0:
        for line in out.splitlines():
            job, _, state = line.partition("|")
            if job.strip() in job_ids and state.strip():
                found[job.strip()] = state.split()[0]
    # Accounting may lag: a job that left the queue and is not in sacct yet is "DONE".
    return {j: found.get(j, "DONE") for j in job_ids}


PING_LINE = re.compile(r"^Slurmctld\([^)]*\) at (\S+) is (UP|DOWN)", re.M)


class PingWatcher:
    """`scontrol ping` every 15 s in a background thread, every 2 s while none answers,
    and at once when a client command found no controller (ControllerOrder.trouble): the
    health check reads the last answer (a dead primary controller makes scontrol wait;
    the health check must not), and ControllerOrder follows it. Not faster while one
    controller stays down: every portal process pings, and each ping of a dead
    controller waits out its connect time-out."""

    INTERVAL = 15.0
    INTERVAL_DOWN = 2.0

    def __init__(self, order: ControllerOrder | None = None) -> None:
        self.order = order or ORDER
        self.answers: Background[str] = Background(self.ping, self.pause, "slurm-ping")
        self.order.on_trouble.append(self.answers.wake)

    def pause(self, value: str) -> float:
        """After a ping: "ok" when at least one controller answered."""
        return self.INTERVAL if value == "ok" else self.INTERVAL_DOWN

    def ping(self) -> str:
        # With slurm.conf's own order: "primary" in the answer is its first SlurmctldHost.
        rc, out = run(["scontrol", "ping"], ordered=False)
        status = [(m.group(1), m.group(2) == "UP") for m in PING_LINE.finditer(out)]
        if status:
            # Each controller is asked whatever the order, so this sees the first one return.
            self.order.update(status)
        if any(ok for _n, ok in status):  # one controller answering is enough (rc is 1 if another is down)
            return "ok"
        last = out.strip().splitlines()[-1][-120:] if out.strip() else "-"
        return f"error: no slurmctld answers scontrol ping (rc {rc}: {last})"

    def check(self) -> str:
        value, age = self.answers.latest()
        if value is None:
            return "error: Slurm not checked yet"
        if age > 4 * self.INTERVAL + 30:
            return f"error: Slurm check stale ({age:.0f}s old)"
        return value
