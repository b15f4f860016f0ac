"""The batch-span experiment of ``benchmarks/sdze_batch_span.py``: its basis and its runs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import load_benchmark

from sdze_lightning.methods.sdze import orthonormal_basis
from sdze_lightning.nn import MLP
from sdze_lightning.seeding import Stream

span = load_benchmark("sdze_batch_span")


def _span_residual(x: torch.Tensor, vectors: torch.Tensor) -> float:
    """Largest distance of a column of ``vectors`` (``d x k``) from the row span of ``x``."""
    coef = torch.linalg.lstsq(x.T.double(), vectors.double()).solution
    return float((x.T.double() @ coef - vectors.double()).norm(dim=0).max())


def test_batch_span_basis_is_orthonormal_and_in_the_span_of_the_batch():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(10, 60, generator=gen)
    basis = span.batch_span_basis(x, 4, seed=0, step=3)
    assert basis.shape == (60, 4)
    torch.testing.assert_close(basis.T @ basis, torch.eye(4), atol=1e-5, rtol=0)
    assert _span_residual(x, basis) < 1e-5
    # the check can fail: a random orthonormal basis of R^60 is mostly outside a 10-dim span
    # (expected squared distance of a unit column: 50/60)
    random_basis = orthonormal_basis(60, 4, 0, 0, 0, Stream.SUBSPACE_RIGHT, torch.float32,
                                     torch.device("cpu"))
    assert _span_residual(x, random_basis) > 0.5
    # a fresh draw per step, the same draw for the same step
    torch.testing.assert_close(span.batch_span_basis(x, 4, seed=0, step=3), basis)
    assert not torch.allclose(span.batch_span_basis(x, 4, seed=0, step=4), basis)


def _batches(step: int) -> torch.Tensor:
    return torch.randn(8, 30, generator=torch.Generator().manual_seed(100 + step))


def _closure_for(net: MLP, step: int):
    def closure() -> torch.Tensor:
        return ((net(_batches(step)) - 1.0) ** 2).mean()

    return closure


def test_first_layer_moves_only_inside_the_span_of_the_batches():
    net = MLP(30, width=16, depth=2, seed=0)
    w0 = net.layers[0].weight.detach().clone()
    opt = span.BatchSpanSDZE(net, batch_points=_batches, period=1, lr=1e-2, seed=0)
    for step in range(2):
        opt.step(_closure_for(net, step))
        torch.testing.assert_close(
            opt.subspaces()[0].B, span.batch_span_basis(_batches(step), 4, 0, step))
    opt.fold()
    moved = (net.layers[0].weight.detach() - w0).T  # (d, width): columns are the row changes
    assert float(moved.norm()) > 0
    both = torch.cat([_batches(0), _batches(1)])
    assert _span_residual(both, moved) < 1e-5 * float(moved.norm(dim=0).max())
    # while plain SDZE's first layer moves outside it (the check above can fail)
    net2 = MLP(30, width=16, depth=2, seed=0)
    plain = span.SDZE(net2, period=1, lr=1e-2, seed=0)
    for step in range(2):
        plain.step(_closure_for(net2, step))
    plain.fold()
    moved2 = (net2.layers[0].weight.detach() - w0).T
    assert _span_residual(both, moved2) > 0.1 * float(moved2.norm(dim=0).max())


def test_first_layer_rms_is_adam_with_beta1_zero():
    net = MLP(30, width=16, depth=2, seed=0)
    lr, (b1, b2) = 1e-2, (0.9, 0.999)
    opt = span.BatchSpanSDZE(net, batch_points=_batches, first_layer_rms=True, period=100,
                             lr=lr, seed=0)
    size = opt.subspaces()[0].size
    grads = []
    for step in range(3):
        opt.step(_closure_for(net, step))
        grads.append(opt.last_query_estimates[0, :size].clone())  # q = 1: the estimate
    v = sum((1 - b2) * b2 ** (2 - k) * g * g for k, g in enumerate(grads))
    expected = -lr * grads[-1] / ((v / (1 - b2**3)).sqrt() + opt.adam_eps)
    # Adam's own beta1 = 0.9 with a fresh first moment would give (1 - b1) / (1 - b1^3) = 0.37
    # times this: the rescaling is what makes it RMSprop
    torch.testing.assert_close(opt.layer_state(0)["coords"], expected, rtol=1e-5, atol=1e-8)
    assert "exp_avg_sq" in opt.layer_state(0) and b1 == opt.betas[0]


@pytest.mark.parametrize("kwargs", [dict(period=1, crns=False), dict(period=100)])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError, match="BatchSpanSDZE needs"):
        span.BatchSpanSDZE(MLP(30, width=16, depth=2, seed=0), batch_points=_batches, **kwargs)


def test_config_built_span_optimizer_takes_its_basis_from_the_problems_batches():
    """The variant built from the packaged config (``method._target_`` override) and bound to
    the problem's batches draws the first layer's ``B`` from each step's points."""
    from _common import SMOKE_OVERRIDES, build_run

    overrides = span.study_overrides("sdze", "twobody", 30, 0, *SMOKE_OVERRIDES,
                                     *span.variant_overrides("span_p1"), n_eval=16)
    assert f"method._target_={span.TARGET}" in overrides and "method.period=1" in overrides
    run = build_run(overrides)
    run.problem.fit_threads.restore()
    assert type(run.optimizer).__name__ == "BatchSpanSDZE" and run.optimizer.period == 1
    with pytest.raises(RuntimeError, match="needs the step's batch"):
        run.step(0)  # not bound: refused before anything moves
    assert span.bind_batches(run.optimizer, run.problem)
    for step in range(2):
        run.step(step)
        x = run.problem.points(step, 0)
        torch.testing.assert_close(run.optimizer.subspaces()[0].B,
                                   span.batch_span_basis(x, 4, 0, step))
    plain = build_run(span.study_overrides("sdze", "twobody", 30, 0, *SMOKE_OVERRIDES,
                                           *span.variant_overrides("sdze", period=3), n_eval=16))
    plain.problem.fit_threads.restore()
    assert not span.bind_batches(plain.optimizer, plain.problem) and plain.optimizer.period == 3


