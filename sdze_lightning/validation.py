"""How often a run evaluates ``val/rel_l2``: about 20 times per run, at most every 10 steps.

A fixed cadence (every 1000 steps) leaves a short run without any accuracy figure in
its log or progress bar. The default follows the run's length instead; a run without
a step limit (``trainer.max_steps=-1``, e.g. ``trainer.max_time``) evaluates every
:data:`UNBOUNDED_INTERVAL` steps. An explicit ``trainer.val_check_interval`` or
``trainer.check_val_every_n_epoch`` wins.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

#: Evaluations per run.
EVALUATIONS_PER_RUN = 20
#: Fewest steps between two evaluations (one evaluation of the held-out points costs
#: about as much as a few steps of the smallest runs).
MIN_STEPS_BETWEEN = 10
#: Steps between evaluations when the run has no step limit.
UNBOUNDED_INTERVAL = 1000


def validation_interval(max_steps: int | None) -> int:
    """Steps between evaluations of a run of ``max_steps`` steps."""
    if max_steps is None or max_steps <= 0:
        return UNBOUNDED_INTERVAL
    return max(MIN_STEPS_BETWEEN, math.ceil(max_steps / EVALUATIONS_PER_RUN))


def validation_cadence(trainer_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Trainer arguments of the default cadence (none if the config sets its own)."""
    own = ("val_check_interval", "check_val_every_n_epoch")
    if any(trainer_cfg.get(key) is not None for key in own):
        return {}
    return {
        "val_check_interval": validation_interval(trainer_cfg.get("max_steps")),
        "check_val_every_n_epoch": None,
    }
