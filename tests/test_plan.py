"""plan=true (train.py -m) and sweep.plan=true (sweep.py): every job composed and checked, GPU-hours
estimated, nothing submitted."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from conftest import CONF_DIR, compose_cfg
from hydra import compose, initialize_config_dir

from asr.paths import REPO_DIR


def plan(*args: str, tmp_path, expect: int = 0) -> subprocess.CompletedProcess:
    # no tracking server (refused at once): the plan falls back to our measured table; no SLURM either
    env = {**os.environ, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9", "SLURM_CONF": "/nonexistent"}
    proc = subprocess.run([sys.executable, *args], cwd=REPO_DIR, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def total(out: str, prefix: str = "total:") -> float:
    return float(re.search(rf"{prefix} ([\d,.]+) H200 GPU-hours", out).group(1).replace(",", ""))


def test_seed_grid_on_openslr54_plans_near_140_gpu_hours(tmp_path):
    """The seed's 8/20/40 grid on OpenSLR 54 (data absent here): three jobs, ~140 H200 GPU-hours at the
    seed's settings from our measurement and the config's approximate hours, and what gpu_fast takes."""
    sweep_dir = tmp_path / "multirun"
    out = plan(
        "train.py",
        "-m",
        "hydra/launcher=slurm",
        "experiment=seed_8_20_40",
        "dataset=openslr54",
        "plan=true",
        f"hydra.sweep.dir={sweep_dir}",
        tmp_path=tmp_path,
    ).stdout
    rows = [line.split() for line in out.splitlines() if re.match(r"^\d+\s+trainer\.epochs=", line)]
    assert [r[1] for r in rows] == ["trainer.epochs=8", "trainer.epochs=20", "trainer.epochs=40"]
    assert all(r[3] == "148.5" for r in rows)  # 90% of ~165 h: the train split
    assert 110 <= total(out) <= 180, out
    assert 5 <= total(out, "with trainer=gpu_fast:") <= 20, out
    assert "our H200 measurement" in out and "approximate figure (165 h)" in out and "absent" in out
    assert "nothing submitted" in out and not (sweep_dir / ".submitit").exists()
    # 606 M parameters x (4 bytes of weights + 8 of AdamW state), save_total_limit 2 per job
    assert "disk: up to 40.6 GiB of checkpoints (3 job(s) x 2, 6.77 GiB each)" in out, out
    # 48 h allocations (less the 5-minute warning): the 40-epoch job needs more than one, within max_num_timeout
    allocations = dict(re.findall(r"^job (\d): [\d.,]+ GPU-h in allocations of 48 h: (\d+)$", out, re.M))
    assert sorted(allocations) == ["0", "1", "2"] and int(allocations["2"]) >= 2, out


def test_plan_warns_when_the_time_limit_allows_too_few_allocations(tmp_path):
    result = plan(
        "train.py",
        "-m",
        "hydra/launcher=slurm",
        "experiment=seed_8_20_40",
        "dataset=openslr54",
        "hydra.launcher.timeout_min=600",
        "hydra.launcher.max_num_timeout=0",
        "plan=true",
        f"hydra.sweep.dir={tmp_path / 'multirun'}",
        tmp_path=tmp_path,
    )
    assert re.search(
        r"WARNING: job 2: .* allows 1: it would stop unfinished. Fix: hydra.launcher.max_num_timeout=", result.stderr
    )


@pytest.fixture
def no_tracking(monkeypatch):
    """No tracking server (refused at once): the plan uses our measured table."""
    from asr.estimate import _tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    _tracking.cache_clear()
    yield
    _tracking.cache_clear()


@pytest.mark.fast
def test_plan_names_a_job_that_does_not_compose(no_tracking, capsys):
    from asr.hydra_seam import grid_jobs
    from asr.plan import print_plan

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        code = print_plan(grid_jobs(["model=tiny,no_such_model", "debug=fast"]), "plan")
    out, err = capsys.readouterr()
    assert code == 1 and re.search(r"^1\s+model=no_such_model\s+ERROR", out, re.M), out
    assert err.strip() == "error: 1 job(s) do not compose (see the table); nothing submitted"


@pytest.mark.fast
def test_sweep_plan_is_an_upper_bound(no_tracking, capsys, tmp_path):
    from asr.plan import print_study_plan
    from asr.sweep.spec import spec_from_config

    overrides = [
        "sweep=lr_epochs",
        "experiment=seed",
        "dataset=openslr54",
        "sweep.plan=true",
        f"sweep.dir={tmp_path / 'study'}",
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="study", overrides=overrides)
        assert cfg.sweep.plan is True
        code = print_study_plan(spec_from_config(cfg, overrides))
    out = capsys.readouterr().out
    assert code == 0 and "upper bound" in out and "x40 trials" in out and "trainer.epochs=40" in out
    assert total(out) > total(out, "with trainer=gpu_fast:") > 0
    assert not (tmp_path / "study").exists()  # no study created, no worker started


@pytest.mark.fast
def test_plan_prefers_mlflow_runs_of_the_same_settings(tmp_path, monkeypatch, no_tracking):
    """An earlier run's measured throughput (train_audio_seconds_per_second) beats the table."""
    from mlflow.tracking import MlflowClient

    from asr.estimate import estimate
    from asr.tracking import flatten

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cfg = compose_cfg("debug=fast", with_hydra=True)
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("earlier")).info.run_id
    train_only = {k: v for k, v in flatten(compose_cfg("debug=fast")).items() if k.startswith(("model.", "trainer."))}
    for key, value in train_only.items():
        client.log_param(run, key, value)
    client.log_metric(run, "train_audio_seconds_per_second", 100.0)
    client.set_tag(run, "device", "NVIDIA H100")
    result = estimate(cfg, "cpu", "0", "")
    assert result.source == "MLflow: 1 earlier run(s) of these settings on NVIDIA H100, per GPU"
    # a 2-GPU DDP run logs both GPUs' audio (300 s/s: 150 per GPU); a CPU run is another device
    for speed, world, device in ((300.0, 2, "NVIDIA H100"), (1000.0, 1, "cpu")):
        other = client.create_run(client.get_experiment_by_name("earlier").experiment_id).info.run_id
        for key, value in train_only.items():
            client.log_param(other, key, value)
        client.log_metric(other, "train_audio_seconds_per_second", speed)
        client.log_metric(other, "train_world_size", world)
        client.set_tag(other, "device", device)
    mixed = estimate(cfg, "cpu", "0", "")
    assert mixed.source == "MLflow: 2 earlier run(s) of these settings on NVIDIA H100, per GPU"
    assert mixed.gpu_hours == pytest.approx(result.gpu_hours * 100 / 125)  # median of 100 and 150 per GPU
    assert result.audio_hours == 1500 * 2.5 / 3600
    steps_per_epoch = 1500 * 2.5 / cfg.trainer.batch_seconds / cfg.trainer.grad_accum  # batches by audio seconds
    assert abs(result.epochs - 30 / steps_per_epoch) < 1e-9  # debug=fast: max_steps caps the epochs
    assert result.gpu_hours > 0


