"""``PINNProblem``: a PDE as a ``LightningModule``.

A new PDE subclasses :class:`PINNProblem` and implements its user contract (sampling,
residual, optionally the exact solution and boundary values); network, spatial
estimator and method are injected, and ``lightning.Trainer(max_steps=...).fit(problem)``
needs no DataModule. The class holds the contract and thin Lightning hooks; each
other concern has its module, named where the class uses it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from sdze_lightning import collocation, evaluation, input_checks, loss, resume, stepping
from sdze_lightning.constraints import Constraint
from sdze_lightning.derivatives import Derivatives
from sdze_lightning.distributed import Shard, data_parallel_shard
from sdze_lightning.divergence import DivergenceGuard, NonFiniteLossError
from sdze_lightning.estimators import Estimator
from sdze_lightning.input_checks import check_precision
from sdze_lightning.methods.base import build_optimizer
from sdze_lightning.metrics import RelativeL2Error
from sdze_lightning.model_fn import ModelFunction
from sdze_lightning.seeding import Stream, mix
from sdze_lightning.stepping import StepOutcome, inner_optimizers, zeroth_order_optimizers
from sdze_lightning.threads import FitThreads

__all__ = ["NonFiniteLossError", "PINNProblem", "StepOutcome", "check_precision"]


class PINNProblem(L.LightningModule):
    """Base class of physics-informed problems (manual optimization).

    Args:
        dim: Spatial dimension ``d`` (time, if any, is an extra input).
        net: Network module, or a factory called as ``net(in_features=...)``;
            defaults to :class:`~sdze_lightning.nn.MLP` (width 128, depth 4).
        estimator: An :class:`~sdze_lightning.estimators.Estimator` or a registered name
            (default ``"exact"``).
        method: Optimizer class or partial, or a method's name (its packaged config,
            seeded with ``seed``); zeroth-order methods receive the network, others its
            parameters. Defaults to Adam(lr=1e-3).
        scheduler: Optional learning-rate scheduler partial, stepped every step.
        n_interior: Interior collocation points per step.
        n_boundary: Boundary/initial points per step (0 under a hard constraint).
        boundary_weight: Weight of the boundary term in the loss.
        n_eval: Held-out points for the relative L2 error.
        seed: Seed of sampling and estimator randomness.
        squared_residual: ``"biased"`` or ``"unbiased"`` (:mod:`~sdze_lightning.loss`).
        steps_per_epoch: Steps per epoch of step indices; without a
            ``val_check_interval`` (the CLI sets one) validation runs once an epoch.
        divergence: ``"stop"`` or ``"skip"`` on a NaN/Inf loss (:mod:`~sdze_lightning.divergence`).
        prefetch: Build the next step's interior batch (and its :meth:`prepare_batch`) on
            a background thread (:mod:`~sdze_lightning.collocation`); ``sample_interior``
            and ``prepare_batch`` must then not depend on the network.
        fused_kernels: Let the problem use fused ``torch.compile`` kernels for its per-batch
            data where it has them (:mod:`sdze_lightning.kernels`).
        threads: Intra-op threads during ``fit``, ``"auto"`` or a count
            (:mod:`sdze_lightning.threads`); the count used is :attr:`intra_op_threads`.

    """

    #: Operators the residual uses; checked against the estimator at construction.
    operators: ClassVar[tuple[str, ...]] = ("u", "laplacian")
    #: Whether the last input coordinate is time.
    time_dependent: ClassVar[bool] = False

    def __init__(
        self, dim: int, net: nn.Module | Callable[..., nn.Module] | None = None,
        estimator: Estimator | str | None = None,
        method: Callable[..., torch.optim.Optimizer] | str | None = None,
        scheduler: Callable[..., Any] | None = None, n_interior: int = 100, n_boundary: int = 0,
        boundary_weight: float = 1.0, n_eval: int = 2000, seed: int = 0,
        squared_residual: str = "biased", steps_per_epoch: int = 1000, divergence: str = "stop",
        prefetch: bool = False, fused_kernels: bool = True, threads: int | str = "auto",
    ) -> None:
        super().__init__()
        input_checks.check_arguments(
            type(self), dim=dim, n_interior=n_interior, n_boundary=n_boundary, n_eval=n_eval,
            seed=seed, boundary_weight=boundary_weight, squared_residual=squared_residual,
            steps_per_epoch=steps_per_epoch, divergence=divergence, prefetch=prefetch,
            fused_kernels=fused_kernels, threads=threads,
        )
        self.automatic_optimization = False
        self.dim, self.input_dim, self.seed = dim, dim + int(self.time_dependent), seed
        self.n_interior, self.n_boundary, self.n_eval = n_interior, n_boundary, n_eval
        self.boundary_weight, self.squared_residual = boundary_weight, squared_residual
        self.steps_per_epoch, self.divergence, self.threads = steps_per_epoch, divergence, threads
        self.fused_kernels = fused_kernels
        self.net = input_checks.checked_network(self, net)
        self.estimator = input_checks.checked_estimator(estimator, self.operators)
        #: The two half-estimators of ``squared_residual="unbiased"``.
        self.estimator_halves = self.estimator.halves() if squared_residual == "unbiased" else ()
        self.method = input_checks.checked_method(method, seed, self.estimator)
        self.scheduler = scheduler
        self.constraint: Constraint | None = None
        #: This rank's share of each batch (the whole batch unless data-parallel).
        self.shard = Shard()
        self.collocation = collocation.Collocation(self, prefetch)
        self.divergence_guard = DivergenceGuard()
        self.fit_threads = FitThreads(threads)
        #: The intra-op thread count of the last ``fit`` (``None`` before one).
        self.intra_op_threads: int | None = None
        self.rel_l2 = RelativeL2Error()
        self.last_loss: float = float("nan")
        self._checked_as: tuple[torch.device, torch.dtype] | None = None
        self._resumed_from: dict[str, Any] | None = None

    # ------------------------------------------------------------- user contract
    def sample_interior(self, n: int, generator: torch.Generator) -> Tensor:
        """Return ``n`` interior points ``(n, input_dim)`` drawn with ``generator``."""
        raise NotImplementedError(f"{type(self).__name__} must implement sample_interior().")

    def sample_boundary(self, n: int, generator: torch.Generator) -> Tensor:
        """Return ``n`` boundary/initial points; needed when ``n_boundary > 0``."""
        raise NotImplementedError(
            f"{type(self).__name__} has n_boundary={self.n_boundary} but no sample_boundary()."
        )

    def residual(self, x: Tensor, d: Derivatives) -> Tensor:
        """Return the PDE residual ``L u - f`` at ``x``, shape ``(N,)``."""
        raise NotImplementedError(f"{type(self).__name__} must implement residual().")

    def exact_solution(self, x: Tensor) -> Tensor | None:
        """Return the exact (or reference) solution at ``x``, or ``None`` if unknown."""
        return None

    def boundary_target(self, x: Tensor) -> Tensor:
        """Prescribed boundary/initial values; defaults to the exact solution."""
        target = self.exact_solution(x)
        if target is None:
            raise NotImplementedError(
                f"{type(self).__name__} samples boundary points but defines neither "
                "boundary_target() nor exact_solution()."
            )
        return target

    def boundary_residual(self, x: Tensor) -> Tensor:
        """Return the boundary residual at boundary points ``x``, shape ``(N,)``."""
        return self.model(x) - self.boundary_target(x).to(self.dtype)

    def hard_constraint(self, x: Tensor, out: Tensor) -> Tensor:
        """Custom map from network output to ``u``; override only if ``constraint`` cannot.

        Overriding it disables the dimension-free fast paths of the estimators.
        """
        return out

    def prepare_batch(self, x: Tensor, rows: int | None = None) -> None:
        """Compute and cache what depends on the interior batch ``x`` only (default: nothing).

        With ``prefetch`` it runs on the prefetch thread for (about) the first ``rows``
        rows, then on the main thread with ``rows=None`` for the rest
        (:class:`~sdze_lightning.prefetch.PreparePlacement`); it must not use the network.
        An override without ``rows`` gets the whole batch on one thread.
        """

    # -------------------------------------------------- the solution and its operators
    @property
    def model(self) -> ModelFunction:
        """The solution ``u`` as a function of the points (network + constraint)."""
        own = type(self).hard_constraint is not PINNProblem.hard_constraint
        return ModelFunction(self.net, self.constraint, self.hard_constraint if own else None)

    def forward(self, x: Tensor) -> Tensor:
        """Return the predicted solution ``u(x)``, shape ``(N,)``."""
        return self.model(x)

    def derivatives(
        self, x: Tensor, generator: torch.Generator, estimator: Estimator | None = None,
        model: Callable[[Tensor], Tensor] | None = None,
    ) -> Derivatives:
        """The accessor ``d`` that :meth:`residual` receives, at any points ``(N, input_dim)``.

        ``estimator`` and ``model`` replace the problem's (e.g. to check a new PDE on its
        exact solution: ``problem.residual(x, problem.derivatives(x, torch.Generator(),
        ExactEstimator(), model=problem.exact_solution))`` is ~0 in float64).
        """
        est = estimator or self.estimator
        values = est.estimate(model or self.model, x, self.operators, generator, self.dim)
        return Derivatives(x, values, self.dim)

    def generator(self, *parts: int, stream: Stream = Stream.USER) -> torch.Generator:
        """A generator on this module's device seeded from ``(stream, seed, *parts)``.

        The library's draws have their own streams (:mod:`sdze_lightning.seeding`).
        """
        gen = torch.Generator(device=self.device)
        gen.manual_seed(mix(stream, self.seed, *parts))
        return gen

    def rand(self, *shape: int, generator: torch.Generator) -> Tensor:
        """Uniform ``[0, 1)`` samples on this module's device and dtype."""
        return torch.rand(*shape, generator=generator, device=self.device, dtype=self.dtype)

    def randn(self, *shape: int, generator: torch.Generator) -> Tensor:
        """Standard normal samples on this module's device and dtype."""
        return torch.randn(*shape, generator=generator, device=self.device, dtype=self.dtype)

    # -------- the library's API: functions of the problem in their modules, bound as methods
    # The points of a step (:mod:`sdze_lightning.collocation`).
    points = collocation.points
    sample_points = collocation.sample_points
    boundary_points = collocation.boundary_points
    isolated_points = collocation.isolated_points

    @property
    def prefetch(self) -> bool:
        """Whether training batches are prefetched (see the ``prefetch`` argument)."""
        return self.collocation.prefetcher is not None

    begin_step = collocation.begin_step
    stop_prefetch = collocation.stop_prefetch

    # The loss (:mod:`sdze_lightning.loss`).
    interior_residuals = loss.interior_residuals
    loss_terms = loss.loss_terms
    residual_batch = loss.residual_batch

    def compute_loss(self, step: int, key: int = 0) -> Tensor:
        """Scalar training loss of ``step`` for noise key ``key``."""
        return self.loss_terms(step, key)["loss"]

    # The held-out error (:mod:`sdze_lightning.evaluation`).
    eval_chunk_rows = evaluation.eval_chunk_rows
    eval_batches = evaluation.eval_batches
    relative_l2_error = evaluation.relative_l2_error

    def run_step(
        self, optimizer: torch.optim.Optimizer, step: int, *,
        backward: Callable[[Tensor], Any] | None = None, skip_nonfinite: bool = False,
    ) -> StepOutcome:
        """One optimizer step on the points of ``step``: what ``training_step`` runs.

        Usable without a ``Trainer``; see :func:`sdze_lightning.stepping.run_step`.
        """
        return stepping.run_step(self, optimizer, step, backward, skip_nonfinite)

    def check_inputs(self) -> None:
        """Check the user contract on a tiny batch (:mod:`sdze_lightning.input_checks`).

        ``fit`` calls it unless it already ran for the module's device and dtype (the
        CLI calls it before it writes any logger, checkpoint or summary).
        """
        input_checks.check_inputs(self)
        self._checked_as = (self.device, self.dtype)

    @property
    def skipped_steps(self) -> int:
        """Steps skipped under ``divergence="skip"``."""
        return self.divergence_guard.skipped_steps

    # ---------------------------------------------------------------- lightning hooks
    def setup(self, stage: str) -> None:
        """Reject a Trainer precision this library cannot train with."""
        check_precision(self.trainer.precision)

    def on_fit_start(self) -> None:
        """Check the inputs (once), shard the batches under DDP, set the thread count."""
        if self._checked_as != (self.device, self.dtype):
            self.check_inputs()
        sizes = {"pde.n_interior": self.n_interior, "pde.n_boundary": self.n_boundary}
        self.shard = data_parallel_shard(self.trainer, inner_optimizers(self), sizes)
        work = (self.n_interior + self.n_boundary) * sum(p.numel() for p in self.net.parameters())
        self.intra_op_threads = self.fit_threads.apply(
            self.device.type == "cpu", work, int(self.prefetch), self.trainer.num_devices
        )
        self.divergence_guard.in_a_row = 0

    def on_train_start(self) -> None:
        """Drop a batch prefetched by an earlier fit; after a resume, refuse another method seed."""
        self.stop_prefetch()
        collocation.drop_prefetch_without_crns(self, zeroth_order_optimizers(self))
        saved, self._resumed_from = self._resumed_from, None
        if saved:
            resume.check_method_seeds(saved, inner_optimizers(self))

    def configure_optimizers(self) -> Any:
        """Build the injected method (and scheduler)."""
        opt = build_optimizer(self.method, self.net)
        if self.scheduler is None:
            return opt
        scheduler = {"scheduler": self.scheduler(opt), "interval": "step"}
        return {"optimizer": opt, "lr_scheduler": scheduler}

    def train_dataloader(self) -> DataLoader[int]:
        """The step indices of an epoch; the points are sampled in ``training_step``."""
        return self._indices(self.steps_per_epoch)

    def val_dataloader(self) -> DataLoader[int]:
        """One index: validation evaluates the held-out set."""
        return self._indices(1)

    def _indices(self, n: int) -> DataLoader[int]:
        # An own generator: a loader's iterator draws its base seed from it, not globally.
        gen = torch.Generator().manual_seed(self.seed)
        return DataLoader(range(n), batch_size=None, generator=gen)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        """One optimizer step (:meth:`run_step`) under the :attr:`divergence` policy."""
        outcome = self.divergence_guard.run(self.divergence, lambda skip: self.run_step(
            self.optimizers(), self.global_step, backward=self.manual_backward, skip_nonfinite=skip
        ))
        sched = self.lr_schedulers()
        if sched is not None:
            sched.step()
        self.last_loss = float(outcome.loss)
        self.log("train/loss", outcome.loss, prog_bar=True)
        if "boundary" in outcome.terms:
            self.log("train/boundary", outcome.terms["boundary"].detach())
        if self.skipped_steps:
            self.log("train/skipped_steps", float(self.skipped_steps))

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Log ``val/rel_l2`` on the held-out points (torchmetrics, DDP-safe)."""
        if evaluation.update_error(self, self.rel_l2):
            self.log("val/rel_l2", self.rel_l2, prog_bar=True)

    def on_train_end(self) -> None:
        """Fold the methods' implicit offsets (SDZE) into the weights: a plain network again."""
        for opt in zeroth_order_optimizers(self):
            opt.fold()

    def teardown(self, stage: str) -> None:
        """Stop prefetching; restore the whole batch, the thread count; close the methods."""
        self.stop_prefetch()
        self.fit_threads.restore()
        self.shard, self._checked_as = Shard(), None
        for opt in zeroth_order_optimizers(self):
            opt.reducer = None
            opt.close()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the seeds a resumed run must share (:mod:`sdze_lightning.resume`)."""
        checkpoint[resume.CHECKPOINT_KEY] = resume.resume_state(
            self.seed, inner_optimizers(self), self.skipped_steps
        )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Convert to the Trainer's precision before the weights load; refuse another seed.

        Lightning loads the weights before it converts the module: with ``64-true`` a
        float32 module would round the float64 checkpoint first.
        """
        trainer = getattr(self, "_trainer", None)
        if trainer is not None:
            trainer.strategy.precision_plugin.convert_module(self)
        saved = checkpoint.get(resume.CHECKPOINT_KEY)
        if saved:
            resume.check_seed(saved, self.seed)
            self.divergence_guard.skipped_steps = int(saved.get("skipped_steps", 0))
        self._resumed_from = saved or None
