"""CPU threads: how many torch uses, so training degrades gracefully when something else runs.

torch's CPU kernels run on OpenMP threads that meet at a barrier after every parallel region. On
a machine where another process runs (a laptop, a shared box, two sweep workers on two cores),
a thread waits at that barrier for a sibling the scheduler has parked, and training collapses:
measured on 2 cores beside one busy process, 0.30 of the idle pace where fair sharing gives 0.5.
Letting the waiting threads sleep (OMP_WAIT_POLICY=PASSIVE) fixes the collapse but costs a third
of the idle pace on small models; shorter spinning does not help. What works is to use only the
cores nobody else is using: `CpuShare` measures, from /proc/stat, how many cores other processes
took since the last look, and `asr.trainer.ThreadGovernor` sets torch's thread count to the rest
every few seconds (all of them again once the neighbour is gone). benchmarks/thread_policy.py
measures it (docs/performance.md).

Applied when `asr` is imported, before torch loads: the CPUs SLURM gave the task become
OMP_NUM_THREADS (clusters without cgroups would otherwise start a thread per core of the node).
Your own OMP_NUM_THREADS always wins, and then the thread count is never changed.
"""

from __future__ import annotations

import os
import time


def apply_policy(environ: dict[str, str] | None = None) -> None:
    """Set OMP_NUM_THREADS in `environ` (os.environ) to SLURM's CPUs per task unless the user set it."""
    env = os.environ if environ is None else environ
    cpus = env.get("SLURM_CPUS_PER_TASK")
    if "OMP_NUM_THREADS" not in env and cpus and cpus.isdigit():
        env["OMP_NUM_THREADS"] = cpus


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask: taskset, cpusets)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class CpuShare:
    """Cores used by *other* processes since the last call, from /proc/stat (busy jiffies of the
    whole machine) minus this process's own CPU time. None where /proc/stat does not exist."""

    def __init__(self) -> None:
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.last = self._sample()

    def _sample(self) -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as stat:
                fields = [int(v) for v in stat.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        busy = (sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)) / self.tick  # all but idle and iowait
        own = sum(os.times()[:2])  # user + system time of every thread of this process
        return time.monotonic(), busy, own

    def others(self) -> float | None:
        now = self._sample()
        if now is None or self.last is None:
            return None
        (t0, busy0, own0), (t1, busy1, own1) = self.last, now
        self.last = now
        if t1 - t0 <= 0:
            return None
        return max(0.0, ((busy1 - busy0) - (own1 - own0)) / (t1 - t0))


def threads_for(cores: int, others: float, margin: float = 0.3) -> int:
    """Threads that leave the cores other processes use to them: 2 cores, one busy neighbour → 1."""
    return max(1, min(cores, int(cores - others + margin)))


def match_launcher(launcher_cfg) -> None:
    """Jobs of hydra/launcher=local_parallel run side by side on one machine, and submitit's local
    executor does not limit them: each uses the launcher's `cpus_per_task` threads."""
    if "OMP_NUM_THREADS" in os.environ or "LocalLauncher" not in str(launcher_cfg.get("_target_", "")):
        return
    cpus = launcher_cfg.get("cpus_per_task")
    if cpus:
        import torch

        os.environ["OMP_NUM_THREADS"] = str(cpus)  # a fixed count: the governor leaves it alone
        torch.set_num_threads(int(cpus))
