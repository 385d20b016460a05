"""Slurm through its client commands (sbatch, squeue, sacct, scontrol): slurm.conf and
munge on the app host do the rest, and a controller failover is Slurm's business.

Idempotent submission: the portal's request id goes into the job's comment
(`sbatch --comment=<request id>`, as the stand-in portal does; slurm.conf keeps it in accounting with
AccountingStoreFlags=job_comment). A retry after a time-out (sbatch may have queued the
job before the answer was lost) first looks the id up with squeue, then sacct, and
submits only if neither knows it. Concurrent retries of one id are serialised by the
caller (a short Redis lock), not here."""

from __future__ import annotations

import re
import subprocess
import sys
from typing import Any

from .background import Background

REQUEST_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
JOB_ID = re.compile(r"\d+(?:_\d+)?")
TIMEOUT = 20.0


class SlurmError(RuntimeError):
    pass


def run(argv: list[str], timeout: float = TIMEOUT) -> tuple[int, str]:
    try:
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        return 1, f"{argv[0]}: {e}"
    return cp.returncode, (cp.stdout + cp.stderr).strip() if cp.returncode else cp.stdout.strip()


def find_by_request_id(request_id: str) -> tuple[str | None, str]:
    """(the job whose comment is request_id or None, where it was looked up). squeue
    --states=all first (every job the controller holds, also those that ended less than
    MinJobAge ago), then sacct. A failing squeue raises: nothing may be submitted then (a
    duplicate could follow). A failing sacct (slurmdbd down) only narrows the lookup to
    squeue, so submissions do not stop with accounting."""
    try:
        held = queue_request_ids()
    except SlurmError as e:
        raise SlurmError(f"cannot tell whether request {request_id} was already submitted: {e}; "
                         "retry with the same request id") from e
    if request_id in held:
        return held[request_id], "squeue"
    rc, out = run(["sacct", "-n", "-X", "-P", "-a", "-S", "now-7days", "-o", "JobID,Comment"])
    if rc != 0:
        print(f"hpc-portal: sacct failed (rc {rc}), request {request_id} looked up in squeue only: {out[-200:]}",
              file=sys.stderr, flush=True)
        return None, "squeue (sacct failed)"
    for line in out.splitlines():
        job, _, comment = line.partition("|")
        if comment.strip() == request_id and job.strip():
            return job.strip(), "sacct"
    return None, "squeue+sacct"


def submit(request_id: str, name: str, seconds: int) -> dict[str, Any]:
    """The stand-in's answer: {"job_id", "request_id", "created"} (created false: an
    earlier attempt's job was found, and "found_in" says where)."""
    found, where = find_by_request_id(request_id)
    if found:
        return {"job_id": found, "request_id": request_id, "created": False, "found_in": where}
    return {"job_id": sbatch(request_id, name, seconds), "request_id": request_id, "created": True}


def sbatch(request_id: str, name: str, seconds: int) -> str:
    """Submit, the request id as the job's comment; the job id."""
    rc, out = run(["sbatch", "--parsable", f"--comment={request_id}", f"--job-name={name}",
                   "--output=/dev/null", f"--wrap=sleep {seconds}"])
    job = out.split(";")[0].strip()
    if rc != 0 or not JOB_ID.fullmatch(job):
        raise SlurmError(f"sbatch failed (rc {rc}): {out[-300:]}; the job may exist: retry with the same request id")
    return job


def queue_request_ids() -> dict[str, str]:
    """{request id: job id} of every job the controller in charge holds (squeue
    --states=all: also those that ended less than MinJobAge ago). SlurmError when squeue
    fails: then nothing can be said about a job's absence."""
    rc, out = run(["squeue", "-h", "--states=all", "-o", "%i|%k"])
    if rc != 0:
        raise SlurmError(f"squeue failed (rc {rc}): {out[-300:]}")
    held: dict[str, str] = {}
    for line in out.splitlines():
        job, _, comment = line.partition("|")
        if comment.strip() and comment.strip() != "(null)" and job.strip():
            held.setdefault(comment.strip(), job.strip())  # the first, as squeue lists them
    return held


def job_state(job_id: str) -> str | None:
    rc, out = run(["squeue", "-h", "-j", job_id, "-o", "%T"])
    if rc == 0 and out:
        return out.splitlines()[0].strip()
    rc, out = run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"])
    if rc == 0 and out:
        return out.splitlines()[0].split()[0]
    return None


def queue_states() -> dict[str, str]:
    """Every job in the queue with a portal request id as its comment: {job id: state}."""
    rc, out = run(["squeue", "-h", "--states=all", "-o", "%i|%T|%k"])
    if rc != 0:
        raise SlurmError(f"squeue failed (rc {rc}): {out[-300:]}")
    states = {}
    for line in out.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and REQUEST_ID.fullmatch(parts[2].strip()) and parts[2].strip() != "(null)":
            states[parts[0].strip()] = parts[1].strip()
    return states


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


class PingWatcher:
    """`scontrol ping` every 15 s in a background thread: the health check reads the last
    answer (a dead primary controller makes scontrol wait; the health check must not)."""

    INTERVAL = 15.0

    def __init__(self) -> None:
        self.answers: Background[str] = Background(self.ping, self.INTERVAL, "slurm-ping")

    @staticmethod
    def ping() -> str:
        rc, out = run(["scontrol", "ping"])
        if " is UP" in out:  # one controller answering is enough (rc is 1 if another is down)
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
