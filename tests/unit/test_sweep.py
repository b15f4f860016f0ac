"""``sdze_lightning.sweep``: the job-status records and the :class:`SweepReport` callback.

The callback's hooks are called directly, with what Hydra's in-process launcher passes
them (``hydra.core.utils.run_job`` and ``BasicLauncher``, Hydra 1.3): the job's config
composed by Hydra with its ``hydra`` node, ``hydra.job.num`` set by the launcher,
``hydra.runtime.output_dir`` set (absolute) by ``run_job``, and a
``hydra.core.utils.JobReturn`` whose ``hydra_cfg`` is the masked copy of the ``hydra``
node that ``HydraConfig`` keeps. No sweep is launched (``tests/integration/test_cli.py``
runs real ones).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from sdze_lightning.sweep import (
    JOB_STATUS,
    SWEEP_FAILED_EXIT,
    SweepReport,
    record_job_status,
    write_status,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(autouse=True)
def clean_job_status():
    """The module-level record is shared by the process: empty around each test."""
    saved = dict(JOB_STATUS)
    JOB_STATUS.clear()
    yield
    JOB_STATUS.clear()
    JOB_STATUS.update(saved)


@pytest.fixture(scope="module")
def composed(tmp_path_factory) -> DictConfig:
    """A config as Hydra composes it (``return_hydra_config``), before any job runs."""
    folder = tmp_path_factory.mktemp("hydra_config")
    (folder / "config.yaml").write_text("lr: 0.1\nseed: 0\n")
    with initialize_config_dir(config_dir=str(folder), version_base=None):
        return compose("config", overrides=["lr=0.5"], return_hydra_config=True)


def job(composed: DictConfig, run_dir: Path, num: int, overrides: list[str],
        status: JobStatus = JobStatus.COMPLETED) -> tuple[DictConfig, JobReturn]:
    """``(config, job_return)`` of job ``num`` as ``run_job`` passes them to ``on_job_end``."""
    config = OmegaConf.create(composed)  # a copy that keeps the structured hydra node
    with read_write(config), open_dict(config):
        config.hydra.job.num = num  # BasicLauncher
        config.hydra.job.id = num
        config.hydra.runtime.output_dir = os.path.abspath(run_dir)  # run_job
        config.hydra.overrides.task = overrides
    ret = JobReturn(overrides=list(overrides), cfg=config, status=status,
                    hydra_cfg=OmegaConf.masked_copy(config, "hydra"))
    ret.return_value = None if status == JobStatus.COMPLETED else RuntimeError("boom")
    return config, ret


def summary(run_dir: Path, status: str) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "summary.json").write_text(json.dumps({"status": status, "steps": 3}))


# ------------------------------------------------------------------ the status records


def test_record_job_status_keys_by_the_normalised_directory(tmp_path):
    record_job_status(tmp_path / "a" / "." / "b", "failed: x")
    record_job_status(str(tmp_path / "c") + "/", "interrupted")
    assert JOB_STATUS == {str(tmp_path / "a" / "b"): "failed: x",
                          str(tmp_path / "c"): "interrupted"}


def test_write_status_writes_once_and_keeps_a_summary_already_there(tmp_path):
    run_dir = tmp_path / "new" / "job"
    assert write_status(run_dir, "refused: bad dim") is True  # creates the folders
    path = run_dir / "summary.json"
    assert json.loads(path.read_text()) == {"status": "refused: bad dim"}
    assert path.read_text().endswith("\n")
    before = path.read_text()
    assert write_status(run_dir, "failed: later") is False
    assert path.read_text() == before
    summary(tmp_path / "other", "completed")
    assert write_status(tmp_path / "other", "refused: x") is False
    assert json.loads((tmp_path / "other" / "summary.json").read_text())["status"] == "completed"


# ---------------------------------------------------------------------- the callback


def test_the_packaged_config_registers_the_callback():
    assert issubclass(SweepReport, Callback)
    node = OmegaConf.load(CONFIGS / "config.yaml").hydra.callbacks.sweep_report
    assert isinstance(instantiate(node), SweepReport)


def test_a_completed_sweep_reports_nothing_and_does_not_exit(composed, tmp_path, capsys):
    report = SweepReport()
    report.on_multirun_start(composed)
    for num in range(2):
        summary(tmp_path / str(num), "completed")
        report.on_job_end(*job(composed, tmp_path / str(num), num, [f"seed={num}"]))
    assert report.failed == []
    report.on_multirun_end(composed)  # no SystemExit
    assert capsys.readouterr().err == ""


def test_the_status_the_cli_recorded_is_reported_and_consumed(composed, tmp_path):
    report = SweepReport()
    report.on_multirun_start(composed)
    run_dir = tmp_path / "0"
    summary(run_dir, "completed")  # the CLI's record wins over the summary
    record_job_status(run_dir, "refused: dim must be positive")
    config, ret = job(composed, run_dir, 0, ["pde.dim=0"])
    report.on_job_end(config, ret)
    assert report.failed == [(0, ["pde.dim=0"], "refused: dim must be positive")]
    assert JOB_STATUS == {}


def test_a_job_that_raised_is_reported_as_failed(composed, tmp_path):
    report = SweepReport()
    run_dir = tmp_path / "4"
    report.on_job_end(*job(composed, run_dir, 4, ["lr=9"], status=JobStatus.FAILED))
    assert report.failed == [(4, ["lr=9"], "failed (see the error above)")]


@pytest.mark.parametrize("written,expected", [
    ("interrupted", "interrupted"),
    (None, "unknown"),  # no summary.json
    ("not json", "unknown"),  # an unreadable summary
])
def test_otherwise_the_summary_decides(composed, tmp_path, written, expected):
    run_dir = tmp_path / "1"
    if written == "not json":
        run_dir.mkdir()
        (run_dir / "summary.json").write_text("{")
    elif written is not None:
        summary(run_dir, written)
    report = SweepReport()
    report.on_job_end(*job(composed, run_dir, 1, ["seed=1"]))
    assert report.failed == [(1, ["seed=1"], expected)]


def test_a_job_return_without_a_hydra_config_is_ignored(composed, tmp_path):
    record_job_status(tmp_path, "failed: x")
    report = SweepReport()
    report.on_job_end(composed, JobReturn(status=JobStatus.FAILED))
    assert report.failed == []
    assert JOB_STATUS == {str(tmp_path): "failed: x"}  # not consumed


def test_the_end_of_a_sweep_prints_one_line_per_job_and_exits_1(composed, tmp_path, capsys):
    report = SweepReport()
    report.on_multirun_start(composed)
    summary(tmp_path / "0", "completed")
    report.on_job_end(*job(composed, tmp_path / "0", 0, ["seed=0", "lr=0.1"]))
    record_job_status(tmp_path / "1", "failed: ValueError: bad\n  second line")
    report.on_job_end(*job(composed, tmp_path / "1", 1, ["seed=1", "lr=0.1"]))
    report.on_job_end(*job(composed, tmp_path / "2", 2, ["seed=2"], status=JobStatus.FAILED))
    with pytest.raises(SystemExit) as info:
        report.on_multirun_end(composed)
    assert info.value.code == SWEEP_FAILED_EXIT == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        "sdze-train: job 1 (seed=1 lr=0.1): failed: ValueError: bad second line",
        "sdze-train: job 2 (seed=2): failed (see the error above)",
        "sdze-train: 2 job(s) of the sweep did not complete.",
    ]


def test_a_new_sweep_forgets_the_previous_one(composed, tmp_path, capsys):
    report = SweepReport()
    report.on_multirun_start(composed)
    report.on_job_end(*job(composed, tmp_path / "0", 0, [], status=JobStatus.FAILED))
    record_job_status(tmp_path / "stale", "interrupted")  # never collected
    assert report.failed
    report.on_multirun_start(composed)
    assert report.failed == [] and JOB_STATUS == {}
    report.on_multirun_end(composed)  # nothing left to report: no exit
    assert capsys.readouterr().err == ""
