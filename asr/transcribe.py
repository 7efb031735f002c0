"""Transcribe audio files with a trained model.

    python -m asr.transcribe MODEL_DIR FILE... [--batch-size N] [--json]
    asr-transcribe MODEL_DIR FILE...

Any format libsndfile reads, any sample rate, stereo or mono. Files longer than --chunk-seconds
are cut into overlapping chunks by the transformers ASR pipeline, whose CTC stride handling
stitches the chunks' logits back together, so long recordings are neither truncated nor held
in memory as one sequence. An unreadable file is reported on stderr and the rest still run;
the exit status is then 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import pipeline

from asr import cli
from asr.data.audio import AudioDecodeError, load_audio
from asr.errors import ConfigError
from asr.inference import load_model


def build_pipeline(model_dir: str, device: str | None = None):
    model, processor = load_model(model_dir, device)
    return pipeline("automatic-speech-recognition", model=model, tokenizer=processor.tokenizer,
                    feature_extractor=processor.feature_extractor, device=model.device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Transcribe audio files with a model saved by train.py (its model/ folder).")
    parser.add_argument("model_dir", help="folder with the model and processor (a run's outputs/.../model)")
    parser.add_argument("files", nargs="+", help="audio files (FLAC, WAV, OGG, ...; any sample rate)")
    parser.add_argument("--batch-size", type=int, default=1, help="chunks per forward pass (default 1)")
    parser.add_argument("--chunk-seconds", type=float, default=30.0, help="longer files are split into chunks of this length")
    parser.add_argument("--stride-seconds", type=float, default=5.0, help="overlap on each side of a chunk, for clean joins")
    parser.add_argument("--json", action="store_true", help="print JSON lines {path, text, seconds} instead of path<TAB>text")
    parser.add_argument("--device", default=None, help="cpu | cuda | cuda:1 ... (default: cuda when available)")
    args = parser.parse_args(argv)

    if not (Path(args.model_dir) / "config.json").is_file():
        raise ConfigError(f"{args.model_dir} is not a saved model (no config.json). Fix: pass a run's model folder, "
                          "e.g. outputs/<date>/<time>/model")
    asr = build_pipeline(args.model_dir, args.device)
    rate = asr.feature_extractor.sampling_rate
    failed = 0
    for path in args.files:
        try:
            audio = load_audio(path, rate)
        except AudioDecodeError as err:
            print(f"cannot read {err}", file=sys.stderr)
            failed += 1
            continue
        chunking = {"chunk_length_s": args.chunk_seconds, "stride_length_s": args.stride_seconds} if len(audio) > args.chunk_seconds * rate else {}
        with torch.inference_mode():
            text = asr({"raw": audio, "sampling_rate": rate}, batch_size=args.batch_size, **chunking)["text"]
        if args.json:
            print(json.dumps({"path": path, "text": text, "seconds": round(len(audio) / rate, 3)}, ensure_ascii=False), flush=True)
        else:
            print(f"{path}\t{text}", flush=True)
    if failed:
        print(f"{failed} of {len(args.files)} files could not be read", file=sys.stderr)
    return 1 if failed else 0


def entry() -> None:
    """`python -m asr.transcribe` and the `asr-transcribe` command."""
    sys.exit(cli.run(main))


if __name__ == "__main__":
    entry()
