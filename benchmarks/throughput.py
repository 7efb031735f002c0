"""Training throughput of two trainer presets through our real pipeline, alternating A/B/A/B, and
the pipeline's overhead against a bare PyTorch loop on the same model and batches.

    .venv/bin/python benchmarks/throughput.py                      # CPU: tiny model, trainer=cpu vs trainer=seed
    python benchmarks/throughput.py --gpu --out gpu_throughput.jsonl   # GPU: w2v-bert-2.0 shape, gpu_fast vs seed

Every arm builds the Trainer exactly as `train.py` does (`asr.trainer.build_trainer`: our
sampler, collator, CTCTrainer, throughput and MLflow callbacks) from the same initial weights
and the same data, runs `--steps` optimizer steps and reports real audio seconds per second
over the steps after `--warmup` (the clock of asr.throughput: data loading included,
evaluation excluded). Arms alternate for `--rounds` rounds; ratios are paired within a round, and the median counts.
The overhead check runs preset A again against a plain loop (forward, backward, clipping,
AdamW step) over the same DataLoader: goal >= 0.95 of the bare loop's throughput.

Data: the built-in corpus's train features (CPU default), or `--synthetic N`: N utterances of
random features with OpenSLR-54-like lengths (log-normal, median 4 s, 1-15 s; see
benchmarks/padding.py), the GPU default since it needs no audio. Every result line is appended
to `--out` (JSON lines) as soon as it is measured, so a timeout loses nothing.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, DatasetDict
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from transformers import TrainerCallback

import asr  # noqa: F401  (registers ${repo_dir:})
from asr.collator import STATS_KEY
from asr.features import build_processor, build_vocab
from asr.model import build_model, load_feature_extractor
from asr.paths import REPO_DIR
from asr.prepare import prepare
from asr.torch_setup import configure_torch, resolve_precision
from asr.tracking import MlflowRun
from asr.trainer import build_trainer

CPU = {
    "model": ["model=tiny"],
    "a": ["trainer=cpu", "trainer.batch_seconds=30", "trainer.pad_to_multiple_of=25"],
    "b": ["trainer=seed"],
    "steps": 30,
    "warmup": 5,
}
GPU = {
    "model": ["model=w2v_bert_2", "model.pretrained=false", "regularization=seed"],
    "a": ["trainer=gpu_fast"],
    "b": ["trainer=seed", "trainer.attn_implementation=eager"],
    "steps": 30,
    "warmup": 5,
}


class StepClock(TrainerCallback):
    """Real frames and time per optimizer step, read from the ThroughputCallback's running totals."""

    def __init__(self, throughput) -> None:
        self.throughput, self.marks = throughput, []

    def on_step_end(self, args, state, control, **kwargs):
        self.marks.append((time.perf_counter(), self.throughput.real))


