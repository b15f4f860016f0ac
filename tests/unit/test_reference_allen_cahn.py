"""``sdze_lightning.reference.allen_cahn``: the ETDRK4 Fourier solver against closed forms.

``tests/unit/test_problems.py`` covers the benchmark reference through ``AllenCahn1D`` (its
PDE residual, fourth order in time, spectral/second order in space). Here the solver is
checked directly against two exact solutions of ``u_t = eps u_xx + rate (u - u^3)``,
evaluated anywhere through ``__call__`` (Fourier in ``x``, cubic Hermite in ``t``):

* a uniform start ``u(x, 0) = c`` stays uniform and follows the ODE ``u' = rate (u - u^3)``:
  ``u(t) = c e^{rate t} / sqrt(1 - c^2 + c^2 e^{2 rate t})`` (the cubic term at work);
* with ``rate = 0`` a single mode ``sin(pi x)`` decays as ``e^{-eps pi^2 t}`` (the linear
  part, integrated exactly).

Each case is its own subclass: the solved snapshots are cached per class and settings.
"""

from __future__ import annotations

import math

import pytest
import torch

from sdze_lightning.reference import AllenCahnReference

C = 0.3


class Uniform(AllenCahnReference):
    def initial(self, x):
        return torch.full_like(x, C)


class Sine(AllenCahnReference):
    def initial(self, x):
        return torch.sin(math.pi * x)


def random_points(n: int = 200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = 2 * torch.rand(n, generator=gen, dtype=torch.float64) - 1
    return x, torch.rand(n, generator=gen, dtype=torch.float64)


def test_a_uniform_start_follows_the_reaction_ode():
    ref = Uniform(n_points=16)  # rate 5, dt 1e-3, snapshots every 5e-3 up to t = 1
    x, t = random_points()
    growth = torch.exp(ref.rate * t)
    exact = C * growth / torch.sqrt(1 - C**2 + C**2 * growth**2)
    # ETDRK4 error ~ (rate dt)^4 ~ 6e-10 and Hermite interpolation error
    # ~ save_dt^4 max|u''''| / 384 ~ 1e-9 (observed 1.1e-9); leaving out the cubic term
    # would be off by O(1) (u -> 0.3 e^5).
    assert (ref(x, t) - exact).abs().max() < 1e-7
    assert float(exact[t.argmax()]) > 0.9  # the solution is far from its start there


def test_without_reaction_a_sine_mode_decays_exactly():
    ref = Sine(eps=0.1, rate=0.0, n_points=16)
    x, t = random_points(seed=1)
    exact = torch.sin(math.pi * x) * torch.exp(-0.1 * math.pi**2 * t)
    assert (ref(x, t) - exact).abs().max() < 1e-10  # observed 1.4e-12: round-off
    assert ref(x, t).dtype == torch.float64
    assert ref(x.float(), t.float()).dtype == torch.float32


def test_bad_grids_are_refused():
    with pytest.raises(ValueError, match="even"):
        AllenCahnReference(n_points=15)
    with pytest.raises(ValueError, match="multiple"):
        AllenCahnReference(save_dt=5e-3, horizon=0.0123)