def test_smoke_run_trains(tmp_path):
    rows = span.main(["--smoke", "--variants", "span_p1", "span_rms", "--out", str(tmp_path)])
    assert [r["variant"] for r in rows] == ["span_p1", "span_rms"]
    for r in rows:
        assert r["steps"] > 5 and math.isfinite(r["final_rel_l2"])
        errors = [e for _, _, e in r["curve"]]
        assert len(errors) >= 2 and len(set(errors)) > 1  # the network changes as it trains
        assert 0 < r["constant_floor"] <= 1
        assert r["below_floor"] == (r["final_rel_l2"] < r["constant_floor"])
        assert set(r["captured"]) == {"start", "end"}
        for share in r["captured"].values():  # untrained and trained weights
            assert all(0 <= v <= 1 + 1e-9 for v in share.values())
            # the rank-r basis lies in the batch span: it cannot hold more of either gradient
            for prefix in ("", "mean_"):
                assert share[f"{prefix}span_basis"] <= share[f"{prefix}batch_span"] + 1e-9
            # fixed seeds, 10 steps: about r/N = 4/8 of the gradient against r/d = 4/50
            assert share["span_basis"] > 2 * share["random_basis"]
    saved = json.loads((tmp_path / "sdze_batch_span_smoke.json").read_text())
    assert [r["variant"] for r in saved["rows"]] == ["span_p1", "span_rms"]
    # provenance of the file; each row's overrides, command and what the command leaves out
    assert {"date", "commit", "machine", "load_start", "load_end", "command"} <= set(saved)
    assert "benchmarks/sdze_batch_span.py --smoke" in saved["command"]
    for r in saved["rows"]:
        assert r["command"] == "sdze-train " + " ".join(r["overrides"])
        assert f"method._target_={span.TARGET}" in r["overrides"]
        assert any("batch_points" in note for note in r["not_in_command"])
    assert "method.period=1" in saved["rows"][0]["overrides"] and saved["rows"][0]["period"] == 1
    rms = saved["rows"][1]
    assert "+method.first_layer_rms=true" in rms["overrides"] and rms["period"] == 3  # smoke
