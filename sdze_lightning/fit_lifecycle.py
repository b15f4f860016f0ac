"""What a ``fit`` sets up before its first step and releases after its last.

:class:`~sdze_lightning.problem.PINNProblem` binds these functions as its Lightning
hooks (``on_fit_start``, ``on_train_start``, ``on_train_end``, ``teardown``): the
input check (once per device and dtype), the data-parallel share of each batch, the
intra-op thread count, the prefetch thread and the methods' implicit offsets.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sdze_lightning import collocation, resume
from sdze_lightning.distributed import Shard, data_parallel_shard
from sdze_lightning.methods.fused_adafactor import FusedAdafactor
from sdze_lightning.stepping import inner_optimizers, zeroth_order_optimizers

if TYPE_CHECKING:
    from sdze_lightning.problem import PINNProblem


def on_fit_start(problem: PINNProblem) -> None:
    """Check the inputs (once), shard the batches under DDP, set threads, fit the output offset.

    The offset is fitted in a fresh fit only: weights from a checkpoint keep theirs.
    """
    if problem._checked_as != (problem.device, problem.dtype):
        problem.check_inputs()
    sizes = {"pde.n_interior": problem.n_interior, "pde.n_boundary": problem.n_boundary}
    problem.shard = data_parallel_shard(problem.trainer, inner_optimizers(problem), sizes)
    params = sum(p.numel() for p in problem.net.parameters())
    work = (problem.n_interior + problem.n_boundary) * params
    problem.intra_op_threads = problem.fit_threads.apply(
        problem.device.type == "cpu", work, int(problem.prefetch), problem.trainer.num_devices
    )
    problem.divergence_guard.in_a_row = 0
    problem.output_fit.apply(problem)


def on_train_start(problem: PINNProblem) -> None:
    """Drop a batch prefetched by an earlier fit; after a resume, refuse another method seed."""
    problem.stop_prefetch()
    collocation.drop_prefetch_without_crns(problem, zeroth_order_optimizers(problem))
    saved, problem._resumed_from = problem._resumed_from, None
    if saved:
        resume.check_method_seeds(saved, inner_optimizers(problem))


def on_train_end(problem: PINNProblem) -> None:
    """Fold the methods' implicit offsets (SDZE) into the weights: a plain network again."""
    for opt in zeroth_order_optimizers(problem):
        opt.fold()


def teardown(problem: PINNProblem, stage: str) -> None:
    """Stop prefetching; restore the whole batch, the thread count; close the methods."""
    problem.stop_prefetch()
    problem.fit_threads.restore()
    problem.shard, problem._checked_as = Shard(), None
    for opt in zeroth_order_optimizers(problem):
        opt.reducer = None
        opt.close()
    for opt in inner_optimizers(problem):
        if isinstance(opt, FusedAdafactor):
            opt.shard = None
