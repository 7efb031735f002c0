"""asr.lm: build an n-gram LM, decode with it, tune its weights; evaluate and transcribe with it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import kenlm
import numpy as np
import pytest
import soundfile as sf
from conftest import SESSION_DIR, SMALL_CORPUS, compose_cfg
from omegaconf import OmegaConf

from asr import transcribe
from asr.data import load_splits
from asr.evaluate import evaluate
from asr.features import build_processor, build_vocab
from asr.lm import LMError
from asr.lm.__main__ import build, tune
from asr.lm.build import build_lm, find_tool
from asr.lm.decode import UNK_LABEL, BeamSettings, CTCDecoder, ctc_alphabet
from asr.lm.tune import tune_weights
from asr.model import load_feature_extractor
from asr.paths import REPO_DIR

pytestmark = pytest.mark.skipif(find_tool("lmplz") is None, reason="KenLM's lmplz is not built (make lmplz)")

LM_TEXT = [
    "the cat sat on the mat",
    "a cat sat on a hat",
    "the cat ate the rat",
    "my cat sat here",
    "the dog sat on the mat",
    "a rat ate the hat",
    "the cat is on the mat",
]


def _lm_cfg(*overrides: str):
    return compose_cfg(*overrides, config_name="language_model").lm


def _tokenizer(tmp_path):
    vocab = build_vocab(LM_TEXT + ["cut"])
    return build_processor(vocab, load_feature_extractor(compose_cfg().model), tmp_path / "tok").tokenizer


def _log_probs(tokenizer, text: str, doubt: dict[int, dict[str, float]] | None = None) -> np.ndarray:
    """Frames spelling `text` with a blank between letters; frame i of `doubt` spreads its mass over letters."""
    vocab, frames = tokenizer.get_vocab(), []
    for index, char in enumerate(text):
        weights = (doubt or {}).get(index, {char: 0.98})
        row = np.full(len(vocab), 1e-4)
        for letter, p in weights.items():
            row[vocab["|" if letter == " " else letter]] = p
        frames += [row, np.eye(len(vocab))[tokenizer.pad_token_id] * 0.98 + 1e-4]
    probs = np.asarray(frames)
    return np.log(probs / probs.sum(-1, keepdims=True))


@pytest.mark.fast
def test_builder_on_a_tiny_corpus(tmp_path):
    info = build_lm(LM_TEXT, tmp_path, _lm_cfg(), "hand-written", test_texts=["the rat sat on my hat"])
    assert {"lm.arpa", "lm.bin", "unigrams.txt", "lm.json"} <= {p.name for p in tmp_path.iterdir()}
    assert info["order"] == 3 and info["sentences"] == 7 and info["vocabulary"] == 13 and info["test_overlap"] == 0
    assert "\\3-grams:" in (tmp_path / "lm.arpa").read_text()
    assert (tmp_path / "unigrams.txt").read_text().split()[:2] == ["the", "cat"]  # most frequent first
    model = kenlm.Model(str(tmp_path / "lm.bin"))
    assert model.order == 3
    assert model.score("the cat sat on the mat") > model.score("mat the on sat cat the") + 3  # word order was learned


@pytest.mark.fast
def test_builder_refuses_test_sentences_or_warns_loudly(tmp_path, caplog):
    with pytest.raises(LMError, match="contains 1 of the 2 test sentences.*lm.test_overlap=warn"):
        build_lm(LM_TEXT, tmp_path / "a", _lm_cfg(), "x", test_texts=["the cat ate the rat", "no such line"])
    with pytest.raises(LMError, match="contains 1 of"):  # inside a longer line counts too
        build_lm(LM_TEXT, tmp_path / "b", _lm_cfg(), "x", test_texts=["sat on a"])
    info = build_lm(LM_TEXT, tmp_path / "c", _lm_cfg("lm.test_overlap=warn"), "x", test_texts=["the cat ate the rat"])
    assert info["test_overlap"] == 1 and "DO NOT REPORT TEST WER" in caplog.text.upper()


@pytest.mark.fast
def test_missing_lmplz_names_the_fix(tmp_path):
    with pytest.raises(LMError, match="make lmplz"):
        build_lm(LM_TEXT, tmp_path, _lm_cfg(f"lm.lmplz={tmp_path / 'nowhere'}"), "x", test_texts=[])


@pytest.mark.fast
def test_alphabet_from_the_tokenizer(tmp_path):
    tokenizer = _tokenizer(tmp_path)
    labels, columns = ctc_alphabet(tokenizer, len(tokenizer))
    assert labels[list(columns).index(tokenizer.pad_token_id)] == ""
    assert labels[list(columns).index(tokenizer.word_delimiter_token_id)] == " "
    assert labels[list(columns).index(tokenizer.unk_token_id)] == UNK_LABEL
    assert set(labels) - {"", " ", UNK_LABEL} == set("".join(LM_TEXT + ["cut"]).replace(" ", ""))


@pytest.mark.fast
def test_lm_flips_a_word_that_greedy_and_plain_beam_get_wrong(tmp_path):
    tokenizer = _tokenizer(tmp_path)
    build_lm(LM_TEXT, tmp_path / "lm", _lm_cfg(), "hand-written", test_texts=[])
    spoken = "the cat sat"  # the acoustics prefer "u" over "a" in the second word
    log_probs = _log_probs(tokenizer, spoken, {5: {"u": 0.6, "a": 0.38}})
    greedy = CTCDecoder("greedy", tokenizer, len(tokenizer))
    beam = CTCDecoder("beam", tokenizer, len(tokenizer))
    with_lm = CTCDecoder("beam_lm", tokenizer, len(tokenizer), tmp_path / "lm", BeamSettings(alpha=0.8, beta=1.0))
    assert greedy.decode(log_probs) == beam.decode(log_probs) == "the cut sat"
    assert with_lm.decode(log_probs) == "the cat sat"
    with_lm.set_weights(0.0, 0.0)  # no LM weight: the acoustics win again
    assert with_lm.decode(log_probs) == "the cut sat"
    # padded frames never reach the decoder: a clean utterance decodes the same by every decoder
    clean = _log_probs(tokenizer, "the mat")
    assert greedy.decode(clean) == beam.decode(clean) == with_lm.decode(clean) == "the mat"


@pytest.mark.fast
def test_tuner_finds_a_known_optimum():
    def score(alpha: float, beta: float) -> tuple[float, float]:
        return (alpha - 1.2) ** 2 + (beta - 0.7) ** 2, abs(alpha - 1.2)

    result = tune_weights(score, (0.0, 3.0), (-2.0, 5.0), trials=60, seed=0, start=(0.5, 1.5))
    assert abs(result["alpha"] - 1.2) < 0.3 and abs(result["beta"] - 0.7) < 0.5
    assert result["trials"][0]["alpha"] == 0.5 and len(result["trials"]) == 60  # the start point is tried first
    assert result["wer"] == min(t["wer"] for t in result["trials"])


@pytest.mark.fast
def test_unknown_decoder_and_missing_lm_name_the_fix(tmp_path):
    tokenizer = _tokenizer(tmp_path)
    with pytest.raises(LMError, match="choose one of greedy, beam, beam_lm"):
        CTCDecoder("viterbi", tokenizer, len(tokenizer))
    with pytest.raises(LMError, match="python -m asr.lm build"):
        CTCDecoder("beam_lm", tokenizer, len(tokenizer), tmp_path / "no-lm")


# ---- on a trained model ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_with_lm(learned, tmp_path_factory):
    """A copy of the trained run (its model folder gains an LM) with the LM built and tuned by the commands' code."""
    cfg, run_dir, metrics = learned
    copy = tmp_path_factory.mktemp("lm-run")
    for name in (".hydra", "model"):
        shutil.copytree(run_dir / name, copy / name)
    common = [f"run_dir={copy}", f"paths.cache_dir={SESSION_DIR / 'cache'}", "tracking.experiment=test-lm"]
    info = build(compose_cfg(*common, "command=build", config_name="language_model"), copy / "lm-build-log")
    tuned = tune(
        compose_cfg(*common, "command=tune", "lm.tune.trials=8", config_name="language_model"), copy / "lm-tune-log"
    )
    return copy, metrics, info, tuned