@pytest.mark.fast
def test_manifest_hours_are_measured(tmp_path):
    from asr.estimate import dataset_hours

    manifest = tmp_path / "train.jsonl"
    manifest.write_text(
        "".join(f'{{"audio_filepath": "a{i}.flac", "text": "x", "duration": 36}}\n' for i in range(100))
    )
    train_h, dev_h, utterances, source = dataset_hours(
        compose_cfg("dataset=manifest", f"dataset.train={manifest}").dataset
    )
    assert (round(train_h, 6), round(dev_h, 6), utterances) == (
        0.9,
        0.05,
        90.0,
    ) and "measured from train.jsonl" in source


@pytest.mark.fast
def test_manifest_hours_without_durations_given_dev_and_test_files(tmp_path):
    """No `duration` fields: the audio headers give the hours; a missing file makes them UNKNOWN, not 0.0.
    Given dev and test files are not carved out of train, and the dev hours are the dev file's."""
    import numpy as np
    import soundfile as sf

    from asr.estimate import dataset_hours

    for name, seconds in (("a.wav", 2.0), ("b.wav", 4.0), ("d.wav", 3.0)):
        sf.write(tmp_path / name, np.zeros(int(16000 * seconds), dtype="float32"), 16000)
    train, dev, test = tmp_path / "train.jsonl", tmp_path / "dev.jsonl", tmp_path / "test.jsonl"
    train.write_text('{"audio_filepath": "a.wav", "text": "x"}\n{"audio_filepath": "b.wav", "text": "y"}\n')
    dev.write_text('{"audio_filepath": "d.wav", "text": "z"}\n')
    test.write_text('{"audio_filepath": "d.wav", "text": "z"}\n')
    train_h, dev_h, utterances, _ = dataset_hours(
        compose_cfg("dataset=manifest", f"dataset.train={train}", f"dataset.dev={dev}", f"dataset.test={test}").dataset
    )
    assert (train_h * 3600, dev_h * 3600, utterances) == pytest.approx((6.0, 3.0, 2.0))
    train_h, dev_h, _, _ = dataset_hours(
        compose_cfg("dataset=manifest", f"dataset.train={train}", f"dataset.test={test}").dataset
    )
    assert (train_h * 3600, dev_h * 3600) == pytest.approx((6.0 * 0.95, 6.0 * 0.05))  # only dev carved out

    train.write_text(train.read_text() + '{"audio_filepath": "gone.wav", "text": "w"}\n')
    train_h, _, _, source = dataset_hours(compose_cfg("dataset=manifest", f"dataset.train={train}").dataset)
    assert train_h is None and source.startswith("UNKNOWN hours: 1 of 3 utterances")


def test_shared_trunk_plan_refuses_what_the_run_refuses(tmp_path):
    """experiment=seed_8_20_40 uses a linear schedule with a warm-up ratio: `hydra/sweeper=branches` refuses
    it, and so must its plan, with the same one line."""
    result = plan(
        "train.py",
        "-m",
        "experiment=seed_8_20_40",
        "hydra/sweeper=branches",
        "plan=true",
        f"hydra.sweep.dir={tmp_path / 'multirun'}",
        tmp_path=tmp_path,
        expect=1,
    )
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: a shared trunk needs the warmup-stable-decay schedule"), result.stderr
    assert "Fix: add trainer.lr_scheduler=wsd" in lines[-1] and "GPU-hours" not in result.stdout
