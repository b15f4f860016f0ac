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

import json
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sdze_lightning.callbacks.summary import RunSummary
from sdze_lightning.loggers import fail_safe
from sdze_lightning.problem import NonFiniteLossError, PINNProblem, check_precision

log = logging.getLogger("sdze_lightning")

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
warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")


def _group(cfg: DictConfig, key: str) -> Any:
    """A config group's node, or ``None`` when it is empty (``logger=none``)."""
    node = cfg.get(key)
    if node is None or (isinstance(node, DictConfig) and len(node) == 0):
        return None
    return node


def build_problem(cfg: DictConfig) -> PINNProblem:
    """Instantiate the problem with its injected network, estimator, method and scheduler."""
    for key in ("pde", "model", "estimator", "method"):
        if _group(cfg, key) is None:
            raise ValueError(f"Config group '{key}' is empty; choose one, e.g. {key}=<name>.")
    extra: dict[str, Any] = {}
    if "seed" not in cfg.pde:
        extra["seed"] = cfg.seed
    if "divergence" not in cfg.pde and cfg.get("divergence") is not None:
        extra["divergence"] = cfg.divergence
    if "prefetch" not in cfg.pde and cfg.get("prefetch") is not None:
        extra["prefetch"] = cfg.prefetch
    if "threads" not in cfg.pde and cfg.get("threads") is not None:
        extra["threads"] = cfg.threads
    scheduler = instantiate(cfg.scheduler) if _group(cfg, "scheduler") is not None else None
    problem = instantiate(
        cfg.pde,
        net=instantiate(cfg.model),
        estimator=instantiate(cfg.estimator),
        method=instantiate(cfg.method),
        scheduler=scheduler,
        **extra,
    )
    if not isinstance(problem, PINNProblem):
        raise TypeError(
            f"pde._target_ must be a PINNProblem subclass, got {type(problem).__name__}."
        )
    return problem


def build_loggers(cfg: DictConfig, record_config: bool = True) -> list[Any] | bool:
    """Instantiate the logger (fail-safe) and record the resolved config in it.

    With ``record_config=False`` nothing is written yet (call :func:`record_config`
    once the Trainer exists, so a bad ``trainer.*`` value leaves no files behind).
    """
    node = _group(cfg, "logger")
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
    node = _group(cfg, "callbacks")
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


def train(
    cfg: DictConfig, run_dir: str | Path, callbacks: Sequence[L.Callback] = ()
) -> dict[str, Any]:
    """Build everything from ``cfg``, fit, and return the run summary.

    All validation (names, dimensions, precision, residual shape) happens
    before the first optimizer step. ``callbacks`` are added to the configured ones.
    """
    check_precision(cfg.trainer.get("precision", "32-true"))
    for key in ("max_steps", "max_epochs", "log_every_n_steps", "num_sanity_val_steps"):
        value = cfg.trainer.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise ValueError(f"trainer.{key} must be an integer, got {value!r}.")
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path not in (None, "last", "best", "hpc") and not Path(ckpt_path).exists():
        raise FileNotFoundError(f"ckpt_path={ckpt_path} does not exist.")
    problem = build_problem(cfg)
    problem.check_inputs()  # before any logger, checkpoint or summary exists
    summary = RunSummary(dirpath=run_dir, echo=False)
    callbacks = [*build_callbacks(cfg), *callbacks, summary]
    if cfg.get("replay_log"):
        from sdze_lightning.replay import SeedReplayLog, check_replayable

        check_replayable(problem.method)
        config = OmegaConf.to_container(cfg, resolve=True)
        config.pop("hydra", None)  # present when composed by compose_config()
        callbacks.append(SeedReplayLog(dirpath=Path(run_dir) / "replay", config=config))
    loggers = build_loggers(cfg, record_config=False)
    trainer = instantiate(cfg.trainer, logger=loggers, callbacks=callbacks)
    _record_config(loggers, cfg)  # only now: a bad trainer.* value leaves no files behind
    try:
        trainer.fit(problem, ckpt_path=ckpt_path)
    except NonFiniteLossError as err:
        log.error("%s", err)
    finally:
        _finish_wandb()
    return summary.summary or {}


def _finish_wandb() -> None:
    """Close an open W&B run now, so its sync hints print before the summary line."""
    wandb = sys.modules.get("wandb")
    if wandb is None or getattr(wandb, "run", None) is None:
        return
    try:
        wandb.finish()
    except Exception as err:  # noqa: BLE001 - logging must never fail the run
        log.error("wandb.finish() failed: %s", err)


def compose_config(overrides: list[str], run_dir: str | Path) -> DictConfig:
    """Compose the packaged config outside a Hydra app (notebooks, benchmark scripts).

    ``${hydra:runtime.output_dir}`` resolves to ``run_dir``, as ``hydra.run.dir`` would.
    """
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    with initialize_config_module("sdze_lightning.configs", version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    return cfg


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
    return summary.get("rel_l2")


if __name__ == "__main__":
    main()
