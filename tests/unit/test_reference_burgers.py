"""``sdze_lightning.reference.burgers.burgers_cole_hopf``: exact identities and the PDE.

``tests/unit/test_problems.py`` covers the default viscosity through ``Burgers1D`` (its PDE
residual by autodiff) and the quadrature's exponential convergence. Here, directly: the
initial condition ``-sin(pi x)`` at ``t = 0``, the boundary values ``u(+-1, t) = 0``, the
oddness ``u(-x, t) = -u(x, t)`` (all exact up to round-off), and the PDE
``u_t + u u_x = nu u_xx`` by central differences at another viscosity.
"""

from __future__ import annotations

import math

import torch

from sdze_lightning.reference import burgers_cole_hopf


def uniform(n: int, low: float, high: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(n, generator=gen, dtype=torch.float64)


def test_initial_condition_boundary_values_and_oddness():
    x, t = uniform(64, -1, 1, 0), uniform(64, 0, 1, 1)
    initial = burgers_cole_hopf(x, torch.zeros_like(x))
    assert (initial + torch.sin(math.pi * x)).abs().max() < 1e-14
    ones = torch.ones_like(t)
    assert burgers_cole_hopf(ones, t).abs().max() < 1e-14
    assert burgers_cole_hopf(-ones, t).abs().max() < 1e-14
    u = burgers_cole_hopf(x, t)
    assert (u + burgers_cole_hopf(-x, t)).abs().max() < 1e-14
    assert u.abs().max() > 0.5  # not trivially zero
    assert burgers_cole_hopf(x.float(), t.float()).dtype == torch.float32


def test_the_solution_satisfies_burgers_by_central_differences():
    nu, h = 0.1, 1e-4
    x, t = uniform(64, -0.9, 0.9, 2), uniform(64, 0.1, 0.9, 3)

    def u(a, b):
        return burgers_cole_hopf(a, b, nu=nu)

    u0 = u(x, t)
    u_t = (u(x, t + h) - u(x, t - h)) / (2 * h)
    u_x = (u(x + h, t) - u(x - h, t)) / (2 * h)
    u_xx = (u(x + h, t) - 2 * u0 + u(x - h, t)) / h**2
    residual = u_t + u0 * u_x - nu * u_xx
    # Truncation O(h^2) ~ 1e-8 times third/fourth derivatives (|u_xx| <= ~15 here) and
    # round-off ~ 1e-16 / h^2 = 1e-8 in u_xx: observed 8e-8. A wrong viscosity would leave
    # |delta nu * u_xx| ~ 1, so 1e-5 separates the two.
    assert residual.abs().max() < 1e-5
    assert (u_t + u0 * u_x - 0.5 * nu * u_xx).abs().max() > 0.1
