"""Silence Lightning's promotional tips (``litlogger``, ``litmodels``) on every run.

Lightning logs them at INFO level through its ``rank_zero`` loggers whenever a
Trainer is built without those packages. Importing :mod:`sdze_lightning` installs a
filter that drops exactly these records (their text starts with
:data:`TIP_PREFIX`); every other message passes. ``SDZE_LIGHTNING_TIPS=1`` in the
environment keeps them.
"""

from __future__ import annotations

import logging
import os

#: How Lightning's promotional tips begin.
TIP_PREFIX = "💡 Tip:"
#: The loggers Lightning's ``rank_zero_info`` writes to (fabric's or pytorch's,
#: whichever was imported last).
RANK_ZERO_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
)


class DropLightningTips(logging.Filter):
    """Drop log records that are Lightning's promotional tips."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep every record but a tip."""
        return not str(record.msg).startswith(TIP_PREFIX)


def silence_lightning_tips() -> None:
    """Install :class:`DropLightningTips` on Lightning's rank-zero loggers (once)."""
    if os.environ.get("SDZE_LIGHTNING_TIPS") == "1":
        return
    for name in RANK_ZERO_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropLightningTips) for f in logger.filters):
            logger.addFilter(DropLightningTips())
