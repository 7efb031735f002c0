"""CPU threads: how many torch uses, so training degrades gracefully when something else runs.

torch's CPU kernels run on OpenMP threads that meet at a barrier after every parallel region. On
a machine where another process runs (a laptop, a shared box, two sweep workers on two cores),
a thread waits at that barrier for a sibling the scheduler has parked, and training collapses:
measured on 2 cores beside one busy process, 0.30 of the idle pace where fair sharing gives 0.5.
Letting the waiting threads sleep (OMP_WAIT_POLICY=PASSIVE) fixes the collapse but costs a third
of the idle pace on small models; shorter spinning does not help. What works is to use only the
cores nobody else is using: `CpuShare` measures, from /proc/stat's lines for the CPUs this process
may run on (or from its cgroup's usage under a CPU quota), how many cores other processes took since
the last look, and `asr.torch_setup.ThreadGovernor` sets torch's thread count to the rest
every few seconds (all of them again once the neighbour is gone). benchmarks/thread_policy.py
measures it (docs/performance.md).

Applied when `asr` is imported, before torch loads: the CPUs SLURM gave the task become
OMP_NUM_THREADS (clusters without cgroups would otherwise start a thread per core of the node).
Your own OMP_NUM_THREADS always wins, and then the thread count is never changed.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from pathlib import Path

PROC = Path("/proc")
CGROUP = Path("/sys/fs/cgroup")


def apply_policy(environ: dict[str, str] | None = None) -> None:
    """Set OMP_NUM_THREADS in `environ` (os.environ) to SLURM's CPUs per task unless the user set it."""
    env = os.environ if environ is None else environ
    cpus = env.get("SLURM_CPUS_PER_TASK")
    if "OMP_NUM_THREADS" not in env and cpus and cpus.isdigit():
        env["OMP_NUM_THREADS"] = cpus


def _cgroup_files(proc: Path, cgroup_root: Path) -> list[Path]:
    """This process's cgroup folders holding CPU files: v2's one, v1's cpu and cpuacct ones."""
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return []
    folders = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            folders.append(cgroup_root / path.lstrip("/"))
        elif {"cpu", "cpuacct"} & set(controllers.split(",")):
            folders.append(cgroup_root / controllers / path.lstrip("/"))
    return folders


def cgroup_cpu_limit(proc: Path = PROC, cgroup_root: Path = CGROUP) -> float | None:
    """CPUs this process's cgroup may use (`cpu.max` in cgroup v2, `cpu.cfs_quota_us` / `cpu.cfs_period_us`
    in v1): a `--cpus=2` container on a 64-core host gets 2.0; None without a quota."""
    for folder in _cgroup_files(proc, cgroup_root):
        try:
            quota, period = (folder / "cpu.max").read_text().split()[:2]
            if quota != "max":
                return int(quota) / int(period)
        except (OSError, ValueError):
            pass
        try:
            quota = int((folder / "cpu.cfs_quota_us").read_text())
            if quota > 0:
                return quota / int((folder / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            pass
    return None


def cgroup_cpu_seconds(proc: Path = PROC, cgroup_root: Path = CGROUP) -> float | None:
    """CPU seconds used by every process of this cgroup (v2 `cpu.stat` usage_usec, v1 `cpuacct.usage`)."""
    for folder in _cgroup_files(proc, cgroup_root):
        try:
            for line in (folder / "cpu.stat").read_text().splitlines():
                if line.startswith("usage_usec "):
                    return int(line.split()[1]) / 1e6
        except (OSError, ValueError):
            pass
        try:
            return int((folder / "cpuacct.usage").read_text()) / 1e9
        except (OSError, ValueError):
            pass
    return None


def allowed_cpus() -> set[int]:
    """The CPUs this process may run on (its affinity mask: taskset, cpusets, Kubernetes' CPU manager)."""
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))


def usable_cores(cpus: set[int] | None = None, proc: Path = PROC, cgroup_root: Path = CGROUP) -> int:
    """Cores this process may use: its affinity mask, capped by its cgroup's CPU quota."""
    cores = len(allowed_cpus() if cpus is None else cpus)
    limit = cgroup_cpu_limit(proc, cgroup_root)
    return max(1, min(cores, math.ceil(limit))) if limit else cores


class CpuShare:
    """Cores used by *other* processes since the last call, on this process's own CPUs only (the `cpuN`
    lines of /proc/stat for the CPUs of its affinity mask), minus this process's own CPU time. Guest time
    is already inside user and nice time and is not counted twice. None where /proc/stat does not exist."""

    def __init__(self, cpus: set[int] | None = None, proc: Path = PROC, cgroup_root: Path = CGROUP) -> None:
        self.cpus = allowed_cpus() if cpus is None else set(cpus)
        self.stat = proc / "stat"
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        # under a CPU quota smaller than the CPUs it may run on (a container), what competes for the quota
        # is the rest of its cgroup, not the whole machine
        limit = cgroup_cpu_limit(proc, cgroup_root)
        self.cgroup = (proc, cgroup_root) if limit and limit < len(self.cpus) else None
        self.last = self._sample()

    def _sample(self) -> tuple[float, float, float] | None:
        if self.cgroup:
            used = cgroup_cpu_seconds(*self.cgroup)
            return None if used is None else (time.monotonic(), used, sum(os.times()[:2]))
        busy, found = 0, False
        try:
            lines = self.stat.read_text().splitlines()
        except OSError:
            return None
        for line in lines:
            name, *values = line.split()
            if not (name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in self.cpus):
                continue
            # user nice system idle iowait irq softirq steal [guest guest_nice]: all but idle, iowait and guest
            fields = [int(v) for v in values[:8]]
            busy += sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)
            found = True
        if not found:
            return None
        own = sum(os.times()[:2])  # user + system time of every thread of this process
        return time.monotonic(), busy / self.tick, own

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


@contextmanager
def restored():
    """torch's thread count as it was, however the block ends: a pruned or out-of-memory trial inside a
    sweep worker must not leave the governor's reduced count to the next trial."""
    import torch

    threads = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def match_launcher(launcher_cfg) -> None:
    """Jobs of hydra/launcher=local_parallel run side by side on one machine, and submitit's local
    executor does not limit them: each uses the launcher's `cpus_per_task` threads."""
    from asr.hydra_seam import launcher_kind  # Hydra is imported by the launcher's process anyway

    if "OMP_NUM_THREADS" in os.environ or launcher_kind(launcher_cfg) != "local":
        return
    cpus = launcher_cfg.get("cpus_per_task")
    if cpus:
        import torch

        os.environ["OMP_NUM_THREADS"] = str(cpus)  # a fixed count: the governor leaves it alone
        torch.set_num_threads(int(cpus))
