"""CPU thread policy, applied when `asr` is imported (before torch loads OpenMP).

torch's CPU kernels run on OpenMP threads that, by default, spin-wait for their siblings
between parallel regions. On a machine where something else runs (a laptop, a shared box,
two sweep workers on two cores) a spinning thread burns the core its descheduled sibling
needs, and training collapses: measured on 2 cores beside one busy process, 0.32 of the idle
pace where fair sharing gives 0.5, and 15x slower with several neighbours. Waiting threads
therefore sleep instead of spinning (`OMP_WAIT_POLICY=PASSIVE`); benchmarks/thread_policy.py
measures the choice (busy-neighbour pace over idle pace, and the idle cost).

Your own OMP_WAIT_POLICY or GOMP_SPINCOUNT, set in the environment, always wins.
Thread counts: OMP_NUM_THREADS if set, else the CPUs SLURM gave the task, else the launcher's
`cpus_per_task` for jobs that share one machine (hydra/launcher=local_parallel), else every core
(sweep workers sharing one machine get an equal share: asr.sweep.driver).
"""

from __future__ import annotations

import os

WAIT_POLICY = "PASSIVE"  # OpenMP threads sleep when idle instead of spinning (see the module docstring)


def apply_policy(environ: dict[str, str] | None = None) -> None:
    """Set the OpenMP wait policy and thread count in `environ` (os.environ) unless the user set them."""
    env = os.environ if environ is None else environ
    if "OMP_WAIT_POLICY" not in env and "GOMP_SPINCOUNT" not in env:
        env["OMP_WAIT_POLICY"] = WAIT_POLICY
    cpus = env.get("SLURM_CPUS_PER_TASK")
    if "OMP_NUM_THREADS" not in env and cpus and cpus.isdigit():
        env["OMP_NUM_THREADS"] = cpus  # no cgroups on some clusters: torch would start a thread per core of the node


def match_launcher(launcher_cfg) -> None:
    """Jobs of hydra/launcher=local_parallel run side by side on one machine, and submitit's local
    executor does not limit them: each uses the launcher's `cpus_per_task` threads."""
    if "OMP_NUM_THREADS" in os.environ or "LocalLauncher" not in str(launcher_cfg.get("_target_", "")):
        return
    cpus = launcher_cfg.get("cpus_per_task")
    if cpus:
        import torch

        torch.set_num_threads(int(cpus))
