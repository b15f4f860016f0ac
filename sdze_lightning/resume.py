"""Resume state: what a checkpoint records so that a resumed run continues exactly.

Points and estimator directions are drawn from ``(seed, step, key, stream)``, a
method's directions and bases from ``(method seed, step/window, layer)``: no
generator state exists between steps, so the step counter (saved by Lightning) and
the seeds fix the rest of the trajectory. The checkpoint records the seeds under
:data:`CHECKPOINT_KEY`; a resume with other seeds is refused, naming the seed to use.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from sdze_lightning.methods.zeroth_order import ZerothOrderOptimizer
from sdze_lightning.stepping import inner_optimizers

if TYPE_CHECKING:
    from sdze_lightning.contract import ProblemContract

#: Key of the resume state in a Lightning checkpoint.
CHECKPOINT_KEY = "sdze_lightning"


def method_seed(optimizer: Any) -> int | None:
    """The seed of a zeroth-order method, or ``None`` (other methods, or unseeded)."""
    seed = optimizer.seed if isinstance(optimizer, ZerothOrderOptimizer) else None
    return int(seed) if isinstance(seed, numbers.Integral) else None


def resume_state(seed: int, optimizers: Iterable[Any], skipped_steps: int) -> dict[str, Any]:
    """The state a resumed run must share: the problem's and the methods' seeds."""
    return {
        "seed": int(seed),
        "method_seeds": [method_seed(o) for o in optimizers],
        "skipped_steps": skipped_steps,
    }


def check_seed(saved: Mapping[str, Any], seed: int) -> None:
    """Refuse to resume a checkpoint trained with another problem seed."""
    if saved.get("seed") is not None and int(saved["seed"]) != int(seed):
        raise ValueError(
            f"The checkpoint was trained with seed={saved['seed']}, this problem has "
            f"seed={seed}; resume with seed={saved['seed']}."
        )


def check_method_seeds(saved: Mapping[str, Any], optimizers: Iterable[Any]) -> None:
    """Refuse to resume with methods seeded otherwise than in the checkpoint."""
    now = [method_seed(o) for o in optimizers]
    for before, after in zip(saved.get("method_seeds", []), now, strict=False):
        if before is not None and after is not None and before != after:
            raise ValueError(
                f"The checkpoint was trained with method.seed={before}, the method now has "
                f"seed={after}; resume with method.seed={before}."
            )


class ResumeRecord:
    """The seeds a checkpoint records and a resume must share (a problem's ``resume_record``).

    Args:
        problem: The problem (its seed, Trainer and collaborators).

    Attributes:
        resumed_from: The checkpoint's record, from loading until the resumed fit has
            checked its methods' seeds (``None`` otherwise).

    """

    def __init__(self, problem: ProblemContract) -> None:
        self.problem = problem
        self.resumed_from: dict[str, Any] | None = None

    def save(self, checkpoint: dict[str, Any]) -> None:
        """Record the seeds a resumed run must share."""
        problem = self.problem
        checkpoint[CHECKPOINT_KEY] = resume_state(
            problem.seed, inner_optimizers(problem), problem.step_runner.guard.skipped_steps
        )

    def load(self, checkpoint: dict[str, Any]) -> None:
        """Convert to the Trainer's precision before the weights load; refuse another seed.

        Lightning loads the weights before it converts the module: with ``64-true`` a
        float32 module would round the float64 checkpoint first. The skipped-step count
        continues from the checkpoint's, and the output offset is not fitted again.
        """
        problem = self.problem
        trainer = getattr(problem, "_trainer", None)
        if trainer is not None:
            trainer.strategy.precision_plugin.convert_module(problem)
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved:
            check_seed(saved, problem.seed)
            problem.step_runner.guard.skipped_steps = int(saved.get("skipped_steps", 0))
        self.resumed_from = saved or None
        problem.output_fit.skip()  # trained weights: their offset is not fitted again

    def check_methods(self) -> None:
        """After a resume's optimizers are built: refuse methods seeded otherwise."""
        saved, self.resumed_from = self.resumed_from, None
        if saved:
            check_method_seeds(saved, inner_optimizers(self.problem))
