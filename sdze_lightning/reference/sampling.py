"""Seeded samplers and quadrature rules the reference solvers share.

Everything draws from an explicit ``torch.Generator``; nothing touches the
global RNG (``torch.distributions`` cannot take a generator, hence the
hand-written Gamma sampler).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def standard_gamma(shape: float, n: int, generator: torch.Generator) -> Tensor:
    """``n`` samples of ``Gamma(shape, 1)`` in float64 (Marsaglia-Tsang, 2000).

    For ``shape < 1`` the boost ``Gamma(a) = Gamma(a + 1) * U^(1/a)`` is used.

    Args:
        shape: Shape parameter ``a > 0``.
        n: Number of samples.
        generator: Source of randomness (CPU generator).

    Returns:
        Tensor ``(n,)`` of float64 samples.

    """
    if shape <= 0:
        raise ValueError(f"Gamma shape must be positive, got {shape}.")
    a = shape + 1.0 if shape < 1.0 else shape
    d = a - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    out = torch.empty(0, dtype=torch.float64)
    while out.numel() < n:
        m = int(1.1 * (n - out.numel())) + 16  # acceptance rate is above 0.95 for a >= 1
        z = torch.randn(m, generator=generator, dtype=torch.float64)
        u = torch.rand(m, generator=generator, dtype=torch.float64)
        v = (1.0 + c * z) ** 3
        ok = v > 0
        logv = torch.log(torch.where(ok, v, torch.ones_like(v)))
        ok &= torch.log(u) < 0.5 * z * z + d - d * v + d * logv
        out = torch.cat([out, d * v[ok]])
    out = out[:n]
    if shape < 1.0:
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        out = out * u ** (1.0 / shape)
    return out


def chi_square(k: int, n: int, generator: torch.Generator) -> Tensor:
    """``n`` samples of a chi-square variable with ``k`` degrees of freedom (float64).

    Small ``k`` sums ``k`` squared normals; large ``k`` uses ``2 Gamma(k/2)``, so
    the cost does not grow with ``k``.
    """
    if k < 0:
        raise ValueError(f"Degrees of freedom must be non-negative, got {k}.")
    if k == 0:
        return torch.zeros(n, dtype=torch.float64)
    if k <= 32:
        return torch.randn(n, k, generator=generator, dtype=torch.float64).square().sum(dim=1)
    return 2.0 * standard_gamma(k / 2.0, n, generator)


def gauss_hermite(n: int) -> tuple[Tensor, Tensor]:
    """Nodes and weights of ``E[f(Z)]``, ``Z ~ N(0, 1)``, with ``n`` points (float64).

    Golub-Welsch on the Jacobi matrix of the probabilists' Hermite
    polynomials; the rule is exact for polynomials of degree ``2n - 1``.
    """
    off = torch.sqrt(torch.arange(1, n, dtype=torch.float64))
    jacobi = torch.diag(off, 1) + torch.diag(off, -1)
    nodes, vecs = torch.linalg.eigh(jacobi)
    return nodes, vecs[0] ** 2
