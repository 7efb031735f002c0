"""A Hydra sweeper that runs an epoch grid as one shared trunk plus cooldown branches.

    python train.py -m trainer.epochs=8,20,40 trainer.lr_scheduler=wsd hydra/sweeper=branches

The grid's jobs run in waves through the configured launcher (in this process, local processes,
SLURM): wave k trains the trunk up to the fork of the k-th shortest length and, beside it, the
branch of the (k-1)-th, whose fork exists by then; the last wave is the longest branch. With the
basic launcher that is one job after the other; with a parallel launcher each branch runs as its
own job while the trunk goes on. Every other swept key (trainer.lr=1e-3,3e-3) gets its own trunk.
Each job is an ordinary `train.py` job with `branch.role` and `branch.trunk_dir` set (asr/roles.py
does the rest), so the MLflow parent run, summary.csv and the WER plot work as for any grid. At
the end the parent run gets the compute used and what independent runs would have used.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser

from asr.hydra_seam import basic_sweeper, override_key

log = logging.getLogger(__name__)

EPOCHS = "trainer.epochs"


class BranchesSweeper(basic_sweeper()):
    def __init__(self, trunks_dir: str, max_batch_size: int | None = None, params: dict | None = None) -> None:
        super().__init__(max_batch_size=None, params=params)
        self.trunks_dir = trunks_dir

    def sweep(self, arguments: list[str]) -> Any:
        import asr  # noqa: F401  (the ${repo_dir:} resolver)

        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        plans = self._trunk_plans(arguments)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)

        def job(folder, overrides: list[str], role: str) -> list[str]:
            return [*overrides, f"branch.role={role}", f"branch.trunk_dir={folder.path}"]

        waves = max(len(lengths) for _, lengths in plans) + 1
        returns, job_index, ran = [], 0, []
        for wave in range(waves):
            batch = []
            for folder, lengths in plans:
                if wave < len(lengths) and not self._trunk_done(folder, lengths[wave:]):
                    batch.append(job(folder, lengths[wave][1], "trunk"))
                if 0 < wave <= len(lengths):
                    epochs, overrides = lengths[wave - 1]
                    if folder.done(epochs):
                        log.info(
                            "Branch of %g epochs finished earlier (%s): not run again",
                            epochs,
                            folder.done(epochs).get("output_dir"),
                        )
                    else:
                        batch.append(job(folder, overrides, "branch"))
            if not batch:
                continue
            self.validate_batch_is_legal(batch)
            results = self.launcher.launch(batch, initial_job_idx=job_index)
            for result in results:
                _ = result.return_value  # a failed job stops the grid, as with the basic sweeper
            job_index += len(batch)
            returns.append(results)
            ran.extend(results)
        self._record_compute(plans, ran, sweep_dir)
        return returns

    def _trunk_plans(self, arguments: list[str]) -> list:
        """(trunk folder, [(epochs, overrides)] shortest first) per trunk: one per combination of the other
        swept keys; a setting that cannot share a trunk ends the command in one line."""
        from asr import branches
        from asr.cli import fail
        from asr.errors import UserError

        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        combos = self.split_arguments(parser.parse_overrides(self._parse_config() + list(arguments)), None)[0]
        groups: OrderedDict[tuple[str, ...], dict[float, list[str]]] = OrderedDict()
        for combo in combos:
            lengths = [o.split("=", 1)[1] for o in combo if override_key(o) == EPOCHS]
            if not lengths:
                fail(f"hydra/sweeper=branches forks branches of different lengths. Fix: add e.g. {EPOCHS}=8,20,40")
            rest = tuple(o for o in combo if override_key(o) != EPOCHS)
            groups.setdefault(rest, {})[float(lengths[0])] = combo
        plans = []
        for rest, by_length in groups.items():
            first = self.hydra_context.config_loader.load_sweep_config(
                self.config, list(next(iter(by_length.values())))
            )
            try:
                branches.check_settings(first)
            except UserError as err:
                fail(str(err))
            folder = branches.TrunkFolder(Path(self.trunks_dir).resolve() / branches.trunk_key(first))
            plans.append((folder, sorted(by_length.items())))
            log.info(
                "Trunk %s for %s (lengths %s)",
                folder.path,
                " ".join(rest) or "the defaults",
                ", ".join(f"{e:g}" for e in sorted(by_length)),
            )
        return plans

    @staticmethod
    def _trunk_done(folder, remaining) -> bool:
        """Every branch still to come has finished: the trunk need not go on."""
        return all(folder.done(epochs) for epochs, _ in remaining)

    def _record_compute(self, plans, results, sweep_dir: Path) -> None:
        """Optimizer steps and real audio seconds this grid trained, against independent runs of each length."""
        used_steps = used_audio = independent_steps = independent_audio = 0.0
        for result in results:
            metrics_file = Path(result.hydra_cfg.hydra.runtime.output_dir) / "metrics.json"
            if not metrics_file.is_file():
                continue
            metrics = json.loads(metrics_file.read_text())
            role = result.cfg.branch.role
            if role == "trunk":
                used_steps += metrics.get("trunk_steps", 0)
                used_audio += metrics.get("train_real_audio_seconds", 0.0)
            elif role == "branch":
                used_steps += metrics.get("branch_steps", 0)
                used_audio += metrics.get("train_real_audio_seconds", 0.0)
                independent_steps += metrics.get("train_steps", 0)
                independent_audio += result.cfg.trainer.epochs * metrics.get("train_audio_seconds", 0.0)
        summary = {
            "compute_steps": used_steps,
            "independent_steps": independent_steps,
            "compute_ratio": used_steps / independent_steps if independent_steps else float("nan"),
            "compute_audio_seconds": used_audio,
            "independent_audio_seconds": independent_audio,
        }
        (sweep_dir / "branches.json").write_text(json.dumps(summary, indent=2))
        log.info(
            "Shared trunk: %d optimizer steps for what independent runs would train in %d (%.2f)",
            used_steps,
            independent_steps,
            summary["compute_ratio"],
        )
        from asr.records import SweepRecord

        parent = SweepRecord.read(sweep_dir)
        if parent is not None:
            from mlflow.tracking import MlflowClient

            from asr.tracking import log_parent_metrics

            log_parent_metrics(MlflowClient(parent.tracking_uri), parent.parent_run_id, summary)
