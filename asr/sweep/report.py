"""What a finished (or interrupted) study tells its user: leaderboard, best.yaml, plots.

`best.yaml` is a Hydra experiment file, so the winner is re-run (longer, on more data, on a
cluster) with `python train.py experiment=best_<study>` instead of copying numbers by hand.
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from optuna.trial import FrozenTrial, TrialState

from asr.sweep.space import to_overrides
from asr.sweep.spec import EPOCHS, SweepSpec
from asr.sweep.trial import CONF_DIR, counted

log = logging.getLogger(__name__)

# Groups that train.yaml lists after `experiment`: an experiment file cannot `override` them, so
# best.yaml includes their (global-package) option directly.
INCLUDED_GROUPS = ("experiment", "debug")


def trial_steps(trial: FrozenTrial) -> int:
    """Optimizer steps a trial trained: its final step, or the last evaluation before it stopped; with
    sweep.fidelity=branches, its trunk's steps plus its branches'."""
    if "optimizer_steps" in trial.user_attrs:
        return int(trial.user_attrs["optimizer_steps"])
    metrics = trial.user_attrs.get("metrics") or {}
    if "train_steps" in metrics:
        return int(metrics["train_steps"])
    return max(trial.intermediate_values, default=0)


def leaderboard(study: optuna.Study) -> pd.DataFrame:
    """One row per trial, best first: value, state, parameters, steps trained, why it stopped."""
    rows = []
    for trial in counted(study.get_trials(deepcopy=False)):
        metrics = trial.user_attrs.get("metrics") or {}
        rows.append(
            {
                "trial": trial.number,
                "state": trial.state.name,
                "value": trial.value,
                **trial.params,
                "steps": trial_steps(trial),
                "test_wer": metrics.get("test_wer"),
                "minutes": round(trial.duration.total_seconds() / 60, 1) if trial.duration else None,
                "note": trial.user_attrs.get("fail_reason")
                or (
                    f"pruned at step {trial.user_attrs['pruned_at_step']}"
                    if "pruned_at_step" in trial.user_attrs
                    else ""
                )
                + (f" (OOM: retried with {trial.user_attrs['oom_retry']})" if "oom_retry" in trial.user_attrs else ""),
                "mlflow_run_id": trial.user_attrs.get("mlflow_run_id", ""),
            }
        )
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    ascending = study.direction == optuna.study.StudyDirection.MINIMIZE
    complete = table["state"] == "COMPLETE"
    return pd.concat(
        [
            table[complete].sort_values(["value", "trial"], ascending=[ascending, True]),
            table[~complete].sort_values("trial"),
        ]
    ).reset_index(drop=True)


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:  # no COMPLETE trial yet
        return None


def experiment_yaml(overrides: list[str], header: str) -> str:
    """Overrides → a `# @package _global_` experiment file: groups in `defaults`, values nested."""
    defaults: list = []
    values = OmegaConf.create({})
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group
        if key.startswith(("hydra", "sweep")) or override.is_delete():
            continue
        value = override.value()
        if key in INCLUDED_GROUPS:
            defaults.append(f"/{key}/{value}")
        elif (CONF_DIR / key.replace(".", "/")).is_dir():
            defaults.append({f"override /{key.replace('.', '/')}": value})
        else:
            OmegaConf.update(values, key, value, force_add=True)
    body = OmegaConf.to_yaml(
        OmegaConf.create({"defaults": defaults, **OmegaConf.to_container(values)}) if defaults else values
    )
    # like every file in conf/, each setting says where it comes from
    lines = [
        line + "  # from the sweep (see Overrides above)" if re.match(r"^\s*[\w.]+:\s*[^\s#]", line) else line
        for line in body.splitlines()
    ]
    return f"# @package _global_\n{header}" + "\n".join(lines) + "\n"


def best_experiment_name(spec: SweepSpec) -> str:
    """`best_<study>`: the experiment option best.yaml is exported as (`train.py experiment=best_<study>`)."""
    return "best_" + re.sub(r"[^A-Za-z0-9_]+", "_", spec.study["study_name"]).strip("_")


def write_best_yaml(study: optuna.Study, spec: SweepSpec) -> Path | None:
    """best.yaml in the sweep folder, and a copy in sweep.export_dir as best_<study>.yaml."""
    best = best_trial(study)
    if best is None:
        return None
    params = dict(best.params)
    if spec.fidelity == "branches":  # a finished trial's value is its longest rung's branch
        params[EPOCHS] = spec.rungs()[-1]
    overrides = spec.trial_overrides(params)
    name = best_experiment_name(spec)
    header = (
        f"# Best trial ({best.number}, {spec.study['metric']} {best.value:.4f}) of Optuna study "
        f"{spec.study['study_name']!r}, written by sweep.py.\n"
        f"# Re-run it: python train.py experiment={name}\n"
        f"# Overrides: {' '.join(overrides)}\n"
    )
    text = experiment_yaml(overrides, header)
    spec.dir.mkdir(parents=True, exist_ok=True)
    (spec.dir / "best.yaml").write_text(text)
    export_dir = spec.study.get("export_dir")
    if export_dir:
        Path(export_dir).mkdir(parents=True, exist_ok=True)
        (Path(export_dir) / f"{name}.yaml").write_text(text)
    return spec.dir / "best.yaml"


def _save(axes, path: Path) -> Path:
    figure = np.atleast_1d(axes).flat[0].figure
    figure.set_size_inches(max(6.4, figure.get_size_inches()[0]), 4.8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(figure)
    return path


def write_plots(study: optuna.Study, out_dir: Path) -> list[Path]:
    """History, parameter importances, intermediate values (the pruning picture), WER vs each parameter."""
    import matplotlib

    matplotlib.use("Agg")
    from optuna.importance import PedAnovaImportanceEvaluator
    from optuna.visualization import matplotlib as plots

    out_dir.mkdir(parents=True, exist_ok=True)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    reported = [t for t in study.get_trials(deepcopy=False) if t.intermediate_values]
    made = []
    jobs = {
        "optimization_history.png": (len(complete) >= 1, lambda: plots.plot_optimization_history(study)),
        "intermediate_values.png": (len(reported) >= 1, lambda: plots.plot_intermediate_values(study)),
        "wer_vs_params.png": (len(complete) >= 1 and bool(complete[0].params), lambda: plots.plot_slice(study)),
        "param_importances.png": (
            len(complete) >= 3 and len(complete[0].params) >= 2,
            lambda: plots.plot_param_importances(study, evaluator=PedAnovaImportanceEvaluator()),
        ),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna's matplotlib backend is marked experimental
        for name, (possible, draw) in jobs.items():
            if not possible:
                continue
            try:
                made.append(_save(draw(), out_dir / name))
            except Exception as err:  # noqa: BLE001  (a plot must never lose the study's results)
                log.warning("could not draw %s: %s", name, err)
    return made


def summarize(study: optuna.Study, spec: SweepSpec) -> tuple[pd.DataFrame, list[Path]]:
    """Print the leaderboard and best trial; write leaderboard.csv, best.yaml and plots to the sweep folder."""
    table = leaderboard(study)
    files: list[Path] = []
    if table.empty:
        log.info("study %r has no trials yet", study.study_name)
        return table, files
    spec.dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(spec.dir / "leaderboard.csv", index=False)
    files.append(spec.dir / "leaderboard.csv")
    counts = table["state"].value_counts().to_dict()
    with pd.option_context("display.max_columns", None, "display.width", 200, "display.max_colwidth", 60):
        print(
            f"\nStudy {study.study_name!r}: {len(table)} trials "
            f"({', '.join(f'{v} {k.lower()}' for k, v in counts.items())}), "
            f"{int(table['steps'].sum())} train steps in "
            f"all\n{table.drop(columns=['mlflow_run_id']).head(20).to_string(index=False)}"
        )
    best = best_trial(study)
    if best is not None:
        best_file = write_best_yaml(study, spec)
        files.append(best_file)
        name = best_experiment_name(spec)
        print(
            f"\nBest: trial {best.number}, {spec.study['metric']} {best.value:.4f}: "
            f"{' '.join(to_overrides(best.params))}\n"
            f"  {best_file}"
            + (f"; re-run it with: python train.py experiment={name}" if spec.study.get("export_dir") else "")
        )
    files += write_plots(study, spec.dir / "plots")
    return table, files
