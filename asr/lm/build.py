"""Build a word n-gram LM with KenLM's lmplz (modified Kneser-Ney), from normalised transcripts.

The text is the train split's transcripts by default, or a user's file normalised by the same
`dataset.text` rules, one sentence per line. Test sentences must never reach the LM: a text that
contains one (as a whole line or inside a longer one) is refused, or kept with a loud warning
when `lm.test_overlap=warn`.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from asr.data.text import normalize_text
from asr.lm import INFO_FILE, LMError

log = logging.getLogger(__name__)


def find_tool(name: str, configured: str | None = None) -> Path | None:
    """A KenLM program: the configured path, else next to this Python (`make lmplz` puts it in .venv/bin), else PATH."""
    if configured:
        return Path(configured) if Path(configured).is_file() else None
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return beside
    found = shutil.which(name)
    return Path(found) if found else None


def normalized_lines(path: str | Path, text_cfg: DictConfig) -> list[str]:
    """A user's text file, one sentence per line, normalised like the transcripts (rejected lines dropped)."""
    file = Path(path)
    if not file.is_file():
        raise LMError(f"lm.text_file={path} does not exist. Fix: give a UTF-8 text file, one sentence per line")
    options = {k: v for k, v in OmegaConf.to_container(text_cfg, resolve=True).items() if k != "min_char_count"}
    lines = []
    for raw in file.read_text(encoding="utf-8").splitlines():
        text, rejected = normalize_text(raw, **options)
        if text and not rejected:
            lines.append(text)
    if not lines:
        raise LMError(
            f"lm.text_file={path} holds no sentence after normalisation. "
            "Fix: one sentence per line, in the dataset's script"
        )
    return lines


def test_overlap(lines: list[str], test_texts: list[str]) -> list[str]:
    """Test sentences found in the LM text, as whole lines or between word boundaries inside one."""
    joined = " " + " \n ".join(lines) + " "
    return [text for text in dict.fromkeys(test_texts) if text and f" {text} " in joined]


def check_test_overlap(lines: list[str], test_texts: list[str] | None, policy: str) -> int:
    """Refuse (policy=refuse) or loudly warn (warn) when test sentences are in the LM text; returns how many."""
    if policy not in ("refuse", "warn"):
        raise LMError(f"lm.test_overlap={policy!r}: choose refuse or warn")
    if test_texts is None:
        log.warning(
            "No test split known: cannot check that the LM text holds no test sentence "
            "(give dataset=... or run_dir=...)"
        )
        return 0
    found = test_overlap(lines, test_texts)
    if not found:
        return 0
    message = (
        f"the LM text contains {len(found)} of the {len(set(test_texts))} test sentences (e.g. {found[0]!r}); "
        "an LM that saw them makes test WER meaningless"
    )
    if policy == "refuse":
        raise LMError(f"{message}. Fix: remove them from the text, or lm.test_overlap=warn to build anyway")
    log.warning(
        "!!! %s. Building anyway (lm.test_overlap=warn): do not report test WER from this LM !!!", message.upper()
    )
    return len(found)


def lmplz_for(cfg: DictConfig) -> Path:
    """The lmplz program for these settings, or the one-line error that building would end with."""
    if cfg.order < 2:
        raise LMError(f"lm.order={cfg.order}: KenLM loads n-gram models from order 2 up. Fix: lm.order=2 or more")
    lmplz = find_tool("lmplz", cfg.lmplz)
    if lmplz is None:
        raise LMError(
            "KenLM's lmplz was not found. Fix: make lmplz (needs cmake, g++ and Boost: make lm-deps as root), "
            "or lm.lmplz=<path to lmplz>"
        )
    return lmplz


def run_lmplz(lines: list[str], out_dir: Path, cfg: DictConfig) -> Path:
    """lmplz → lm.arpa (and build_binary → lm.bin when cfg.binary); returns the file decoders should load."""
    lmplz = lmplz_for(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    arpa = out_dir / "lm.arpa"
    with tempfile.TemporaryDirectory(prefix="lmplz-") as tmp:
        command = [
            str(lmplz),
            "-o",
            str(cfg.order),
            "-S",
            str(cfg.memory),
            "-T",
            f"{tmp}/",
            "--arpa",
            str(arpa),
            "--skip_symbols",
        ]
        if cfg.discount_fallback:
            command.append("--discount_fallback")
        if cfg.prune:
            command += ["--prune", *map(str, cfg.prune)]
        done = subprocess.run(command, input="\n".join(lines) + "\n", text=True, capture_output=True)
    if done.returncode != 0:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        hint = (
            " Fix: lm.discount_fallback=true, or a lower lm.order, for a small text"
            if "discount" in done.stderr.lower()
            else ""
        )
        raise LMError(f"lmplz failed ({tail}).{hint}")
    if not cfg.binary:
        return arpa
    build_binary = find_tool("build_binary", str(lmplz.with_name("build_binary")))
    if build_binary is None:
        log.warning("KenLM's build_binary not found next to %s: decoders will load the (slower) ARPA file", lmplz)
        return arpa
    binary = out_dir / "lm.bin"
    done = subprocess.run([str(build_binary), str(arpa), str(binary)], text=True, capture_output=True)
    if done.returncode != 0:
        log.warning(
            "build_binary failed (%s): decoders will load the ARPA file",
            " | ".join(done.stderr.strip().splitlines()[-2:]),
        )
        binary.unlink(missing_ok=True)
        return arpa
    return binary


def write_unigrams(lines: list[str], out_dir: Path) -> Counter:
    """unigrams.txt: every word of the LM text, most frequent first (pyctcdecode's lexicon)."""
    counts = Counter(word for line in lines for word in line.split())
    (out_dir / "unigrams.txt").write_text("\n".join(word for word, _ in counts.most_common()) + "\n", encoding="utf-8")
    return counts


def build_lm(lines: list[str], out_dir: Path, cfg: DictConfig, source: str, test_texts: list[str] | None) -> dict:
    """The whole build: overlap check → lmplz (+ binary) → unigrams → lm.json. Returns lm.json's content."""
    if not lines:
        raise LMError("no sentences to build an LM from. Fix: a train split with transcripts, or lm.text_file=<file>")
    overlap = check_test_overlap(lines, test_texts, cfg.test_overlap)
    started = time.perf_counter()
    model_file = run_lmplz(lines, out_dir, cfg)
    counts = write_unigrams(lines, out_dir)
    info = {
        "model_file": model_file.name,
        "order": cfg.order,
        "prune": list(cfg.prune or []),
        "source": source,
        "sentences": len(lines),
        "words": sum(counts.values()),
        "vocabulary": len(counts),
        "test_overlap": overlap,
        "build_seconds": round(time.perf_counter() - started, 2),
        "alpha": None,
        "beta": None,
    }
    old = out_dir / INFO_FILE
    if old.is_file():  # a rebuilt LM needs its weights tuned again
        log.info("Replacing the LM in %s (its tuned alpha/beta are reset)", out_dir)
    old.write_text(json.dumps(info, indent=2, ensure_ascii=False), encoding="utf-8")
    log.info(
        "%d-gram LM from %d sentences (%d words, %d distinct) → %s",
        cfg.order,
        info["sentences"],
        info["words"],
        info["vocabulary"],
        out_dir / model_file.name,
    )
    return info
