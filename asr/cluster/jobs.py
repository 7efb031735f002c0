"""Wait for submitit jobs without hanging on one that SLURM ended before it wrote its result.

submitit learns a job's state from `sacct`. On a cluster without SLURM accounting every state reads
UNKNOWN, so a job that died without writing its result file (scancel, time limit, OOM kill, node
lost) looks unfinished forever and `job.result()` never returns; with accounting, submitit only
asks sacct at growing intervals (up to every 10 minutes). `squeue` always works: a job it no longer
lists as pending or running, with no result file `grace_s` later, is over.
"""

from __future__ import annotations

import logging
import subprocess
import time
from typing import Any

log = logging.getLogger(__name__)

ACTIVE = {
    "PENDING",
    "CONFIGURING",
    "RUNNING",
    "COMPLETING",
    "SUSPENDED",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "RESIZING",
    "SIGNALING",
    "STAGE_OUT",
    "STOPPED",
}  # squeue states of a job that may still write its result
KILLED = {"CANCELLED", "TIMEOUT", "BOOT_FAIL", "DEADLINE"}  # ended by SLURM: no result file will come
# Every other state out of the queue (COMPLETED, FAILED, OUT_OF_MEMORY, no longer listed) waits `grace_s` for
# the result file, which holds the job's own result or exception; PREEMPTED and NODE_FAIL too, since a job
# with requeue comes back PENDING right after them.


class JobLostError(RuntimeError):
    """The job left the SLURM queue without writing its result."""


def queue_states(job_ids: list[str]) -> dict[str, str] | None:
    """{job id: SLURM state} for the jobs squeue still knows (ended ones stay listed for MinJobAge,
    300 s by default); None when squeue itself fails (then nothing is concluded)."""
    roots = sorted({job_id.split("_")[0] for job_id in job_ids})
    try:
        out = subprocess.run(
            ["squeue", "-h", "-r", "--states=all", "-o", "%i|%T", "-j", ",".join(roots)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0 and "Invalid job id" not in out.stderr:
        return None
    return dict(line.split("|", 1) for line in out.stdout.split() if "|" in line)


def wait_all(
    jobs: list, poll_s: float = 1.0, queue_poll_s: float = 5.0, grace_s: float = 90.0
) -> list[tuple[Any, Any, BaseException | None]]:
    """(job, result, error) per job once every job has a result or is gone from SLURM's queue for good.

    Result files are looked for every `poll_s` seconds, squeue is asked every `queue_poll_s`;
    `grace_s`: how long a job may be out of the queue (or ended) before its result file must exist:
    NFS caches a folder's attributes for 30-60 s, so a finished job's result can show up late. A job
    that comes back to the queue (requeued after preemption, a node failure or its time limit; held
    and released) is waited for again. Jobs of submitit's local executor are waited for as submitit
    does. A job of several tasks (`tasks_per_node` > 1) returns its first task's result.
    """
    outcomes: dict[str, tuple[Any, Any, BaseException | None]] = {}
    left_queue: dict[str, float] = {}
    slurm = any(type(job).__name__ == "SlurmJob" for job in jobs)
    states, asked = None, float("-inf")
    while len(outcomes) < len(jobs):
        pending = [job for job in jobs if job.job_id not in outcomes]
        if slurm and time.monotonic() - asked >= queue_poll_s:
            states, asked = queue_states([job.job_id for job in pending]), time.monotonic()
        for job in pending:
            if _has_result(job) or (not slurm and job.done()):  # SLURM: never ask sacct
                outcomes[job.job_id] = _outcome(job)
                continue
            if states is None or states.get(job.job_id) in ACTIVE:
                left_queue.pop(job.job_id, None)
                continue
            since = left_queue.setdefault(job.job_id, time.monotonic())
            if states.get(job.job_id) in KILLED or time.monotonic() - since > grace_s:
                state = states.get(job.job_id, "no longer listed by squeue")
                lost = JobLostError(f"job {job.job_id} ended without a result ({state}){_log_tail(job)}")
                log.warning("%s", lost)
                outcomes[job.job_id] = (job, None, lost)
        if len(outcomes) < len(jobs):
            time.sleep(poll_s)
    return [outcomes[job.job_id] for job in jobs]


def _has_result(job) -> bool:
    """Every task's result file is there; the folder's attributes are refreshed first, as submitit's
    own `done()` does, so that an NFS client looks again instead of answering from its cache."""
    tasks = [job.task(i) for i in range(job.num_tasks)]
    for folder in {task.paths.result_pickle.parent for task in tasks}:
        try:
            folder.chmod(folder.stat().st_mode)
        except OSError:
            pass
    return all(task.paths.result_pickle.exists() for task in tasks)


def _log_tail(job, lines: int = 5) -> str:
    """The last lines of the job's stderr: a FAILED or OUT_OF_MEMORY job's own error, not just its state."""
    try:
        text = job.task(0).paths.stderr.read_text(errors="replace").strip().splitlines()
    except OSError:
        return f"; its log: {job.paths.stdout}"
    tail = " | ".join(line.strip() for line in text[-lines:] if line.strip())
    return f"; its log {job.task(0).paths.stderr} ends: {tail}" if tail else f"; its log: {job.task(0).paths.stdout}"


def _outcome(job) -> tuple[Any, Any, BaseException | None]:
    try:
        return job, job.task(0).result(), None  # under DDP every task returns the same metrics; rank 0's count
    except Exception as err:  # noqa: BLE001  (the caller reports every job's failure)
        return job, None, err
