"""Data parallelism with scalar communication.

Under ``trainer.strategy=ddp`` every rank holds the same parameters (same
seeded initialisation, broadcast once by DDP) and the same method seed. For a
step ``k``:

1. every rank samples the *whole* batch of collocation points from the
   per-step seed (the same on all ranks) and keeps its contiguous share
   (:class:`Shard`); the union of the shares is the single-process batch;
2. it evaluates each loss term on its share as the rank's estimate of the
   global term, ``world_size * sum(share) / n_total``
   (:meth:`Shard.mean`); the mean of these over the ranks is exactly the
   global mean, whatever the split;
3. a zeroth-order method all-reduces its ``2 q`` loss values
   (:func:`all_reduce_mean`): ``16 q`` bytes per step, whatever the
   parameter count; every rank then applies the same update from the shared
   seed, so ranks never drift apart;
4. a first-order method back-propagates its rank's estimate and Lightning's
   DDP averages the gradients (the usual DDP), which again gives the gradient
   of the global loss;
5. ``fused_adafactor`` keeps its input layer's weight out of DDP: the ranks
   exchange that layer's back-propagated signals (``N x width`` numbers, see
   :meth:`~sdze_lightning.nn.first_layer_grad.FirstLayerGradient.across_ranks`),
   and each rank rebuilds the whole batch's gradient factors from the points it
   sampled (:meth:`Shard.full_batch`); DDP averages the small layers' gradients.

The estimators' random directions depend on the per-step seed only, not on the
points, so each rank uses the same directions as the single-process run.

:class:`CommunicationCounter` counts the bytes of every collective issued
through ``torch.distributed`` (including DDP's gradient buckets when a Python
communication hook such as ``allreduce_hook`` is registered), to check that
claim.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from sdze_lightning.methods.base import method_class, traits_of
from sdze_lightning.methods.zeroth_order import ZerothOrderOptimizer

#: Every share handed out by :meth:`Shard.take`, with the batch it was taken from: a rank's
#: points are a view of the whole batch, which every rank sampled.
_TAKEN_FROM = WeakIdKeyDictionary()

#: Collectives whose tensor payloads :class:`CommunicationCounter` counts.
COLLECTIVES: tuple[str, ...] = (
    "all_reduce",
    "broadcast",
    "reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "all_to_all",
    "all_to_all_single",
    "gather",
    "scatter",
    "send",
    "recv",
    "isend",
    "irecv",
    "all_gather_object",
    "broadcast_object_list",
    "gather_object",
    "scatter_object_list",
    "barrier",
)


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group with more than one rank is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@dataclass(frozen=True)
class Shard:
    """The share of one rank in a batch: contiguous, sizes differ by at most one.

    Attributes:
        rank: Global rank.
        world_size: Number of ranks.

    """

    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world size {self.world_size}.")

    @property
    def active(self) -> bool:
        """Whether the batch is actually split (more than one rank)."""
        return self.world_size > 1

    def bounds(self, n: int) -> tuple[int, int]:
        """``(start, stop)`` of this rank's rows in a batch of ``n`` (as ``torch.tensor_split``)."""
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (1 if self.rank < extra else 0)

    def take(self, batch: Tensor) -> Tensor:
        """Rows of ``batch`` that belong to this rank (the whole batch on one rank).

        The share is a view of ``batch``; :meth:`full_batch` finds ``batch`` from it.
        """
        if not self.active:
            return batch
        start, stop = self.bounds(batch.shape[0])
        share = batch[start:stop]
        _TAKEN_FROM[share] = batch
        return share

    def full_batch(self, share: Tensor) -> Tensor | None:
        """The batch that :meth:`take` cut ``share`` from, or ``None`` if it did not.

        ``None`` too for a tensor that is no longer exactly this rank's rows of that
        batch (a copy, a transformed or reshaped input).
        """
        batch = _TAKEN_FROM.get(share)
        if batch is None:
            return None
        start, stop = self.bounds(batch.shape[0])
        if share.shape != (stop - start, *batch.shape[1:]) or (
                stop > start and share.data_ptr() != batch[start].data_ptr()):
            return None
        return batch

    def mean(self, values: Tensor, n_total: int) -> Tensor:
        """Estimate, from this rank's share, of the mean over the whole batch of ``n_total`` values.

        ``values`` are the rank's share; the mean over the ranks of
        ``world_size * values.sum() / n_total`` is the global mean. On one rank
        this is ``values.mean()`` (bit for bit).
        """
        if not self.active:
            return values.mean()
        return values.sum() * (self.world_size / n_total)


