"""2D Poisson problem of He et al. (2023), section 5.1."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sdze_lightning.derivatives import Derivatives
from sdze_lightning.problem import PINNProblem


class Poisson2D(PINNProblem):
    """``Delta u = -sin(x1 + x2)`` on ``[0, 1]^2``, ``u = 0.5 sin(x1 + x2)`` (Dirichlet).

    The boundary values come from the exact solution through a soft boundary
    loss on ``n_boundary`` points per step, spread uniformly over the four edges.
    """

    operators = ("u", "laplacian")

    def __init__(self, n_boundary: int = 100, **kwargs: Any) -> None:
        kwargs.setdefault("dim", 2)
        if kwargs["dim"] != 2:
            raise ValueError(f"poisson2d is two-dimensional; got pde.dim={kwargs['dim']}.")
        super().__init__(n_boundary=n_boundary, **kwargs)

    def sample_interior(self, n: int, generator: torch.Generator) -> Tensor:
        """Uniform points in the unit square."""
        return self.rand(n, 2, generator=generator)

    def sample_boundary(self, n: int, generator: torch.Generator) -> Tensor:
        """Uniform points on the four edges of the unit square."""
        s = self.rand(n, generator=generator)
        edge = torch.randint(0, 4, (n,), generator=generator, device=self.device)
        fixed = (edge % 2).to(self.dtype)  # edges 0, 2 at 0; edges 1, 3 at 1
        on_x = edge < 2  # the fixed coordinate is x1 for edges 0, 1
        x1 = torch.where(on_x, fixed, s)
        x2 = torch.where(on_x, s, fixed)
        return torch.stack([x1, x2], dim=1)

    def residual(self, x: Tensor, d: Derivatives) -> Tensor:
        """``Delta u + sin(x1 + x2)``."""
        return d.laplacian + torch.sin(x[:, 0] + x[:, 1])

    def exact_solution(self, x: Tensor) -> Tensor:
        """``0.5 sin(x1 + x2)``."""
        return 0.5 * torch.sin(x[:, 0] + x[:, 1])
