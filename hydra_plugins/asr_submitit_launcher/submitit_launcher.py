"""`hydra/launcher=slurm` for `train.py -m`: hydra-submitit-launcher's SLURM launcher, except that it
waits for the jobs with asr.cluster.jobs.wait_all.

The upstream launcher waits with submitit's `job.results()`, which never returns for a job that died
before writing its result when SLURM has no accounting (see asr/cluster/jobs.py). Here such a job
becomes a failed job of the sweep: Hydra reports it and `train.py -m` exits instead of waiting forever.
Submission is the upstream launcher's, step for step.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides

from asr.cluster.jobs import wait_all
from asr.hydra_seam import submitit_executor
from hydra_plugins.hydra_submitit_launcher import submitit_launcher

log = logging.getLogger(__name__)


class SlurmLauncher(submitit_launcher.SlurmLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        executor = submitit_executor(self.params, self._EXECUTOR, self.params["submitit_folder"])
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {sweep_dir}")
        job_params = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            job_params.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
        jobs = executor.map_array(self, *zip(*job_params))
        returns = []
        for (job, result, error), (overrides, *_) in zip(wait_all(jobs), job_params):
            if error is None:
                returns.append(result)
            else:  # Hydra's sweeper raises it after the batch, like a job's own exception
                returns.append(JobReturn(overrides=overrides, status=JobStatus.FAILED, _return_value=error))
        return returns
