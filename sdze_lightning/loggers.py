"""Fail-safe experiment loggers: a logging failure never stops training.

:func:`fail_safe` wraps the I/O methods of a Lightning logger *instance* so that
an exception inside them (a full disk, a W&B process that died, a bad value)
is reported once per method and swallowed. The logger keeps its type, so
callbacks that look for a :class:`~lightning.pytorch.loggers.WandbLogger` still
find it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

from lightning.pytorch.loggers import Logger

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
    for name in GUARDED_METHODS:
        method = getattr(logger, name, None)
        if callable(method):
            setattr(logger, name, _guard(logger, name, method))
    logger._sdze_fail_safe = True  # type: ignore[attr-defined]
    return logger
