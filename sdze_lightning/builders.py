"""Building a run from its config: the problem and the composed config.

Shared by ``sdze-train`` (:mod:`sdze_lightning.cli`) and ``sdze-replay``
(:mod:`sdze_lightning.replay`), which rebuilds the problem from the config
stored in a replay log; neither imports the other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig

from sdze_lightning.problem import PINNProblem


def config_group(cfg: DictConfig, key: str) -> Any:
    """A config group's node, or ``None`` when it is empty (``logger=none``)."""
    node = cfg.get(key)
    if node is None or (isinstance(node, DictConfig) and len(node) == 0):
        return None
    return node


def build_problem(cfg: DictConfig) -> PINNProblem:
    """Instantiate the problem with its injected network, estimator, method and scheduler."""
    for key in ("pde", "model", "estimator", "method"):
        node = config_group(cfg, key)
        if node is None or "_target_" not in node:  # ~pde leaves config.yaml's pde.seed
            raise ValueError(f"Config group '{key}' is empty; choose one, e.g. {key}=<name>.")
    # Run options that a resume may change: copied here, not interpolated into pde (the
    # checkpoint stores the resolved config, which would keep the first segment's values).
    extra: dict[str, Any] = {}
    for key in ("divergence", "prefetch", "fused_kernels", "threads", "output_fit"):
        if key not in cfg.pde and cfg.get(key) is not None:
            extra[key] = cfg[key]
    scheduler = instantiate(cfg.scheduler) if config_group(cfg, "scheduler") is not None else None
    estimator = instantiate(cfg.estimator)
    _check_reverse_passes(cfg, estimator)  # before the problem allocates its network
    problem = instantiate(
        cfg.pde,
        net=instantiate(cfg.model),
        estimator=estimator,
        method=instantiate(cfg.method),
        scheduler=scheduler,
        **extra,
    )
    if not isinstance(problem, PINNProblem):
        raise TypeError(
            f"pde._target_ must be a PINNProblem subclass, got {type(problem).__name__}."
        )
    return problem


def _check_reverse_passes(cfg: DictConfig, estimator: Any) -> None:
    """:func:`~sdze_lightning.input_checks.check_reverse_passes` from the config alone.

    Skipped where the values are not yet known to be good (the problem's constructor
    reports a bad ``pde.dim`` or ``pde._target_``; ``check_inputs`` checks again).
    """
    from sdze_lightning.estimators import Estimator
    from sdze_lightning.input_checks import check_reverse_passes

    try:
        operators = getattr(get_class(cfg.pde._target_), "operators", None)
    except Exception:  # noqa: BLE001 - a bad target: the constructor's call reports it
        return
    dim = cfg.pde.get("dim")
    if (isinstance(estimator, Estimator) and isinstance(dim, int) and not isinstance(dim, bool)
            and dim > 0 and operators is not None):
        check_reverse_passes(estimator, operators, dim)


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


