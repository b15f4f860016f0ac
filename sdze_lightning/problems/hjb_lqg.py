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
    and E (2018). Inputs are ``(x, t)`` with time last. The terminal condition
    is a soft loss on ``n_boundary`` points ``(x, T)`` per step; the equation
    holds on all of ``R^N``, so there is no spatial boundary condition.

    The reference solution is the Cole-Hopf formula
    ``u = -(1/lambda) ln E[exp(-lambda g(x + sqrt(2) W_{T-t}))]`` evaluated by
    Monte Carlo in our own code
    (:class:`~sdze_lightning.reference.hjb.ColeHopfReference`): seeded,
    ``O(1)`` per sample whatever ``N``, and cached per (dim, seed, points), so
    validating on the same held-out points costs a lookup after the first time.

    Args:
        lam: Coefficient ``lambda`` of ``|grad u|^2``.
        horizon: Terminal time ``T``.
        reference_samples: Monte Carlo samples of the reference.
        reference_seed: Seed of the reference's samples.
        reference_cache_dir: Optional on-disk cache of reference values.
        n_boundary: Terminal-condition points per step.
        **kwargs: :class:`~sdze_lightning.problem.PINNProblem` arguments
            (``dim`` defaults to 100).

    """

    operators = ("u", "grad_norm2", "laplacian", "dt")
    time_dependent = True

    def __init__(
        self,
        lam: float = 1.0,
        horizon: float = 1.0,
        reference_samples: int = 1 << 16,
        reference_seed: int = 0,
        reference_cache_dir: str | Path | None = None,
        n_boundary: int = 100,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("dim", 100)
        super().__init__(n_boundary=n_boundary, **kwargs)
        self.lam = float(lam)
        self.horizon = float(horizon)
        self.reference = ColeHopfReference(
            self.dim,
            lam=self.lam,
            horizon=self.horizon,
            samples=reference_samples,
            seed=reference_seed,
            cache_dir=reference_cache_dir,
        )

    def sample_interior(self, n: int, generator: torch.Generator) -> Tensor:
        """Uniform ``(x, t)`` in ``[0, 1]^N x [0, T]``."""
        x = self.rand(n, self.dim + 1, generator=generator)
        x[:, -1] *= self.horizon
        return x

    def sample_boundary(self, n: int, generator: torch.Generator) -> Tensor:
        """Uniform ``x`` in ``[0, 1]^N`` at the terminal time ``T``."""
        x = self.rand(n, self.dim + 1, generator=generator)
        x[:, -1] = self.horizon
        return x

    def residual(self, x: Tensor, d: Derivatives) -> Tensor:
        """``u_t + Delta u - lambda |grad u|^2``."""
        return d.dt + d.laplacian - self.lam * d.grad_norm2

    def boundary_target(self, x: Tensor) -> Tensor:
        """Terminal condition ``g(x)`` (analytic, no Monte Carlo)."""
        return terminal_condition(x[:, :-1])

    def exact_solution(self, x: Tensor) -> Tensor:
        """Cole-Hopf Monte Carlo reference (cached per point set)."""
        return self.reference(x)
