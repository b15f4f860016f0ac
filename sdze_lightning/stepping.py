"""One optimizer step: first-/zeroth-order dispatch, non-finite checks, divergence policy.

A zeroth-order method (:class:`~sdze_lightning.methods.ZerothOrderOptimizer`) gets
``step(loss_at=..., step_index=step)``, ``loss_at(key)`` being the loss of the step
with noise key ``key``; it checks the (reduced) loss values before its update. Any
other ``torch.optim.Optimizer`` gets ``step(closure)``: the closure checks the loss
before ``backward``. Either way a NaN/Inf loss applies nothing: the step raises
:class:`~sdze_lightning.divergence.NonFiniteLossError`, or, asked to skip, reports it
in :attr:`StepOutcome.skipped`; :class:`DivergenceGuard` applies the ``divergence``
policy to it.

A skipped step copies nothing where the method withholds it by itself
(:func:`~sdze_lightning.methods.base.withholds_nonfinite`: the zeroth-order methods,
which check their loss values before the update; Adam, SGD and ``pde_aware``, which
apply nothing after a closure that back-propagated nothing). For any other first-order
method the skipped step takes a :func:`snapshot` of the parameters and the optimizer
state (a copy of each) and restores it after the method's ``step``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from sdze_lightning.distributed import all_reduce_mean, all_true
from sdze_lightning.divergence import MAX_CONSECUTIVE_SKIPS, NonFiniteLossError
from sdze_lightning.methods.base import FirstOrderStep, traits_of, withholds_nonfinite
from sdze_lightning.methods.zeroth_order import ZerothOrderOptimizer

if TYPE_CHECKING:
    import lightning as L

    from sdze_lightning.collocation import Collocation
    from sdze_lightning.contract import ProblemContract
    from sdze_lightning.loss import PhysicsLoss

log = logging.getLogger(__name__)

#: Copies of an optimizer's state and of its parameters (:func:`snapshot`).
Snapshot = tuple[dict[str, Any], list[Tensor]]


@dataclass
class StepOutcome:
    """What one optimizer step did (:meth:`PINNProblem.run_step`).

    Attributes:
        loss: The step's loss (detached; zeroth-order: the mean of the evaluated
            losses); NaN for a skipped step.
        terms: Loss terms (``"loss"``, ``"interior"``, ``"boundary"``) of the step's
            last evaluation.
        skipped: For a non-finite step skipped under ``skip_nonfinite``: its report
            (nothing of the step was applied); ``None`` otherwise.

    """

    loss: Tensor
    terms: dict[str, Tensor]
    skipped: NonFiniteLossError | None = None


def inner_optimizers(module: L.LightningModule) -> list[Any]:
    """The optimizers of ``module``'s Trainer, unwrapped from Lightning's wrappers."""
    trainer = getattr(module, "_trainer", None)
    return [getattr(o, "optimizer", o) for o in (trainer.optimizers if trainer else [])]


def zeroth_order_optimizers(module: L.LightningModule) -> list[ZerothOrderOptimizer]:
    """The zeroth-order methods among :func:`inner_optimizers`."""
    return [o for o in inner_optimizers(module) if isinstance(o, ZerothOrderOptimizer)]


def describe(optimizer: torch.optim.Optimizer) -> str:
    """The method's state for divergence reports (zeroth-order state, or the learning rate)."""
    if isinstance(optimizer, ZerothOrderOptimizer):
        return optimizer.describe_state()
    lrs = [g.get("lr") for g in optimizer.param_groups]
    return f"{type(optimizer).__name__}(lr={lrs[0] if len(lrs) == 1 else lrs})"


def snapshot(optimizer: torch.optim.Optimizer) -> Snapshot:
    """Copies of an optimizer's state and of its parameters (restored by :func:`restore`).

    Taken at a skipped step of a first-order method that does not withhold it by itself
    (:func:`~sdze_lightning.methods.base.withholds_nonfinite`): as large as the
    parameters plus the optimizer state.
    """
    params = [p.detach().clone() for g in optimizer.param_groups for p in g["params"]]
    return copy.deepcopy(optimizer.state_dict()), params


@torch.no_grad()
def restore(optimizer: torch.optim.Optimizer, saved: Snapshot) -> None:
    """Put back the state and parameters of a :func:`snapshot`."""
    state, params = saved
    for p, value in zip((p for g in optimizer.param_groups for p in g["params"]), params,
                        strict=True):
        p.copy_(value)
    optimizer.load_state_dict(state)


