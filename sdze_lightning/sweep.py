"""A Hydra sweep (``sdze-train -m ...``) that runs every job and reports the failed ones.

Inside a multirun, ``sdze-train`` does not stop the process when a job fails, is
refused (bad input) or is interrupted: the job's status goes into its own run
directory (``summary.json``) and into :data:`JOB_STATUS`, and the sweep goes on.
:class:`SweepReport`, a Hydra callback registered in ``configs/config.yaml``, prints
one line per job that did not complete when the sweep ends and exits with status 1
if there is any. A single run keeps its own exit codes (:mod:`sdze_lightning.cli`).

Jobs run by Hydra's default (in-process) launcher are reported; a launcher that runs
jobs in other processes leaves the statuses in the run directories only
(``sdze-collect`` gathers them).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

#: Status of each job of this process that did not complete, by run directory.
JOB_STATUS: dict[str, str] = {}
#: Exit status of a sweep in which a job did not complete.
SWEEP_FAILED_EXIT = 1


def record_job_status(run_dir: str | Path, status: str) -> None:
    """Note that the job in ``run_dir`` ended with ``status`` (not ``completed``)."""
    JOB_STATUS[str(Path(run_dir))] = status


def write_status(run_dir: str | Path, status: str) -> bool:
    """Record ``status`` as the run's ``summary.json`` if the directory has none yet.

    A summary already there belongs to a run this command did not start (it was
    refused for that reason) and is left as it is.

    Returns:
        Whether the file was written.

    """
    path = Path(run_dir) / "summary.json"
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"status": status}, indent=2) + "\n")
    return True


def _summary_status(run_dir: str) -> str | None:
    try:
        return json.loads((Path(run_dir) / "summary.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None


class SweepReport(Callback):
    """Hydra callback: after a multirun, one line per job that did not complete; exit 1."""

    def __init__(self) -> None:
        self.failed: list[tuple[int, list[str], str]] = []

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Forget the jobs of an earlier sweep in this process."""
        self.failed = []
        JOB_STATUS.clear()

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        """Note the job's status: the one the CLI recorded, else its summary's."""
        hydra_cfg = job_return.hydra_cfg
        if hydra_cfg is None:
            return
        run_dir = str(Path(hydra_cfg.hydra.runtime.output_dir))
        status = JOB_STATUS.pop(run_dir, None)
        if status is None and job_return.status == JobStatus.FAILED:
            status = "failed (see the error above)"
        if status is None:
            status = _summary_status(run_dir) or "unknown"
        if status != "completed":
            overrides = list(job_return.overrides or [])
            self.failed.append((int(hydra_cfg.hydra.job.num), overrides, status))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Print one line per job that did not complete and exit 1 if there is any."""
        if not self.failed:
            return
        for num, overrides, status in self.failed:
            first_line = " ".join(status.split())
            print(f"sdze-train: job {num} ({' '.join(overrides)}): {first_line}",
                  file=sys.stderr, flush=True)
        print(f"sdze-train: {len(self.failed)} job(s) of the sweep did not complete.",
              file=sys.stderr, flush=True)
        sys.exit(SWEEP_FAILED_EXIT)