def test_build_and_tune_on_a_run(run_with_lm):
    run_dir, metrics, info, tuned = run_with_lm
    assert info["source"].startswith("train split") and info["sentences"] == 400 and info["test_overlap"] == 0
    saved = json.loads((run_dir / "model" / "lm" / "lm.json").read_text())
    assert saved["alpha"] == tuned["alpha"] and saved["tuned"]["split"] == "dev" and len(tuned["trials"]) == 8
    assert tuned["wer"] <= tuned["trials"][0]["wer"]  # never worse on dev than where it started
    assert (run_dir / "lm-tune-log" / "tune.json").is_file()
    with pytest.raises(LMError, match="lm.tune.split=dev"):
        tune(compose_cfg(f"run_dir={run_dir}", "lm.tune.split=test", config_name="language_model"), run_dir / "x")


def test_evaluate_with_each_decoder(run_with_lm, tmp_path):
    run_dir, metrics, info, tuned = run_with_lm
    common = [f"run_dir={run_dir}", f"paths.cache_dir={SESSION_DIR / 'cache'}", "tracking.experiment=test-lm"]
    greedy = evaluate(compose_cfg(*common, "decoder=greedy", config_name="evaluate"), tmp_path / "greedy")
    assert greedy["wer"] == metrics["test_wer"]  # the same numbers as training's greedy test decoding
    cached = list((SESSION_DIR / "cache" / "logits").glob("test-*.npz"))
    assert cached  # saved once, reused by the next evaluations
    auto = evaluate(compose_cfg(*common, config_name="evaluate"), tmp_path / "auto")  # the model has an LM now
    assert auto["decoding"]["decoder"] == "beam_lm" and auto["decoding"]["alpha"] == pytest.approx(tuned["alpha"])
    assert (
        "verdict" in auto["versus_greedy"]["wer"]
        and "Against greedy decoding" in (tmp_path / "auto" / "report.md").read_text()
    )
    beam = evaluate(compose_cfg(*common, "decoder=beam", "lm.beam_width=8", config_name="evaluate"), tmp_path / "beam")
    assert beam["decoding"] == {**beam["decoding"], "decoder": "beam", "beam_width": 8}