class DivergenceGuard:
    """Applies a divergence policy to the steps of a run and counts the skipped ones.

    Attributes:
        skipped_steps: Steps skipped under ``"skip"`` (saved in checkpoints).
        in_a_row: Steps skipped in a row now.

    """

    def __init__(self) -> None:
        self.skipped_steps = 0
        self.in_a_row = 0

    def run(self, policy: str, step: Callable[[bool], StepOutcome]) -> StepOutcome:
        """Run ``step(skip_nonfinite)`` under ``policy``; count a skipped step.

        Under ``"skip"`` the step that would be the
        :data:`~sdze_lightning.divergence.MAX_CONSECUTIVE_SKIPS`-th skip in
        a row is not allowed to skip: its error ends training.
        """
        skip = policy == "skip" and self.in_a_row + 1 < MAX_CONSECUTIVE_SKIPS
        try:
            outcome = step(skip)
        except NonFiniteLossError as err:
            if policy == "skip":
                raise NonFiniteLossError(
                    err.step,
                    err.terms,
                    f"{err.method_state}; stopping: {self.in_a_row + 1} non-finite "
                    "steps in a row under divergence=skip",
                ) from None
            raise
        if outcome.skipped is not None:
            self.in_a_row += 1
            self.skipped_steps += 1
            log.warning("%s Skipping the step (divergence=skip).", outcome.skipped)
        else:
            self.in_a_row = 0
        return outcome


