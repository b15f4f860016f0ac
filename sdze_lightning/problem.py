"""``PINNProblem``: a PDE as a ``LightningModule``.

A new PDE subclasses :class:`PINNProblem` and implements its user contract (sampling,
residual, optionally the exact solution and boundary values); network, spatial
estimator and method are injected, and ``lightning.Trainer(max_steps=...).fit(problem)``
needs no DataModule. The class holds the contract and thin Lightning hooks; each
other concern has its module, named where the class uses it.

A problem records its constructor call (``hparams``, plain data) and its class in every
checkpoint: ``PINNProblem.load_from_checkpoint(path)`` returns the trained problem
(:mod:`sdze_lightning.loading`).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, ClassVar

import lightning as L
import torch
from torch import Tensor, nn

from sdze_lightning import input_checks, loading
from sdze_lightning.collocation import Collocation, StepLoader, seeded_generator, step_indices
from sdze_lightning.constraints import Constraint
from sdze_lightning.derivatives import Derivatives
from sdze_lightning.distributed import Shard, data_parallel_shard, keep_self_reduced_out_of_ddp
from sdze_lightning.divergence import NonFiniteLossError
from sdze_lightning.estimators import Estimator
from sdze_lightning.evaluation import HeldOutSet
from sdze_lightning.input_checks import ContractCheck, check_precision
from sdze_lightning.loss import PhysicsLoss
from sdze_lightning.methods.base import build_optimizer
from sdze_lightning.metrics import RelativeL2Error
from sdze_lightning.model_fn import ModelFunction
from sdze_lightning.output_fit import OutputOffsetFit
from sdze_lightning.resume import ResumeRecord
from sdze_lightning.seeding import Stream
from sdze_lightning.stepping import (
    StepOutcome,
    StepRunner,
    inner_optimizers,
    zeroth_order_optimizers,
)
from sdze_lightning.threads import FitThreads

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self needs Python 3.11

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
        output_fit: ``"constant"``: before the first step of a fit (not a resume), set the
            network's mean output to the constant that minimises the training loss
            (:mod:`sdze_lightning.output_fit`); ``"none"``: keep the initialisation.

    The arguments of the constructor call (of the subclass, if it has its own) are
    recorded in ``hparams`` as plain data, the network as a recipe (the library's
    ``MLP``: its arguments; a factory: the partial); a network module of one's own is not
    recorded, and :meth:`load_from_checkpoint` then needs ``net=`` again
    (:mod:`sdze_lightning.loading`).

    Public surface, beyond ``LightningModule``'s (``tests/unit/test_problem_surface.py`` checks
    this list against ``dir()``):

    * the user contract, overridden by a subclass: ``sample_interior``,
      ``sample_boundary``, ``residual``, ``exact_solution``, ``boundary_target``,
      ``boundary_residual``, ``hard_constraint``, ``prepare_batch``, ``operators``,
      ``time_dependent``;
    * tools for writing it: ``generator``, ``rand``, ``randn``, ``derivatives``, ``model``,
      ``overrides``;
    * the settings (constructor arguments): ``dim``, ``input_dim``, ``seed``,
      ``n_interior``, ``n_boundary``, ``n_eval``, ``boundary_weight``,
      ``squared_residual``, ``steps_per_epoch``, ``divergence``, ``threads``,
      ``fused_kernels``, ``net``, ``estimator``, ``estimator_halves``, ``method``,
      ``scheduler``, ``constraint``;
    * the collaborators that own the library's state: ``collocation`` (points, prefetch,
      this rank's share), ``physics_loss``, ``step_runner`` (steps, divergence guard),
      ``held_out``, ``contract_check``, ``resume_record``, ``output_fit``, ``fit_threads``,
      and the metric ``rel_l2``;
    * what the last fit did: ``intra_op_threads``, ``last_loss``, ``skipped_steps``;
    * the library's API, delegating to the collaborators: ``points``, ``sample_points``,
      ``boundary_points``, ``isolated_points``, ``begin_step``, ``stop_prefetch``,
      ``prefetch``, ``shard``, ``interior_residuals``, ``loss_terms``, ``residual_batch``,
      ``compute_loss``, ``eval_chunk_rows``, ``eval_batches``, ``relative_l2_error``,
      ``run_step``, ``check_inputs``, ``prepare_fit``.

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
        output_fit: str = "constant",
    ) -> None:
        super().__init__()
        input_checks.check_arguments(
            type(self), dim=dim, n_interior=n_interior, n_boundary=n_boundary, n_eval=n_eval,
            seed=seed, boundary_weight=boundary_weight, squared_residual=squared_residual,
            steps_per_epoch=steps_per_epoch, divergence=divergence, prefetch=prefetch,
            fused_kernels=fused_kernels, threads=threads, output_fit=output_fit,
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
        # the collaborators that own the library's state (see the class docs)
        self.collocation = Collocation(self, prefetch)
        self.physics_loss = PhysicsLoss(self, self.collocation)
        self.step_runner = StepRunner(self, self.collocation, self.physics_loss)
        self.held_out = HeldOutSet(self)
        self.contract_check = ContractCheck(self)
        self.resume_record = ResumeRecord(self)
        #: Fits the network's output offset to the loss before the first step.
        self.output_fit = OutputOffsetFit(output_fit)
        self.fit_threads = FitThreads(threads)
        #: The intra-op thread count of the last ``fit`` (``None`` before one).
        self.intra_op_threads: int | None = None
        #: The held-out error logged at validation (torchmetrics, DDP-safe).
        self.rel_l2 = RelativeL2Error()
        loading.record_arguments(self, inspect.currentframe())

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

    # ------------------------------------------------- random numbers for the samplers
    def generator(self, *parts: int, stream: Stream = Stream.USER) -> torch.Generator:
        """A generator on the problem's device seeded from ``(stream, seed, *parts)``.

        The library's own draws use other streams (:mod:`sdze_lightning.seeding`).
        """
        return seeded_generator(self.device, self.seed, *parts, stream=stream)

    def rand(self, *shape: int, generator: torch.Generator) -> Tensor:
        """Uniform ``[0, 1)`` samples on the problem's device and dtype."""
        return torch.rand(*shape, generator=generator, device=self.device, dtype=self.dtype)

    def randn(self, *shape: int, generator: torch.Generator) -> Tensor:
        """Standard normal samples on the problem's device and dtype."""
        return torch.randn(*shape, generator=generator, device=self.device, dtype=self.dtype)

    @classmethod
    def overrides(cls, name: str) -> bool:
        """Whether this class defines its own ``name`` (a contract method) over the base's."""
        return getattr(cls, name) is not getattr(PINNProblem, name)

    # -------------------------------------------------- the solution and its operators
    @property
    def model(self) -> ModelFunction:
        """The solution ``u`` as a function of the points (network + constraint)."""
        own = self.overrides("hard_constraint")
        return ModelFunction(self.net, self.constraint, self.hard_constraint if own else None)

    def forward(self, x: Tensor) -> Tensor:
        """Return the predicted solution ``u(x)`` (hard constraint included), shape ``(N,)``."""
        return self.model(x)

    def predict_step(
        self, batch: Tensor | Sequence[Tensor], batch_idx: int = 0, dataloader_idx: int = 0
    ) -> Tensor:
        """``u`` at a batch of points, for ``Trainer.predict``.

        Args:
            batch: Points ``(B, input_dim)``, or a list/tuple whose first entry they are
                (a ``TensorDataset``'s batch); converted to the module's dtype.
            batch_idx: Index of the batch (unused).
            dataloader_idx: Index of the loader (unused).

        Returns:
            ``u(x)`` (hard constraint included), shape ``(B,)``.

        """
        x = batch[0] if isinstance(batch, list | tuple) else batch
        return self(x.to(self.dtype) if x.is_floating_point() else x)

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls, checkpoint_path: str | Path | IO, map_location: Any = "cpu", *, strict: bool = True,
        weights_only: bool | None = None, **kwargs: Any,
    ) -> Self:
        """The trained problem of a checkpoint (``sdze-train``'s or ``Trainer.fit``'s).

        Rebuilt from the run's config (``sdze-train``) or the recorded constructor call, of
        the checkpoint's class (which must be ``cls`` or a subclass), with the trained
        weights in their dtype, a zeroth-order method's offset folded in, in eval mode
        (:func:`sdze_lightning.loading.load_checkpoint`).

        Args:
            checkpoint_path: The checkpoint file.
            map_location: Where the weights go (``torch.load``'s argument; default CPU).
            strict: Whether the state dict must match the module's keys.
            weights_only: ``torch.load``'s argument (``None``: torch's default).
            **kwargs: Constructor arguments replacing the recorded ones (``threads=1``,
                ``net=`` a network module of one's own, which is not recorded).

        """
        return loading.load_checkpoint(
            cls, checkpoint_path, map_location, strict, weights_only, **kwargs
        )

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

    # ------------------------------ the library's API: delegates to the collaborators
    @property
    def shard(self) -> Shard:
        """This rank's share of each batch (the whole batch unless data-parallel)."""
        return self.collocation.shard

    @property
    def prefetch(self) -> bool:
        """Whether training batches are prefetched (see the ``prefetch`` argument)."""
        return self.collocation.prefetching

    def points(self, step: int, key: int = 0) -> Tensor:
        """Interior points of ``step`` for noise key ``key`` (cached within the step)."""
        return self.collocation.points(step, key)

    def sample_points(self, step: int, key: int = 0) -> Tensor:
        """Interior points of ``step`` for noise key ``key``, drawn anew (not cached)."""
        return self.collocation.sample_points(step, key)

    def boundary_points(self, step: int, key: int = 0) -> Tensor:
        """Boundary/initial points of ``step`` for noise key ``key`` (cached within the step)."""
        return self.collocation.boundary_points(step, key)

    def isolated_points(self) -> contextlib.AbstractContextManager[None]:
        """A block whose cached points (probes, measurements) are dropped at its end."""
        return self.collocation.isolated()

    def begin_step(self, step: int) -> None:
        """Make the (prefetched) interior batch of training ``step`` ready."""
        self.collocation.begin_step(step)

    def stop_prefetch(self) -> None:
        """Stop the prefetch thread and drop the batch it was building."""
        self.collocation.stop_prefetch()

    def interior_residuals(
        self, step: int, key: int = 0, rows: slice | None = None
    ) -> tuple[Tensor, ...]:
        """Per-point residual(s) of ``step``: one tensor, or two independent halves."""
        return self.physics_loss.interior_residuals(step, key, rows)

    def loss_terms(self, step: int, key: int = 0) -> dict[str, Tensor]:
        """Loss of ``step`` as a dict with ``"loss"``, ``"interior"`` and ``"boundary"``."""
        return self.physics_loss.terms(step, key)

    def residual_batch(
        self, step: int, key: int = 0, rows: slice | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Per-point interior residual and weighted boundary term (``pde_aware``'s input)."""
        return self.physics_loss.residual_batch(step, key, rows)

    def compute_loss(self, step: int, key: int = 0) -> Tensor:
        """Scalar training loss of ``step`` for noise key ``key``."""
        return self.physics_loss.terms(step, key)["loss"]

    def eval_chunk_rows(self) -> int:
        """Held-out points per chunk."""
        return self.held_out.chunk_rows()

    def eval_batches(self, chunk: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """Held-out points and reference values, one chunk at a time."""
        return self.held_out.batches(chunk)

    def relative_l2_error(self) -> float | None:
        """Relative L2 error on the held-out points, or ``None`` without a reference."""
        return self.held_out.relative_l2_error()

    def run_step(
        self, optimizer: torch.optim.Optimizer, step: int, *,
        backward: Callable[[Tensor], Any] | None = None, skip_nonfinite: bool = False,
    ) -> StepOutcome:
        """One optimizer step on the points of ``step``, usable without a Trainer.

        See :meth:`~sdze_lightning.stepping.StepRunner.run`.
        """
        return self.step_runner.run(optimizer, step, backward=backward,
                                    skip_nonfinite=skip_nonfinite)

    def check_inputs(self) -> None:
        """Check the user contract on a tiny batch (:func:`.input_checks.check_inputs`)."""
        self.contract_check.run()

    @property
    def skipped_steps(self) -> int:
        """Steps skipped under ``divergence="skip"`` so far (checkpoints keep the count)."""
        return self.step_runner.guard.skipped_steps

    @property
    def last_loss(self) -> float:
        """The loss of the last training step (NaN before one)."""
        return self.step_runner.last_loss

    # ---------------------------------------------------------------- lightning hooks
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the seeds a resume must share and the problem's class.

        See :mod:`sdze_lightning.resume` and :mod:`sdze_lightning.loading`.
        """
        self.resume_record.save(checkpoint)
        loading.on_save_checkpoint(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Take the Trainer's precision before the weights load; refuse other seeds."""
        self.resume_record.load(checkpoint)

    def setup(self, stage: str) -> None:
        """Reject a Trainer precision this library cannot train with; set up DDP's exclusions."""
        check_precision(self.trainer.precision)
        keep_self_reduced_out_of_ddp(self, self.method, self.net)

    def on_fit_start(self) -> None:
        """Check the inputs (once), shard the batches under DDP, set threads, fit the offset.

        The offset is fitted in a fresh fit only: weights from a checkpoint keep theirs.
        """
        self.prepare_fit(self.device.type == "cpu", self.trainer.num_devices)
        sizes = {"pde.n_interior": self.n_interior, "pde.n_boundary": self.n_boundary}
        self.collocation.shard = data_parallel_shard(self.trainer, inner_optimizers(self), sizes)
        self.step_runner.guard.in_a_row = 0
        self.output_fit.apply(self)

    def prepare_fit(self, on_cpu: bool = True, num_devices: int = 1) -> int:
        """Check the inputs (once) and set torch's thread count for the step's work.

        The part of :meth:`on_fit_start` that needs no Trainer; returns the thread count.

        Args:
            on_cpu: Whether the network runs on the CPU (the thread policy applies there).
            num_devices: Processes training on this machine (data-parallel ranks).

        """
        self.contract_check.run_unless_checked()
        params = sum(p.numel() for p in self.net.parameters())
        work = (self.n_interior + self.n_boundary) * params
        self.intra_op_threads = self.fit_threads.apply(on_cpu, work, int(self.prefetch),
                                                       num_devices)
        return self.intra_op_threads

    def on_train_start(self) -> None:
        """Drop a batch prefetched by an earlier fit; after a resume, refuse another method seed."""
        self.collocation.stop_prefetch()
        self.collocation.drop_prefetch_without_crns(zeroth_order_optimizers(self))
        self.resume_record.check_methods()

    def on_train_end(self) -> None:
        """Fold the methods' implicit offsets (SDZE) into the weights: a plain network again."""
        for opt in zeroth_order_optimizers(self):
            opt.fold()

    def teardown(self, stage: str) -> None:
        """Stop prefetching; restore the whole batch, the thread count; close the methods."""
        self.collocation.stop_prefetch()
        self.fit_threads.restore()
        self.collocation.shard = Shard()
        self.contract_check.forget()
        for opt in zeroth_order_optimizers(self):
            opt.close()

    def configure_optimizers(self) -> Any:
        """Build the injected method (and scheduler)."""
        opt = build_optimizer(self.method, self.net)
        if self.scheduler is None:
            return opt
        scheduler = {"scheduler": self.scheduler(opt), "interval": "step"}
        return {"optimizer": opt, "lr_scheduler": scheduler}

    def train_dataloader(self) -> StepLoader:
        """The step indices of an epoch (``steps_per_epoch``); resumable mid-epoch."""
        return step_indices(self.seed, self.steps_per_epoch)

    def val_dataloader(self) -> StepLoader:
        """One index: validation evaluates the held-out set."""
        return step_indices(self.seed, 1)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        """One step of the method under the divergence policy; the loss is logged."""
        outcome = self.step_runner.training_step()
        self.log("train/loss", outcome.loss, prog_bar=True)
        if "boundary" in outcome.terms:
            self.log("train/boundary", outcome.terms["boundary"].detach())
        if self.skipped_steps:
            self.log("train/skipped_steps", float(self.skipped_steps))

    def validation_step(self, batch: object, batch_idx: int) -> None:
        """Log ``val/rel_l2`` on the held-out points (torchmetrics, DDP-safe)."""
        if self.held_out.update(self.rel_l2):
            self.log("val/rel_l2", self.rel_l2, prog_bar=True)