def test_transcribe_uses_the_models_lm(run_with_lm, tmp_path, capsys):
    run_dir, metrics, info, tuned = run_with_lm
    rows = load_splits(OmegaConf.load(run_dir / ".hydra" / "config.yaml").dataset)["test"].select(range(3))
    files = [str(tmp_path / f"{i}.wav") for i in range(3)]
    for row, path in zip(rows, files):
        audio, rate = sf.read(row["audio_path"])
        sf.write(path, audio, rate)
    outputs = {}
    for decoder in ("auto", "greedy", "beam_lm"):
        assert transcribe.main([str(run_dir / "model"), *files, "--json", "--decoder", decoder]) == 0
        outputs[decoder] = [json.loads(line)["text"] for line in capsys.readouterr().out.splitlines()]
    assert outputs["auto"] == outputs["beam_lm"] and all(outputs["auto"])
    vocabulary = set((run_dir / "model" / "lm" / "unigrams.txt").read_text().split())
    unknown = {
        name: sum(word not in vocabulary for text in texts for word in text.split()) for name, texts in outputs.items()
    }
    assert unknown["beam_lm"] <= unknown["greedy"]  # the LM steers towards words it knows


def test_transcribe_without_an_lm_names_the_fix(learned, tmp_path):
    cfg, run_dir, metrics = learned
    wav = tmp_path / "a.wav"
    sf.write(wav, np.zeros(16000, dtype="float32"), 16000)
    # a user error (LMError is a ConfigError): asr.cli prints it as one line
    with pytest.raises(LMError, match="no language model in .* Fix: python -m asr.lm build"):
        transcribe.main([str(run_dir / "model"), str(wav), "--decoder", "beam_lm"])


