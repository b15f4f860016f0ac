"""Hutchinson probes that repeat up to sign are evaluated once, with the same result."""

from __future__ import annotations

import torch

from sdze_lightning.estimators.directional import DirectionalEstimator
from sdze_lightning.estimators.hte import HutchinsonEstimator

F64 = torch.float64


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
    ).to(F64)


class _Counting(HutchinsonEstimator):
    """Records how many directions each ``directional`` call evaluates."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.counts: list[int] = []

    def directional(self, model, x, dirs, orders, u0=None):
        self.counts.append(dirs.count)
        return super().directional(model, x, dirs, orders, u0)


def _laplacian(est: HutchinsonEstimator, net: torch.nn.Module, x: torch.Tensor, dim: int):
    gen = torch.Generator().manual_seed(7)
    return est.estimate(lambda z: net(z).squeeze(-1), x, {"laplacian"}, gen, dim)["laplacian"]


def test_repeated_rademacher_probes_give_the_plain_mean_at_fewer_evaluations():
    net = _net()
    x = torch.randn(20, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    # A time column (zero in every probe) rides along: the spatial dimension is 2.
    x = torch.cat([x, torch.rand(20, 1, dtype=F64)], dim=1)
    deduped = _Counting(num_directions=16)
    got = _laplacian(deduped, net, x, dim=2)
    # 16 Rademacher probes in 2-D are at most 2 distinct vectors up to sign.
    assert deduped.counts and max(deduped.counts) <= 2

    plain = _Counting(num_directions=16)
    plain.directional_means = (  # type: ignore[method-assign]
        lambda *a, **k: DirectionalEstimator.directional_means(plain, *a, **k)
    )
    want = _laplacian(plain, net, x, dim=2)
    assert plain.counts == [16]
    # Same draws, same estimator: equal up to the order of summation.
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_probes_without_repeats_take_the_plain_path():
    net = _net()
    x = torch.randn(10, 3, dtype=F64, generator=torch.Generator().manual_seed(2))
    est = _Counting(num_directions=16, distribution="gaussian")
    _laplacian(est, net, x, dim=3)
    assert est.counts == [16]  # Gaussian probes never repeat
