"""End to end: a short real run learns, writes the run outputs and records an MLflow run."""

from __future__ import annotations

import json

import jiwer
import mlflow
import pytest
import soundfile as sf
import torch
from conftest import LEARNING_RUN, SMALL_CORPUS, compose_cfg
from mlflow.tracking import MlflowClient
from transformers import pipeline as hf_pipeline

from asr import pipeline, roles
from asr.evaluate import compare
from asr.tracking import tracking_uri


def _mlflow_run(experiment: str):
    client = MlflowClient(tracking_uri())
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id], order_by=["start_time DESC"])
    return client, runs[0]


def _training_run(output_dir):
    client = MlflowClient(tracking_uri())
    return client, client.get_run(json.loads((output_dir / "mlflow_run.json").read_text())["run_id"])


def test_cer_falls_from_chance_to_below_half(learned):
    cfg, output_dir, metrics = learned
    client, run = _training_run(output_dir)
    cer_curve = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "eval_cer"), key=lambda m: m.step)]
    assert len(cer_curve) == 7  # step 0 + every 50 steps up to 300
    assert cer_curve[0] > 0.9
    assert cer_curve[-1] < 0.5
    assert metrics["eval_cer"] < 0.5 and metrics["test_cer"] < 0.5
    assert metrics["eval_wer"] == min(m.value for m in client.get_metric_history(run.info.run_id, "eval_wer"))


def test_run_outputs(learned):
    cfg, output_dir, metrics = learned
    on_disk = json.loads((output_dir / "metrics.json").read_text())
    assert on_disk == pytest.approx(metrics)
    for key in ("eval_wer", "eval_cer", "test_wer", "test_cer", "train_runtime", "train_steps", "train_audio_seconds"):
        assert key in on_disk
    assert on_disk["train_steps"] == 300
    state = json.loads((output_dir / "checkpoints" / "checkpoint-300" / "trainer_state.json").read_text())
    assert on_disk["best_step"] == int(state["best_model_checkpoint"].rsplit("-", 1)[1])  # the tested model's
    assert 400 * 1.0 < on_disk["train_audio_seconds"] < 400 * 6.0
    predictions = [json.loads(line) for line in (output_dir / "predictions_test.jsonl").read_text().splitlines()]
    assert len(predictions) == 40 and {"id", "speaker", "reference", "hypothesis"} <= set(predictions[0])
    assert sum(p["hypothesis"] == "" for p in predictions) < 10


def test_saved_model_works_in_a_transformers_pipeline(learned):
    cfg, output_dir, metrics = learned
    asr_pipeline = hf_pipeline("automatic-speech-recognition", model=str(output_dir / "model"))
    predictions = [json.loads(line) for line in (output_dir / "predictions_test.jsonl").read_text().splitlines()]
    from asr.data import load_splits

    test_rows = load_splits(cfg.dataset)["test"]
    audio, rate = sf.read(test_rows[0]["audio_path"], dtype="float32")
    text = asr_pipeline({"raw": audio, "sampling_rate": rate})["text"]
    # one utterance alone vs. in a padded batch: the same model up to float noise, which can flip a
    # near-tie frame of a 300-step model (seen: one vowel sign in 17 characters)
    assert text and jiwer.cer(predictions[0]["hypothesis"], text) <= 0.1, (text, predictions[0]["hypothesis"])


def test_mlflow_run_holds_config_curves_and_artifacts(learned):
    cfg, output_dir, metrics = learned
    client, run = _training_run(output_dir)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == " ".join(LEARNING_RUN)  # named after the command-line overrides
    assert run.data.params["trainer.lr"] == str(cfg.trainer.lr)
    assert run.data.params["model.config.hidden_size"] == "96"
    assert "per_device_train_batch_size" not in run.data.params  # HF's 170 params are not logged
    assert run.data.tags["output_dir"] == str(output_dir.resolve())
    for tag in ("git_sha", "dataset_fingerprint", "model", "dataset"):
        assert run.data.tags[tag]
    assert run.data.metrics["test_wer"] == pytest.approx(metrics["test_wer"])
    assert len(client.get_metric_history(run.info.run_id, "loss")) >= 10
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "metrics.json", "predictions_test.jsonl", "vocab.json"} <= artifacts


