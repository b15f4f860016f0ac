"""``sdze_lightning.variance.optimizer_probe_variance``: under data parallelism the probe's
loss values are averaged across the ranks (the problem's ``collocation.shard``)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from sdze_lightning.distributed import all_reduce_mean
from sdze_lightning.variance import ProbeSettings, optimizer_probe_variance


class ProbingMethod:
    """Records what ``probe`` was called with; returns fixed estimates."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def probe(self, loss_at, n, crns=True, reduce=None):  # noqa: D102
        self.calls.append({"n": n, "crns": crns, "reduce": reduce})
        return torch.arange(2 * n, dtype=torch.float64).reshape(n, 2)


def problem_with(active: bool):
    shard = SimpleNamespace(active=active)
    return SimpleNamespace(collocation=SimpleNamespace(shard=shard),
                           compute_loss=lambda step, key: torch.zeros(()))


def test_the_probe_is_reduced_across_ranks_only_under_data_parallelism():
    method = ProbingMethod()
    settings = ProbeSettings(count=4, compare_crns=True)
    ddp = optimizer_probe_variance(problem_with(True), method, 0, settings)
    assert [c["reduce"] for c in method.calls] == [all_reduce_mean, all_reduce_mean]
    assert [c["crns"] for c in method.calls] == [True, False]
    method.calls.clear()
    single = optimizer_probe_variance(problem_with(False), method, 0, settings)
    assert [c["reduce"] for c in method.calls] == [None, None]
    assert ddp == single and ddp["zo_crns_ratio"] == 1.0  # same estimates, same figures
