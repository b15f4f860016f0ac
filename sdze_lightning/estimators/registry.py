"""Estimators by name (``estimator="taylor"``), as the CLI's ``estimator=<name>`` builds them.

The names are the options of the packaged config group ``configs/estimator/``
(:mod:`sdze_lightning.config_options`): each file's ``_target_`` is the class and its
other keys are the defaults, the same for the Python API as for ``sdze-train``.
"""

from __future__ import annotations

from typing import Any

from hydra.utils import get_class, instantiate

from sdze_lightning.config_options import option_config, option_names
from sdze_lightning.estimators.base import Estimator

#: Estimator name -> the class its config instantiates (``_target_``).
ESTIMATORS: dict[str, str] = {
    name: option_config("estimator", name)._target_ for name in option_names("estimator")
}


def estimator_class(name: str) -> type[Estimator]:
    """Return the estimator class that ``estimator=<name>`` instantiates.

    Raises:
        ValueError: If no packaged estimator config has that name.

    """
    return get_class(option_config("estimator", name)._target_)


def build_estimator(name: str, **kwargs: Any) -> Estimator:
    """The estimator ``name`` with its config's defaults, overridden by ``kwargs``.

    Raises:
        ValueError: If no packaged estimator config has that name, or ``kwargs`` holds a
            bad value (the estimator's own message).

    """
    # a partial, so that the constructor's own error reaches the caller unwrapped
    return instantiate(option_config("estimator", name), _partial_=True)(**kwargs)
