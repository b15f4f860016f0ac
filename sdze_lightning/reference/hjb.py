"""Cole-Hopf reference of the HJB-LQG equation (He et al. 5.2; Han, Jentzen and E, 2018).

The equation ``u_t + Delta u - lambda |grad u|^2 = 0`` on ``R^N x [0, T]`` with
``u(T, x) = g(x)`` becomes the backward heat equation for ``w = exp(-lambda u)``,
so

    u(t, x) = -(1/lambda) ln E[exp(-lambda g(x + sqrt(2) W_{T-t}))].

For the radial terminal condition ``g(x) = ln((1 + |x|^2) / 2)`` only
``|x + s Z|^2`` matters (``s = sqrt(2 (T - t))``, ``Z ~ N(0, I_N)``). Splitting ``Z``
along ``x/|x|`` and its complement gives the exact identity in law

    |x + s Z|^2 = (|x| + s z)^2 + s^2 C,   z ~ N(0, 1),  C ~ chi^2_{N-1},

so one Monte Carlo sample costs ``O(1)`` whatever ``N`` (the chi-square comes
from a Gamma sampler). :class:`ColeHopfReference` draws ``samples`` pairs
``(z, C)`` once from a seeded generator (antithetic in ``z``), shares them across
points, and caches the values per ``(dim, seed, samples, points)``: evaluating
the same held-out points again is a dictionary lookup.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from pathlib import Path

import torch
from torch import Tensor

from sdze_lightning.reference.sampling import chi_square

_VALUES: OrderedDict[tuple, Tensor] = OrderedDict()
_SAMPLES: OrderedDict[tuple, tuple[Tensor, Tensor]] = OrderedDict()
_CACHE_SIZE = 64


def terminal_condition(x: Tensor) -> Tensor:
    """``g(x) = ln((1 + |x|^2) / 2)`` on the spatial coordinates ``x`` ``(n, N)``."""
    return torch.log((1.0 + x.square().sum(dim=1)) / 2.0)


def points_digest(x: Tensor) -> str:
    """A content hash of a point set (float64 bytes), the cache key of its values."""
    data = x.detach().to("cpu", torch.float64).contiguous().numpy().tobytes()
    return hashlib.sha1(data + str(tuple(x.shape)).encode()).hexdigest()


def _remember(store: OrderedDict, key: tuple, value: object) -> None:
    store[key] = value
    store.move_to_end(key)
    while len(store) > _CACHE_SIZE:
        store.popitem(last=False)


class ColeHopfReference:
    """Monte Carlo values of the HJB-LQG solution at given points.

    Args:
        dim: Spatial dimension ``N``.
        lam: Coefficient ``lambda`` of ``|grad u|^2``.
        horizon: Terminal time ``T``.
        samples: Monte Carlo samples (rounded up to even: antithetic pairs).
        seed: Seed of the sample generator.
        cache_dir: Optional directory for an on-disk cache of the values
            (one ``.pt`` file per key); the in-memory cache is always on.
        chunk: Points per vectorised block.

    """

    def __init__(
        self,
        dim: int,
        lam: float = 1.0,
        horizon: float = 1.0,
        samples: int = 1 << 16,
        seed: int = 0,
        cache_dir: str | Path | None = None,
        chunk: int = 64,
    ) -> None:
        if dim <= 0 or samples <= 0:
            raise ValueError(f"dim and samples must be positive, got {dim}, {samples}.")
        if lam <= 0:
            raise ValueError(f"lam must be positive, got {lam}.")
        self.dim = dim
        self.lam = float(lam)
        self.horizon = float(horizon)
        self.samples = samples + samples % 2
        self.seed = seed
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.chunk = chunk

    def draws(self) -> tuple[Tensor, Tensor]:
        """The shared ``(z, C)`` samples, antithetic in ``z`` (cached per key)."""
        key = (self.dim, self.samples, self.seed)
        hit = _SAMPLES.get(key)
        if hit is None:
            gen = torch.Generator().manual_seed(self.seed)
            half = self.samples // 2
            z = torch.randn(half, generator=gen, dtype=torch.float64)
            c = chi_square(self.dim - 1, half, gen)
            hit = (torch.cat([z, -z]), torch.cat([c, c]))
            _remember(_SAMPLES, key, hit)
        return hit

    def _key(self, x: Tensor) -> tuple:
        return (self.dim, self.lam, self.horizon, self.samples, self.seed, points_digest(x))

    def __call__(self, x: Tensor) -> Tensor:
        """Reference ``u`` at points ``x`` ``(n, N + 1)`` (time last), in ``x``'s dtype."""
        return self.values_and_errors(x)[0].to(device=x.device, dtype=x.dtype)

    def uncached(self, x: Tensor) -> Tensor:
        """Like ``__call__`` but without the value cache (points drawn afresh every step)."""
        if x.dim() != 2 or x.shape[1] != self.dim + 1:
            raise ValueError(f"Expected points (n, {self.dim + 1}), got {tuple(x.shape)}.")
        values = self._compute(x.detach().to("cpu", torch.float64))[0]
        return values.to(device=x.device, dtype=x.dtype)

    def values_and_errors(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Float64 values and their Monte Carlo standard errors (delta method)."""
        if x.dim() != 2 or x.shape[1] != self.dim + 1:
            raise ValueError(f"Expected points (n, {self.dim + 1}), got {tuple(x.shape)}.")
        key = self._key(x)
        hit = _VALUES.get(key)
        path = None
        if hit is None and self.cache_dir is not None:
            path = self.cache_dir / f"hjb_{hashlib.sha1(repr(key).encode()).hexdigest()}.pt"
            if path.exists():
                hit = torch.load(path)
        if hit is None:
            hit = self._compute(x.detach().to("cpu", torch.float64))
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(hit, path)
        _remember(_VALUES, key, hit)
        return hit

    def _compute(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z, c = self.draws()
        half = z.numel() // 2
        values, errors = [], []
        for xb in x.split(self.chunk):
            r = xb[:, :-1].square().sum(dim=1).sqrt()[:, None]
            s = torch.sqrt(2.0 * (self.horizon - xb[:, -1]).clamp_min(0.0))[:, None]
            sq = torch.addcmul(r, s, z[None]).square_().addcmul_(s * s, c[None])  # |x + sZ|^2
            w = sq.add_(1.0).mul_(0.5)  # exp(-lam g) = ((1 + |y|^2) / 2)^(-lam), in place
            w = w.reciprocal_() if self.lam == 1.0 else w.pow_(-self.lam)
            mean = w.mean(dim=1)
            # Antithetic pairs are dependent: the standard error uses pair means.
            pairs = (w[:, :half] + w[:, half:]).mul_(0.5)
            se_w = pairs.std(dim=1) / math.sqrt(half)
            values.append(-torch.log(mean) / self.lam)
            errors.append(se_w / (self.lam * mean))
        return torch.cat(values), torch.cat(errors)


def cole_hopf_quadrature(
    x: Tensor, lam: float = 1.0, horizon: float = 1.0, step: float = 0.1, width: float = 9.0
) -> Tensor:
    """Deterministic Cole-Hopf values by the tensor trapezoidal rule (``N <= 2`` only).

    The integrand ``exp(-lam g(x + s z)) phi(z)`` is analytic in a strip and
    decays like a Gaussian, so the trapezoidal rule on ``[-width, width]^N``
    converges exponentially in ``1 / step``. Differentiable in ``x``, so autodiff
    of it checks the PDE.

    Args:
        x: Points ``(n, N + 1)``, time last.
        lam: Coefficient ``lambda``.
        horizon: Terminal time ``T``.
        step: Grid spacing in each standard-normal coordinate.
        width: Half-width of the grid (in standard deviations).

    """
    dim = x.shape[1] - 1
    if dim > 2:
        raise ValueError(f"Tensor quadrature is for N <= 2, got N = {dim}.")
    n1 = int(round(width / step))
    t1 = torch.arange(-n1, n1 + 1, dtype=x.dtype, device=x.device) * step
    grids = torch.meshgrid(*([t1] * dim), indexing="ij")
    pts = torch.stack([g.reshape(-1) for g in grids], dim=1)  # (Q, N)
    logphi = -0.5 * pts.square().sum(dim=1) + dim * math.log(step / math.sqrt(2 * math.pi))
    s = torch.sqrt(2.0 * (horizon - x[:, -1:]))  # (n, 1)
    y = x[:, None, :-1] + s[:, :, None] * pts[None]  # (n, Q, N)
    logw = -lam * torch.log((1.0 + y.square().sum(dim=2)) / 2.0)
    return -torch.logsumexp(logw + logphi[None], dim=1) / lam
