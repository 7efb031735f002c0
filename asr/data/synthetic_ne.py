"""The built-in corpus: Nepali sentences spoken by eSpeak NG, so every run works offline.

Sentences come from a small Nepali grammar (subject-object-verb order, verbs agreeing with their
subject; asr/data/nepali_grammar.py), or, with `sentences: words`, are random 3-8 word strings
from a list of common Nepali words. Each is spoken by a random voice variant at a random speed and
pitch (one variant = one speaker).
Generation is deterministic given the config and is cached under a content hash, so a
changed setting makes a new corpus and an unchanged one is never regenerated.

eSpeak NG carries synthesis state from one utterance to the next, so byte-identical output
needs the same sequence from a fresh library: fixed chunks of utterances, each spoken in a
new process with a seeded noise generator. That also spreads the work over the CPU cores.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import queue
import shutil
from pathlib import Path

import numpy as np
import soundfile as sf
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from asr.data import SPLITS, DataError, Rows
from asr.data.audio import mono_resampled
from asr.data.espeak import Voice, engine_version, load_speaker
from asr.data.manifest import read_manifest
from asr.data.nepali_grammar import sentence as grammar_sentence

log = logging.getLogger(__name__)

GENERATOR_VERSION = 3  # bump when the generation code changes what it writes
CHUNK = 250  # utterances per fresh process; fixed, so the corpus never depends on the worker count
DEFAULT_WORDS = Path(__file__).with_name("nepali_words.txt")
RECIPE_KEYS = (
    "seed",
    "sentences",
    "sizes",
    "min_words",
    "max_words",
    "language",
    "voices",
    "speed",
    "pitch",
    "sample_rate",
)

Utterance = tuple[str, str, str, Voice]  # split, id, text, voice


def read_words(path: str | Path | None) -> list[str]:
    """Unique words in file order; lines starting with # are comments."""
    lines = Path(path or DEFAULT_WORDS).read_text(encoding="utf-8").splitlines()
    return list(dict.fromkeys(w.strip() for w in lines if w.strip() and not w.startswith("#")))


def draw_sentences(
    words: list[str], sizes: dict[str, int], min_words: int, max_words: int, rng, source: str = "grammar"
) -> dict[str, list[str]]:
    """Distinct sentences, so no test sentence was seen in training (nor in an LM built from train)."""
    if source not in ("grammar", "words"):
        raise DataError(f"dataset.sentences={source!r}: choose grammar or words")
    total = sum(sizes.values())
    sentences: dict[str, None] = {}
    for _ in range(total * 100):
        if len(sentences) == total:
            break
        if source == "grammar":
            text = grammar_sentence(rng)
            if min_words <= len(text.split()) <= max_words:
                sentences[text] = None
        else:
            sentences[" ".join(rng.choice(words, size=int(rng.integers(min_words, max_words + 1))))] = None
    else:
        raise DataError(f"could not draw {total} distinct sentences; lower dataset.sizes or raise dataset.max_words")
    ordered, out, start = list(sentences), {}, 0
    for split in SPLITS:
        out[split] = ordered[start : start + sizes[split]]
        start += sizes[split]
    return out


def plan(cfg: DictConfig, words: list[str]) -> list[Utterance]:
    """Every random choice, made up front from one seeded generator."""
    rng = np.random.default_rng(cfg.seed)
    sentences = draw_sentences(words, dict(cfg.sizes), cfg.min_words, cfg.max_words, rng, cfg.get("sentences", "words"))
    utterances = []
    for split in SPLITS:
        for index, text in enumerate(sentences[split]):
            variant = str(rng.choice(list(cfg.voices)))
            speed = int(rng.integers(cfg.speed[0], cfg.speed[1] + 1))
            pitch = int(rng.integers(cfg.pitch[0], cfg.pitch[1] + 1))
            utterances.append((split, f"{split}-{index:05d}", text, Voice(f"{cfg.language}+{variant}", speed, pitch)))
    return utterances


def corpus_key(cfg: DictConfig, words: list[str], engine_version: str) -> str:
    """Hash of everything that changes the corpus bytes (not of where it is cached)."""
    settings = OmegaConf.to_container(cfg, resolve=True)
    recipe = {
        "generator": GENERATOR_VERSION,
        "engine": engine_version,
        "words": words,
        **{k: settings[k] for k in RECIPE_KEYS},
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:12]


