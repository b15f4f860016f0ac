"""High-dimensional HJB equation of a linear-quadratic-Gaussian control problem (He et al. 5.2)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sdze_lightning.derivatives import Derivatives
from sdze_lightning.problem import PINNProblem
from sdze_lightning.reference.hjb import ColeHopfReference, terminal_condition


class HJBLQG(PINNProblem):
    """``u_t + Delta u - lambda |grad u|^2 = 0`` on ``[0, 1]^N x [0, T]``, ``u(T, x) = g(x)``.

    ``g(x) = ln((1 + |x|^2) / 2)``, ``lambda = 1``, ``T = 1`` and ``N = 100, 1000,
    5000`` (``pde.dim``) as in He et al. (2023), section 5.2, after Han, Jentzen
    and E (2018). Inputs are ``(x, t)`` with time last.

    The reference solution is the Cole-Hopf formula
    ``u = -(1/lambda) ln E[exp(-lambda g(x + sqrt(2) W_{T-t}))]`` evaluated by
    Monte Carlo in our own code
    (:class:`~sdze_lightning.reference.hjb.ColeHopfReference`): seeded,
    ``O(1)`` per sample whatever ``N``, and cached per (dim, seed, points), so
    validating on the same held-out points costs a lookup after the first time.

    Boundary data. The equation holds on all of ``R^N``, but the collocation
    points only cover the cube. With the terminal condition alone (He et al.'s
    setup, ``lateral_fraction=0``) the problem on the cube is not well posed:
    any lateral data give another solution, and a network with a small loss
    can be far from the Cole-Hopf solution (its error grows backward from ``T``,
    away from the only data it is given). By default a share ``lateral_fraction``
    of the boundary points therefore lies on the faces ``x_j in {0, 1}`` with
    Dirichlet values from the Cole-Hopf reference (``lateral_samples`` Monte Carlo
    samples, ``O(1)`` in ``N``); the rest sits on ``t = T`` with the analytic ``g``.

    Args:
        lam: Coefficient ``lambda`` of ``|grad u|^2``.
        horizon: Terminal time ``T``.
        lateral_fraction: Share of boundary points on the faces of the cube
            (``0`` = terminal condition only, as in He et al.).
        lateral_samples: Monte Carlo samples of the lateral boundary values.
        reference_samples: Monte Carlo samples of the held-out reference.
        reference_seed: Seed of the reference's samples.
        reference_cache_dir: Optional on-disk cache of reference values.
        n_boundary: Boundary (terminal and lateral) points per step.
        **kwargs: :class:`~sdze_lightning.problem.PINNProblem` arguments
            (``dim`` defaults to 100).
    """

    operators = ("u", "grad_norm2", "laplacian", "dt")
    time_dependent = True

    def __init__(
        self,
        lam: float = 1.0,
        horizon: float = 1.0,
        lateral_fraction: float = 0.5,
        lateral_samples: int = 4096,
        reference_samples: int = 1 << 16,
        reference_seed: int = 0,
        reference_cache_dir: str | Path | None = None,
        n_boundary: int = 100,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("dim", 100)
        if not 0 <= lateral_fraction <= 1:
            raise ValueError(f"pde.lateral_fraction must be in [0, 1], got {lateral_fraction}.")
        super().__init__(n_boundary=n_boundary, **kwargs)
        self.lam = float(lam)
        self.horizon = float(horizon)
        self.lateral_fraction = float(lateral_fraction)
        common = dict(lam=self.lam, horizon=self.horizon, seed=reference_seed)
        self.reference = ColeHopfReference(
            self.dim, samples=reference_samples, cache_dir=reference_cache_dir, **common
        )
        self.lateral_reference = ColeHopfReference(self.dim, samples=lateral_samples, **common)

    def sample_interior(self, n: int, generator: torch.Generator) -> Tensor:
        """Uniform ``(x, t)`` in ``[0, 1]^N x [0, T]``."""
        x = self.rand(n, self.dim + 1, generator=generator)
        x[:, -1] *= self.horizon
        return x

    def sample_boundary(self, n: int, generator: torch.Generator) -> Tensor:
        """Terminal points ``(x, T)`` and, a share ``lateral_fraction``, face points."""
        x = self.rand(n, self.dim + 1, generator=generator)
        lateral = self.rand(n, generator=generator) < self.lateral_fraction
        face = torch.randint(0, 2 * self.dim, (n,), generator=generator, device=self.device)
        rows = torch.arange(n, device=self.device)
        side = (face % 2).to(x.dtype)
        x[rows, face // 2] = torch.where(lateral, side, x[rows, face // 2])
        terminal = torch.full_like(side, self.horizon)
        x[:, -1] = torch.where(lateral, self.horizon * x[:, -1], terminal)
        return x

    def residual(self, x: Tensor, d: Derivatives) -> Tensor:
        """``u_t + Delta u - lambda |grad u|^2``."""
        return d.dt + d.laplacian - self.lam * d.grad_norm2

    def boundary_target(self, x: Tensor) -> Tensor:
        """``g(x)`` at ``t = T`` (analytic); Cole-Hopf Monte Carlo values on the faces."""
        target = terminal_condition(x[:, :-1])
        lateral = x[:, -1] < self.horizon
        if bool(lateral.any()):
            target = target.clone()
            target[lateral] = self.lateral_reference.uncached(x[lateral])
        return target

    def exact_solution(self, x: Tensor) -> Tensor:
        """Cole-Hopf Monte Carlo reference (cached per point set)."""
        return self.reference(x)