def test_a_crashing_run_is_marked_failed(tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("loss is NaN at step 3")

    monkeypatch.setattr(roles.Plain, "train", crash)
    cfg = compose_cfg(*SMALL_CORPUS, "debug=fast", "tracking.experiment=test-failure")
    with pytest.raises(RuntimeError, match="NaN"):
        pipeline.run(cfg, tmp_path)
    _, run = _mlflow_run("test-failure")
    assert run.info.status == "FAILED"
    assert "loss is NaN" in run.data.tags["error"]
    mlflow.end_run()


def test_reported_best_is_the_restored_model_when_saves_are_sparser_than_evaluations():
    """trainer=seed evaluates every 300 steps and saves every 600: the lowest WER at step 300 has no
    checkpoint, so load_best_model_at_end restores step 600's, and that is what eval_wer/best_step say."""
    from asr.roles import best_eval

    history = [
        {"step": step, "eval_wer": wer, "eval_cer": wer / 2, "eval_loss": wer * 3}
        for step, wer in ((300, 0.40), (600, 0.45), (900, 0.42), (1200, 0.50))
    ]
    assert best_eval(history)["best_step"] == 300  # the lowest WER, whatever was saved
    tested = best_eval(history, restored="/run/checkpoints/checkpoint-600", tested=True)
    assert tested == {"eval_wer": 0.45, "eval_cer": 0.225, "eval_loss": 1.35, "best_step": 600}
    assert best_eval(history, tested=True)["best_step"] == 1200  # nothing restored: the final model is tested
    assert (
        best_eval(history, after_step=600, restored="/run/checkpoints/checkpoint-1200", tested=True)["best_step"]
        == 1200
    )


def test_checkpoint_averaging_tests_the_average_beside_the_runs_model(tmp_path):
    """trainer.average_checkpoints=2 average_checkpoints_by=cooldown: two checkpoints are saved evenly
    through the WSD decay (steps 25..30 of this 30-step run), off the every-10-steps saves; their weights
    are averaged, evaluated and tested beside the run's own model (which stays what model/ and test_wer
    are), saved in average/, which `asr.evaluate compare` pairs with the run."""
    from safetensors.torch import load_file

    from asr.averaging import average_weights

    overrides = [
        "trainer.average_checkpoints=2",
        "trainer.average_checkpoints_by=cooldown",
        "trainer.save_total_limit=null",
    ]
    cfg = compose_cfg(*SMALL_CORPUS, "debug=fast", "tracking.experiment=test-averaging", *overrides)
    metrics = pipeline.run(cfg, tmp_path, overrides=overrides)
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["average_seconds"] > 0
    for key in ("test_avg_wer", "test_avg_cer", "eval_avg_wer"):
        assert 0 <= on_disk[key] <= 1.5 and metrics[key] == on_disk[key]
    saved = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "checkpoints").glob("checkpoint-*"))
    assert saved == [10, 20, 27, 30]  # every eval_steps, and the decay's two
    newest = [tmp_path / "checkpoints" / f"checkpoint-{step}" for step in (27, 30)]
    averaged = load_file(str(tmp_path / "average" / "model" / "model.safetensors"))
    expected = average_weights(newest)
    assert averaged.keys() == expected.keys()
    assert all(torch.equal(averaged[name], expected[name]) for name in expected)
    own = load_file(str(tmp_path / "model" / "model.safetensors"))
    best = load_file(str(tmp_path / "checkpoints" / f"checkpoint-{on_disk['best_step']}" / "model.safetensors"))
    assert all(torch.equal(own[name], best[name]) for name in best)  # the run's own model is untouched
    assert len((tmp_path / "average" / "predictions_test.jsonl").read_text().splitlines()) == 16
    compare_cfg = compose_cfg(f"compare=[{tmp_path},{tmp_path / 'average'}]", config_name="evaluate")
    assert compare(compare_cfg, tmp_path / "compare")["utterances"] == 16
    client, run = _training_run(tmp_path)
    assert run.data.tags["averaged_checkpoints"] == "27 30"
    assert run.data.metrics["test_avg_wer"] == pytest.approx(on_disk["test_avg_wer"])
