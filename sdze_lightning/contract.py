"""What the library's collaborators read from a problem: :class:`ProblemContract`.

:class:`~sdze_lightning.problem.PINNProblem` implements it. The collaborators that own
the library's state (:class:`~sdze_lightning.collocation.Collocation`,
:class:`~sdze_lightning.loss.PhysicsLoss`, :class:`~sdze_lightning.stepping.StepRunner`,
:class:`~sdze_lightning.evaluation.HeldOutSet`, :class:`~sdze_lightning.resume.ResumeRecord`,
:class:`~sdze_lightning.output_fit.OutputOffsetFit`, the input checks) are typed against
this protocol, not against ``PINNProblem``: ``problem.py`` imports them, none of them
imports it, so the modules form no import circle.
"""

# ruff: noqa: D102 (the members are documented where PINNProblem defines them)
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from sdze_lightning.collocation import Collocation
    from sdze_lightning.constraints import Constraint
    from sdze_lightning.derivatives import Derivatives
    from sdze_lightning.estimators import Estimator
    from sdze_lightning.evaluation import HeldOutSet
    from sdze_lightning.loss import PhysicsLoss
    from sdze_lightning.model_fn import ModelFunction
    from sdze_lightning.output_fit import OutputOffsetFit
    from sdze_lightning.stepping import StepRunner


class ProblemContract(Protocol):
    """A PDE problem as the library's collaborators see it.

    The settings and the user contract of a problem, the collaborators it holds, and
    the parts of ``lightning.LightningModule`` the step runner and the resume record
    use. Attribute docs: :class:`~sdze_lightning.problem.PINNProblem`.
    """

    # settings
    dim: int
    input_dim: int
    seed: int
    n_interior: int
    n_boundary: int
    n_eval: int
    boundary_weight: float
    squared_residual: str
    divergence: str
    prefetch: bool
    operators: tuple[str, ...]
    time_dependent: bool
    net: nn.Module
    estimator: Estimator
    estimator_halves: tuple[Estimator, ...]
    method: Callable[..., torch.optim.Optimizer]
    scheduler: Callable[..., Any] | None
    constraint: Constraint | None

    # collaborators
    collocation: Collocation
    physics_loss: PhysicsLoss
    step_runner: StepRunner
    held_out: HeldOutSet
    output_fit: OutputOffsetFit

    # from LightningModule
    global_step: int
    _trainer: Any

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def optimizers(self) -> Any: ...

    def lr_schedulers(self) -> Any: ...

    def manual_backward(self, loss: Tensor) -> None: ...

    def __call__(self, x: Tensor) -> Tensor: ...

    # the user contract
    @property
    def model(self) -> ModelFunction: ...

    def sample_interior(self, n: int, generator: torch.Generator) -> Tensor: ...

    def sample_boundary(self, n: int, generator: torch.Generator) -> Tensor: ...

    def residual(self, x: Tensor, d: Derivatives) -> Tensor: ...

    def exact_solution(self, x: Tensor) -> Tensor | None: ...

    def boundary_residual(self, x: Tensor) -> Tensor: ...

    def prepare_batch(self, x: Tensor, rows: int | None = None) -> None: ...

    def derivatives(
        self, x: Tensor, generator: torch.Generator, estimator: Estimator | None = None,
        model: Callable[[Tensor], Tensor] | None = None,
    ) -> Derivatives: ...

    def eval_batches(self, chunk: int | None = None) -> Iterator[tuple[Tensor, Tensor]]: ...

    def compute_loss(self, step: int, key: int = 0) -> Tensor: ...

    @classmethod
    def overrides(cls, name: str) -> bool: ...
