"""Per-layer low-rank subspaces ``W + A C B^T`` regenerated from a seed.

For a linear layer with weight ``W`` (``m x n``) and bias ``b`` (``m``), the
subspace of a window is spanned by orthonormal factors ``A`` (``m x ra``) and
``B`` (``n x rb``), ``ra = min(r, m)``, ``rb = min(r, n)``: a point of it has
coordinates ``C`` (``ra x rb``) and, for the bias, ``c_b`` (``ra``), and stands
for ``W + A C B^T``, ``b + A c_b``. The coordinates are kept as one flat vector
of ``ra * rb + ra`` numbers per layer, independent of ``n`` (the input
dimension for the first layer).

The factors are the Q factors of seeded Gaussian matrices, signs fixed by the
diagonal of R so that the basis is Haar distributed and unique
(:func:`torch.nn.init.orthogonal_` with the seeded generator). They are a pure
function of ``(seed, window, layer)``: they are never part of the optimizer
state, and after a resume they are simply drawn again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sdze_lightning.nn.perturb import LowRankDelta
from sdze_lightning.seeding import Stream, generator


def orthonormal_basis(
    rows: int, rank: int, seed: int, window: int, layer: int, side: Stream,
    dtype: torch.dtype, device: torch.device,
) -> Tensor:
    """Orthonormal ``(rows, rank)`` matrix: QR of a seeded Gaussian matrix (``orthogonal_``).

    Args:
        rows: Number of rows (``m`` or ``n``); ``rank <= rows``.
        rank: Number of columns.
        seed: The method's seed.
        window: Index of the refresh window.
        layer: Index of the layer.
        side: ``Stream.SUBSPACE_LEFT`` or ``Stream.SUBSPACE_RIGHT``.
        dtype: Floating dtype of the result (bfloat16 and float16 are drawn and
            factored in float32, which has a QR, then cast).
        device: Device of the result (the generator lives there too).

    """
    gen = generator(device, side, seed, window, layer)
    work = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    # Column-major, the layout of LAPACK's Q factor, so the products with the basis
    # round as they would with the factor itself.
    basis = torch.empty(rank, rows, dtype=work, device=device).T
    return nn.init.orthogonal_(basis, generator=gen).to(dtype)


@dataclass
class LayerSubspace:
    """The subspace of one linear layer in one window.

    Attributes:
        layer: The linear layer.
        A: Left factor ``(out_features, ra)``.
        B: Right factor ``(in_features, rb)``.

    """

    layer: nn.Linear
    A: Tensor
    B: Tensor

    @staticmethod
    def draw(layer: nn.Linear, rank: int, seed: int, window: int, index: int) -> LayerSubspace:
        """Draw the factors of ``layer`` (index ``index``) for ``window``."""
        m, n = layer.weight.shape
        kw = dict(dtype=layer.weight.dtype, device=layer.weight.device)
        a = orthonormal_basis(m, min(rank, m), seed, window, index, Stream.SUBSPACE_LEFT, **kw)
        b = orthonormal_basis(n, min(rank, n), seed, window, index, Stream.SUBSPACE_RIGHT, **kw)
        return LayerSubspace(layer, a, b)

    @staticmethod
    def size_for(layer: nn.Linear, rank: int) -> int:
        """Number of coordinates of ``layer`` at rank ``rank``."""
        m, n = layer.weight.shape
        ra, rb = min(rank, m), min(rank, n)
        return ra * rb + (ra if layer.bias is not None else 0)

    @property
    def ra(self) -> int:
        """Rank of the left factor."""
        return self.A.shape[1]

    @property
    def rb(self) -> int:
        """Rank of the right factor."""
        return self.B.shape[1]

    @property
    def size(self) -> int:
        """Number of coordinates ``ra * rb (+ ra)``."""
        return self.ra * self.rb + (self.ra if self.layer.bias is not None else 0)

    def split(self, coords: Tensor) -> tuple[Tensor, Tensor | None]:
        """Core ``(ra, rb)`` and bias part ``(ra,)`` (or ``None``) of a flat vector."""
        k = self.ra * self.rb
        core = coords[:k].view(self.ra, self.rb)
        return core, (coords[k:] if self.layer.bias is not None else None)

    def delta(self, coords: Tensor) -> LowRankDelta:
        """The implicit offset ``A C B^T``, ``A c_b`` for coordinates ``coords``."""
        core, cb = self.split(coords)
        return LowRankDelta(self.A, self.B, core, cb)

    @torch.no_grad()
    def fold(self, coords: Tensor) -> None:
        """Write ``W += A C B^T`` and ``b += A c_b`` in place (one parameter-sized write)."""
        core, cb = self.split(coords)
        w = self.layer.weight
        w.addmm_((self.A @ core.to(self.A.dtype)).to(w.dtype), self.B.T.to(w.dtype))
        if cb is not None:
            self.layer.bias.add_((self.A @ cb.to(self.A.dtype)).to(self.layer.bias.dtype))

    def rotation(self, old: LayerSubspace) -> tuple[Tensor, Tensor]:
        """``(A_new^T A_old, B_new^T B_old)``: old coordinates to new ones."""
        return self.A.T @ old.A, self.B.T @ old.B

    def carry(self, old: LayerSubspace, coords: Tensor, second_moment: bool = False) -> Tensor:
        """Carry a coordinate vector of the ``old`` subspace into this one.

        A first-order quantity (offset, momentum, Adam's first moment) is
        projected: ``C <- A_new^T A_old C B_old^T B_new``, ``c_b <- A_new^T A_old c_b``.
        A second moment is mapped as the variances of independent coordinates:
        with the element-wise squared rotations, ``V <- (R_A^2) V (R_B^2)^T``.
        """
        ra_map, rb_map = self.rotation(old)
        if second_moment:
            ra_map, rb_map = ra_map * ra_map, rb_map * rb_map
        core, cb = old.split(coords)
        out = [(ra_map @ core @ rb_map.T).reshape(-1)]
        if cb is not None:
            out.append(ra_map @ cb)
        return torch.cat(out)
