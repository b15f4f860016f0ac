"""Fail-safe experiment loggers: a logging failure never stops training.

:func:`fail_safe` wraps the I/O methods of a Lightning logger *instance* so that
an exception inside them (a full disk, a W&B process that died, a bad value)
is reported once per method and swallowed. The logger keeps its type, so
callbacks that look for a :class:`~lightning.pytorch.loggers.WandbLogger` still
find it. The failures are kept on the logger (:func:`logger_failures`) for the
run's summary.

:class:`AppendingCSVLogger` is Lightning's ``CSVLogger`` that appends to the
``metrics.csv`` of an earlier segment of the run instead of deleting it, and
:func:`check_writable` refuses a logger directory that cannot be written before
training starts.
"""

from __future__ import annotations

import csv
import functools
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

log = logging.getLogger(__name__)

#: Logger methods that talk to the outside world.
GUARDED_METHODS: tuple[str, ...] = (
    "log_metrics",
    "log_hyperparams",
    "log_graph",
    "log_image",
    "log_table",
    "save",
    "finalize",
    "after_save_checkpoint",
)


def _guard(logger: Logger, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    reported = False

    @functools.wraps(method)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        nonlocal reported
        try:
            return method(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - the point is to survive any logger failure
            if not reported:
                logger._sdze_failures.append(f"{type(logger).__name__}.{name}: {err}")
                log.error(
                    "%s.%s failed (%s: %s); training continues without it. "
                    "Further failures of this method are not reported.",
                    type(logger).__name__,
                    name,
                    type(err).__name__,
                    err,
                )
                reported = True
            return None

    return guarded


def fail_safe(logger: Logger) -> Logger:
    """Make ``logger``'s I/O methods report and swallow exceptions; returns it."""
    if getattr(logger, "_sdze_fail_safe", False):
        return logger
    logger._sdze_failures = []  # type: ignore[attr-defined]
    for name in GUARDED_METHODS:
        method = getattr(logger, name, None)
        if callable(method):
            setattr(logger, name, _guard(logger, name, method))
    logger._sdze_fail_safe = True  # type: ignore[attr-defined]
    return logger


def logger_failures(logger: Logger) -> list[str]:
    """The failures a :func:`fail_safe` logger reported (``Class.method: error``)."""
    return list(getattr(logger, "_sdze_failures", []))


def check_writable(logger: Logger, field: str = "logger.save_dir") -> None:
    """Raise ``ValueError`` naming ``field`` if the logger's directory cannot be written.

    Creates the directory (as the logger would) and a probe file in it, then removes
    the probe.
    """
    save_dir = getattr(logger, "save_dir", None)
    if save_dir is None or "://" in str(save_dir):
        return
    folder = Path(save_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".sdze-probe-"):
            pass
    except OSError as err:
        raise ValueError(
            f"{field}={save_dir} cannot be written ({type(err).__name__}: {err.strerror or err}); "
            f"choose a writable directory for {field}."
        ) from None


class _AppendingWriter(ExperimentWriter):
    """``ExperimentWriter`` that keeps an existing ``metrics.csv`` and appends to it."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                header = next(csv.reader(file), [])
            self.metrics_keys = sorted(header)


class AppendingCSVLogger(CSVLogger):
    """Lightning's ``CSVLogger``; a later segment of a run appends to its ``metrics.csv``.

    Lightning's writer deletes an existing ``metrics.csv``: a resumed run would lose
    its history. Rows of every segment stay in one file (new columns rewrite the
    header and keep the earlier rows).
    """

    @property
    @rank_zero_experiment
    def experiment(self) -> _AppendingWriter:
        """The writer (created on first use)."""
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
