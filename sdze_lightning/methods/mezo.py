"""MeZO-style full-space two-point zeroth-order optimizer (the ZO baseline).

Every step draws ``q`` Gaussian directions ``z_j`` over *all* trainable
parameters and estimates ``g = (1/q) sum_j (L(theta + eps z_j) - L(theta - eps
z_j)) / (2 eps) z_j`` (SPSA). As in MeZO (Malladi et al. 2023) the directions
are never stored: each is regenerated, parameter by parameter, from a seed
(``(seed, step, query, parameter index)``, on the parameter's device, never the
global RNG), so memory stays at one parameter tensor of noise at a time.

Perturbation is **in place** (``theta += eps z``, ``-= 2 eps z``, ``+= eps z``):
an implicit full-rank offset would be as large as the parameters themselves,
and this is the baseline being compared against. The restore is therefore not
bit-exact: each step leaves a round-off drift of order ``eps * |z| *
machine epsilon`` per parameter, far below the update ``lr * g * z``.
(SDZE's implicit offsets do not have this problem.) With an MLP, in-place
writes also invalidate the shared ``W x`` of the first layer, so every
evaluation pays a full pass over the input, as MeZO does.

**Scale-free step (``normalize=True``, the default).** Plain
SGD on the SPSA estimate needs a learning rate inversely proportional to the
size of the loss gradient, which differs by orders of magnitude between
problems (the two-body Allen-Cahn source grows like ``d^1.5``, Poisson 2D's loss is
of order one), so no one rate serves both (measured: ``benchmarks/README.md``,
``method_accuracy.py``). With ``normalize=True`` each
projected-gradient scalar ``s_j`` is divided by the root of a bias-corrected
exponential moving average of ``mean_j s_j^2`` (decay ``norm_beta``), so that
every parameter moves by about ``lr * z`` per step whatever the loss scale (an
RMSProp-style normalisation of the one scalar per query; the directions, the
in-place perturbation and the SGD form of the update are MeZO's). The moving
average is a float in the optimizer state (checkpointed, replayed). With
``normalize=False`` the update is MeZO's plain ``theta <- theta - lr s z``, whose
``lr`` has to be matched to the loss scale.

The constructor's defaults are the values of ``configs/method/mezo.yaml``, so
``MeZO(net)`` is the optimizer that ``sdze-train method=mezo`` runs.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from sdze_lightning.checks import boolean
from sdze_lightning.methods.zeroth_order import TwoPointOptimizer
from sdze_lightning.seeding import Stream, generator


class MeZO(TwoPointOptimizer):
    """Full-space SPSA with seed-regenerated Gaussian directions and SGD updates.

    Args:
        module: The network (every trainable parameter is perturbed).
        lr: Learning rate (a ``param_groups`` entry, so LR schedulers work).
        eps: Perturbation size.
        queries: Directions ``q`` per step.
        crns: Common Random Numbers Synchronisation of the paired evaluations.
        weight_decay: Decoupled weight decay ``theta <- (1 - lr wd) theta``.
        seed: Seed of the directions.
        normalize: Divide the projected-gradient scalars by the root of their
            bias-corrected running mean square (scale-free step; module docstring).
        norm_beta: Decay of that running mean square.

    """

    def __init__(
        self,
        module: nn.Module,
        lr: float = 3e-3,
        eps: float = 1e-3,
        queries: int = 1,
        crns: bool = True,
        weight_decay: float = 0.0,
        seed: int = 0,
        normalize: bool = True,
        norm_beta: float = 0.99,
    ) -> None:
        boolean("method.normalize", normalize)
        if not isinstance(norm_beta, int | float) or isinstance(norm_beta, bool) or not (
            0 <= norm_beta < 1
        ):
            raise ValueError(f"method.norm_beta must be in [0, 1), got {norm_beta!r}.")
        super().__init__(
            module, dict(lr=lr, weight_decay=weight_decay), eps=eps, queries=queries, crns=crns,
            seed=seed,
        )
        self._params = [p for g in self.param_groups for p in g["params"]]
        self._step = 0
        self._offset: tuple[int, float] | None = None
        self.normalize = normalize
        self.norm_beta = float(norm_beta)
        if normalize:
            self.zo_state.update(sq_avg=0.0, norm_step=0)

    @staticmethod
    def step_temporary_numel(module: nn.Module, **_: Any) -> int:
        """Numbers a step allocates (the memory pre-flight's count).

        The regenerated direction ``z`` of one parameter at a time: the largest.
        """
        return max((p.numel() for p in module.parameters() if p.requires_grad), default=0)

    def direction(self, query: int, index: int) -> Tensor:
        """Regenerate ``z`` of query ``query`` for parameter ``index`` at the current step."""
        p = self._params[index]
        gen = generator(
            p.device, Stream.MEZO_DIRECTIONS, self.seed, self._step, query, index
        )
        return torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype)

    def _prepare(self, step: int) -> None:
        self._step = step
        self._offset = None

    @torch.no_grad()
    def _perturb(self, query: int | None, sign: int) -> None:
        target = None if query is None else (query, sign * self.eps)
        current = self._offset
        if target == current:
            return
        for i, p in enumerate(self._params):
            if current is not None and target is not None and current[0] == target[0]:
                p.add_(self.direction(target[0], i), alpha=target[1] - current[1])
                continue
            if current is not None:
                p.add_(self.direction(current[0], i), alpha=-current[1])
            if target is not None:
                p.add_(self.direction(target[0], i), alpha=target[1])
        self._offset = target

    def normalized(self, scalars: Tensor) -> Tensor:
        """The scalars divided by the root of their running mean square (updates the average).

        Identity when ``normalize`` is off. The average lives in :attr:`zo_state`
        (``sq_avg``, ``norm_step``), so checkpoints and replays reproduce it.
        """
        if not self.normalize:
            return scalars
        state = self.zo_state
        state["norm_step"] = state.get("norm_step", 0) + 1
        state.setdefault("sq_avg", 0.0)
        state["sq_avg"] = self.norm_beta * state["sq_avg"] + (1 - self.norm_beta) * float(
            scalars.square().mean()
        )
        rms = math.sqrt(state["sq_avg"] / (1 - self.norm_beta ** state["norm_step"]))
        return scalars / rms if rms > 0 else torch.zeros_like(scalars)

    @torch.no_grad()
    def _update(self, scalars: Tensor) -> None:
        coeff = (self.normalized(scalars) / self.queries).tolist()
        wd = float(self.param_groups[0].get("weight_decay", 0.0))
        for i, p in enumerate(self._params):
            if wd:
                p.mul_(1 - self.lr * wd)
            for j, c in enumerate(coeff):
                p.add_(self.direction(j, i), alpha=-self.lr * c)

    def state_size(self) -> int:
        """Number of tensor elements in the optimizer state (none: directions are regenerated)."""
        return 0
