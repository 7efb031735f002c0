"""Typed schemas for the config groups code reads most: `trainer`, `branch`, `tracking`, `lm` and `sweep`.

The values and their one-line comments stay in conf/ (every trainer preset starts from
conf/shared/trainer.yaml); these dataclasses only say which keys exist and of what type. Each YAML
file pulls its schema in first (`- /schema/trainer@_here_`), so a misspelt key in a preset or an
experiment, or a value of the wrong type on the command line (`trainer.lr=fast`), is an error when
the config is composed, before any data is loaded, instead of a key silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class TrainerConf:
    epochs: int | float = MISSING
    max_steps: int | None = MISSING
    lr: int | float = MISSING
    lr_scheduler: str = MISSING
    cooldown_fraction: int | float = MISSING
    cooldown_shape: str = MISSING
    warmup_ratio: int | float = MISSING
    warmup_steps: int | None = MISSING
    weight_decay: int | float = MISSING
    max_grad_norm: int | float = MISSING
    batch_size: int = MISSING
    eval_batch_size: int = MISSING
    grad_accum: int = MISSING
    precision: str = MISSING
    gradient_checkpointing: bool = MISSING
    group_by_length: bool = MISSING
    eval_steps: int = MISSING
    save_steps: int = MISSING
    save_total_limit: int | None = MISSING
    average_checkpoints: int = MISSING
    average_checkpoints_by: str = MISSING
    logging_steps: int = MISSING
    dataloader_num_workers: int = MISSING
    batch_seconds: int | float | None = MISSING
    pad_to_multiple_of: int | None = MISSING  # frames
    bucket_edges_seconds: list[float] | None = MISSING
    optim: str = MISSING
    attn_implementation: str | None = MISSING
    tf32: bool = MISSING
    cudnn_benchmark: Any = MISSING  # true | false | auto
    cuda_alloc_conf: str | None = MISSING
    pin_memory: bool = MISSING
    peak_tflops: int | float | None = MISSING
    seed: int = MISSING
    extra: dict[str, Any] = field(default_factory=dict)  # any other TrainingArguments field
    cpu_threads: str = MISSING
    cpu_threads_check_s: int | float = MISSING


@dataclass
class BranchConf:
    role: str | None = MISSING
    trunk_dir: str | None = MISSING
    keep_forks: bool = MISSING
    lease_s: int | float = MISSING


@dataclass
class TrackingConf:
    enabled: bool = MISSING
    uri: str | None = MISSING
    experiment: str = MISSING
    run_name: str | None = MISSING


@dataclass
class LMTuneConf:
    split: str = MISSING
    trials: int = MISSING
    alpha_range: list[float] = MISSING
    beta_range: list[float] = MISSING
    seed: int = MISSING


@dataclass
class LMConf:
    path: str | None = MISSING
    text_file: str | None = MISSING
    order: int = MISSING
    prune: list[int] = MISSING
    discount_fallback: bool = MISSING
    memory: str = MISSING
    binary: bool = MISSING
    lmplz: str | None = MISSING
    test_overlap: str = MISSING
    log_files: bool = MISSING
    beam_width: int = MISSING
    beam_prune_logp: int | float = MISSING
    token_min_logp: int | float = MISSING
    alpha: int | float | None = MISSING
    beta: int | float | None = MISSING
    tune: LMTuneConf = field(default_factory=LMTuneConf)
    after_training: bool = MISSING


@dataclass
class SamplerConf:
    name: str = MISSING
    seed: int = MISSING
    n_startup_trials: int = MISSING


@dataclass
class PrunerConf:
    name: str = MISSING
    warmup_evals: int = MISSING
    n_startup_trials: int = MISSING
    percentile: int | float = MISSING
    reduction_factor: int = MISSING
    metric: str | None = MISSING


@dataclass
class SweepConf:
    study_name: str = MISSING
    dir: str = MISSING
    storage: str | None = MISSING
    export_dir: str | None = MISSING
    metric: str = MISSING
    direction: str = MISSING
    n_trials: int | None = MISSING
    timeout: int | float | None = MISSING
    workers: int = MISSING
    sampler: SamplerConf = field(default_factory=SamplerConf)
    pruner: PrunerConf = field(default_factory=PrunerConf)
    heartbeat_interval: int = MISSING
    grace_period: int = MISSING
    max_retry: int = MISSING
    oom_retry: bool = MISSING
    report_only: bool = MISSING
    plan: bool = MISSING
    fidelity: str = MISSING
    params: dict[str, Any] = field(default_factory=dict)  # key → Hydra sweep grammar (nested like the config)


SCHEMAS = {"trainer": TrainerConf, "branch": BranchConf, "tracking": TrackingConf, "lm": LMConf, "sweep": SweepConf}


def register_schemas() -> None:
    """Put the schemas in Hydra's ConfigStore as schema/<name> (conf/ files pull them in)."""
    store = ConfigStore.instance()
    for name, node in SCHEMAS.items():
        store.store(group="schema", name=name, node=node)
