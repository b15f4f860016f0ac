"""``sdze-train``: the Hydra entry point.

Composes ``configs/config.yaml`` (groups ``pde``, ``model``, ``estimator``,
``method``, ``trainer``, ``logger``, ``callbacks``, ``experiment``), builds the
problem with the injected network, estimator and method, and fits it with a
Lightning ``Trainer``. Every run writes ``summary.json`` into its run directory
(``hydra.run.dir``) and prints the same summary as its last line. Examples::

    sdze-train pde=poisson2d trainer.max_steps=2000 logger=csv
    sdze-train -m method=adam,sdze seed=0,1,2
    sdze-train --cfg job

Bad input (a config value, a name, a custom PDE breaking the contract) found before the
first training step is printed as one line, ``Error: <message>``, without a traceback,
and the process exits with status 2; ``HYDRA_FULL_ERROR=1`` shows the traceback.
Errors after the first step are bugs and keep theirs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.errors import (
    ConfigCompositionException,
    HydraException,
    InstantiationException,
    MissingConfigException,
    OverrideParseException,
)
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from sdze_lightning.builders import build_problem, compose_config, config_group
from sdze_lightning.callbacks.elapsed import ElapsedTime
from sdze_lightning.callbacks.interrupt import GracefulInterrupt
from sdze_lightning.callbacks.summary import RunSummary
from sdze_lightning.checkpoint_io import streaming_checkpoints
from sdze_lightning.config_schema import check_run_options
from sdze_lightning.loggers import (
    check_writable,
    fail_safe,
    is_wandb_config,
    record_wandb_run,
    wandb_run_options,
)
from sdze_lightning.problem import NonFiniteLossError, check_precision
from sdze_lightning.run_dir import (
    RANK_VARIABLES,
    ConfigInCheckpoint,
    check_fresh,
    find_checkpoint,
    is_writing_rank,
    record_segment_config,
    resume_config,
    stored_run,
)
from sdze_lightning.sweep import record_job_status, write_status
from sdze_lightning.validation import validation_cadence

log = logging.getLogger("sdze_lightning")

#: Third-party warnings that say nothing about a run of this CLI, silenced only while it
#: trains: Lightning's advice to add loader workers (the loader yields dummy step
#: numbers; points are sampled in the step) and torch's deprecation of the ``LeafSpec``
#: that Lightning's own pytree helper uses.
QUIET_WARNINGS: tuple[str, ...] = (
    r".*does not have many workers.*",
    r".*isinstance\(treespec, LeafSpec\).*",
)


@contextlib.contextmanager
def _quiet_third_party_warnings() -> Iterator[None]:
    """Ignore :data:`QUIET_WARNINGS` inside; the caller's filters are restored on exit."""
    with warnings.catch_warnings():
        for message in QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        yield


#: Exception types that mean bad input when raised before the first training step.
BAD_INPUT_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    TypeError,
    KeyError,
    FileNotFoundError,
    NotImplementedError,
    HydraException,
    OmegaConfBaseException,
)
#: Exit status of a run stopped by bad input (a failed run exits with 1).
BAD_INPUT_EXIT = 2


def build_loggers(
    cfg: DictConfig,
    record_config: bool = True,
    choices: dict[str, Any] | None = None,
    run_dir: str | Path | None = None,
    resuming: bool = False,
) -> list[Any] | bool:
    """Instantiate the logger (fail-safe) and record the resolved config in it.

    With ``record_config=False`` nothing is written yet (call :func:`record_config`
    once the Trainer exists, so a bad ``trainer.*`` value leaves no files behind).
    A ``WandbLogger`` gets its run's name, group, tags, job type and id from
    :func:`~sdze_lightning.loggers.wandb_run_options` (``choices``: the config-group
    choices, Hydra's if ``None``; ``run_dir``: where the W&B run id is stored, read back
    when ``resuming``).
    """
    node = config_group(cfg, "logger")
    if node is None:
        return False
    options = wandb_run_options(cfg, choices, run_dir, resuming) if is_wandb_config(node) else {}
    logger = fail_safe(instantiate(node, **options))
    if options:
        logger._sdze_run_dir = run_dir  # where _record_config stores the W&B run id
    if record_config:
        _record_config([logger], cfg)
    return [logger]


