"""What to score and on what: a training run's model and data (run_dir=, mlflow_run=, or model_dir= with a
dataset), loaded and audited as training scored them. Shared by `asr.evaluate` and `asr.lm`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf, open_dict

from asr.audit import run_audit
from asr.errors import ConfigError
from asr.inference import load_model
from asr.prepare import features_for, load_normalised
from asr.records import RunRecord
from asr.tracking import tracking_uri


@dataclass
class Source:
    """Where a model comes from: its folder, the data and audit settings it was trained with, its MLflow run."""

    model_dir: Path
    dataset: DictConfig
    audit: DictConfig
    train_run_id: str | None


@dataclass
class ScoringSplit:
    """One split ready to score: the model, its processor, the audited split and its references."""

    source: Source
    model: object
    processor: object
    split: Dataset
    references: list[str]


def resolve_source(cfg: DictConfig) -> Source:
    """Model folder, dataset and audit configs and training run id from run_dir | mlflow_run | model_dir."""
    train_run_id, run_dir = None, None
    if cfg.mlflow_run:
        run_dir, train_run_id = _run_folder_of(cfg.mlflow_run, cfg.tracking.uri), cfg.mlflow_run
    elif cfg.run_dir:
        run_dir = Path(cfg.run_dir)
    if run_dir is not None:
        config = run_dir / ".hydra" / "config.yaml"
        if not config.is_file() or not (run_dir / "model").is_dir():
            raise ConfigError(
                f"{run_dir} is not a finished training run (no .hydra/config.yaml or model/). "
                "Fix: run_dir=<a train.py run folder>, e.g. outputs/<date>/<time>"
            )
        train_cfg = OmegaConf.load(config)
        record = RunRecord.read(run_dir)
        train_run_id = train_run_id or (record.run_id if record else None)
        return Source(
            run_dir / "model",
            cfg.get("dataset") or train_cfg.dataset,
            train_cfg.get("audit") or cfg.audit,
            train_run_id,
        )
    if cfg.model_dir and cfg.get("dataset"):
        if not Path(cfg.model_dir).is_dir():
            raise ConfigError(
                f"model_dir={cfg.model_dir} does not exist. Fix: a folder saved by train.py (<run folder>/model)"
            )
        return Source(Path(cfg.model_dir), cfg.dataset, cfg.audit, None)
    if cfg.model_dir:
        raise ConfigError(
            "model_dir= needs the data to score it on. Fix: add dataset=<name> and its settings, "
            "e.g. dataset=manifest dataset.train=... dataset.test=..."
        )
    raise ConfigError(
        "nothing to evaluate. Fix: run_dir=<training run folder>, mlflow_run=<run id>, "
        "or model_dir=<model folder> dataset=<name> (see conf/evaluate.yaml)"
    )


def _run_folder_of(run_id: str, uri: str | None) -> Path:
    """The output folder of a training run, found through its MLflow run."""
    client = MlflowClient(tracking_uri(uri))
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        raise ConfigError(
            f"no MLflow run {run_id} in {client.tracking_uri}. Fix: copy the id from the UI or "
            "mlflow_run.json, and set MLFLOW_TRACKING_URI (or tracking.uri) to the store that has it"
        ) from err
    if "output_dir" not in run.data.tags:
        raise ConfigError(
            f"MLflow run {run_id} is not a training run of this project (no output_dir tag). "
            "Fix: pick the training run, or use model_dir=<folder> dataset=<name>"
        )
    return Path(run.data.tags["output_dir"])


def scoring_split(cfg: DictConfig, split_name: str, output_dir: Path) -> ScoringSplit:
    """The model of `cfg`'s source and its split `split_name`, audited as training scored it
    (the audit's report goes to output_dir/data_audit.json)."""
    source = resolve_source(cfg)
    dataset_cfg = source.dataset
    with open_dict(cfg):  # the evaluation is filed in the training run's experiment (asr-${dataset.name})
        cfg.dataset = dataset_cfg
    splits = load_normalised(dataset_cfg)
    model, processor = load_model(source.model_dir)
    features = features_for(splits, processor, dataset_cfg, cfg.paths.cache_dir, only=(split_name,))
    split = run_audit(
        features,
        source.audit,
        model.config,
        output_dir / "data_audit.json",  # as training scored it
        allow_missing=dataset_cfg.get("allow_missing_audio", False),
    )[0][split_name]
    # References as training scored them: the labels decoded (characters outside the train vocabulary → [UNK]).
    refs = processor.tokenizer.batch_decode(split["labels"], group_tokens=False)
    return ScoringSplit(source, model, processor, split, refs)
