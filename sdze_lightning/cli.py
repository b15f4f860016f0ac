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
from hydra.errors import HydraException, InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sdze_lightning.builders import build_problem, compose_config, config_group
from sdze_lightning.callbacks.interrupt import GracefulInterrupt
from sdze_lightning.callbacks.summary import RunSummary
from sdze_lightning.config_schema import check_run_options
from sdze_lightning.loggers import check_writable, fail_safe
from sdze_lightning.problem import NonFiniteLossError, check_precision
from sdze_lightning.run_dir import (
    ConfigInCheckpoint,
    check_fresh,
    find_checkpoint,
    record_segment_config,
    resume_config,
    stored_run,
)
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


def build_loggers(cfg: DictConfig, record_config: bool = True) -> list[Any] | bool:
    """Instantiate the logger (fail-safe) and record the resolved config in it.

    With ``record_config=False`` nothing is written yet (call :func:`record_config`
    once the Trainer exists, so a bad ``trainer.*`` value leaves no files behind).
    """
    node = config_group(cfg, "logger")
    if node is None:
        return False
    logger = fail_safe(instantiate(node))
    if record_config:
        _record_config([logger], cfg)
    return [logger]


def _record_config(loggers: list[Any] | bool, cfg: DictConfig) -> None:
    for logger in loggers or []:
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
    callbacks = [*build_callbacks(cfg), *callbacks, summary, GracefulInterrupt(resume)]
    callbacks.append(ConfigInCheckpoint(config, choices, run_dir))
    if cfg.get("replay_log"):
        from sdze_lightning.replay import SeedReplayLog, check_replayable

        check_replayable(problem.method)
        callbacks.append(SeedReplayLog(dirpath=Path(run_dir) / "replay", config=config))
    loggers = build_loggers(cfg, record_config=False)
    for logger in loggers or []:
        check_writable(logger)
    trainer = instantiate(
        cfg.trainer, logger=loggers, callbacks=callbacks, **validation_cadence(cfg.trainer)
    )
    record_segment_config(run_dir, config, overrides)
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


@hydra.main(version_base="1.3", config_path="pkg://sdze_lightning.configs", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Run one training job (Hydra entry point)."""
    run_dir = HydraConfig.get().runtime.output_dir
    watch = FirstStepWatch()
    try:
        summary = train(cfg, run_dir, callbacks=[watch])
    except Exception as err:
        message = bad_input_message(err)
        if message is None or watch.reached or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"Error: {message}", file=sys.stderr, flush=True)
        sys.exit(BAD_INPUT_EXIT)
    print(json.dumps(summary), flush=True)
    if str(summary.get("status", "")).startswith("failed"):
        sys.exit(1)
    if summary.get("status") == "interrupted":
        sys.exit(130)  # as a shell reports a Ctrl-C
    return summary.get("rel_l2")


if __name__ == "__main__":
    main()
