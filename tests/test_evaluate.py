"""asr.bootstrap / asr.evaluate / asr.transcribe: numbers checked by hand, and on a trained model."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import soundfile as sf
import soxr
from conftest import SESSION_DIR, compose_cfg
from mlflow.tracking import MlflowClient
from transformers import Wav2Vec2BertForCTC

from asr import transcribe
from asr.bootstrap import bootstrap_rates, confidence_interval, paired_difference, utterance_counts, verdict
from asr.data import load_splits
from asr.evaluate import compare, evaluate
from asr.metrics import error_rates


def _eval_cfg(*overrides: str):
    return compose_cfg(*overrides, f"paths.cache_dir={SESSION_DIR / 'cache'}", config_name="evaluate")


# ---- scoring ---------------------------------------------------------------------------------


def test_utterance_counts_hand_computed():
    counts = utterance_counts(["क ख ग घ", "च छ"], ["क ग घ ङ", "च छ"])
    # 1st: ख deleted, ङ inserted → 2 word errors over 4 words; 2nd: perfect
    assert counts["word_errors"].tolist() == [2, 0] and counts["words"].tolist() == [4, 2]
    # characters (7 → 7): three substitutions ख→ग, ग→घ, घ→ङ beat two deletions + two insertions
    assert counts["char_errors"].tolist() == [3, 0] and counts["chars"].tolist() == [7, 3]
    rates = error_rates(["क ख ग घ", "च छ"], ["क ग घ ङ", "च छ"])
    assert rates["wer"] == pytest.approx(2 / 6) == counts["word_errors"].sum() / counts["words"].sum()
    assert (rates["substitutions"], rates["deletions"], rates["insertions"]) == (0, 1, 1)


@pytest.mark.fast
def test_bootstrap_interval_contains_the_estimate_and_shrinks_with_data():
    rng = np.random.default_rng(0)
    widths = []
    for n in (50, 2000):
        lengths = rng.integers(3, 12, n)
        errors = rng.binomial(lengths, 0.2)
        samples = bootstrap_rates(errors, lengths, None, resamples=1000, seed=0)
        low, high = confidence_interval(samples)
        assert low < errors.sum() / lengths.sum() < high
        widths.append(high - low)
    assert widths[1] < widths[0] / 3  # ~ 1/sqrt(40)


def test_speaker_resampling_is_wider_when_speakers_differ():
    lengths = np.full(200, 10)
    speakers = [f"s{i % 10}" for i in range(200)]
    errors = np.array([1 if i % 10 < 5 else 4 for i in range(200)])  # half the speakers are much worse
    by_utt = confidence_interval(bootstrap_rates(errors, lengths, None, 1000, 0))
    by_spk = confidence_interval(bootstrap_rates(errors, lengths, speakers, 1000, 0))
    assert by_spk[1] - by_spk[0] > 2 * (by_utt[1] - by_utt[0])


@pytest.mark.fast
def test_paired_difference_verdicts():
    lengths = np.full(300, 10)
    a = np.random.default_rng(1).binomial(10, 0.2, 300)
    same = paired_difference(a, a, lengths, None, 1000, 0)
    assert same["difference"] == 0 and verdict(same).startswith("no significant difference")
    worse = paired_difference(a, a + 2, lengths, None, 1000, 0)
    assert verdict(worse).startswith("B worse than A: WER +20.00") and worse["p_value"] < 0.01
    assert paired_difference(a + 2, a, lengths, None, 1000, 0)["b_better_share"] == 1.0


# ---- evaluate and compare on a trained model ---------------------------------------------------


def test_evaluate_reproduces_the_runs_test_wer(learned, tmp_path):
    cfg, run_dir, metrics = learned
    report = evaluate(_eval_cfg(f"run_dir={run_dir}", "batch_size=7"), tmp_path)
    assert report["wer"] == metrics["test_wer"] and report["cer"] == metrics["test_cer"]
    low, high = report["bootstrap"]["wer_ci95"]
    assert low <= report["wer"] <= high and report["bootstrap"]["unit"] == "speaker"
    assert report["hits"] + report["substitutions"] + report["deletions"] == report["words"]
    assert report["per_speaker"] and report["worst"] and report["confusions"]
    assert {"report.json", "report.md", "predictions_test.jsonl"} <= {p.name for p in tmp_path.iterdir()}
    assert "| WER |" in (tmp_path / "report.md").read_text()

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    training_run = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    experiment = client.get_run(training_run).info.experiment_id  # filed beside the training run
    runs = client.search_runs([experiment], f"tags.evaluates_run_id = '{training_run}'")
    assert runs and runs[0].data.metrics["test_wer"] == report["wer"]


def test_compare_a_model_with_itself_and_with_an_untrained_one(learned, tmp_path):
    cfg, run_dir, metrics = learned
    untrained_dir = tmp_path / "untrained"
    shutil.copytree(run_dir / ".hydra", untrained_dir / ".hydra")
    shutil.copytree(run_dir / "model", untrained_dir / "model")
    trained = Wav2Vec2BertForCTC.from_pretrained(str(run_dir / "model"))
    Wav2Vec2BertForCTC(trained.config).save_pretrained(str(untrained_dir / "model"))
    evaluate(_eval_cfg(f"run_dir={untrained_dir}", "tracking.enabled=false"), untrained_dir)

    itself = compare(_eval_cfg(f"compare=[{run_dir},{run_dir}]"), tmp_path / "same")
    assert itself["wer"]["verdict"].startswith("no significant difference")
    versus = compare(_eval_cfg(f"compare=[{run_dir},{untrained_dir}]"), tmp_path / "versus")
    assert versus["cer"]["verdict"].startswith("B worse than A") and versus["cer"]["p_value"] < 0.05
    assert (tmp_path / "versus" / "compare.json").is_file()


def test_evaluate_on_dev_gives_the_best_checkpoints_eval_wer(learned, tmp_path):
    """(The command line itself, `python -m asr.evaluate mlflow_run=... split=dev`, runs in tests/test_readme.py.)"""
    cfg, run_dir, metrics = learned
    evaluate(_eval_cfg(f"run_dir={run_dir}", "split=dev", "tracking.enabled=false"), tmp_path)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["source"]["split"] == "dev" and report["utterances"] == 40
    assert report["wer"] == metrics["eval_wer"]  # the saved model is the best checkpoint, chosen on dev


def test_nothing_to_evaluate_names_the_fix(tmp_path):
    with pytest.raises(ValueError, match="run_dir="):
        evaluate(_eval_cfg(), tmp_path)


# ---- transcribe ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def audio_files(learned, tmp_path_factory):
    cfg, run_dir, metrics = learned
    folder = tmp_path_factory.mktemp("audio")
    test_rows = load_splits(cfg.dataset)["test"]
    pieces = [sf.read(row["audio_path"], dtype="float32")[0] for row in test_rows.select(range(40))]
    long_audio, used = [], 0
    for piece in pieces:  # ~45 s of consecutive test utterances
        long_audio.append(piece)
        used += 1
        if sum(map(len, long_audio)) >= 45 * 16000:
            break
    sf.write(folder / "long.flac", np.concatenate(long_audio), 16000)
    sentences = np.concatenate(pieces[:3])  # enough letters to compare two transcripts of the 300-step model
    stereo = soxr.resample(sentences, 16000, 44100)
    sf.write(folder / "stereo.wav", np.stack([stereo, stereo], axis=1), 44100)
    sf.write(folder / "mono.flac", sentences, 16000)
    (folder / "corrupt.flac").write_bytes(b"fLaC\x00\x00\x00\x22" + bytes(40))
    return folder, run_dir / "model", [test_rows[i]["text"] for i in range(used)], pieces[:used]


def _transcribe(capsys, *args):
    code = transcribe.main([*map(str, args)])
    out = capsys.readouterr()
    return code, dict(line.split("\t", 1) for line in out.out.splitlines()), out.err


def test_transcribe_long_file_in_chunks_covers_every_part(audio_files, capsys):
    folder, model_dir, texts, pieces = audio_files
    assert sum(map(len, pieces)) / 16000 >= 45
    code, lines, _ = _transcribe(
        capsys, model_dir, folder / "long.flac", "--chunk-seconds", "10", "--stride-seconds", "2"
    )
    assert code == 0
    long_text = lines[str(folder / "long.flac")]
    for i, piece in enumerate(pieces):
        sf.write(folder / f"piece{i}.flac", piece, 16000)
    _, piece_lines, _ = _transcribe(capsys, model_dir, *[folder / f"piece{i}.flac" for i in range(len(pieces))])
    one_by_one = " ".join(piece_lines[str(folder / f"piece{i}.flac")] for i in range(len(pieces)))
    letters = lambda text: len(text.replace(" ", ""))  # noqa: E731  (the 300-step model still drops many spaces)
    assert letters(long_text) > 0.8 * letters(" ".join(texts))  # every part transcribed, not just the first chunk
    # as good as transcribing the utterances one by one, give or take the missing pauses between them
    reference = " ".join(texts)
    assert error_rates([reference], [long_text])["cer"] < error_rates([reference], [one_by_one])["cer"] + 0.15


def test_transcribe_stereo_44k_and_a_corrupt_file(audio_files, capsys):
    folder, model_dir, texts, pieces = audio_files
    code, lines, err = _transcribe(
        capsys, model_dir, folder / "mono.flac", folder / "corrupt.flac", folder / "stereo.wav"
    )
    assert code == 1
    assert "corrupt.flac" in err and "1 of 3 files could not be read" in err
    assert set(lines) == {str(folder / "mono.flac"), str(folder / "stereo.wav")}
    # the same sentences as a 44.1 kHz stereo file: resampled and down-mixed, the 300-step model spells them
    # nearly alike (a file read as interleaved samples or not resampled transcribes to garbage, CER near 1)
    assert error_rates([lines[str(folder / "mono.flac")]], [lines[str(folder / "stereo.wav")]])["cer"] < 0.3


def test_transcribe_json_lines(audio_files, capsys):
    folder, model_dir, texts, pieces = audio_files
    assert transcribe.main([str(model_dir), str(folder / "mono.flac"), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["path"] == str(folder / "mono.flac") and record["seconds"] == pytest.approx(
        sum(map(len, pieces[:3])) / 16000, abs=1e-3
    )
