"""A sweep worker process: `python -m asr.sweep.worker <sweep_spec.json> <index>` (or a submitit job).

Started by the driver (asr.sweep.driver); a worker on another machine can also be started by
hand with the same spec file, as long as it reaches the storage and the tracking server.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import asr  # noqa: F401  (registers the ${repo_dir:} resolver used in conf/)


def main(spec_path: str, index: int = 0, threads: int | None = None) -> int:
    """`threads`: CPU threads for torch when several workers share one machine's cores."""
    from asr.sweep.spec import SweepSpec
    from asr.sweep.study import work

    if threads:
        import torch

        torch.set_num_threads(threads)
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format=f"[%(asctime)s][worker {index}][%(name)s][%(levelname)s] - %(message)s"
        )
    return work(SweepSpec.load(Path(spec_path)), worker=int(index))


class Worker:
    """A worker as a submitit job (the driver's SLURM job array). submitit requeues a job whose callable
    has `checkpoint` when SLURM warns of its time limit or a preemption: the running trial saves a
    checkpoint first (asr/requeue.py), and the requeued worker queues that trial again, resumed from it."""

    def __call__(self, spec_path: str, index: int = 0, threads: int | None = None) -> int:
        return main(spec_path, index, threads)

    def checkpoint(self, *args, **kwargs):
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m asr.sweep.worker <sweep_spec.json> <worker index>")
    main(sys.argv[1], int(sys.argv[2]))