def _record_config(loggers: list[Any] | bool, cfg: DictConfig) -> None:
    for logger in loggers or []:
        record_wandb_run(logger, getattr(logger, "_sdze_run_dir", None))
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """Instantiate every entry of the ``callbacks`` mapping (``null`` entries are skipped)."""
    node = config_group(cfg, "callbacks")
    if node is None:
        return []
    return [instantiate(c) for c in node.values() if c is not None]


class FirstStepWatch(L.Callback):
    """Records whether training reached its first step (later errors are not bad input)."""

    def __init__(self) -> None:
        self.reached = False

    def on_train_batch_start(self, *args: Any, **kwargs: Any) -> None:
        """Mark the first step as reached."""
        self.reached = True


def bad_input_message(err: BaseException) -> str | None:
    """``err``'s message on one line if it is bad input (:data:`BAD_INPUT_ERRORS`), else ``None``.

    Hydra's ``InstantiationException`` is unwrapped to the error of the constructor it
    called (a ``RuntimeError`` there is a bug, not bad input).
    """
    while isinstance(err, InstantiationException) and err.__cause__ is not None:
        err = err.__cause__
    if not isinstance(err, BAD_INPUT_ERRORS):
        return None
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(text.split()) or type(err).__name__


@_quiet_third_party_warnings()
def train(
    cfg: DictConfig, run_dir: str | Path, callbacks: Sequence[L.Callback] = ()
) -> dict[str, Any]:
    """Build everything from ``cfg``, fit, and return the run summary.

    All validation (names, dimensions, precision, residual shape, the resume's
    overrides, the logger's directory) happens before the first optimizer step and
    before anything is written to ``run_dir``. With ``ckpt_path`` the run continues
    with the config stored in the checkpoint (:mod:`sdze_lightning.run_dir`).
    ``callbacks`` are added to the configured ones.
    """
    ckpt_path = cfg.get("ckpt_path")
    overrides, choices = _command_line(cfg)
    cfg, choices = _resume_or_start(cfg, run_dir, ckpt_path, overrides, choices)
    check_run_options(cfg)  # seed, divergence, trainer.max_steps & co.: typed
    check_precision(cfg.trainer.get("precision", "32-true"))
    if ckpt_path not in (None, "last", "best", "hpc") and not Path(ckpt_path).exists():
        raise FileNotFoundError(f"ckpt_path={ckpt_path} does not exist.")
    problem = build_problem(cfg)
    problem.check_inputs()  # before any logger, checkpoint or summary exists
    config = _plain(cfg)
    summary = RunSummary(dirpath=run_dir, echo=False)
    resume = f"sdze-train hydra.run.dir={run_dir} ckpt_path=last"
    callbacks = [*build_callbacks(cfg), *callbacks, summary, GracefulInterrupt(resume),
                 ElapsedTime()]
    callbacks.append(ConfigInCheckpoint(config, choices, run_dir))
    if cfg.get("replay_log"):
        from sdze_lightning.replay import SeedReplayLog, check_replayable

        check_replayable(problem.method)
        callbacks.append(SeedReplayLog(dirpath=Path(run_dir) / "replay", config=config))
    loggers = build_loggers(cfg, False, choices, run_dir, resuming=ckpt_path is not None)
    writer = is_writing_rank()  # the other data-parallel ranks leave the run directory alone
    for logger in (loggers or []) if writer else []:
        check_writable(logger)
    trainer = instantiate(
        cfg.trainer, logger=loggers, callbacks=callbacks, **validation_cadence(cfg.trainer),
        **streaming_checkpoints(cfg.trainer, problem),
    )
    if writer:
        record_segment_config(run_dir, config, overrides, choices)
    _record_config(loggers, cfg)  # only now: a bad trainer.* value leaves no files behind
    try:
        trainer.fit(problem, ckpt_path=ckpt_path)
    except NonFiniteLossError as err:
        log.error("%s", err)
    finally:
        _finish_wandb()
    return summary.summary or {}


