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

A W&B run (``logger=wandb``) gets its identity from :func:`wandb_run_options` (group,
tags, job type, the seed in its name, and the run id that a resume continues), which
:func:`record_wandb_run` stores in the run directory; :func:`update_wandb_summary` copies
the run's ``summary.json`` into the W&B run's summary.
"""

from __future__ import annotations

import csv
import json
import logging
import secrets
import string
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

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


def _report(logger: Logger, name: str, err: BaseException) -> None:
    """Record ``err`` of ``logger``'s ``name`` for the summary and log it."""
    if not hasattr(logger, "_sdze_failures"):
        logger._sdze_failures = []  # type: ignore[attr-defined]
    logger._sdze_failures.append(f"{type(logger).__name__}.{name}: {err}")
    log.error(
        "%s.%s failed (%s: %s); training continues without it. "
        "Further failures of this method are not reported.",
        type(logger).__name__,
        name,
        type(err).__name__,
        err,
    )


class _GuardedMethod:
    """``logger.<name>`` that reports and swallows its exceptions (:func:`fail_safe`).

    An object rather than a closure so that a guarded logger still pickles (``ddp_spawn``
    sends the Trainer's loggers to its processes). The method itself is looked up on the
    logger's class at each call, unless the logger had its own instance attribute.
    """

    def __init__(self, logger: Logger, name: str) -> None:
        self.logger = logger
        self.name = name
        self.own = logger.__dict__.get(name)  # an instance attribute the guard replaced
        self.reported = False
        self.__doc__ = getattr(getattr(type(logger), name, None), "__doc__", None)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the method; on an exception, report it once and return ``None``."""
        method = self.own or getattr(type(self.logger), self.name).__get__(self.logger)
        try:
            return method(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - the point is to survive any logger failure
            if not self.reported:
                _report(self.logger, self.name, err)
                self.reported = True
            return None


def fail_safe(logger: Logger) -> Logger:
    """Make ``logger``'s I/O methods report and swallow exceptions; returns it."""
    if getattr(logger, "_sdze_fail_safe", False):
        return logger
    logger._sdze_failures = []  # type: ignore[attr-defined]
    for name in GUARDED_METHODS:
        if callable(getattr(logger, name, None)):
            setattr(logger, name, _GuardedMethod(logger, name))
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


# ------------------------------------------------------------------ W&B run identity
#: Where a run directory keeps its W&B run's identity (id, name, group, tags, job type).
WANDB_RUN_RECORD = Path("wandb") / "sdze-run.json"
#: Config groups whose choices tag a W&B run (``pde:poisson2d``, ...), in this order.
WANDB_TAG_GROUPS: tuple[str, ...] = ("pde", "method", "estimator", "experiment")


def is_wandb_config(node: Any) -> bool:
    """Whether a logger config node instantiates a (subclass of) Lightning's ``WandbLogger``."""
    from hydra.utils import get_object

    target = node.get("_target_") if isinstance(node, (DictConfig, Mapping)) else None
    if not target:
        return False
    try:
        cls = get_object(str(target))
    except Exception:  # noqa: BLE001 - a bad target is reported by instantiate()
        return False
    return isinstance(cls, type) and issubclass(cls, WandbLogger)


def read_wandb_run(run_dir: str | Path) -> dict[str, Any] | None:
    """The W&B run identity stored in ``run_dir`` (:data:`WANDB_RUN_RECORD`), if any."""
    path = Path(run_dir) / WANDB_RUN_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        log.warning("%s cannot be read (%s); this segment starts a new W&B run.", path, err)
        return None
    return record if isinstance(record, dict) and record.get("id") else None


def new_wandb_run_id(length: int = 8) -> str:
    """A new random W&B run id: lowercase letters and digits, as ``wandb`` generates them.

    ``wandb.util`` of wandb 0.31 has no ``generate_id`` (it lives in the private
    ``wandb.sdk.lib.runid``); this is its alphabet and length.
    """
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(length))


def _hydra_node(cfg: DictConfig) -> Any:
    """Hydra's node: ``cfg.hydra`` (``compose_config``) or the running app's, else ``None``."""
    if "hydra" in cfg:
        return cfg.hydra
    return HydraConfig.get() if HydraConfig.initialized() else None


def _default_group(cfg: DictConfig, choices: Mapping[str, Any]) -> str | None:
    """The sweep directory in a Hydra multirun, else the ``experiment`` choice, else ``None``."""
    node = _hydra_node(cfg)
    mode = node.get("mode") if node is not None else None
    if getattr(mode, "name", mode) == "MULTIRUN":
        return str(node.sweep.dir)
    experiment = choices.get("experiment")
    return str(experiment) if experiment else None