def data_parallel_shard(
    trainer: Any,
    optimizers: Sequence[Any],
    sizes: Mapping[str, int],
) -> Shard:
    """This rank's :class:`Shard` for ``trainer``.

    Zeroth-order two-point methods and plain first-order optimizers (whose
    gradients Lightning's DDP averages) evaluate this rank's share of the
    points; the step hands a zeroth-order method :func:`all_reduce_mean` as its
    ``reduce`` and ``fused_adafactor`` the shard. Optimizers that compute their own
    per-point gradients (``needs_residuals``, e.g. pde_aware) see the whole batch
    on every rank.

    Args:
        trainer: The Lightning Trainer.
        optimizers: Its optimizers, unwrapped.
        sizes: Points per batch by config name (``pde.n_interior``, ...); each must
            give every rank at least one point.

    """
    world = int(getattr(trainer, "world_size", 1) or 1)
    if world <= 1:
        return Shard()
    from lightning.pytorch.strategies import DDPStrategy

    zeroth_order = [o for o in optimizers if isinstance(o, ZerothOrderOptimizer)]
    if zeroth_order and not isinstance(trainer.strategy, DDPStrategy):
        raise ValueError(
            f"Zeroth-order methods support trainer.strategy=ddp (ddp, ddp_spawn, ddp_fork) "
            f"across devices; got {type(trainer.strategy).__name__}."
        )
    if any(traits_of(o).needs_residuals for o in optimizers):
        return Shard()
    for name, n in sizes.items():
        if 0 < n < world:
            raise ValueError(
                f"{name}={n} is smaller than the number of ranks ({world}); every rank "
                "needs at least one point."
            )
    return Shard(int(trainer.global_rank), world)


def keep_self_reduced_out_of_ddp(
    module: torch.nn.Module, factory: Any, net: torch.nn.Module
) -> None:
    """Have DDP leave alone the parameters that the method ``factory`` reduces itself.

    ``fused_adafactor``'s input weight: no gradient bucket (``width x d`` numbers), no
    all-reduce. Must run before the strategy wraps ``module`` (Lightning's ``setup``
    hook); without DDP it has no effect.

    Args:
        module: The module the strategy wraps (the problem).
        factory: The method (class, partial or instance).
        net: The network the method is built from.

    """
    if not traits_of(factory).reduces_input_layer:
        return
    ids = {id(p) for p in method_class(factory).self_reduced_parameters(net)}
    names = [name for name, p in module.named_parameters() if id(p) in ids]
    # DDP's way to exclude parameters from its reducer (a static method of the wrapper)
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        module, names)


def all_reduce_mean(values: Tensor, group: Any = None) -> Tensor:
    """Mean of ``values`` over the ranks of ``group`` (a copy; the input is untouched).

    One ``all_reduce`` (sum) of ``values.numel()`` elements. Every rank gets the
    same bytes, so all ranks take the same decisions from the result.
    """
    if not is_distributed():
        return values
    out = values.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out / dist.get_world_size(group)


def all_true(flag: bool, device: torch.device | str = "cpu", group: Any = None) -> bool:
    """Whether ``flag`` holds on every rank (one all-reduce of one number)."""
    if not is_distributed():
        return flag
    if dist.get_backend(group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    t = torch.tensor([0.0 if flag else 1.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return bool(t.item() == 0)


def _payload_bytes(value: Any) -> int:
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, list | tuple):
        return sum(_payload_bytes(v) for v in value)
    return 0


@dataclass
class CommunicationCounter:
    """Count the collectives issued through ``torch.distributed`` and their payload bytes.

    Used as a context manager: while it is active the functions named in
    :data:`COLLECTIVES` are wrapped. Payload = the tensors handed to the call
    (inputs and output buffers), ``numel * element_size``; Python objects
    (``*_object`` calls) count 0 bytes but are counted as calls. Collectives
    issued from C++ without going through Python (DDP's built-in gradient
    all-reduce) are not seen: register a Python communication hook
    (``torch.distributed.algorithms.ddp_comm_hooks.default_hooks.allreduce_hook``,
    the same communication) to count them.

    Attributes:
        bytes: Total payload bytes so far.
        calls: Number of calls per collective name.

    """

    bytes: int = 0
    calls: dict[str, int] = field(default_factory=dict)
    _saved: dict[str, Callable[..., Any]] = field(default_factory=dict, repr=False)

    def snapshot(self) -> tuple[int, int]:
        """``(bytes, total calls)`` so far."""
        return self.bytes, sum(self.calls.values())

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] = self.calls.get(name, 0) + 1
            self.bytes += sum(_payload_bytes(a) for a in (*args, *kwargs.values()))
            return fn(*args, **kwargs)

        return counted

    def __enter__(self) -> CommunicationCounter:
        for name in COLLECTIVES:
            fn = getattr(dist, name, None)
            if fn is not None:
                self._saved[name] = fn
                setattr(dist, name, self._wrap(name, fn))
        return self

    def __exit__(self, *exc: object) -> None:
        for name, fn in self._saved.items():
            setattr(dist, name, fn)
        self._saved.clear()