def _plain(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config without Hydra's own node."""
    config = OmegaConf.to_container(cfg, resolve=True)
    config.pop("hydra", None)  # present when composed by compose_config()
    return config


def _command_line(cfg: DictConfig) -> tuple[list[str], dict[str, Any]]:
    """This command's task overrides and config-group choices (empty outside Hydra)."""
    node = cfg.get("hydra") if "hydra" in cfg else None
    if node is None and HydraConfig.initialized():
        node = HydraConfig.get()
    if node is None:
        return [], {}
    choices = {k: v for k, v in node.runtime.choices.items() if not k.startswith("hydra")}
    return list(node.overrides.task), choices


def _resume_or_start(
    cfg: DictConfig,
    run_dir: str | Path,
    ckpt_path: str | None,
    overrides: list[str],
    choices: dict[str, Any],
) -> tuple[DictConfig, dict[str, Any]]:
    """The config to train with: the checkpoint's on a resume, else ``cfg`` (a new run)."""
    if ckpt_path is None:
        if is_writing_rank():  # rank 0 has written the run's config by the time the others start
            check_fresh(run_dir)
        return cfg, choices
    path = find_checkpoint(ckpt_path, cfg, run_dir)
    stored = stored_run(path) if path is not None and path.is_file() else None
    if stored is None:
        if path is not None and path.is_file():
            log.warning("%s holds no config (an older checkpoint): resuming with this "
                        "command's config.", path)
        return cfg, choices
    resumed, choices = resume_config(cfg, stored, overrides, choices, run_dir)
    log.info("Resuming %s with its stored config (overrides applied: %s).", path,
             [o for o in overrides if not o.startswith("ckpt_path")] or "none")
    return resumed, choices


def _finish_wandb() -> None:
    """Close an open W&B run now, so its sync hints print before the summary line."""
    wandb = sys.modules.get("wandb")
    if wandb is None or getattr(wandb, "run", None) is None:
        return
    try:
        wandb.finish()
    except Exception as err:  # noqa: BLE001 - logging must never fail the run
        log.error("wandb.finish() failed: %s", err)


def run(overrides: list[str], run_dir: str | Path) -> dict[str, Any]:
    """Train like ``sdze-train <overrides> hydra.run.dir=<run_dir>`` and return the summary."""
    return train(compose_config(overrides, run_dir), run_dir)


#: Exit status of a run that failed after its first step (a NaN loss, a bug).
FAILED_EXIT = 1
#: Exit status of a run stopped by SIGINT/SIGTERM, as a shell reports a Ctrl-C.
INTERRUPTED_EXIT = 130
#: The user's environment where :func:`console` changed it for Hydra (``HYDRA_FULL_ERROR``).
_USER_ENVIRONMENT: dict[str, str | None] = {}


def _user_full_error() -> str | None:
    """``HYDRA_FULL_ERROR`` as the user set it."""
    name = "HYDRA_FULL_ERROR"
    return _USER_ENVIRONMENT[name] if name in _USER_ENVIRONMENT else os.environ.get(name)


def _full_error() -> bool:
    """Whether the user asked for tracebacks (``HYDRA_FULL_ERROR=1``)."""
    return _user_full_error() == "1"


@contextlib.contextmanager
def _users_environment() -> Iterator[None]:
    """``HYDRA_FULL_ERROR`` as the user set it inside (data-parallel ranks inherit it)."""
    during = os.environ.get("HYDRA_FULL_ERROR")
    _set_env("HYDRA_FULL_ERROR", _user_full_error())
    try:
        yield
    finally:
        _set_env("HYDRA_FULL_ERROR", during)


def _set_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def _in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _job_status(run_dir: str, status: str, exit_code: int) -> None:
    """End a job that did not complete: exit (a single run) or record it (a sweep goes on)."""
    if not _in_multirun():
        sys.exit(exit_code)
    record_job_status(run_dir, status)
    if is_writing_rank():
        write_status(run_dir, status)


def check_sweep_strategy(cfg: DictConfig) -> None:
    """Refuse a sweep job that Lightning would launch on several processes itself.

    Lightning's launcher starts the command line again for every other rank: with ``-m``
    each of those processes would run the whole sweep.
    """
    trainer = cfg.get("trainer") or {}
    strategy, devices = str(trainer.get("strategy", "auto")), trainer.get("devices", 1)
    launched = any(os.environ.get(name) is not None for name in RANK_VARIABLES)
    if "ddp" in strategy and str(devices) not in ("1", "auto") and not launched:
        raise ValueError(
            f"trainer.strategy={strategy} with trainer.devices={devices} cannot run inside a "
            "sweep (-m): Lightning would start the whole sweep again for every rank; run the "
            "jobs one at a time."
        )


@hydra.main(version_base="1.3", config_path="pkg://sdze_lightning.configs", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Run one training job (Hydra entry point).

    A single run exits with status 2 (bad input), 1 (failed) or 130 (interrupted);
    inside a multirun the job's status is recorded and the sweep goes on
    (:mod:`sdze_lightning.sweep`). Only the data-parallel rank 0 prints the summary.
    """
    run_dir = HydraConfig.get().runtime.output_dir
    watch = FirstStepWatch()
    try:
        if _in_multirun():
            check_sweep_strategy(cfg)
        with _users_environment():
            summary = train(cfg, run_dir, callbacks=[watch])
    except Exception as err:
        message = bad_input_message(err)
        if message is None or watch.reached or _full_error():
            if not _in_multirun():
                raise
            log.exception("The job failed:")
            _job_status(run_dir, f"failed: {type(err).__name__}: {err}", FAILED_EXIT)
            return None
        print(f"Error: {message}", file=sys.stderr, flush=True)
        _job_status(run_dir, f"refused: {message}", BAD_INPUT_EXIT)
        return None
    if is_writing_rank():
        print(json.dumps(summary), flush=True)
    status = str(summary.get("status", ""))
    if status.startswith("failed"):
        _job_status(run_dir, status, FAILED_EXIT)
    elif status == "interrupted":
        _job_status(run_dir, status, INTERRUPTED_EXIT)
    return summary.get("rel_l2")


def composition_error_message(err: BaseException) -> str:
    """One line for an error of Hydra's composition (an unknown option, key or override).

    An unknown option names its group and the valid choices; an unknown key says how
    to add one.
    """
    if isinstance(err, MissingConfigException) and err.options:
        group, _, name = (err.missing_cfg_file or "").rpartition("/")
        if group:
            choices = ", ".join(sorted(str(o) for o in err.options))
            return f"{group}={name} is not an option of '{group}'; choose one of: {choices}."
    cause = err.__cause__
    full_key = getattr(cause, "full_key", None)
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and full_key:
        parent, _, leaf = str(full_key).rpartition(".")
        node = getattr(cause, "parent_node", None)
        known = f" (its keys: {', '.join(sorted(map(str, node)))})" if node is not None else ""
        where = f"'{parent}'{known}" if parent else f"the config{known}"
        return (f"{full_key} is not a key of {where}; check the spelling, or add a new "
                f"key with +{full_key}=<value>.")
    lines = [str(err)]
    if err.__cause__ is not None:
        lines.append(str(err.__cause__))
    text = " ".join(" ".join(lines).split())
    return text or type(err).__name__


def console() -> None:
    """``sdze-train``: :func:`main`, with Hydra's composition errors as one line (exit 2)."""
    # Hydra prints its own errors over several lines and exits 1; with HYDRA_FULL_ERROR
    # set it raises them instead, and they are reported here as the library's own are.
    _USER_ENVIRONMENT["HYDRA_FULL_ERROR"] = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except (ConfigCompositionException, OverrideParseException) as err:
        if _full_error():
            raise
        print(f"Error: {composition_error_message(err)}", file=sys.stderr, flush=True)
        sys.exit(BAD_INPUT_EXIT)
    finally:
        _set_env("HYDRA_FULL_ERROR", _USER_ENVIRONMENT.pop("HYDRA_FULL_ERROR"))


if __name__ == "__main__":
    console()
