"""Divergence: what happens when the training loss is NaN or infinite.

A non-finite loss is detected at the step where it occurs, before anything is
applied: first-order steps check the loss before ``backward``, zeroth-order
steps check the ``2 q`` loss values (after the data-parallel reduction, so all
ranks decide alike) before the update. The step raises
:class:`NonFiniteLossError`, whose message names the step, the loss terms and
the method's state. The problem's ``divergence`` policy then decides
(:class:`~sdze_lightning.stepping.DivergenceGuard`):

* ``"stop"`` (default): the error ends ``fit``. Lightning saves no checkpoint
  on an exception, so ``last.ckpt`` stays the last good one.
* ``"skip"``: the step is counted (``global_step`` advances, the next step
  draws new points) but not applied; the parameters and optimizer state are
  those of before the step. After :data:`MAX_CONSECUTIVE_SKIPS` skipped steps
  in a row training stops anyway (the parameters themselves have diverged).
  The zeroth-order methods, Adam, SGD and ``pde_aware`` withhold the step
  themselves, without a copy (MeZO's weights keep the round-off of its in-place
  perturbations, as after any step); any other method has its parameters and
  state copied before the step and put back after it
  (:func:`~sdze_lightning.methods.base.withholds_nonfinite`), a copy the memory
  check counts.
"""

from __future__ import annotations

#: Values of ``divergence`` (``PINNProblem(divergence=...)``, config key ``divergence``).
DIVERGENCE_POLICIES: tuple[str, ...] = ("stop", "skip")
#: Under ``divergence="skip"``, stop after this many non-finite steps in a row.
MAX_CONSECUTIVE_SKIPS = 10


class NonFiniteLossError(RuntimeError):
    """Raised when the training loss is NaN or infinite; no update is applied.

    Attributes:
        step: The step (``global_step``) at which the loss was non-finite.
        terms: Loss terms or evaluated loss values of the step.
        method_state: One-line description of the optimizer's state.

    """

    def __init__(self, step: int, terms: dict[str, float], method_state: str = "") -> None:
        self.step = step
        self.terms = terms
        self.method_state = method_state
        msg = f"Non-finite loss at step {step}: {terms}. The update of this step was not applied."
        if method_state:
            msg += f" Method state: {method_state}."
        super().__init__(msg)

    def __reduce__(self) -> tuple:
        # Picklable with its arguments (multiprocessing, ddp_spawn).
        return (type(self), (self.step, self.terms, self.method_state))


def check_policy(policy: str) -> None:
    """Raise ``ValueError`` for an unknown divergence policy."""
    if policy not in DIVERGENCE_POLICIES:
        raise ValueError(
            f"divergence must be one of {list(DIVERGENCE_POLICIES)}, got {policy!r}."
        )
