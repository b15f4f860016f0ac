"""Name-to-class registry of the spatial estimators (``estimator=<name>``)."""

from __future__ import annotations

import importlib
from typing import Any

from sdze_lightning.estimators.base import Estimator

#: Estimator name -> ``module:Class``; modules are imported on first use.
ESTIMATORS: dict[str, str] = {
    "exact": "sdze_lightning.estimators.exact:ExactEstimator",
    "sdgd": "sdze_lightning.estimators.sdgd:SDGDEstimator",
    "hte": "sdze_lightning.estimators.hte:HutchinsonEstimator",
    "stein": "sdze_lightning.estimators.stein:SteinEstimator",
    "fd": "sdze_lightning.estimators.fd:FiniteDifferenceEstimator",
    "taylor": "sdze_lightning.estimators.taylor:TaylorEstimator",
}


def estimator_class(name: str) -> type[Estimator]:
    """Return the estimator class registered as ``name``.

    Raises:
        ValueError: If ``name`` is not registered.

    """
    if name not in ESTIMATORS:
        raise ValueError(f"Unknown estimator {name!r}; available: {sorted(ESTIMATORS)}.")
    module, cls = ESTIMATORS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def build_estimator(name: str, **kwargs: Any) -> Estimator:
    """Instantiate the estimator ``name`` with keyword arguments ``kwargs``."""
    return estimator_class(name)(**kwargs)
