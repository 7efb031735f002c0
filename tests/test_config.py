"""Every option of every config group composes, and the pieces build from it."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import CONF_DIR, compose_cfg
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from transformers import SeamlessM4TFeatureExtractor, Wav2Vec2BertConfig, Wav2Vec2BertModel

from asr.features import build_processor, build_vocab
from asr.hydra_seam import launcher_kind, submitit_launcher, sweeper_kind
from asr.model import build_model, load_feature_extractor
from asr.torch_setup import resolve_precision
from asr.trainer import build_training_args

pytestmark = pytest.mark.fast  # the quick tier: `make test-fast`

REQUIRED = {
    "dataset=manifest": ["dataset.train=/data/train.jsonl"],
    "dataset=openslr54": ["dataset.root=/data/openslr54"],
    "dataset=hf_hub": ["dataset.path=parquet"],
}
GROUPS = ["dataset", "model", "regularization", "trainer", "tracking", "experiment", "debug"]
OPTIONS = [f"{group}={path.stem}" for group in GROUPS for path in sorted((CONF_DIR / group).glob("*.yaml"))]


def test_every_group_has_options():
    for group in GROUPS:
        assert list((CONF_DIR / group).glob("*.yaml")), f"conf/{group}/ is empty"


@pytest.mark.parametrize("option", OPTIONS)
def test_every_option_composes_and_resolves(option):
    cfg = compose_cfg(option, *REQUIRED.get(option, []))
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert resolved["trainer"]["epochs"] > 0
    assert resolved["tracking"]["experiment"]


def test_every_yaml_setting_has_a_comment():
    """Every `key: value` line in conf/ says what it does (one-line comment)."""
    setting = re.compile(r"^\s*[\w.]+:\s*[^\s#]")
    for path in CONF_DIR.rglob("*.yaml"):
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if setting.match(line):
                assert "#" in line, f"conf/{path.relative_to(CONF_DIR)}:{lineno} has no comment: {line.strip()}"


@pytest.mark.parametrize(("launcher", "kind"), [("slurm", "slurm"), ("local_parallel", "local")])
def test_launchers_compose_over_submitit(launcher, kind):
    cfg = compose_cfg(f"hydra/launcher={launcher}", with_hydra=True)
    assert launcher_kind(cfg.hydra.launcher) == kind and submitit_launcher(cfg.hydra.launcher) is not None
    assert cfg.hydra.callbacks.mlflow_multirun._target_ == "asr.multirun.MlflowMultirunCallback"


def test_seed_grid_preset_sweeps_the_seed_epochs():
    cfg = compose_cfg("experiment=seed_8_20_40", with_hydra=True)
    assert cfg.hydra.sweeper.params["trainer.epochs"] == "8,20,40"
    assert cfg.model.name_or_path == "facebook/w2v-bert-2.0"
    assert (cfg.trainer.batch_size, cfg.trainer.grad_accum) == (4, 2)
    exp1 = compose_cfg("experiment=seed_exp1")
    assert (exp1.trainer.lr, exp1.trainer.epochs) == (1e-5, 7)


def test_unknown_option_error_lists_the_choices():
    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg("model=w2v_bert_3")
    assert "tiny" in str(err.value) and "w2v_bert_2" in str(err.value)


def test_misspelled_key_is_refused():
    with pytest.raises(ConfigCompositionException, match="trainer.lrr"):
        compose_cfg("trainer.lrr=1e-4")


@pytest.mark.parametrize("reg", ["light", "seed", "none"])
def test_every_regularization_builds_a_tiny_model(reg, tmp_path):
    cfg = compose_cfg(f"regularization={reg}")
    processor = build_processor(build_vocab(["नमस्ते साथी"]), load_feature_extractor(cfg.model), tmp_path)
    model = build_model(cfg.model, cfg.regularization, processor.tokenizer)
    for key, value in cfg.regularization.items():
        assert getattr(model.config, key) == value
    assert model.config.vocab_size == len(processor.tokenizer)
    assert model.config.pad_token_id == processor.tokenizer.pad_token_id
    assert model.wav2vec2_bert.adapter.layerdrop == 0.0


def test_unknown_regularization_key_is_refused(tmp_path):
    cfg = compose_cfg("+regularization.dropout_everywhere=0.5")
    processor = build_processor(build_vocab(["क ख"]), load_feature_extractor(cfg.model), tmp_path)
    with pytest.raises(ValueError, match="dropout_everywhere"):
        build_model(cfg.model, cfg.regularization, processor.tokenizer)


def test_pretrained_model_path_loads_a_local_checkpoint(tmp_path):
    """model=w2v_bert_2 with a local folder laid out like facebook/w2v-bert-2.0 (encoder + preprocessor)."""
    tiny = compose_cfg().model
    encoder_config = Wav2Vec2BertConfig(**OmegaConf.to_container(tiny.config))
    encoder = Wav2Vec2BertModel(encoder_config)
    encoder.save_pretrained(tmp_path)
    SeamlessM4TFeatureExtractor(feature_size=80, num_mel_bins=80, stride=2).save_pretrained(tmp_path)

    cfg = compose_cfg("experiment=seed", f"model.name_or_path={tmp_path}")
    extractor = load_feature_extractor(cfg.model)
    processor = build_processor(build_vocab(["नमस्ते साथी", "घर"]), extractor, tmp_path / "proc")
    model = build_model(cfg.model, cfg.regularization, processor.tokenizer)

    assert model.config.vocab_size == len(processor.tokenizer)
    assert model.config.layerdrop == 0.1 and model.config.mask_time_prob == 0.05
    assert model.wav2vec2_bert.adapter.layerdrop == 0.0
    loaded = model.wav2vec2_bert.encoder.layers[0].ffn1.intermediate_dense.weight
    assert torch.equal(loaded, encoder.encoder.layers[0].ffn1.intermediate_dense.weight)


def test_seed_trainer_maps_to_the_seed_training_arguments(tmp_path):
    args = build_training_args(compose_cfg("trainer=seed", "trainer.epochs=8").trainer, tmp_path)
    assert args.num_train_epochs == 8 and args.max_steps == -1
    assert args.per_device_train_batch_size == 4 and args.gradient_accumulation_steps == 2
    assert args.learning_rate == 3e-5 and args.warmup_steps == 0.1
    assert args.gradient_checkpointing and args.train_sampling_strategy == "group_by_length"
    assert args.eval_steps == 300 and args.save_steps == 600 and args.save_total_limit == 2
    assert args.load_best_model_at_end and args.metric_for_best_model == "wer" and not args.greater_is_better


def test_extra_passes_any_training_argument_through(tmp_path):
    args = build_training_args(
        compose_cfg("+trainer.extra.eval_on_start=true", "trainer.max_steps=7").trainer, tmp_path
    )
    assert args.eval_on_start and args.max_steps == 7


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_precision_on_cpu():
    assert resolve_precision("auto") == {"fp16": False, "bf16": False}
    assert resolve_precision("fp16") == {"fp16": False, "bf16": False}
    with pytest.raises(ValueError, match="fp8"):
        resolve_precision("fp8")


@pytest.mark.parametrize(
    ("overrides", "sweeper", "launcher"),
    [
        ((), "grid", "basic"),
        (("hydra/sweeper=optuna",), "optuna", "basic"),
        (("hydra/sweeper=branches", "hydra/launcher=local_parallel"), "branches", "local"),
    ],
)
def test_sweeper_and_launcher_kinds_come_from_the_plugin_classes(overrides, sweeper, launcher):
    cfg = compose_cfg(*overrides, with_hydra=True)
    assert sweeper_kind(cfg.hydra) == sweeper and launcher_kind(cfg.hydra.launcher) == launcher
    assert (submitit_launcher(cfg.hydra.launcher) is None) == (launcher == "basic")


def test_hydra_discovers_the_projects_plugins():
    """The sweepers and the launcher are found by Hydra's own plugin scan (the namespace package is
    importable as installed), and each config group names a class Hydra can instantiate."""
    from hydra.core.plugins import Plugins
    from hydra.plugins.launcher import Launcher
    from hydra.plugins.sweeper import Sweeper

    plugins = Plugins.instance()
    sweepers = {f"{c.__module__}.{c.__name__}" for c in plugins.discover(Sweeper)}
    launchers = {f"{c.__module__}.{c.__name__}" for c in plugins.discover(Launcher)}
    for group, found in (("hydra/sweeper=optuna", sweepers), ("hydra/sweeper=branches", sweepers)):
        assert compose_cfg(group, with_hydra=True).hydra.sweeper._target_ in found
    assert compose_cfg("hydra/launcher=slurm", with_hydra=True).hydra.launcher._target_ in launchers