def speak_chunk(job: tuple[str, list[Utterance], int, int]) -> list[tuple[str, dict]]:
    """Runs in a fresh process: speak, resample, write FLAC; returns (split, manifest line) pairs."""
    root, utterances, sample_rate, noise_seed = job
    speaker = load_speaker()
    speaker.seed(noise_seed)
    lines = []
    for split, utt_id, text, voice in utterances:
        audio = mono_resampled(speaker.speak(text, voice), speaker.sample_rate, sample_rate)
        relative = f"audio/{split}/{utt_id}.flac"
        sf.write(Path(root) / relative, audio, sample_rate, subtype="PCM_16")
        lines.append(
            (
                split,
                {
                    "id": utt_id,
                    "audio_filepath": relative,
                    "text": text,
                    "speaker": voice.name.split("+")[-1],
                    "duration": round(len(audio) / sample_rate, 3),
                },
            )
        )
    return lines


def _chunk_process(index: int, job: tuple, results) -> None:
    """One chunk's process: sends back its manifest lines or its error, so the parent never waits in vain."""
    try:
        results.put((index, speak_chunk(job), None))
    except BaseException as err:  # noqa: BLE001
        results.put((index, None, f"{type(err).__name__}: {err}"))


def _fresh_process_context():
    """forkserver: chunks fork from a single-threaded server that imported the caller once (forking
    the threaded training process itself can deadlock, spawning re-imports torch per chunk)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["__main__", __name__])
    return context


def speak_in_fresh_processes(jobs: list[tuple], workers: int, bar) -> list[list[tuple[str, dict]]]:
    """Run speak_chunk on every job, each in a new process, at most `workers` at a time; results in job order."""
    context = _fresh_process_context()
    results = context.Queue()
    pending, running, done = list(enumerate(jobs)), {}, {}
    while pending or running:
        while pending and len(running) < workers:
            index, job = pending.pop(0)
            running[index] = context.Process(target=_chunk_process, args=(index, job, results), daemon=True)
            running[index].start()
        try:
            index, lines, error = results.get(timeout=5)
        except queue.Empty:  # nothing for 5 s: make sure no worker died without a word (OOM killer, signal)
            dead = {i: p.exitcode for i, p in running.items() if not p.is_alive()}
            if dead:
                raise RuntimeError(
                    f"corpus generation: the process speaking chunk(s) {sorted(dead)} died (exit codes {dead})"
                ) from None
            continue
        running.pop(index).join()
        if error:
            raise RuntimeError(f"corpus generation failed in chunk {index}: {error}")
        done[index] = lines
        bar.update(len(lines))
    return [done[i] for i in range(len(jobs))]


def generate(cfg: DictConfig) -> Path:
    """Make (or find) the corpus folder: manifests `<split>.jsonl` + `audio/<split>/*.flac`."""
    words = read_words(cfg.word_list)
    engine = engine_version()
    folder = Path(cfg.cache_dir).expanduser() / corpus_key(cfg, words, engine)
    if (folder / "corpus.json").is_file():
        log.info("Synthetic corpus found in %s", folder)
        return folder
    utterances = plan(cfg, words)
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    for split in SPLITS:
        (partial / "audio" / split).mkdir(parents=True)
    jobs = [
        (str(partial), utterances[i : i + CHUNK], cfg.sample_rate, cfg.seed + i)
        for i in range(0, len(utterances), CHUNK)
    ]
    with tqdm(total=len(utterances), desc=f"Speaking synthetic Nepali corpus into {folder}", unit="utt") as bar:
        chunks = speak_in_fresh_processes(jobs, cfg.num_proc, bar)
    _write_manifests(partial, [line for chunk in chunks for line in chunk])
    recipe = {"engine": engine, "words": len(words), "config": OmegaConf.to_container(cfg, resolve=True)}
    (partial / "corpus.json").write_text(json.dumps(recipe, indent=2, ensure_ascii=False), encoding="utf-8")
    if folder.exists():  # another process finished the same corpus first: keep theirs
        shutil.rmtree(partial)
    else:
        partial.rename(folder)
    return folder


def _write_manifests(root: Path, lines: list[tuple[str, dict]]) -> None:
    for split in SPLITS:
        with (root / f"{split}.jsonl").open("w", encoding="utf-8") as manifest:
            for line_split, line in lines:
                if line_split == split:
                    manifest.write(json.dumps(line, ensure_ascii=False) + "\n")


def load_rows(cfg: DictConfig) -> dict[str, Rows]:
    folder = generate(cfg)
    return {split: read_manifest(folder / f"{split}.jsonl") for split in SPLITS}
