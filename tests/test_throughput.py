"""Throughput metrics in every run, and the gpu_fast preset composing and training on a CPU."""

from __future__ import annotations

import json
import os
import time
from types import SimpleNamespace

import pytest
import torch
from conftest import SMALL_CORPUS, compose_cfg
from mlflow.tracking import MlflowClient

from asr import pipeline, torch_setup, trainer
from asr.throughput import BatchStats, ThroughputCallback
from asr.tracking import tracking_uri

THROUGHPUT_KEYS = (
    "train_audio_seconds_per_second",
    "train_padding_fraction",
    "train_distinct_shapes",
    "train_timed_seconds",
    "train_real_audio_seconds",
    "train_padded_audio_seconds",
)


def test_default_run_reports_throughput(learned):
    _, output_dir, _ = learned
    on_disk = json.loads((output_dir / "metrics.json").read_text())
    for key in THROUGHPUT_KEYS:
        assert key in on_disk
    assert on_disk["train_audio_seconds_per_second"] == pytest.approx(
        on_disk["train_real_audio_seconds"] / on_disk["train_timed_seconds"]
    )
    assert 0 < on_disk["train_timed_seconds"] < on_disk["train_runtime"]  # evaluations and saves are not counted
    # trainer=cpu batches up to 20 padded seconds of similar-length utterances (trainer.batch_seconds)
    assert on_disk["train_padded_audio_seconds"] <= 20 * 300
    assert on_disk["train_padding_fraction"] < 0.1  # vs ~0.3 for random batches of 1-6 s utterances
    assert on_disk["train_real_audio_seconds"] > 2 * on_disk["train_audio_seconds"]  # 300 steps: > 2 epochs
    run = MlflowClient(tracking_uri()).get_run(json.loads((output_dir / "mlflow_run.json").read_text())["run_id"])
    assert run.data.metrics["train_audio_seconds_per_second"] == pytest.approx(
        on_disk["train_audio_seconds_per_second"]
    )


def test_gpu_fast_composes_and_trains_on_cpu(tmp_path):
    overrides = [
        *SMALL_CORPUS,
        "debug=fast",
        "trainer=gpu_fast",
        "trainer.max_steps=null",
        "trainer.epochs=2",
        "trainer.batch_seconds=20",
        "trainer.dataloader_num_workers=1",
        "tracking.experiment=test-gpu-fast",
    ]
    cfg = compose_cfg(*overrides)
    args = trainer.build_training_args(cfg.trainer, tmp_path)
    assert args.optim == "adamw_torch_fused" and not args.gradient_checkpointing
    assert not (args.fp16 or args.bf16)  # precision auto = fp32 without a GPU
    assert args.dataloader_persistent_workers and not args.dataloader_pin_memory
    metrics = pipeline.run(cfg, tmp_path)
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk == pytest.approx(metrics)
    # two epochs, each utterance once per epoch (frames are 20 ms: up to 0.02 s rounding per utterance)
    assert metrics["train_real_audio_seconds"] == pytest.approx(2 * metrics["train_audio_seconds"], abs=2 * 64 * 0.02)
    padded, real = metrics["train_padded_audio_seconds"], metrics["train_real_audio_seconds"]
    assert metrics["train_padding_fraction"] == pytest.approx(1 - real / padded)
    assert (
        padded <= 20 * metrics["train_steps"]
    )  # no batch above 20 padded seconds (the debug corpus has no longer utterance)
    assert metrics["train_padding_fraction"] < 0.1  # similar lengths, padded to the batch's longest
    # the same batches every epoch (only their order changes): the second epoch brings no new shape
    assert 1 <= metrics["train_distinct_shapes"] <= metrics["train_steps"] / 2
    assert metrics["test_wer"] <= 1.0


