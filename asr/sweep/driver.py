"""Start a study's workers (here, as local processes, or as a SLURM job array) and report at the end.

Both doors use this: `sweep.py` and the Hydra sweeper plugin (`train.py -m hydra/sweeper=optuna`).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
from omegaconf import DictConfig, OmegaConf

from asr import branches
from asr.cluster.jobs import wait_all
from asr.hydra_seam import launcher_kind, submitit_executor, submitit_launcher
from asr.sweep.parent_run import close_parent, open_parent
from asr.sweep.report import summarize
from asr.sweep.spec import EPOCHS, SweepSpec
from asr.sweep.storage import safe_url, storage_url
from asr.sweep.study import enqueue_grid, load_study, requeue_interrupted, work
from asr.sweep.trial import FINISHED, compose_train_config, counted, n_trials_total

log = logging.getLogger(__name__)

SPEC_FILE = "sweep_spec.json"


def worker_env(index: int, workers: int) -> dict[str, str]:
    """One GPU per worker where there are GPUs; otherwise the CPU cores shared out between workers."""
    env = dict(os.environ)
    import torch

    gpus = torch.cuda.device_count()
    visible = [g for g in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if g] or [str(g) for g in range(gpus)]
    if visible and gpus:
        env["CUDA_VISIBLE_DEVICES"] = visible[index % len(visible)]
    else:
        threads = max(1, (os.cpu_count() or 1) // workers)
        env.setdefault("OMP_NUM_THREADS", str(threads))
        env.setdefault("MKL_NUM_THREADS", str(threads))
    return env


def run_local_workers(spec_path: Path, workers: int) -> None:
    """N worker processes on this machine; each pulls trials from the shared storage until the study is full."""
    log_dir = spec_path.parent / "workers"
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for index in range(workers):
        out = open(log_dir / f"worker_{index}.log", "ab")
        cmd = [sys.executable, "-m", "asr.sweep.worker", str(spec_path), str(index)]
        procs.append((subprocess.Popen(cmd, env=worker_env(index, workers), stdout=out, stderr=subprocess.STDOUT), out))
        log.info("worker %d: pid %d, log %s", index, procs[-1][0].pid, log_dir / f"worker_{index}.log")
    try:
        codes = [proc.wait() for proc, _ in procs]
    except BaseException:  # Ctrl-C / SIGTERM of the driver: stop the workers too (their trials end KILLED)
        for proc, _ in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, _ in procs:
            proc.wait()
        raise
    finally:
        for _, out in procs:
            out.close()
    failed = [f"worker {i} exited {code} (see {log_dir / f'worker_{i}.log'})" for i, code in enumerate(codes) if code]
    if failed:
        log.error("; ".join(failed))


def run_submitit_workers(spec_path: Path, workers: int, launcher: DictConfig) -> None:
    """The workers as one submitit job array (SLURM, or submitit's local executor)."""
    from asr.sweep.worker import Worker

    executor = submitit_executor(
        OmegaConf.to_container(launcher, resolve=True), launcher_kind(launcher), spec_path.parent / "submitit" / "%j"
    )
    # submitit's local executor shares this machine's cores between the workers; SLURM jobs have their own.
    threads = max(1, (os.cpu_count() or 1) // workers) if executor.cluster == "local" else None
    jobs = executor.map_array(Worker(), [str(spec_path)] * workers, list(range(workers)), [threads] * workers)
    log.info("submitted %d workers: %s", workers, ", ".join(job.job_id for job in jobs))
    try:
        for job, _, err in wait_all(jobs):  # also returns for a job cancelled or killed before writing its result
            if err is not None:  # one lost worker must not hide the others' results; its trial is re-queued
                log.error("worker job %s failed: %s", job.job_id, err)
    except BaseException:
        for job in jobs:
            job.cancel(check=False)
        raise


def run_study(spec: SweepSpec, launcher: DictConfig | None = None, report_only: bool = False) -> optuna.Study:
    """Create or resume the study, run its workers, then report (also after Ctrl-C or a crash)."""
    spec.check_fidelity()
    spec.dir.mkdir(parents=True, exist_ok=True)
    study = load_study(spec)  # composes the trials' base config first: a bad override fails before any worker starts
    if spec.fidelity == "branches":  # what a shared trunk needs (WSD, whole epochs), refused before any worker starts
        first = compose_train_config([*spec.trial_overrides(), f"{EPOCHS}={spec.rungs()[0]:g}"])
        branches.check_settings(first)
    if report_only:
        summarize(study, spec)
        return study
    if requeued := requeue_interrupted(study, spec.study["max_retry"]):
        log.info("%d interrupted trial(s) queued again; they resume from their last checkpoint", requeued)
    if spec.study["sampler"]["name"] == "grid":
        added = enqueue_grid(study, spec.space())
        log.info("grid: %d points queued (%d in all)", added, len(spec.space().grid()))
    total = n_trials_total(spec)
    spec.parent_run_id = open_parent(study, spec)
    spec_path = spec.dir / SPEC_FILE
    spec.save(spec_path)
    workers = int(spec.study["workers"])
    log.info(
        "Study %r in %s: %d trials in all, %d worker(s); resume any time with the same command",
        study.study_name,
        safe_url(storage_url(spec.study)),
        total,
        workers,
    )
    status = "FAILED"
    finished = sum(t.state in FINISHED for t in counted(study.get_trials(deepcopy=False)))
    try:
        if finished >= total:  # a rerun of a finished study: no worker (or SLURM job) to start
            log.info("Study %r already holds its %d trials; nothing to run", study.study_name, total)
        elif submitit_launcher(launcher) is not None:
            run_submitit_workers(spec_path, workers, launcher)
        elif workers > 1:
            run_local_workers(spec_path, workers)
        else:
            work(spec)
        status = "FINISHED"
    except (KeyboardInterrupt, SystemExit):
        status = "KILLED"
        raise
    finally:
        table, files = summarize(study, spec)
        close_parent(study, spec, table, files, status)
    return study
