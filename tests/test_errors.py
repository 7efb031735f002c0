"""A user's mistake ends in one line on stderr naming the fix (exit 1; 2 for a bad command line),
never in a traceback; and the CPU thread policy."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import helpers
import pytest
from conftest import SMALL_CORPUS, compose_cfg
from mlflow.tracking import MlflowClient

from asr.paths import REPO_DIR
from asr.threads import CpuShare, apply_policy, threads_for
from asr.tracking import tracking_uri


def run(*args: str, cwd=REPO_DIR, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return helpers.python(*args, cwd=cwd, env=env_extra, timeout=300)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr and "HYDRA_FULL_ERROR" not in result.stderr, (
        result.stderr
    )
    assert not [line for line in lines if "Error executing job" in line], result.stderr
    return errors[0]


OUT = "hydra.run.dir={out}"


@pytest.mark.parametrize(
    ("args", "status", "says"),
    [
        ([str(REPO_DIR / "train.py"), "trainer.epoch=3", OUT], 2, "Could not override 'trainer.epoch'"),
        # typed schemas (asr/schema.py): a wrong type is refused when the config is composed
        ([str(REPO_DIR / "train.py"), "trainer.lr=fast", OUT], 2, "Value 'fast' of type 'str' is incompatible"),
        ([str(REPO_DIR / "sweep.py"), "sweep.workers=two", "sweep.dir={out}"], 2, "could not be converted to Integer"),
        ([str(REPO_DIR / "sweep.py"), "trainer.lr=1e-3", "sweep.dir={out}"], 1, "trainer.lr is searched by the study"),
        (["-m", "asr.evaluate", OUT], 1, "nothing to evaluate. Fix: run_dir="),
        (["-m", "asr.evaluate", "run_dir=/nonexistent/run", OUT], 1, "/nonexistent/run is not a finished training run"),
        (["-m", "asr.transcribe", "/nonexistent/model", "x.flac"], 1, "/nonexistent/model is not a saved model"),
        (
            ["-m", "asr.audit", "dataset=manifest", "dataset.train=/nonexistent/train.jsonl", OUT],
            1,
            "/nonexistent/train.jsonl does not exist",
        ),
    ],
)
def test_user_mistakes_end_in_one_line(args, status, says, tmp_path):
    result = run(*(a.format(out=tmp_path) for a in args), cwd=tmp_path)
    assert result.returncode == status, result.stderr[-2000:]
    assert says in one_error_line(result)


def test_compare_on_an_empty_store_says_how_to_make_a_sweep(tmp_path):
    result = run("-m", "asr.sweep_summary", "--uri", f"sqlite:///{tmp_path / 'empty.db'}")
    assert result.returncode == 1 and "no sweep found" in one_error_line(result)


def test_a_failed_run_carries_the_same_message_in_mlflow(tmp_path):
    result = run(
        str(REPO_DIR / "train.py"),
        "dataset=openslr54",
        f"dataset.root={tmp_path / 'nowhere'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        "tracking.experiment=errors-as-typed",
        cwd=tmp_path,
    )
    line = one_error_line(result)
    assert result.returncode == 1 and "does not exist" in line and "openslr.org/54" in line
    client = MlflowClient(tracking_uri())
    run_ = client.search_runs([client.get_experiment_by_name("errors-as-typed").experiment_id])[0]
    assert run_.info.status == "FAILED" and "error: " + " ".join(run_.data.tags["error"].split()) == line


def test_hydra_full_error_shows_the_traceback(tmp_path):
    result = run("-m", "asr.evaluate", f"hydra.run.dir={tmp_path}", cwd=tmp_path, env_extra={"HYDRA_FULL_ERROR": "1"})
    assert (
        result.returncode == 1 and "Traceback" in result.stderr and "ConfigError: nothing to evaluate" in result.stderr
    )


@pytest.mark.fast
def test_slurm_cpus_become_the_thread_count_unless_the_user_chose():
    env = {"SLURM_CPUS_PER_TASK": "4"}
    apply_policy(env)
    assert env["OMP_NUM_THREADS"] == "4"
    env = {"SLURM_CPUS_PER_TASK": "4", "OMP_NUM_THREADS": "2"}
    apply_policy(env)
    assert env["OMP_NUM_THREADS"] == "2"
    env = {}
    apply_policy(env)
    assert env == {}


@pytest.mark.serial  # measures what other processes use of this machine's cores
def test_the_governor_leaves_other_processes_their_cores():
    """A busy neighbour on one of 2 cores → 1 thread; gone → 2 again (asr.threads, asr.torch_setup.ThreadGovernor)."""
    assert threads_for(2, others=1.0) == 1 and threads_for(2, others=0.05) == 2 and threads_for(2, others=1.9) == 1
    assert threads_for(16, others=3.2) == 13
    share = CpuShare()
    neighbour = subprocess.Popen(
        [sys.executable, "-c", "import time\nend = time.time() + 3\nwhile time.time() < end: pass"]
    )
    try:
        time.sleep(2.0)
        busy = share.others()
    finally:
        neighbour.wait()
    assert busy is not None and 0.6 < busy < 1.6  # one core's worth of someone else's work


def _fake_machine(root: Path, cpu_lines: dict[int, list[int]], cgroup: str = "0::/job", files: dict | None = None):
    """A /proc (stat with per-CPU lines, self/cgroup) and a /sys/fs/cgroup tree under `root`."""
    proc, cgroup_root = root / "proc", root / "cgroup"
    (proc / "self").mkdir(parents=True, exist_ok=True)
    total = [sum(col) for col in zip(*cpu_lines.values())]
    lines = [f"cpu  {' '.join(map(str, total))}"] + [f"cpu{n} {' '.join(map(str, v))}" for n, v in cpu_lines.items()]
    (proc / "stat").write_text("\n".join(lines) + "\nintr 0\n")
    (proc / "self" / "cgroup").write_text(cgroup + "\n")
    for name, text in (files or {}).items():
        (cgroup_root / name).parent.mkdir(parents=True, exist_ok=True)
        (cgroup_root / name).write_text(text)
    return proc, cgroup_root


@pytest.mark.fast
def test_the_governor_counts_only_its_own_cpus_its_quota_and_guest_time_once(tmp_path, monkeypatch):
    """The affinity mask (taskset, cpusets), cgroup CPU quotas (v1 and v2) and guest time, from fake trees."""
    from asr.threads import cgroup_cpu_limit, usable_cores

    #           user nice system idle iowait irq softirq steal guest guest_nice
    idle = [0, 0, 0, 1000, 0, 0, 0, 0, 0, 0]
    proc, cg = _fake_machine(tmp_path / "a", {0: idle, 1: idle, 2: idle, 3: idle})
    share = CpuShare(cpus={0, 1}, proc=proc, cgroup_root=cg)
    # CPUs 2 and 3 (not ours) fully busy, CPU 1 busy with a VM's guest time (counted inside user too)
    busy = [100, 0, 0, 1000, 0, 0, 0, 0, 0, 0]
    guest = [100, 0, 0, 1000, 0, 0, 0, 0, 100, 0]
    _fake_machine(tmp_path / "a", {0: idle, 1: guest, 2: busy, 3: busy})
    share.last = (share.last[0] - 1.0, *share.last[1:])  # one second ago
    monkeypatch.setattr("os.times", lambda: (share.last[2], 0, 0, 0, 0))  # this process used nothing
    others = share.others()
    assert others == pytest.approx(100 / share.tick, rel=0.01)  # CPU 1's guest counted once, CPUs 2-3 not at all

    v2 = _fake_machine(tmp_path / "v2", {n: idle for n in range(64)}, files={"job/cpu.max": "200000 100000\n"})
    assert cgroup_cpu_limit(*v2) == 2.0 and usable_cores(set(range(64)), *v2) == 2
    v1 = _fake_machine(
        tmp_path / "v1",
        {n: idle for n in range(8)},
        cgroup="2:cpu,cpuacct:/docker/abc",
        files={
            "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "150000\n",
            "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
        },
    )
    assert usable_cores(set(range(8)), *v1) == 2  # 1.5 CPUs: two threads
    unlimited = _fake_machine(tmp_path / "max", {0: idle}, files={"job/cpu.max": "max 100000\n"})
    assert cgroup_cpu_limit(*unlimited) is None and usable_cores({0, 1, 2}, *unlimited) == 3

    # under a quota, the rest of the container competes for it, not the host's other 62 CPUs
    quota = _fake_machine(
        tmp_path / "q",
        {n: busy for n in range(64)},
        files={"job/cpu.max": "200000 100000\n", "job/cpu.stat": "usage_usec 5000000\n"},
    )
    share = CpuShare(cpus=set(range(64)), proc=quota[0], cgroup_root=quota[1])
    (quota[1] / "job" / "cpu.stat").write_text("usage_usec 6000000\n")  # the container used 1 CPU-second more
    share.last = (share.last[0] - 1.0, *share.last[1:])
    assert share.others() == pytest.approx(1.0, rel=0.01)


def test_a_pruned_run_gives_back_every_thread(tmp_path):
    """A callback (the governor, then a pruner) cuts the threads and stops the run: the next trial in the
    same worker starts with all of them again."""
    import torch
    from transformers import TrainerCallback

    from asr import pipeline
    from asr.errors import RunPruned

    class CutThenPrune(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            torch.set_num_threads(1)
            raise RunPruned("pruned")

    before = torch.get_num_threads()
    cfg = compose_cfg(*SMALL_CORPUS, "debug=fast", "tracking.enabled=false")
    with pytest.raises(RunPruned):
        pipeline.run(cfg, tmp_path, callbacks=[CutThenPrune()])
    assert torch.get_num_threads() == before


def test_a_misspelt_key_in_a_preset_is_refused_when_the_config_is_composed(tmp_path):
    """A preset of the user's own (here an experiment in a copy of conf/) with a misspelt trainer key
    is an error naming the key, not a setting silently ignored."""
    import shutil

    conf = tmp_path / "conf"
    shutil.copytree(REPO_DIR / "conf", conf)
    (conf / "experiment" / "mine.yaml").write_text("# @package _global_\ntrainer:\n  warmup_step: 100\n")
    result = run(str(REPO_DIR / "train.py"), f"--config-dir={conf}", "experiment=mine", f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0 and "Key 'warmup_step' not in 'TrainerConf'" in one_error_line(result)