@pytest.mark.fast
def test_clock_counts_training_steps_only():
    stats = BatchStats()
    callback = ThroughputCallback(stats, frames_per_second=50)
    args = SimpleNamespace(world_size=1)
    state = SimpleNamespace(is_world_process_zero=True, global_step=2)
    callback.on_train_begin(args, state, None)
    for _ in range(2):
        stats.add({"real_frames": 400, "padded_frames": 500, "shape": (5, 100)})
        time.sleep(0.05)
        callback.on_step_end(args, state, None)
        time.sleep(0.2)  # an evaluation
        callback.on_evaluate(args, state, None)
    callback.on_train_end(args, state, None)
    summary = callback.summary
    assert 0.1 <= summary["train_timed_seconds"] < 0.2
    assert summary["train_real_audio_seconds"] == 16.0 and summary["train_padding_fraction"] == pytest.approx(0.2)
    assert summary["train_distinct_shapes"] == 1
    assert summary["train_audio_seconds_per_second"] == pytest.approx(16.0 / summary["train_timed_seconds"])


@pytest.mark.fast
def test_flop_estimate_matches_torch_flop_counter():
    """The MFU numerator (6·P·B·T + 12·L·d·B·T²) against counted FLOPs of a forward + backward pass."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import Wav2Vec2BertConfig, Wav2Vec2BertForCTC

    from asr.throughput import training_flops

    model = Wav2Vec2BertForCTC(
        Wav2Vec2BertConfig(
            hidden_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=1024,
            output_hidden_size=256,
            add_adapter=True,
            vocab_size=40,
            pad_token_id=39,
            mask_time_prob=0.0,
            layerdrop=0.0,
        )
    )
    features = torch.randn(2, 300, 160)
    with FlopCounterMode(display=False) as counter:
        model(input_features=features).logits.sum().backward()
    estimate = training_flops(model)(2, 300)
    assert 0.7 < estimate / counter.get_total_flops() < 1.3


def _load_benchmark(name: str):
    import importlib.util

    from asr.paths import REPO_DIR

    spec = importlib.util.spec_from_file_location(name, REPO_DIR / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_varlen_benchmark_code_path_on_cpu(tmp_path):
    """benchmarks/gpu_varlen.py's arms, in-process with the tiny model on a few utterances."""
    varlen = _load_benchmark("gpu_varlen")
    opts = SimpleNamespace(
        gpu=False, utterances=16, batch=4, epochs=1, warmup=1, multiple=25, attn="sdpa", threads=1, work=str(tmp_path)
    )
    threads = torch.get_num_threads()
    try:
        naive, bounded = varlen.run_arm("naive", opts), varlen.run_arm("bounded", opts)
    finally:
        torch.set_num_threads(threads)
    assert naive["steps"] == 4 and naive["mean_batch"] == 4.0
    assert bounded["padding_fraction"] < naive["padding_fraction"] / 2  # log-normal lengths: ~40% vs < 15% padding
    assert bounded["distinct_shapes"] <= naive["distinct_shapes"]
    assert bounded["real_audio_s_per_s"] > 0 and bounded["peak_gpu_gib"] is None


def test_throughput_benchmark_runs_both_presets_and_the_bare_loop(tmp_path, monkeypatch):
    bench = _load_benchmark("throughput")
    out = tmp_path / "results.jsonl"
    monkeypatch.setattr(
        "sys.argv",
        [
            "throughput.py",
            "--synthetic",
            "48",
            "--steps",
            "4",
            "--warmup",
            "1",
            "--rounds",
            "1",
            "--threads",
            "1",
            "--out",
            str(out),
            f"paths.cache_dir={tmp_path / 'cache'}",
        ],
    )
    threads = torch.get_num_threads()
    try:
        bench.main()
    finally:
        torch.set_num_threads(threads)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["arm"] for r in rows if "arm" in r] == ["A", "B", "ours", "bare"]
    assert all(r["steps"] == 4 and r["audio_s_per_s"] > 0 for r in rows if "arm" in r)
    summary = rows[-1]["summary"]
    assert summary["A_over_B"] == pytest.approx(summary["A_audio_s_per_s"] / summary["B_audio_s_per_s"])


@pytest.mark.fast
def test_gpu_fast_allocator_setting_goes_into_the_environment(monkeypatch):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    cfg = compose_cfg("trainer=gpu_fast").trainer
    torch_setup.configure_torch(cfg)
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    if not torch.cuda.is_available():
        assert not torch.backends.cudnn.benchmark  # GPU-only settings leave a CPU machine alone
