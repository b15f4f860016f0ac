"""Stochastic dimension gradient descent (SDGD): autodiff on random coordinates.

The exact estimator's stacked back-propagation restricted to a random subset
``J`` of ``|J| = K`` spatial coordinates drawn without replacement, each sum
scaled by ``d / K`` (unbiased because ``P(j in J) = K / d``). The value and the
gradient (hence ``grad_norm2`` and ``dt``) stay exact: they cost one reverse
pass whatever ``d``.

The biharmonic ``sum_{i,j} d_i^2 d_j^2 u`` uses two independent subsets
``J1, J2`` (``(d/K)^2 sum_{i in J1, j in J2}``): reusing one subset for both
sums would weight the diagonal ``i = j`` terms by ``d/K`` and the mixed ones by
``d (K-1) / (K (d-1))``, a biased estimate.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import Tensor

from sdze_lightning.directions import sample_coordinates
from sdze_lightning.estimators.exact import MAX_REVERSE_PASSES, ExactEstimator, pure_derivatives
from sdze_lightning.model_fn import ModelFunction


class SDGDEstimator(ExactEstimator):
    """Autodiff second/third derivatives on ``K`` random coordinates, scaled ``d / K``.

    Args:
        num_directions: Coordinates ``K = |J|`` per estimate (capped at ``d``).
        max_reverse_passes: Most reverse passes one estimate may take (about ``K``, see
            :meth:`reverse_passes`) before the pre-flight refuses the run; ``None``: no bound.

    """

    name = "sdgd"

    def __init__(
        self, num_directions: int = 16, max_reverse_passes: int | None = MAX_REVERSE_PASSES
    ) -> None:
        super().__init__(max_reverse_passes)
        self.num_directions = num_directions

    def coordinate_count(self, spatial_dim: int) -> int:
        """Coordinates one estimate differentiates: ``K``, capped at ``spatial_dim``."""
        return min(self.num_directions, spatial_dim)

    def reverse_passes(self, ops: Collection[str], spatial_dim: int) -> int:
        """Reverse passes of one estimate: as the exact estimator's on ``K`` coordinates.

        The biharmonic takes ``2 + 2K`` passes of its own (a Laplacian on ``J1``, then
        its Laplacian on ``J2``), besides those of the other operators.
        """
        ops = set(ops)
        passes = super().reverse_passes(ops - {"biharmonic"}, spatial_dim)
        if "biharmonic" in ops:
            passes += 2 + 2 * self.coordinate_count(spatial_dim)
        return passes

    def coordinates(self, spatial_dim: int, generator: torch.Generator) -> tuple[list[int], float]:
        """``K`` distinct random coordinates and the scale ``d / K``."""
        coords = sample_coordinates(
            self.num_directions, spatial_dim, generator, device=generator.device
        )
        return coords.tolist(), spatial_dim / coords.numel()

    def _estimate(
        self,
        model: ModelFunction,
        x: Tensor,
        ops: set[str],
        generator: torch.Generator,
        spatial_dim: int,
    ) -> dict[str, Tensor]:
        """Sampled-coordinate autodiff (see the module notes)."""
        out = super()._estimate(model, x, ops - {"biharmonic"}, generator, spatial_dim)
        if "biharmonic" in ops:
            outer_grad = torch.is_grad_enabled()
            c1, s1 = self.coordinates(spatial_dim, generator)
            c2, s2 = self.coordinates(spatial_dim, generator)
            with torch.enable_grad():
                xg = x.detach().requires_grad_(True)
                lap = s1 * sum(p[1] for p in pure_derivatives(model(xg), xg, c1, 2))
                bih = s2 * sum(p[1] for p in pure_derivatives(lap, xg, c2, 2))
            out["biharmonic"] = bih if outer_grad else bih.detach()
        return out
