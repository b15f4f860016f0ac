"""Random directions shared by all collocation points of one estimate, and their sampling.

Directions are either coordinate axes (``index``: the coordinate of each
direction) or dense vectors (``dense``: one row per direction, zero on the
coordinates that are not spatial). They are shared across the batch so that a
network can evaluate ``W v`` once per direction: for a coordinate axis it is a
column of ``W`` and costs nothing that grows with the dimension.

:func:`sample_directions` draws a set from one of :data:`DISTRIBUTIONS`
(coordinate axes through :func:`sample_coordinates`, without replacement);
:func:`time_axis` is the deterministic direction of the time coordinate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Directions:
    """A set of ``K`` directions in the ``D``-dimensional input space.

    Exactly one of ``index`` and ``dense`` is set.

    Attributes:
        dim: Input dimension ``D`` (spatial dimensions plus time, if any).
        index: Long tensor ``(K,)`` of coordinate axes, or ``None``.
        dense: Tensor ``(K, D)`` of direction vectors, or ``None``.
    """

    dim: int
    index: Tensor | None = None
    dense: Tensor | None = None

    def __post_init__(self) -> None:
        if (self.index is None) == (self.dense is None):
            raise ValueError("Directions need exactly one of `index` and `dense`.")

    @property
    def count(self) -> int:
        """Number of directions ``K``."""
        return int(self.index.numel() if self.index is not None else self.dense.shape[0])

    def dot(self, x: Tensor) -> Tensor:
        """Return ``x . v_k`` for every point and direction, shape ``(K, N)``."""
        if self.index is not None:
            return x[:, self.index].T
        return self.dense.to(x.dtype) @ x.T

    def sq_norms(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """Return ``|v_k|^2``, shape ``(K,)``."""
        if self.index is not None:
            return torch.ones(self.count, dtype=dtype, device=device)
        return (self.dense.to(dtype) ** 2).sum(dim=1)

    def materialize(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """Return the directions as a dense ``(K, D)`` tensor (costs ``K * D``)."""
        if self.dense is not None:
            return self.dense.to(dtype=dtype, device=device)
        out = torch.zeros(self.count, self.dim, dtype=dtype, device=device)
        out[torch.arange(self.count, device=device), self.index] = 1.0
        return out

    @staticmethod
    def axis(dim: int, coordinate: int, device: torch.device | str = "cpu") -> Directions:
        """Return the single coordinate direction ``e_coordinate``."""
        return Directions(dim, index=torch.tensor([coordinate], device=device))


#: Direction distributions of the directional estimators.
DISTRIBUTIONS: tuple[str, ...] = ("coordinate", "rademacher", "gaussian")


def sample_coordinates(
    count: int, dim: int, generator: torch.Generator, device: torch.device | str = "cpu"
) -> Tensor:
    """Draw ``min(count, dim)`` distinct coordinates uniformly from ``range(dim)``.

    For ``count`` small against ``dim`` the cost does not grow with ``dim``: the
    first distinct values of an i.i.d. uniform stream form a uniformly random
    subset (by symmetry), so no permutation of all ``dim`` coordinates is needed.

    Args:
        count: Number of coordinates wanted.
        dim: Size of the range.
        generator: The only source of randomness.
        device: Device of the result.

    Returns:
        Long tensor of ``min(count, dim)`` distinct coordinates.

    """
    count = min(count, dim)
    if 4 * count >= dim:
        return torch.randperm(dim, generator=generator, device=device)[:count]
    found = torch.empty(0, dtype=torch.long, device=device)
    while found.numel() < count:
        draw = torch.randint(0, dim, (2 * count,), generator=generator, device=device)
        stream = torch.cat([found, draw])
        uniq, inverse = torch.unique(stream, return_inverse=True)
        first = torch.full((uniq.numel(),), stream.numel(), dtype=torch.long, device=device)
        first.scatter_reduce_(0, inverse, torch.arange(stream.numel(), device=device), "amin")
        found = stream[first.sort().values][:count]
    return found


def sample_directions(
    distribution: str,
    count: int,
    input_dim: int,
    spatial_dim: int,
    generator: torch.Generator,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> Directions:
    """Draw ``count`` directions in the spatial coordinates of a ``input_dim`` input.

    Dense directions are zero on the coordinates past ``spatial_dim`` (time).

    Args:
        distribution: ``"coordinate"`` (axes without replacement; at most
            ``spatial_dim`` of them), ``"rademacher"`` or ``"gaussian"``.
        count: Number of directions ``K``.
        input_dim: Input dimension ``D``.
        spatial_dim: Number of leading spatial coordinates ``d``.
        generator: The only source of randomness.
        dtype: Dtype of dense directions.
        device: Device of the directions.

    """
    if distribution == "coordinate":
        index = sample_coordinates(count, spatial_dim, generator, device)
        return Directions(input_dim, index=index)
    if distribution == "gaussian":
        v = torch.randn(count, spatial_dim, generator=generator, dtype=dtype, device=device)
    elif distribution == "rademacher":
        v = torch.randint(
            0, 2, (count, spatial_dim), generator=generator, dtype=dtype, device=device
        )
        v.mul_(2).sub_(1)
    else:
        raise ValueError(f"Unknown distribution {distribution!r}; use one of {DISTRIBUTIONS}.")
    if input_dim > spatial_dim:
        v = torch.cat([v, v.new_zeros(count, input_dim - spatial_dim)], dim=1)
    return Directions(input_dim, dense=v)


def time_axis(x: Tensor, spatial_dim: int) -> Directions:
    """The direction of the time coordinate, or ``ValueError`` if ``x`` has none."""
    if x.shape[1] == spatial_dim:
        raise ValueError("Operator 'dt' needs a time coordinate (time_dependent=True).")
    return Directions.axis(x.shape[1], x.shape[1] - 1, device=x.device)