class StepRunner:
    """Runs a problem's optimizer steps under its divergence policy (its ``step_runner``).

    Args:
        problem: The problem (its network, Trainer hooks and divergence policy).
        collocation: The points of each step (handed over and dropped per step).
        physics_loss: The loss the methods evaluate.

    Attributes:
        guard: The divergence policy's state (skipped steps, saved in checkpoints).
        last_loss: The loss of the last training step (NaN before one).

    """

    def __init__(
        self, problem: ProblemContract, collocation: Collocation, physics_loss: PhysicsLoss
    ) -> None:
        self.problem = problem
        self.collocation = collocation
        self.physics_loss = physics_loss
        self.guard = DivergenceGuard()
        self.last_loss = float("nan")

    def run(
        self,
        optimizer: torch.optim.Optimizer,
        step: int,
        *,
        backward: Callable[[Tensor], Any] | None = None,
        skip_nonfinite: bool = False,
    ) -> StepOutcome:
        """One step of ``optimizer`` on the points of ``step`` (``PINNProblem.run_step``).

        What ``training_step`` runs, usable without a ``Trainer``: takes the (prefetched)
        batch, evaluates the loss as the method asks and updates the network, under the
        network's first-layer cache (where it has one); the step's points are dropped at
        the end.

        Args:
            optimizer: A zeroth-order method (``step(loss_at=...)``) or any
                ``torch.optim.Optimizer`` (``step(closure)``), or Lightning's wrapper of one.
            step: The step index: it fixes the points and the estimator's directions.
            backward: What back-propagates the loss (default ``Tensor.backward``; the
                Trainer passes ``manual_backward``).
            skip_nonfinite: On a NaN/Inf loss, report it in the outcome instead of raising
                :class:`~sdze_lightning.divergence.NonFiniteLossError`.

        """
        inner = getattr(optimizer, "optimizer", optimizer)  # Lightning's wrapper
        cache = getattr(self.problem.net, "first_layer_cache", None)
        try:
            self.collocation.begin_step(step)
            with cache() if cache is not None else contextlib.nullcontext():
                if isinstance(inner, ZerothOrderOptimizer):
                    return self._zeroth_order_step(optimizer, inner, step, skip_nonfinite)
                return self._first_order_step(
                    optimizer, inner, step, backward or Tensor.backward, skip_nonfinite
                )
        except BaseException:
            self.collocation.stop_prefetch()  # Lightning skips teardown when fit raises
            raise
        finally:
            self.collocation.end_step()

    def _zeroth_order_step(
        self, optimizer: Any, inner: ZerothOrderOptimizer, step: int, skip: bool
    ) -> StepOutcome:
        terms: dict[str, Tensor] = {}
        bad: dict[str, float] = {}

        def loss_at(key: int) -> Tensor:
            # Never raises on a non-finite value: the method checks the (reduced) values,
            # so that under DDP every rank decides alike.
            out = self.physics_loss.terms(step, key)
            if not bad and not bool(torch.isfinite(out["loss"])):
                bad.update({k: float(v.detach()) for k, v in out.items()})
            terms.clear()
            terms.update(out)
            return out["loss"]

        kwargs: dict[str, Any] = {}
        if self.collocation.shard.active:  # the loss values are combined across the ranks
            kwargs["reduce"] = all_reduce_mean
        try:
            loss = optimizer.step(loss_at=loss_at, step_index=step, skip_nonfinite=skip,
                                  **kwargs)
        except NonFiniteLossError as err:
            raise NonFiniteLossError(step, {**bad, **err.terms}, err.method_state) from None
        loss = torch.as_tensor(loss).detach()
        if bool(torch.isfinite(loss)):
            return StepOutcome(loss, terms)
        report = NonFiniteLossError(step, bad or {"loss": float(loss)}, inner.describe_state())
        return StepOutcome(loss, terms, report)

    def _first_order_step(
        self, optimizer: Any, inner: torch.optim.Optimizer, step: int,
        backward: Callable[[Tensor], Any], skip: bool,
    ) -> StepOutcome:
        terms: dict[str, Tensor] = {}
        bad: dict[str, float] = {}
        saved: list[Snapshot] = []
        shard = self.collocation.shard

        def closure() -> Tensor:
            optimizer.zero_grad(set_to_none=True)
            out = self.physics_loss.terms(step, 0)
            terms.clear()
            terms.update(out)
            finite = bool(torch.isfinite(out["loss"]))
            if shard.active:
                finite = all_true(finite, self.problem.device)  # every rank decides alike
            if finite:
                backward(out["loss"])
                return out["loss"]
            if not bad:
                bad.update({k: float(v.detach()) for k, v in out.items()})
            if not skip:
                raise NonFiniteLossError(step, dict(bad), describe(inner))
            if not saved and not withholds_nonfinite(inner):
                saved.append(snapshot(inner))  # undo whatever the method does without gradients
            # NaN on every rank (this rank's loss may be finite under DDP): a method that
            # checks the closure's value (pde_aware) withholds the step on every rank alike
            return torch.full_like(out["loss"].detach(), float("nan"))

        traits = traits_of(inner)
        if traits.needs_residuals or traits.reduces_input_layer:  # one request, as declared
            request = FirstOrderStep(
                closure, step, skip,
                residuals=(functools.partial(self.physics_loss.residual_batch, step)
                           if traits.needs_residuals else None),
                points=(self.collocation.points(step, 0).shape[0]
                        if traits.needs_residuals else None),
                shard=shard if traits.reduces_input_layer and shard.active else None,
            )
            loss = optimizer.step(closure=closure, request=request)
        else:  # torch's protocol
            loss = optimizer.step(closure=closure)
        if bad:  # skipped (a non-finite loss without skip raised in the closure)
            if saved:
                restore(inner, saved[0])
            nan = torch.full((), float("nan"), dtype=self.problem.dtype)
            return StepOutcome(nan, terms, NonFiniteLossError(step, dict(bad), describe(inner)))
        loss = loss if isinstance(loss, Tensor) else terms["loss"]
        return StepOutcome(loss.detach(), terms)

    def training_step(self) -> StepOutcome:
        """The Trainer's step: :meth:`run` under the divergence policy.

        The scheduler steps after every step; a ``ReduceLROnPlateau`` with the step's loss.
        """
        problem = self.problem
        outcome = self.guard.run(problem.divergence, lambda skip: self.run(
            problem.optimizers(), problem.global_step, backward=problem.manual_backward,
            skip_nonfinite=skip,
        ))
        step_scheduler(problem.lr_schedulers(), outcome.loss)
        self.last_loss = float(outcome.loss)
        return outcome


def step_scheduler(scheduler: Any, loss: Tensor | float) -> None:
    """Step a learning-rate scheduler after a training step (``None``: nothing).

    A ``ReduceLROnPlateau`` follows the step's training loss; any other scheduler counts steps.
    """
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(float(loss))
    elif scheduler is not None:
        scheduler.step()