def audio_per_second(marks: list[tuple[float, int]], warmup: int, fps: float) -> float:
    (t0, f0), (t1, f1) = marks[warmup - 1], marks[-1]
    return (f1 - f0) / fps / (t1 - t0)


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO_DIR / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def synthetic_features(n: int, vocab_size: int, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    seconds = np.clip(rng.lognormal(np.log(4.0), 0.45, n), 1.0, 15.0)
    frames = (seconds * 50).astype(int)
    return Dataset.from_dict(
        {
            "input_features": [rng.standard_normal((f, 160), dtype=np.float32) for f in frames],
            "labels": [rng.integers(1, vocab_size - 1, int(s * 14)).tolist() for s in seconds],  # ~14 characters/s
            "input_length": frames.tolist(),
            "duration": seconds.tolist(),
        }
    )


def load_data(cfg, synthetic: int | None, work: Path):
    if synthetic:
        vocab = build_vocab([chr(0x0900 + i) for i in range(70)])  # ~72 symbols, like Nepali's vocabulary
        processor = build_processor(vocab, load_feature_extractor(cfg.model), work / "model")
        train = synthetic_features(synthetic, len(processor.tokenizer))
        return DatasetDict(train=train, dev=train.select(range(8))), processor
    _, features, processor = prepare(cfg, work)
    return features, processor


def arm(cfg, label, initial, features, processor, steps, warmup, work, tracker=None, bare=False) -> dict:
    cfg = copy.deepcopy(cfg)
    OmegaConf.update(cfg, "trainer.max_steps", steps)
    OmegaConf.update(cfg, "trainer.eval_steps", 10**9)  # no evaluation or checkpoint inside the timed steps
    OmegaConf.update(cfg, "trainer.save_steps", 10**9)
    model = copy.deepcopy(initial)
    trainer, throughput = build_trainer(cfg, work / label, model, features, processor, tracker)
    trainer.args.eval_strategy, trainer.args.load_best_model_at_end = "no", False  # no evaluation at the end either
    fps = throughput.fps
    try:
        if bare:
            return {"arm": label, **bare_loop(trainer, model, steps, warmup, fps)}
        clock = StepClock(throughput)
        trainer.add_callback(clock)
        trainer.train()
        return {
            "arm": label,
            "audio_s_per_s": audio_per_second(clock.marks, warmup, fps),
            "padding": throughput.summary["train_padding_fraction"],
            "steps": len(clock.marks),
            **{k: v for k, v in throughput.summary.items() if k in ("train_mfu", "peak_gpu_memory_gib")},
        }
    finally:  # free this arm's GPU memory before the next one starts
        del trainer, model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def bare_loop(trainer, model, steps: int, warmup: int, fps: float) -> dict:
    """The same model, DataLoader, optimizer and clipping as the Trainer, and nothing else."""
    args = trainer.args
    device = args.device
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, fused=args.optim.endswith("fused"))
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
    scaler = torch.amp.GradScaler(enabled=args.fp16)
    loader, marks, real, accum = trainer.get_train_dataloader(), [], 0, args.gradient_accumulation_steps
    batches = iter(())
    for _ in range(steps):
        for _ in range(accum):
            batch = next(batches, None)
            if batch is None:
                batches = iter(loader)
                batch = next(batches)
            real += batch.pop(STATS_KEY)["real_frames"]
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = model(**batch).loss / accum
            scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        marks.append((time.perf_counter(), real))
    return {"audio_s_per_s": audio_per_second(marks, warmup, fps), "steps": len(marks)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpu", action="store_true", help="full-size shape, gpu_fast vs seed (needs a CUDA GPU)")
    parser.add_argument("--steps", type=int, help="optimizer steps per arm and round")
    parser.add_argument("--warmup", type=int, help="steps not timed at the start of each arm")
    parser.add_argument("--rounds", type=int, default=5, help="A/B rounds (alternating)")
    parser.add_argument(
        "--synthetic", type=int, help="N synthetic OpenSLR-54-like utterances instead of the built-in corpus"
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", default="throughput_results.jsonl", help="JSON lines, appended as results come")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both arms, e.g. trainer.lr=1e-4")
    args = parser.parse_args()
    plan = GPU if args.gpu else CPU
    if args.threads:
        torch.set_num_threads(args.threads)
    steps, warmup = args.steps or plan["steps"], args.warmup or plan["warmup"]
    synthetic = args.synthetic or (2000 if args.gpu else None)
    out = Path(args.out)

    def record(row: dict) -> None:
        print(json.dumps(row), flush=True)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")

    base = plan["model"] + args.overrides
    cfg_a, cfg_b = compose_cfg(base + plan["a"]), compose_cfg(base + plan["b"])
    configure_torch(cfg_a.trainer)  # allocator settings before CUDA starts (benefits both arms: said in the output)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    record(
        {
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "torch": torch.__version__,
            "a": plan["a"],
            "b": plan["b"],
            "model": base,
            "steps": steps,
            "warmup": warmup,
            "precision_a": resolve_precision(cfg_a.trainer.precision),
            "threads": torch.get_num_threads(),
        }
    )
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        features, processor = load_data(cfg_a, synthetic, work)
        torch.manual_seed(0)
        initial = build_model(cfg_a.model, cfg_a.regularization, processor.tokenizer)
        tracking = OmegaConf.create(
            {"enabled": True, "uri": f"sqlite:///{work / 'mlflow.db'}", "experiment": "throughput"}
        )
        tracker = MlflowRun(tracking, "overhead", {})
        results: dict[str, list[float]] = {}
        initial_b = build_model(
            cfg_b.model, cfg_b.regularization, processor.tokenizer, cfg_b.trainer.get("attn_implementation")
        )
        initial_b.load_state_dict(initial.state_dict())  # same weights; only the attention kernel may differ
        arms = (
            ("A", cfg_a, initial, {}),
            ("B", cfg_b, initial_b, {}),
            ("ours", cfg_a, initial, {"tracker": tracker}),
            ("bare", cfg_a, initial, {"bare": True}),
        )
        for round_ in range(args.rounds):
            for label, cfg, model, kwargs in arms:
                row = arm(cfg, label, model, features, processor, steps, warmup, work, **kwargs)
                record({"round": round_, **row})
                results.setdefault(label, []).append(row["audio_s_per_s"])
        tracker.end("FINISHED")
    med = {k: statistics.median(v) for k, v in results.items()}
    # ratios paired within each round (neighbouring in time), then the median: robust to load changing between rounds
    a_over_b = statistics.median(a / b for a, b in zip(results["A"], results["B"]))
    ours_over_bare = statistics.median(o / b for o, b in zip(results["ours"], results["bare"]))
    summary = {
        "A_audio_s_per_s": med["A"],
        "B_audio_s_per_s": med["B"],
        "A_over_B": a_over_b,
        "ours_over_bare": ours_over_bare,
        "rounds": results,
    }
    record({"summary": summary})
    print(
        f"\nA ({' '.join(plan['a'])}): {med['A']:.1f} audio s/s | B ({' '.join(plan['b'])}): {med['B']:.1f} audio s/s"
        f" | A/B = {summary['A_over_B']:.2f}x"
    )
    print(
        f"overhead: our pipeline {med['ours']:.1f} vs bare loop {med['bare']:.1f} audio s/s = "
        f"{summary['ours_over_bare']:.3f}"
        f" (goal >= 0.95); rounds: {args.rounds}, steps {steps} (first {warmup} untimed)"
    )


if __name__ == "__main__":
    main()
