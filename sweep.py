"""Run an Optuna study over train.py's config: sampled trials, pruning on eval WER, parallel workers.

    python sweep.py                                      # the default study (make sweep)
    python sweep.py sweep=lr_epochs experiment=seed dataset=openslr54 sweep.workers=4
    python sweep.py hydra/launcher=slurm sweep.workers=16 ...   # workers as a SLURM job array
    python sweep.py sweep.report_only=true               # leaderboard, best.yaml, plots of the study so far

Rerunning the same command resumes the study (same name and storage) until sweep.n_trials is reached.
"""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import asr  # noqa: F401  (thread policy; registers the ${repo_dir:} resolver used in conf/)
from asr import cli
from asr.hydra_seam import submitit_launcher
from asr.plan import print_study_plan
from asr.sweep import run_study
from asr.sweep.report import best_trial
from asr.sweep.spec import spec_from_config


@hydra.main(version_base="1.3", config_path="conf", config_name="study")
def main(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    with cli.user_errors():
        spec = spec_from_config(cfg, hydra_cfg.overrides.task)
        if cfg.sweep.plan:  # the trials' configs checked and their GPU-hours, nothing started
            raise SystemExit(print_study_plan(spec))
        launcher = submitit_launcher(hydra_cfg.launcher)  # workers as submitit jobs; else processes here
        best = best_trial(run_study(spec, launcher, report_only=cfg.sweep.report_only))
    return best.value if best else None


if __name__ == "__main__":
    cli.run(main)
