"""Transcribe audio files with a trained model.

    python -m asr.transcribe MODEL_DIR FILE... [--batch-size N] [--json] [--decoder auto|greedy|beam|beam_lm]
    asr-transcribe MODEL_DIR FILE...

Any format libsndfile reads, any sample rate, stereo or mono. Files longer than --chunk-seconds
are cut into overlapping chunks by the transformers ASR pipeline, whose CTC stride handling
stitches the chunks' logits back together, so long recordings are neither truncated nor held
in memory as one sequence. An unreadable file is reported on stderr and the rest still run;
the exit status is then 1.

A model folder that carries an n-gram LM (MODEL_DIR/lm, made by `python -m asr.lm build`) is
decoded with it and its tuned weights by default (--decoder auto); --decoder greedy turns it off.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import pipeline
from transformers.utils import logging as hf_logging

from asr import cli
from asr.data.audio import AudioDecodeError, load_audio
from asr.errors import ConfigError
from asr.inference import load_model
from asr.lm import lm_dir_of
from asr.lm.decode import DECODERS, BeamSettings, CTCDecoder, read_lm_info, resolve_decoder_name


class PipelineDecoder:
    """Our CTC decoder behind the pipeline's `decode_beams` hook, which gets the chunks' stitched logits.

    The pipeline still does what it is good at (chunking long files, joining the chunks' logits);
    the beam search itself is pyctcdecode called by asr.lm.decode. The hook is deprecated for
    Transformers 6 (pyproject.toml pins < 6).
    """

    def __init__(self, decoder: CTCDecoder) -> None:
        self.decoder = decoder

    def decode_beams(self, logits, **kwargs) -> list[tuple[str]]:
        return [(self.decoder.decode(logits),)]


def build_pipeline(
    model_dir: str,
    device: str | None = None,
    decoder: str = "greedy",
    lm_dir: str | None = None,
    beam: BeamSettings | None = None,
):
    lm_path = Path(lm_dir) if lm_dir else lm_dir_of(model_dir)
    kind = resolve_decoder_name(decoder, lm_path)
    if kind == "beam_lm":
        read_lm_info(lm_path)  # a missing LM is reported before the model loads
    model, processor = load_model(model_dir, device)
    extra = {}
    if kind != "greedy":
        extra["decoder"] = PipelineDecoder(
            CTCDecoder(kind, processor.tokenizer, model.config.vocab_size, lm_path, beam)
        )
        hf_logging.get_logger("transformers.pipelines.automatic_speech_recognition").setLevel(
            hf_logging.ERROR
        )  # the deprecation note
    return pipeline(
        "automatic-speech-recognition",
        model=model,
        tokenizer=processor.tokenizer,
        feature_extractor=processor.feature_extractor,
        device=model.device,
        **extra,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Transcribe audio files with a model saved by train.py (its model/ folder)."
    )
    parser.add_argument("model_dir", help="folder with the model and processor (a run's outputs/.../model)")
    parser.add_argument("files", nargs="+", help="audio files (FLAC, WAV, OGG, ...; any sample rate)")
    parser.add_argument("--batch-size", type=int, default=1, help="chunks per forward pass (default 1)")
    parser.add_argument(
        "--chunk-seconds", type=float, default=30.0, help="longer files are split into chunks of this length"
    )
    parser.add_argument(
        "--stride-seconds", type=float, default=5.0, help="overlap on each side of a chunk, for clean joins"
    )
    parser.add_argument(
        "--json", action="store_true", help="print JSON lines {path, text, seconds} instead of path<TAB>text"
    )
    parser.add_argument("--device", default=None, help="cpu | cuda | cuda:1 ... (default: cuda when available)")
    parser.add_argument(
        "--decoder",
        default="auto",
        choices=("auto", *DECODERS),
        help="auto (default): beam search with the model's n-gram LM when MODEL_DIR/lm exists, else greedy",
    )
    parser.add_argument("--lm", default=None, help="LM folder made by `python -m asr.lm build` (default: MODEL_DIR/lm)")
    parser.add_argument(
        "--beam-width", type=int, default=BeamSettings.beam_width, help="hypotheses kept per frame (beam decoders)"
    )
    parser.add_argument(
        "--alpha", type=float, default=None, help="LM weight (default: the value tuned into the LM's lm.json)"
    )
    parser.add_argument("--beta", type=float, default=None, help="word insertion bonus (default: the tuned value)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Print each file's transcript (path<TAB>text, or JSON lines); exit 1 if a file could not be read."""
    args = _parser().parse_args(argv)

    if not (Path(args.model_dir) / "config.json").is_file():
        raise ConfigError(
            f"{args.model_dir} is not a saved model (no config.json). Fix: pass a run's model folder, "
            "e.g. outputs/<date>/<time>/model"
        )
    asr = build_pipeline(
        args.model_dir,
        args.device,
        args.decoder,
        args.lm,
        BeamSettings(beam_width=args.beam_width, alpha=args.alpha, beta=args.beta),
    )
    rate = asr.feature_extractor.sampling_rate
    failed = 0
    for path in args.files:
        try:
            audio = load_audio(path, rate)
        except AudioDecodeError as err:
            print(f"cannot read {err}", file=sys.stderr)
            failed += 1
            continue
        chunking = (
            {"chunk_length_s": args.chunk_seconds, "stride_length_s": args.stride_seconds}
            if len(audio) > args.chunk_seconds * rate
            else {}
        )
        with torch.inference_mode():
            text = asr({"raw": audio, "sampling_rate": rate}, batch_size=args.batch_size, **chunking)["text"]
        if args.json:
            print(
                json.dumps({"path": path, "text": text, "seconds": round(len(audio) / rate, 3)}, ensure_ascii=False),
                flush=True,
            )
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