def test_lm_command_line_errors_are_one_line(tmp_path):
    for args, status in (([], 2), (["build", f"hydra.run.dir={tmp_path}", "tracking.enabled=false"], 1)):
        result = subprocess.run(
            [sys.executable, "-m", "asr.lm", *args], cwd=REPO_DIR, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == status and result.stderr.startswith("error: "), result.stderr[-2000:]
        assert result.stderr.count("\n") == 1 and "Fix:" in result.stderr


def test_training_run_reports_lm_wer_beside_greedy(tmp_path):
    from asr import pipeline

    cfg = compose_cfg(
        f"dataset.cache_dir={SESSION_DIR / 'corpus'}",
        f"paths.cache_dir={SESSION_DIR / 'cache'}",
        "dataset.sizes.train=400",
        "dataset.sizes.dev=40",
        "dataset.sizes.test=40",
        "debug=fast",
        "lm.after_training=true",
        "lm.tune.trials=3",
        "tracking.experiment=test-lm",
    )
    metrics = pipeline.run(cfg, tmp_path, overrides=["lm.after_training=true"])
    assert {"test_wer", "test_lm_wer", "test_lm_cer", "test_lm_wer_p_value"} <= set(metrics)
    assert json.loads((tmp_path / "metrics.json").read_text())["test_lm_wer"] == metrics["test_lm_wer"]
    info = json.loads((tmp_path / "model" / "lm" / "lm.json").read_text())
    assert info["alpha"] == metrics["test_lm_alpha"] and info["sentences"] == 64 and info["test_overlap"] == 0
    assert len((tmp_path / "predictions_test_lm.jsonl").read_text().splitlines()) == 16


def test_lm_settings_that_would_fail_are_refused_before_training(tmp_path):
    """lm.after_training=true without lmplz: one line and exit 1 before any training step, not after hours."""
    result = subprocess.run(
        [
            sys.executable,
            "train.py",
            "lm.after_training=true",
            "lm.lmplz=/nonexistent/lmplz",
            "debug=fast",
            *SMALL_CORPUS,
            f"hydra.run.dir={tmp_path}",
        ],
        cwd=REPO_DIR,
        capture_output=True,
        text=True,
        timeout=300,
    )
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and last.startswith("error: KenLM's lmplz was not found"), result.stderr[-2000:]
    assert "Traceback" not in result.stderr and not (tmp_path / "checkpoints").exists()


def test_lm_step_failing_after_training_keeps_the_runs_metrics(tmp_path):
    """lmplz failing after training (here on a bad lm.memory) loses nothing: metrics.json, the MLflow
    metrics and the model stay, the run is FINISHED with the LM's error as a tag."""
    from mlflow.tracking import MlflowClient

    from asr import pipeline

    cfg = compose_cfg(*SMALL_CORPUS, "debug=fast", "lm.after_training=true", "lm.memory=notasize")
    metrics = pipeline.run(cfg, tmp_path, overrides=["lm.after_training=true", "lm.memory=notasize"])
    assert "test_wer" in metrics and "test_lm_wer" not in metrics
    assert json.loads((tmp_path / "metrics.json").read_text())["test_wer"] == metrics["test_wer"]
    run = MlflowClient().get_run(json.loads((tmp_path / "mlflow_run.json").read_text())["run_id"])
    assert run.info.status == "FINISHED" and "lmplz failed" in run.data.tags["lm_error"]
    assert run.data.metrics["test_wer"] == pytest.approx(metrics["test_wer"])
