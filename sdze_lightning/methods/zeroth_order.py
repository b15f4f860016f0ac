"""Zeroth-order methods: their protocol and the two-point steps with CRNS.

Zeroth-order methods subclass :class:`ZerothOrderOptimizer`, the one protocol
between a forward-only method and :class:`~sdze_lightning.PINNProblem`. They are
built from the network module (they perturb its linear layers implicitly) and
stepped with

    ``optimizer.step(loss_at=fn, step_index=k)``

where ``fn(noise_key)`` evaluates the loss (forward only) with the collocation
points and estimator directions of ``noise_key``: the method chooses the keys
(the same key for the paired evaluations under CRNS, a fresh key per evaluation
without it). Under data parallelism the step also receives ``reduce``, which
combines the loss values across ranks. Lightning passes its own closure as
``closure``; the method calls it once per step, after the evaluations and before
the update, which is where Lightning fires ``on_before_optimizer_step`` (once per
training step). :meth:`ZerothOrderOptimizer.step` hands a subclass's
:meth:`~ZerothOrderOptimizer.zo_step` all of it as one :class:`ZerothOrderStep`.

One step of a two-point method draws ``q`` directions ``z_j`` and evaluates the
loss at ``theta + eps z_j`` and ``theta - eps z_j``. The projected-gradient
scalar of query ``j`` is ``(L_+ - L_-) / (2 eps)``; the update combines the
scalars with the directions.

The loss is itself random when the spatial operators are estimated
(``L_hat(theta; xi)``, ``xi`` = collocation points and estimator directions).
The method evaluates it through ``loss_at(noise_key)``
(:data:`LossAt`), the key picking ``xi``:

* CRNS on: key ``0`` for every evaluation of the step, so the paired
  evaluations share ``xi`` and the estimator noise cancels to first order (the
  scalar is the directional derivative of ``L_hat(.; xi)``); all queries of a
  step also share the points, so ``W x`` of the first layer is computed once;
* CRNS off: a fresh key per evaluation (``1 + 2 j`` and ``2 + 2 j``), the
  noise difference is divided by ``2 eps`` and its variance grows like
  ``1 / eps^2``.

Evaluation and update are separate (:meth:`TwoPointOptimizer.estimate`,
:meth:`TwoPointOptimizer._update`): under data parallelism every rank evaluates
the same perturbations on its share of the points and the step's ``reduce`` (given
by the problem under DDP) averages the ``2 q`` loss values across ranks, the only
communication of a step (:mod:`sdze_lightning.distributed`).

A step whose (reduced) loss values are not all finite raises
:class:`~sdze_lightning.divergence.NonFiniteLossError` before the update: the
network and the method's state are those of before the step. Since the update
depends on nothing but the direction seeds, the loss values and the learning
rate, :meth:`TwoPointOptimizer.replay_step` re-applies a recorded step without
evaluating anything (:mod:`sdze_lightning.replay`).
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, overload

import torch
from torch import Tensor, nn

from sdze_lightning.checks import boolean, integer, non_negative_int, positive_int
from sdze_lightning.divergence import NonFiniteLossError
from sdze_lightning.methods.base import MethodTraits
from sdze_lightning.template_method import allow_public_override

#: ``loss_at(noise_key)``: the loss with the random inputs (points, estimator
#: directions) of ``noise_key``, evaluated without back-propagation.
LossAt = Callable[[int], Tensor]


@dataclass(frozen=True)
class ZerothOrderStep:
    """What a zeroth-order method receives for one step (:meth:`ZerothOrderOptimizer.zo_step`).

    Attributes:
        loss_at: Evaluates the loss for a noise key.
        step_index: Index of the step (its directions are a function of it), or
            ``None``: the method's own counter.
        ready: Called once after the evaluations and before the update (Lightning's
            hook point), or ``None``.
        skip_nonfinite: On non-finite loss values apply nothing, count the step as done
            and return a NaN loss, instead of raising.
        reduce: Combines the step's loss values across data-parallel ranks (``None``:
            one process).

    """

    loss_at: LossAt
    step_index: int | None = None
    ready: Callable[[], Any] | None = None
    skip_nonfinite: bool = False
    reduce: Callable[[Tensor], Tensor] | None = None


class ZerothOrderOptimizer(torch.optim.Optimizer, metaclass=ABCMeta):
    """Base class and protocol of forward-only optimizers.

    The problem uses nothing else of a zeroth-order method than what is declared
    here: :meth:`step`, :attr:`crns`, :attr:`seed`, :meth:`fold`, :meth:`close` and
    :meth:`describe_state`. A subclass implements :meth:`zo_step` (the step, as one
    :class:`ZerothOrderStep`) or overrides :meth:`step` itself; abstract methods are
    enforced (a subclass that leaves one out cannot be built).

    Attributes:
        crns: Whether every evaluation of a step uses noise key ``0`` (the
            step's shared batch, which ``prefetch`` builds ahead).
        seed: Seed of the method's own random numbers (checked on resume).

    """

    traits: ClassVar[MethodTraits] = MethodTraits(
        zeroth_order=True, takes_module=True, withholds_nonfinite_step=True
    )
    crns: bool = True
    seed: int | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        allow_public_override(cls, "step", "zo_step")

    def __init__(self, module: nn.Module, defaults: dict[str, Any]) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"{type(self).__name__} is built from the network module, got {type(module)}."
            )
        super().__init__([p for p in module.parameters() if p.requires_grad], defaults)
        self.module = module

    def step(  # type: ignore[override]
        self,
        closure: Callable[[], Any] | None = None,
        *,
        loss_at: LossAt | None = None,
        step_index: int | None = None,
        skip_nonfinite: bool = False,
        reduce: Callable[[Tensor], Tensor] | None = None,
    ) -> Tensor:
        """One step of training step ``step_index``; returns the mean evaluated loss.

        Args:
            closure: With ``loss_at``: called once after the evaluations and before
                the update (Lightning's hook point); its value is not used.
                Without ``loss_at``: the loss itself, for losses that do not depend
                on a noise key.
            loss_at: Evaluates the loss for a noise key.
            step_index: Index of the step (its directions are a function of it);
                ``None``: the method's own counter.
            skip_nonfinite: On non-finite loss values apply nothing, count the step
                as done and return a NaN loss, instead of raising
                :class:`~sdze_lightning.divergence.NonFiniteLossError` (then nothing
                is applied and the counter does not advance).
            reduce: Combines the loss values across data-parallel ranks (the problem
                passes :func:`~sdze_lightning.distributed.all_reduce_mean` under DDP).

        """
        if loss_at is None:
            if closure is None:
                raise ValueError(
                    f"{type(self).__name__}.step() needs loss_at=fn (fn(noise_key) -> loss) "
                    "or a closure that evaluates the loss."
                )
            loss, closure = closure, None
            loss_at = lambda key: loss()  # noqa: E731 - a noise-free loss ignores the key
        if step_index is not None:
            non_negative_int("step_index", step_index)
        return self.zo_step(ZerothOrderStep(loss_at, step_index, closure, skip_nonfinite, reduce))

    @abstractmethod
    def zo_step(self, request: ZerothOrderStep) -> Tensor:
        """The step itself, with the arguments of :meth:`step` checked; the mean loss."""

    def fold(self) -> None:
        """Write any implicit offset into the weights (the default has none)."""

    def close(self) -> None:
        """Leave the network a plain module (fold; release hooks); the default folds."""
        self.fold()

    def describe_state(self) -> str:
        """One line of the method's state for divergence reports."""
        lrs = [g.get("lr") for g in self.param_groups]
        return f"{type(self).__name__}(lr={lrs[0] if len(lrs) == 1 else lrs})"


#: Key of the method-wide counters inside ``optimizer.state`` (saved as is).
STATE_KEY = "zo"


#: ``perturb(query, sign)``: make the network evaluate at ``theta + sign eps z_query``
#: from now on (``query=None``: back at ``theta``).
Perturb = Callable[[int | None, int], None]


@overload
def perturbation_sweep(queries: int, perturb: Perturb, evaluate: None = None) -> None: ...


@overload
def perturbation_sweep(
    queries: int, perturb: Perturb, evaluate: Callable[[int, int], Any]
) -> Tensor: ...


def perturbation_sweep(
    queries: int, perturb: Perturb, evaluate: Callable[[int, int], Any] | None = None
) -> Tensor | None:
    """Visit ``theta + eps z_j`` and ``theta - eps z_j`` for every query, then ``theta`` again.

    The one perturbation loop of the two-point methods: a step's evaluations, a
    replayed step's perturbations (which MeZO's in-place writes need to
    reproduce the recorded run bit for bit) and SDZE's variance probes. The
    network is back at ``theta`` afterwards, also when ``evaluate`` raises.

    Args:
        queries: Number of directions ``q``.
        perturb: Moves the network (see :data:`Perturb`).
        evaluate: ``evaluate(query, sign)`` returns the loss at the current
            perturbation; ``None`` only perturbs.

    Returns:
        Float64 tensor ``(q, 2)``: ``[L(theta + eps z_j), L(theta - eps z_j)]``,
        or ``None`` without ``evaluate``.

    """
    values: list[Tensor] = []
    try:
        with torch.no_grad():
            for j in range(queries):
                for sign in (1, -1):
                    perturb(j, sign)
                    if evaluate is not None:
                        values.append(torch.as_tensor(evaluate(j, sign)).detach().reshape(()))
    finally:
        perturb(None, 0)
    if evaluate is None:
        return None
    return torch.stack(values).to(torch.float64).view(queries, 2)


def _is_number(value: Any) -> bool:
    """Whether ``value`` is a real number (``bool`` and strings are not)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


class TwoPointOptimizer(ZerothOrderOptimizer):
    """Base class of two-point zeroth-order methods (SDZE, MeZO).

    Subclasses implement :meth:`_prepare` (draw the step's directions),
    :meth:`_perturb` (make the network evaluate at a perturbed point, or at the
    current one) and :meth:`_update` (apply the step from the scalars).

    Args:
        module: The network.
        defaults: Parameter-group defaults; must contain ``lr``.
        eps: Perturbation size.
        queries: Number of directions ``q`` per step.
        crns: Common Random Numbers Synchronisation of the paired evaluations.
        seed: Seed of the method's own random numbers.

    """

    def __init__(
        self,
        module: nn.Module,
        defaults: dict[str, Any],
        eps: float,
        queries: int,
        crns: bool,
        seed: int,
    ) -> None:
        lr = defaults.get("lr")
        if not _is_number(lr) or not lr >= 0:
            raise ValueError(f"method.lr must be a non-negative number, got {lr!r}.")
        if not _is_number(eps) or not eps > 0:
            raise ValueError(f"method.eps must be a positive number, got {eps!r}.")
        positive_int("method.queries", queries)
        integer("method.seed", seed)
        boolean("method.crns", crns)
        super().__init__(module, defaults)
        self.eps = float(eps)
        self.queries = queries
        self.crns = bool(crns)
        self.seed = int(seed)
        self.state[STATE_KEY] = {"step": 0}
        self.last_scalars: Tensor | None = None
        #: Loss values ``(q, 2)`` of the last step (after the reduction; ``None`` if
        #: the closure raised), its learning rate and its index: what a replay log keeps.
        self.last_values: Tensor | None = None
        self.last_lr: float = self.lr
        self.last_step: int = -1

    # ---------------------------------------------------------------- counters
    @property
    def zo_state(self) -> dict[str, int]:
        """Method-wide counters (``step`` and subclass extras), part of ``state_dict``."""
        return self.state[STATE_KEY]

    @property
    def lr(self) -> float:
        """Current learning rate (the one a scheduler writes into the parameter group)."""
        return float(self.param_groups[0]["lr"])

    def noise_key_for(self, query: int, sign: int) -> int:
        """Noise key of evaluation ``sign`` (``+1``/``-1``) of query ``query``."""
        if self.crns:
            return 0
        return 1 + 2 * query + (0 if sign > 0 else 1)

    # ------------------------------------------------------------------- hooks
    @abstractmethod
    def _prepare(self, step: int) -> None:
        """Draw the directions of ``step`` (and do any per-step bookkeeping)."""

    @abstractmethod
    def _perturb(self, query: int | None, sign: int) -> None:
        """Evaluate at ``theta + sign eps z_query`` from now on (``query=None``: at ``theta``)."""

    @abstractmethod
    def _update(self, scalars: Tensor) -> None:
        """Apply the step from the projected-gradient scalars ``(q,)``."""

    # ------------------------------------------------------------------- steps
    def estimate(self, loss_at: LossAt) -> Tensor:
        """Evaluate the ``2 q`` perturbed losses of the current step without updating.

        The network is back at the unperturbed point afterwards, also when
        ``loss_at`` raises.

        Args:
            loss_at: Evaluates the loss for a noise key (:meth:`noise_key_for`).

        Returns:
            Float64 tensor ``(q, 2)``: ``[L(theta + eps z_j), L(theta - eps z_j)]``.

        """
        self._prepare(self.zo_state["step"])
        return perturbation_sweep(
            self.queries, self._perturb, lambda j, sign: loss_at(self.noise_key_for(j, sign))
        )

    def scalars(self, values: Tensor) -> Tensor:
        """Projected-gradient scalars ``(L_+ - L_-) / (2 eps)`` of loss values ``(q, 2)``."""
        return (values[:, 0] - values[:, 1]) / (2 * self.eps)

    @torch.no_grad()
    def zo_step(self, request: ZerothOrderStep) -> Tensor:
        """One two-point step (:meth:`~ZerothOrderOptimizer.step` checks the arguments).

        Evaluates the ``2 q`` losses through ``request.loss_at`` (keys from
        :meth:`noise_key_for`), combines them across ranks with ``request.reduce``,
        calls ``request.ready`` and applies the update. ``request.step_index``
        (``global_step`` in training) sets the method's counter first: directions and
        windows are drawn for it.

        Returns:
            The mean of the evaluated losses.

        Raises:
            NonFiniteLossError: If a loss value is NaN or infinite (after the
                reduction across ranks, so every rank raises alike) and
                ``skip_nonfinite`` is false: nothing is applied and the step counter
                does not advance. With ``skip_nonfinite`` nothing is applied either,
                the counter advances and the NaN mean is returned.

        """
        if request.step_index is not None:
            self.zo_state["step"] = request.step_index
        step = self.zo_state["step"]
        self.last_step, self.last_lr, self.last_values = step, self.lr, None
        values = self.estimate(request.loss_at)
        if request.reduce is not None:
            values = request.reduce(values)
        self.last_values = values
        if not bool(torch.isfinite(values).all()):
            if not request.skip_nonfinite:
                raise NonFiniteLossError(step, self.value_terms(values), self.describe_state())
            self.skip_step()
            return values.mean()
        if request.ready is not None:
            request.ready()
        scalars = self.scalars(values)
        self.last_scalars = scalars
        self._update(scalars)
        self.zo_state["step"] += 1
        return values.mean()

    def value_terms(self, values: Tensor) -> dict[str, float]:
        """The loss values ``(q, 2)`` by name, for reports."""
        return {
            f"L(theta{'+' if k == 0 else '-'}eps*z{j})": float(values[j, k])
            for j in range(values.shape[0])
            for k in range(2)
        }

    def skip_step(self) -> None:
        """Count the current step as done without applying it (``divergence="skip"``).

        The next step draws the directions (and the problem the points) of the
        next index; parameters and update-rule state stay as they are.
        """
        self.zo_state["step"] += 1

    @torch.no_grad()
    def replay_step(self, values: Tensor, lr: float) -> None:
        """Re-apply a recorded step from its loss values and learning rate, evaluating nothing.

        Goes through the same sequence as :meth:`step` (window change, the
        ``2 q`` perturbations and the restore, which MeZO's in-place
        perturbation needs to be reproduced bit for bit, then the update), so
        that the result equals the recorded run's bit for bit on the same
        device and dtype. Non-finite ``values`` replay a skipped step.

        Args:
            values: The step's reduced loss values, ``2 q`` numbers.
            lr: The learning rate the step used.

        """
        for group in self.param_groups:
            group["lr"] = lr
        self._prepare(self.zo_state["step"])
        perturbation_sweep(self.queries, self._perturb)
        values = torch.as_tensor(values, dtype=torch.float64).reshape(self.queries, 2)
        if bool(torch.isfinite(values).all()):
            scalars = self.scalars(values)
            self.last_scalars = scalars
            self._update(scalars)
        self.zo_state["step"] += 1

    def state_dict(self) -> dict[str, Any]:
        """The optimizer state; the method-wide counters are copied, not shared."""
        sd = super().state_dict()
        sd["state"][STATE_KEY] = dict(self.zo_state)
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state from :meth:`state_dict` (counters copied, not shared)."""
        super().load_state_dict(state_dict)
        self.state[STATE_KEY] = dict(self.state.get(STATE_KEY, {"step": 0}))

    def describe_state(self) -> str:
        """One line of counters and settings for divergence reports."""
        last = None if self.last_scalars is None else [f"{float(s):.3g}" for s in self.last_scalars]
        return (
            f"{type(self).__name__}(step={self.zo_state['step']}, lr={self.lr:.3g}, "
            f"eps={self.eps:.3g}, queries={self.queries}, crns={self.crns}, seed={self.seed}, "
            f"last projected-gradient scalars={last})"
        )
