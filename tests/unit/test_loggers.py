"""``sdze_lightning.loggers.fail_safe``: a logger's failures are reported and swallowed, and
the guarded logger still pickles (``ddp_spawn`` sends the Trainer's loggers to its processes)."""

from __future__ import annotations

import pickle

from lightning.pytorch.loggers import CSVLogger

from sdze_lightning.loggers import fail_safe, logger_failures


class BrokenCSV(CSVLogger):
    """A CSV logger whose metrics call fails."""

    def log_metrics(self, metrics, step=None):  # noqa: D102
        raise OSError("disk full")


def test_a_failure_is_reported_once_and_training_goes_on(tmp_path):
    logger = fail_safe(BrokenCSV(tmp_path))
    assert logger.log_metrics({"a": 1.0}, step=0) is None
    assert logger.log_metrics({"a": 2.0}, step=1) is None
    assert logger_failures(logger) == ["BrokenCSV.log_metrics: disk full"]


def test_a_guarded_logger_pickles_and_the_copy_is_still_guarded(tmp_path):
    logger = fail_safe(CSVLogger(tmp_path, name="run"))
    logger.log_hyperparams({"lr": 0.1})
    copy = pickle.loads(pickle.dumps(logger))
    assert copy.log_metrics({"loss": 1.0}, step=0) is None  # the class's method, called
    copy.save()
    assert (tmp_path / "run" / "version_0" / "metrics.csv").read_text().startswith("loss,step")
    broken = pickle.loads(pickle.dumps(fail_safe(BrokenCSV(tmp_path))))
    assert broken.log_metrics({"a": 1.0}) is None
    assert logger_failures(broken) == ["BrokenCSV.log_metrics: disk full"]


def test_fail_safe_is_idempotent(tmp_path):
    logger = fail_safe(CSVLogger(tmp_path))
    guarded = logger.log_metrics
    assert fail_safe(logger) is logger and logger.log_metrics is guarded
