"""Variable-length batches: how much of the fixed-shape speed do our batching and bounded shapes recover?

    .venv/bin/python benchmarks/gpu_varlen.py                     # CPU: tiny model, checks the code path
    python benchmarks/gpu_varlen.py --gpu --out varlen_h200.jsonl    # GPU: w2v-bert-2.0 shape, random weights

Utterances: random features with OpenSLR-54-like lengths (log-normal, median 4 s, 1-15 s, as in
our H200 measurement of variable-length batches), labels at ~14 characters per second. Our collator,
sampler and model (asr.build_model: adapter padding fix included) train with AdamW (fused on
GPU, bf16 autocast on GPU) in four arms, at the same mean batch size B:

  (a) naive: random order, B utterances per batch, padded to the longest (the seed's recipe);
  (b) bucketed: DurationBatchSampler with the cap giving mean batch B, padded to the longest;
  (c) bucketed + bounded: the same, padded to multiples of --multiple frames, with
      PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True and cudnn.benchmark (GPU);
  (f) fixed: every utterance at the mean length, batch B (the reference shape).

Each arm runs in its own process (a fresh CUDA allocator, so peak memory and the allocator
setting are per arm) for --epochs passes over the set; the first --warmup steps are not timed.
Printed and appended to --out (JSON lines) as each arm finishes: real audio s/s (unpadded audio
only), padding fraction, distinct shapes, peak GPU memory, then the ratios c/a, b/a, c/f.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

FPS, CHARS_PER_S = 50, 14
CPU = {"utterances": 256, "batch": 8, "epochs": 2, "warmup": 3}
GPU = {"utterances": 1024, "batch": 32, "epochs": 2, "warmup": 3}


def lengths_seconds(n: int, seed: int = 0) -> np.ndarray:
    return np.clip(np.random.default_rng(seed).lognormal(np.log(4.0), 0.45, n), 1.0, 15.0)


def plan_batches(arm: str, seconds: np.ndarray, batch: int, multiple: int, epoch: int, seed: int = 0):
    from asr.batching import DurationBatchSampler, PadPolicy, cap_for_mean_batch

    frames = np.round(seconds * FPS).astype(int)
    if arm == "fixed":
        frames = np.full_like(frames, int(round(seconds.mean() * FPS)))
    if arm in ("naive", "fixed"):
        order = np.random.default_rng([seed, epoch]).permutation(len(frames))
        return frames, [order[i : i + batch].tolist() for i in range(0, len(order), batch)], PadPolicy()
    pad = PadPolicy(multiple_of=multiple) if arm == "bounded" else PadPolicy()
    sampler = DurationBatchSampler(frames, cap_for_mean_batch(frames, batch, pad), pad, seed=seed)
    sampler.set_epoch(epoch)
    return frames, list(sampler), pad


def run_arm(arm: str, opts: argparse.Namespace, around_steps=contextlib.nullcontext) -> dict:
    """One arm in this process (called with --arm by the parent); the training steps run inside
    `around_steps()` (the profile mode passes the profiler, so model building is not profiled)."""
    import torch
    from hydra import compose, initialize_config_dir
    from torch.utils.data import DataLoader

    import asr  # noqa: F401  (registers ${repo_dir:})
    from asr.collator import STATS_KEY, CTCCollator
    from asr.features import build_processor, build_vocab
    from asr.model import build_model, load_feature_extractor
    from asr.paths import REPO_DIR

    cuda = torch.cuda.is_available()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if arm == "bounded" and cuda:
        torch.backends.cudnn.benchmark = opts.cudnn_benchmark == "on"
    overrides = ["model=w2v_bert_2", "model.pretrained=false"] if opts.gpu else ["model=tiny"]
    overrides += ["regularization=seed", "regularization.layerdrop=0.0", f"model.attn_implementation={opts.attn}"]
    with initialize_config_dir(config_dir=str(REPO_DIR / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    work = Path(opts.work)
    processor = build_processor(
        build_vocab([chr(0x0900 + i) for i in range(70)]), load_feature_extractor(cfg.model), work / arm
    )
    torch.manual_seed(0)
    device = "cuda" if cuda else "cpu"
    model = build_model(cfg.model, cfg.regularization, processor.tokenizer).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cuda)
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else None
    seconds = lengths_seconds(opts.utterances)
    rng = np.random.default_rng(1)
    labels = [rng.integers(1, len(processor.tokenizer) - 1, max(1, int(s * CHARS_PER_S))).tolist() for s in seconds]
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    step_times, real_frames, padded_frames, shapes, steps = [], 0, 0, set(), 0
    per_epoch = []  # real audio s/s of each epoch's timed steps: the cost of first-seen shapes shows in epoch 1
    steps_context = around_steps()
    steps_context.__enter__()
    for epoch in range(opts.epochs):
        epoch_time, epoch_frames = 0.0, 0
        frames, batches, pad = plan_batches(arm, seconds, opts.batch, opts.multiple, epoch)
        rows = [
            {
                "input_features": np.random.default_rng(i).standard_normal((int(f), 160), dtype=np.float32),
                "labels": labels[i],
            }
            for i, f in enumerate(frames)
        ]
        loader = DataLoader(
            rows,
            batch_sampler=batches,
            collate_fn=CTCCollator(processor, pad, with_stats=True),
            num_workers=2 if cuda else 0,
            pin_memory=cuda,
        )
        clock = time.perf_counter()
        for batch in loader:
            stats = batch.pop(STATS_KEY)
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
                loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            now = time.perf_counter()
            steps += 1
            if steps > opts.warmup:
                step_times.append(now - clock)
                epoch_time += now - clock
                epoch_frames += stats["real_frames"]
                real_frames += stats["real_frames"]
                padded_frames += stats["padded_frames"]
            shapes.add(stats["shape"])
            clock = now
        per_epoch.append(round(epoch_frames / FPS / epoch_time, 1) if epoch_time else None)
    steps_context.__exit__(None, None, None)
    if not step_times:
        raise ValueError(f"--warmup {opts.warmup} leaves no timed step of {steps}: raise --utterances or --epochs")
    timed = sum(step_times)
    return {
        "arm": arm,
        "real_audio_s_per_s": real_frames / FPS / timed,
        "padding_fraction": 1 - real_frames / padded_frames,
        "distinct_shapes": len(shapes),
        "steps": steps,
        "timed_steps": len(step_times),
        "mean_step_s": timed / len(step_times),
        "epoch_real_audio_s_per_s": per_epoch,
        "mean_batch": opts.utterances * opts.epochs / steps,
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
    }


SYNC_OPS = (
    "aten::_local_scalar_dense",
    "aten::nonzero",
    "aten::masked_select",  # each waits for the GPU on CUDA
    "cudaStreamSynchronize",
    "cudaDeviceSynchronize",
    "cudaMemcpyAsync",
)  # CUDA runtime calls (GPU runs only)


def profile(opts: argparse.Namespace) -> None:
    """Host-side cost of SpecAugment's NumPy masks and of ops that synchronise with the GPU, per step."""
    import torch
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as torch_profile
    from transformers.models.wav2vec2_bert import modeling_wav2vec2_bert as w2v

    original = w2v._compute_mask_indices

    def timed_mask_indices(*args, **kwargs):
        with record_function("_compute_mask_indices (NumPy)"):
            return original(*args, **kwargs)

    w2v._compute_mask_indices = timed_mask_indices
    opts.epochs, opts.warmup = 1, 0
    opts.utterances = opts.batch * (opts.profile_steps + 2)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    prof = torch_profile(activities=activities)
    result = run_arm("naive", opts, around_steps=lambda: prof)
    events = {e.key: e for e in prof.key_averages()}
    steps = result["steps"]
    total_ms = result["mean_step_s"] * 1000
    mask = events.get("_compute_mask_indices (NumPy)")
    print(f"{steps} steps of batch {opts.batch}, {total_ms:.1f} ms/step (profiled)")
    if mask:
        per_step = mask.cpu_time_total / 1000 / steps
        print(
            f"_compute_mask_indices: {mask.count / steps:.1f} calls/step, {per_step:.2f} ms/step = "
            f"{100 * per_step / total_ms:.2f}% of a step"
        )
    for name in SYNC_OPS:
        if name in events:
            e = events[name]
            print(f"{name}: {e.count / steps:.1f} calls/step, {e.cpu_time_total / 1000 / steps:.3f} ms/step host time")
    print("(aten::_local_scalar_dense also counts .item() on CPU tensors, e.g. AdamW's step counters: not syncs)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpu", action="store_true", help="full-size w2v-bert-2.0 shape (random weights)")
    parser.add_argument("--utterances", type=int)
    parser.add_argument("--batch", type=int, help="mean utterances per batch, every arm")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--warmup", type=int)
    parser.add_argument(
        "--multiple", type=int, default=25, help="bounded arm: pad to a multiple of this many frames (50/s)"
    )
    parser.add_argument("--attn", default="sdpa", help="sdpa | eager")
    parser.add_argument(
        "--cudnn-benchmark",
        default="on",
        choices=("on", "off"),
        help="bounded arm on a GPU: autotune convolutions per shape",
    )
    parser.add_argument("--arms", default="naive,bucketed,bounded,fixed")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's choice)")
    parser.add_argument("--out", default="gpu_varlen_results.jsonl", help="JSON lines, appended as each arm finishes")
    parser.add_argument("--profile", action="store_true", help="profile the naive arm's host-side costs instead")
    parser.add_argument("--profile-steps", type=int, default=10)
    parser.add_argument("--arm", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    for key, value in (GPU if opts.gpu else CPU).items():
        if getattr(opts, key) is None:
            setattr(opts, key, value)
    if opts.arm:
        try:
            result = run_arm(opts.arm, opts)
        except (RuntimeError, ValueError) as err:  # torch.OutOfMemoryError included: recorded, the other arms still run
            result = {"arm": opts.arm, "error": f"{type(err).__name__}: {str(err)[:300]}"}
        print("RESULT " + json.dumps(result), flush=True)
        return
    if opts.profile:
        import tempfile

        with tempfile.TemporaryDirectory() as work:
            opts.work = work
            profile(opts)
        return

    import tempfile

    out = Path(opts.out)
    results = {}
    with tempfile.TemporaryDirectory() as work:
        for arm in opts.arms.split(","):
            env = dict(os.environ)
            if arm == "bounded":
                env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"  # must be set before CUDA starts
            else:
                env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
            args = [sys.executable, __file__, "--arm", arm, "--work", work] + [
                f"--{k.replace('_', '-')}={getattr(opts, k)}"
                for k in ("utterances", "batch", "epochs", "warmup", "multiple", "attn", "threads", "cudnn_benchmark")
            ]
            done = subprocess.run(args + (["--gpu"] if opts.gpu else []), env=env, capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            row = json.loads(lines[-1][7:]) if lines else {"arm": arm, "error": done.stderr[-2000:]}
            results[arm] = row
            print(json.dumps(row), flush=True)
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
    speed = {arm: r.get("real_audio_s_per_s") for arm, r in results.items()}
    ratios = {}
    for num, den in (("bounded", "naive"), ("bucketed", "naive"), ("bounded", "bucketed"), ("bounded", "fixed")):
        if speed.get(num) and speed.get(den):
            ratios[f"{num}/{den}"] = speed[num] / speed[den]
    with out.open("a") as f:
        f.write(json.dumps({"ratios": ratios}) + "\n")
    print(f"\n{'arm':<10}{'real audio s/s':>15}{'padding':>9}{'shapes':>8}{'step s':>8}{'peak GiB':>9}")
    for arm, r in results.items():
        if "error" in r:
            print(f"{arm:<10} failed: {r['error'][-300:]}")
            continue
        peak = f"{r['peak_gpu_gib']:.1f}" if r["peak_gpu_gib"] is not None else "-"
        print(
            f"{arm:<10}{r['real_audio_s_per_s']:>15.1f}{100 * r['padding_fraction']:>8.1f}%{r['distinct_shapes']:>8}"
            f"{r['mean_step_s']:>8.3f}{peak:>9}"
        )
    print(
        "ratios: "
        + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items())
        + f"  ({opts.utterances} utterances, mean batch {opts.batch}, {opts.epochs} epochs)"
    )


if __name__ == "__main__":
    main()