def wandb_run_options(
    cfg: DictConfig, choices: Mapping[str, Any] | None, run_dir: str | Path | None, resuming: bool
) -> dict[str, Any]:
    """Keyword arguments of ``cfg.logger`` (a ``WandbLogger``) that name its W&B run.

    Each of ``name``, ``group``, ``tags`` and ``job_type`` is, in this order: the value the
    logger config gives (``logger.group=...``; ``logger.name`` counts only where it differs
    from the top-level ``name``); on a resume, the first segment's (:data:`WANDB_RUN_RECORD`);
    else the default: ``<name>-s<seed>``, the multirun's ``hydra.sweep.dir`` (outside a
    multirun the ``experiment`` choice, else none), ``pde:<choice>``, ``method:<choice>``,
    ``estimator:<choice>`` (and ``experiment:<choice>``), ``train``.

    The run id: ``logger.id`` if given; on a resume (``resuming``) the stored one, with
    ``resume="allow"`` (W&B continues that run); else a new one (:func:`new_wandb_run_id`)
    without resume (the stored record is written by :func:`record_wandb_run`).

    Args:
        cfg: The run's config (``cfg.logger`` is the W&B logger's node).
        choices: The config-group choices (``pde: poisson2d``, ...); ``None``: Hydra's.
        run_dir: The run directory (where the record is read); ``None``: none is read.
        resuming: Whether this command resumes a run (``ckpt_path`` given).

    Returns:
        ``id``, ``name``, ``group``, ``tags``, ``job_type`` and, unless the config sets
        it, ``resume``.

    """
    node = cfg.logger
    if choices is None:
        hydra_node = _hydra_node(cfg)
        choices = {} if hydra_node is None else dict(hydra_node.runtime.choices)
    record = (read_wandb_run(run_dir) if resuming and run_dir is not None else None) or {}

    def pick(key: str, given: Any, default: Any) -> Any:
        if given is not None:
            return given
        return record[key] if key in record else default

    name, seed = node.get("name"), cfg.get("seed")
    given_name = name if name is not None and name != cfg.get("name") else None
    default_name = name if name is None or seed is None else f"{name}-s{seed}"
    given_tags = node.get("tags")
    tags = [f"{k}:{choices[k]}" for k in WANDB_TAG_GROUPS if choices.get(k)] or None
    options: dict[str, Any] = {
        "name": pick("name", given_name, default_name),
        "group": pick("group", node.get("group"), _default_group(cfg, choices)),
        "tags": pick("tags", None if given_tags is None else list(given_tags), tags),
        "job_type": pick("job_type", node.get("job_type"), "train"),
    }
    given_id = node.get("id") or node.get("version")
    if given_id is not None:
        options["id"] = str(given_id)
    elif record:
        options["id"], options["resume"] = str(record["id"]), "allow"
    else:
        options["id"], options["resume"] = new_wandb_run_id(), None
    if "resume" in node:
        options.pop("resume", None)
    return options


@rank_zero_only
def record_wandb_run(logger: Logger, run_dir: str | Path | None) -> Path | None:
    """Store ``logger``'s W&B run identity in ``run_dir`` (rank 0; an existing record is kept).

    A resume reads it back (:func:`wandb_run_options`). A failure to write is reported
    like a logger failure (:func:`logger_failures`), never raised.

    Returns:
        The file written, or ``None`` (not a ``WandbLogger``, no run directory, a record
        already there, or the write failed).

    """
    if not isinstance(logger, WandbLogger) or run_dir is None:
        return None
    init = getattr(logger, "_wandb_init", {})
    if not init.get("id"):
        return None
    record = {k: init.get(k) for k in ("id", "project", "name", "group", "tags", "job_type")}
    record["tags"] = None if record["tags"] is None else list(record["tags"])
    path = Path(run_dir) / WANDB_RUN_RECORD
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("x") as file:  # never overwrite: the first segment's id stays
            json.dump(record, file, indent=2)
    except FileExistsError:
        return None
    except OSError as err:
        _report(logger, "record_wandb_run", err)
        return None
    return path


def update_wandb_summary(logger: Logger, summary: Mapping[str, Any]) -> bool:
    """Copy every field of ``summary`` into the W&B run's summary (``WandbLogger`` only).

    A failure is reported like a logger failure (:func:`logger_failures`), never raised.

    Returns:
        Whether the W&B summary was updated.

    """
    if not isinstance(logger, WandbLogger):
        return False
    try:
        logger.experiment.summary.update(json.loads(json.dumps(dict(summary))))
    except Exception as err:  # noqa: BLE001 - logging must never fail the run
        _report(logger, "update_wandb_summary", err)
        return False
    return True
