"""``sdze_lightning.reference.hjb``: the Monte Carlo Cole-Hopf reference, checked directly.

``tests/unit/test_problems.py`` covers ``lambda = 1`` through ``HJBLQG`` (the quadrature
solves the PDE; Monte Carlo rate 1/2 in ``N = 2``; the value cache). Here:

* at the terminal time the value is ``g(x) = ln((1 + |x|^2) / 2)`` exactly, with zero
  standard error, in a small and a large dimension (the Gamma chi-square path) and for
  ``lambda != 1`` (the ``pow`` path);
* off the terminal time, for ``lambda != 1``, the Monte Carlo values agree with the
  deterministic quadrature within their own reported standard errors;
* ``uncached`` returns what ``__call__`` does.
"""

from __future__ import annotations

import pytest
import torch

from sdze_lightning.reference import ColeHopfReference, cole_hopf_quadrature
from sdze_lightning.reference.hjb import terminal_condition


def points(n: int, dim: int, seed: int) -> torch.Tensor:
    return torch.rand(n, dim + 1, generator=torch.Generator().manual_seed(seed),
                      dtype=torch.float64)


@pytest.mark.parametrize("dim", [1, 40])
@pytest.mark.parametrize("lam", [1.0, 0.5])
def test_the_terminal_value_is_g_exactly(dim, lam):
    x = points(16, dim, seed=dim)
    x[:, -1] = 1.0  # t = T
    u, se = ColeHopfReference(dim, lam=lam, samples=256, seed=3).values_and_errors(x)
    assert (u - terminal_condition(x[:, :-1])).abs().max() < 1e-14
    assert torch.equal(se, torch.zeros_like(se))


@pytest.mark.parametrize("lam", [0.5, 2.0])
@pytest.mark.parametrize("dim", [1, 2])
def test_monte_carlo_agrees_with_the_quadrature_within_its_errors(dim, lam):
    x = points(16, dim, seed=10 + dim)  # t in [0, 1): off the terminal time
    u, se = ColeHopfReference(dim, lam=lam, samples=4096, seed=5).values_and_errors(x)
    exact = cole_hopf_quadrature(x, lam=lam)
    # The delta-method error is asymptotically normal: P(|z| > 5) ~ 6e-7 per point,
    # below 1e-5 for the 16 points together (union bound; they share the draws).
    # Observed max |z| is 0.3 to 1.4. The errors are not vacuous: se ~ 1e-2.
    assert ((u - exact).abs() < 5 * se).all()
    assert (se > 1e-4).all()


def test_uncached_values_equal_the_cached_ones():
    x = points(8, 3, seed=4)
    ref = ColeHopfReference(3, lam=0.7, samples=512, seed=1)
    assert torch.equal(ref.uncached(x), ref(x))
    assert ref(x.float()).dtype == torch.float32
    with pytest.raises(ValueError, match=r"\(n, 4\)"):
        ref.uncached(x[:, :3])
