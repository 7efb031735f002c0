"""Train one configuration and return its eval WER (so any Hydra sweeper can minimise it).

python train.py                            # built-in synthetic Nepali corpus, tiny model, CPU
python train.py -m trainer.epochs=8,20,40  # a grid, one job per value
"""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import asr  # noqa: F401  (thread policy; registers the ${repo_dir:} resolver used in conf/)
from asr import cli, threads
from asr.multirun import sweep_job
from asr.plan import print_plan


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    hydra_cfg = HydraConfig.get()
    threads.match_launcher(hydra_cfg.launcher)
    with cli.user_errors():
        if cfg.plan:  # plan=true: this run's config check and GPU-hours, no training (-m grids: asr.plan.PlanCallback)
            raise SystemExit(print_plan([("0", list(hydra_cfg.overrides.task), [])], "Plan of `train.py`"))
        from asr.pipeline import run  # torch and transformers load here: `--help` and plan=true need neither

        metrics = run(
            cfg, hydra_cfg.runtime.output_dir, overrides=hydra_cfg.overrides.task, sweep_job=sweep_job(hydra_cfg)
        )
    return metrics.get(cfg.optimized_metric, float("nan"))  # a trunk job of hydra/sweeper=branches has no test


if __name__ == "__main__":
    cli.run(main)
