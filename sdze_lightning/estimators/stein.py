"""Stein estimator (He et al. 2023): derivatives of a Gaussian-smoothed network.

The solution is the smoothed model ``u(x) = E f(x + delta)``,
``delta = sigma * xi``, ``xi ~ N(0, I_d)`` on the spatial coordinates, and
Stein's identity turns its derivatives into expectations of values of ``f``
(He et al., eqs. 7-11), estimated with ``K`` directions ``xi_k`` shared by all
points. With ``f+ = f(x + sigma xi)``, ``f- = f(x - sigma xi)``, ``f0 = f(x)``,
the per-direction terms are:

* ``vanilla`` (eq. 7): gradient ``xi f+ / sigma``, Laplacian
  ``(|xi|^2 - d) f+ / sigma^2``;
* ``cv``, control variate (eqs. 8-9): ``f+`` replaced by ``f+ - f0``;
* ``antithetic``, control variate and antithetic pairs (eqs. 10-11): gradient
  ``xi (f+ - f-) / (2 sigma)``, Laplacian ``(|xi|^2 - d)(f+ + f- - 2 f0) / (2 sigma^2)``.

The antithetic variant (with the control variate ``f0``) has a variance that
does not grow as ``sigma -> 0``; the vanilla one grows like ``sigma^-2``
(gradient) and ``sigma^-4`` (Laplacian).

Other operators:

* ``u``: ``value="plain"`` (default) returns ``f(x)``, the network at the point,
  as He et al. use it; ``value="smoothed"`` returns the Monte Carlo mean of
  the same samples (``mean f+``, or ``mean (f+ + f-)/2`` for ``antithetic``).
* ``grad_norm2``: the U-statistic ``sum_{k != l} g_k . g_l / (K (K - 1))`` of the
  per-direction gradient terms ``g_k``, unbiased for ``|grad u|^2`` (the square
  of the mean gradient is not).
* ``dt``: time is not smoothed; ``dt`` is the central difference of ``f`` along
  the time axis at ``x`` (step ``eps^(1/3)`` of the dtype). Like the plain value,
  it refers to ``f``, not to the smoothed model (an ``O(sigma^2)`` mismatch).
* ``third`` and ``biharmonic`` are not provided: their Stein weights are Hermite
  polynomials of degree 3 and 4 whose variance grows like ``sigma^-4`` and
  ``sigma^-8`` even with antithetic pairs; use ``taylor`` (exact directional
  jets) or ``fd``.

Forward-only: every value comes from :meth:`ModelFunction.line` (first-layer
shortcut: ``W x`` once per point, ``W xi_k`` once per direction).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import ClassVar

import torch
from torch import Tensor

from sdze_lightning.directions import Directions, sample_directions, time_axis
from sdze_lightning.estimators.base import Estimator, Parameter
from sdze_lightning.estimators.fd import central_differences, default_step
from sdze_lightning.model_fn import ModelFunction

#: Variants of He et al.: eq. 7, eqs. 8-9, eqs. 10-11.
VARIANTS: tuple[str, ...] = ("vanilla", "cv", "antithetic")
#: What ``u`` is: the network at the point, or the Monte Carlo mean of the samples.
VALUES: tuple[str, ...] = ("plain", "smoothed")


def noise_level(estimator: Estimator, key: str, value: object) -> float:
    """``sigma``: a positive number, kept as a ``float``."""
    sigma = float(value)  # type: ignore[arg-type]
    if not sigma > 0:
        raise ValueError(f"{key} must be positive, got {value!r}.")
    return sigma


def variant_name(estimator: Estimator, key: str, value: object) -> str:
    """``variant``: one of :data:`VARIANTS`."""
    if value not in VARIANTS:
        raise ValueError(f"{key} must be one of {VARIANTS}, got {value!r}.")
    return str(value)


def value_name(estimator: Estimator, key: str, value: object) -> str:
    """``value``: ``"plain"`` or ``"smoothed"``."""
    if value not in VALUES:
        raise ValueError(f"{key} must be 'plain' or 'smoothed', got {value!r}.")
    return str(value)


def stein_samples(
    model: ModelFunction, x: Tensor, dirs: Directions, sigma: float, antithetic: bool
) -> tuple[Tensor, Tensor | None]:
    """Values ``f(x + sigma xi_k)`` (and ``f(x - sigma xi_k)``), each ``(K, N)``."""
    ts = [sigma, -sigma] if antithetic else [sigma]
    vals = model.line(x, dirs, ts)
    return vals[0], (vals[1] if antithetic else None)


def stein_terms(
    f_plus: Tensor,
    f_minus: Tensor | None,
    f0: Tensor,
    sq_norms: Tensor,
    sigma: float,
    spatial_dim: int,
    variant: str,
) -> tuple[Tensor, Tensor]:
    """Per-direction Stein terms.

    Args:
        f_plus: ``f(x + sigma xi_k)``, ``(K, N)``.
        f_minus: ``f(x - sigma xi_k)``, ``(K, N)`` (``antithetic`` only).
        f0: ``f(x)``, ``(N,)``.
        sq_norms: ``|xi_k|^2``, ``(K,)``.
        sigma: Noise level.
        spatial_dim: ``d``.
        variant: One of :data:`VARIANTS`.

    Returns:
        ``a`` and ``lap``, both ``(K, N)``: the gradient estimate is
        ``mean_k a_k xi_k`` and the Laplacian estimate ``mean_k lap_k``.

    """
    w = ((sq_norms - spatial_dim) / sigma**2)[:, None]
    if variant == "vanilla":
        return f_plus / sigma, w * f_plus
    if variant == "cv":
        diff = f_plus - f0[None, :]
        return diff / sigma, w * diff
    if variant == "antithetic":
        if f_minus is None:
            raise ValueError("The antithetic variant needs f(x - sigma xi).")
        return (f_plus - f_minus) / (2 * sigma), w * (f_plus + f_minus - 2 * f0[None, :]) / 2
    raise ValueError(f"Unknown Stein variant {variant!r}; use one of {VARIANTS}.")


def gradient_norm2_ustat(a: Tensor, xi: Tensor, grad_mean: Tensor | None = None) -> Tensor:
    """Unbiased ``|E[a xi]|^2`` from i.i.d. terms: ``sum_{k != l} a_k a_l xi_k . xi_l / (K(K-1))``.

    Args:
        a: Coefficients ``(K, N)``.
        xi: Spatial directions ``(K, d)``.
        grad_mean: ``mean_k a_k xi_k`` ``(N, d)`` if already computed.

    Returns:
        ``(N,)`` estimate.

    """
    k = a.shape[0]
    diag = (a * a * (xi * xi).sum(dim=1)[:, None]).sum(dim=0)
    if grad_mean is not None:
        full = (k * grad_mean).pow(2).sum(dim=1)
    elif a.shape[1] <= k:
        full = (a.T @ xi).pow(2).sum(dim=1)  # cost N K d
    else:
        full = ((xi @ xi.T) @ a * a).sum(dim=0)  # cost K^2 d + K^2 N
    return (full - diag) / (k * (k - 1))


class SteinEstimator(Estimator):
    """Stein's-identity derivatives of the Gaussian-smoothed network (forward-only).

    Args:
        num_directions: Gaussian samples ``K`` (He et al. use 1024).
        sigma: Noise level (He et al. use 0.1).
        variant: ``"vanilla"``, ``"cv"`` (control variate) or ``"antithetic"``
            (control variate and antithetic pairs; He et al.'s choice).
        value: ``"plain"`` (``u = f(x)``) or ``"smoothed"`` (Monte Carlo mean).

    """

    name = "stein"
    operators = frozenset({"u", "grad", "grad_norm2", "laplacian", "dt"})
    forward_only = True
    shares_first_layer = True
    #: The U-statistic of ``grad_norm2`` needs two samples.
    min_directions = 2
    #: Noise level of the smoothing.
    sigma = Parameter(noise_level)
    #: One of :data:`VARIANTS`.
    variant = Parameter(variant_name)
    #: One of :data:`VALUES`.
    value = Parameter(value_name)

    def __init__(
        self,
        num_directions: int = 16,
        sigma: float = 0.1,
        variant: str = "antithetic",
        value: str = "plain",
    ) -> None:
        self.num_directions = num_directions
        self.sigma = sigma
        self.variant = variant
        self.value = value

    #: Activations kept per evaluated row and hidden unit, with and without the parameters'
    #: graph (Adam and the fused method keep it, MeZO does not): fitted to measured peaks of
    #: the large-``K`` preset ``stein_he`` (measured: ``benchmarks/README.md``,
    #: ``preflight_accuracy.py``).
    ACTIVATIONS: ClassVar[dict[bool, float]] = {True: 1.3, False: 0.6}

    def step_numel(self, points: int, input_dim: int, hidden: int, graph: bool) -> int:
        """Numbers of an estimate: samples and activations (the memory pre-flight's).

        The Gaussian samples ``(K, input_dim)``, and the network's
        activations on the ``(2K + 1) N`` evaluated rows (``(K + 1) N`` without antithetic
        pairs), :data:`ACTIVATIONS` per row and hidden unit.
        """
        k = self.num_directions
        rows = (2 * k + 1 if self.variant == "antithetic" else k + 1) * points
        return int(k * input_dim + self.ACTIVATIONS[graph] * rows * hidden)

    def check(self, ops: Collection[str]) -> None:
        """Like :meth:`Estimator.check`, pointing to ``taylor``/``fd`` for orders 3 and 4."""
        high = sorted(set(ops) & {"third", "biharmonic"})
        if high:
            raise ValueError(
                f"estimator=stein cannot provide {high}: the Stein weights of order 3 and 4 "
                "have a variance growing like sigma^-4 and sigma^-8; use estimator=taylor "
                "(exact directional jets) or estimator=fd for this PDE."
            )
        super().check(ops)

    def _estimate(
        self,
        model: ModelFunction,
        x: Tensor,
        ops: set[str],
        generator: torch.Generator,
        spatial_dim: int,
    ) -> dict[str, Tensor]:
        """Stein estimates of ``ops`` at ``x`` (see the module notes)."""
        d = spatial_dim
        if "dt" in ops:
            t_axis = time_axis(x, d)
        f0 = model(x)
        out: dict[str, Tensor] = {}
        smoothed = "u" in ops and self.value == "smoothed"
        if ops & {"grad", "grad_norm2", "laplacian"} or smoothed:
            dirs = sample_directions(
                "gaussian", self.num_directions, x.shape[1], d, generator, x.dtype, x.device
            )
            xi = dirs.dense[:, :d]
            antithetic = self.variant == "antithetic"
            f_plus, f_minus = stein_samples(model, x, dirs, self.sigma, antithetic)
            a, lap = stein_terms(
                f_plus, f_minus, f0, (xi * xi).sum(dim=1), self.sigma, d, self.variant
            )
            grad = None
            if "grad" in ops:
                grad = a.T @ xi / a.shape[0]
                out["grad"] = grad
            if "grad_norm2" in ops:
                out["grad_norm2"] = gradient_norm2_ustat(a, xi, grad)
            if "laplacian" in ops:
                out["laplacian"] = lap.mean(dim=0)
            if smoothed:
                out["u"] = f_plus.mean(dim=0) if f_minus is None else (f_plus + f_minus).mean(0) / 2
        if "dt" in ops:
            h = default_step(x.dtype, 1)
            out["dt"] = central_differences(model, x, t_axis, {1: h}, f0)[1][1][0]
        if "u" in ops and not smoothed:
            out["u"] = f0
        return out
