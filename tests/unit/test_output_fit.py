"""The output offset fitted before the first step (`output_fit`, sdze_lightning.output_fit).

Tolerances: the search ends with a golden-section bracket of ``0.618^25 ~ 6e-6`` times two
grid cells (at most ``3.75 |c|``), so the constant it returns is within ``2.3e-5 |c|`` of
the minimiser of a unimodal loss; the tests allow ``1e-4 |c|`` (float64 losses, whose
rounding moves the minimiser of a quadratic by far less).
"""

from __future__ import annotations

import json
import math
import sys

import lightning as L
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from sdze_lightning import Derivatives, PINNProblem
from sdze_lightning.cli import main
from sdze_lightning.constraints import BallConstraint
from sdze_lightning.nn import MLP
from sdze_lightning.output_fit import minimise_scalar

pytestmark = pytest.mark.usefixtures("one_thread")

#: The search's accuracy bound (module docs), with margin.
REL_TOL = 1e-4
OFFSET = 37.5


class Offset(PINNProblem):
    """``u = f(x)``, ``f = OFFSET + sin(3 x_0) x_1``: the loss of a constant ``c`` is
    ``mean (c g - f)^2``, minimised by ``<g, f> / <g, g>`` on the batch (``g = 1``, or the
    hard constraint's factor)."""

    operators = ("u",)

    def sample_interior(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return 0.5 * self.rand(n, 2, generator=generator)

    def residual(self, x: torch.Tensor, d: Derivatives) -> torch.Tensor:
        return d.u - self.exact_solution(x)

    def exact_solution(self, x: torch.Tensor) -> torch.Tensor:
        return OFFSET + torch.sin(3 * x[:, 0]) * x[:, 1]


def make(output_fit: str = "constant", constrained: bool = False, **kwargs) -> Offset:
    problem = Offset(dim=2, net=MLP(2, width=16, depth=2, seed=0), n_interior=64, n_eval=64,
                     output_fit=output_fit, **kwargs).double()
    if constrained:
        problem.constraint = BallConstraint()
    return problem


def least_squares_constant(problem: Offset) -> float:
    x = problem.points(0, 0)
    f = problem.exact_solution(x)
    g = problem.constraint.value(x).reshape(-1) if problem.constraint else torch.ones_like(f)
    return float((g @ f) / (g @ g))


@pytest.mark.parametrize("target", [37.5, -2.0e3, 0.0, 3.0e-3])
def test_minimise_scalar_finds_the_minimum_of_a_quadratic(target):
    found = minimise_scalar(lambda c: (c - target) ** 2)
    assert found == pytest.approx(target, rel=REL_TOL, abs=1e-9)


def test_minimise_scalar_prefers_the_global_minimum_and_ignores_non_finite_losses():
    # a local minimum at 1 (loss 5) and the global one at -1e4 (loss 0), NaN beyond 1e5
    def loss(c: float) -> float:
        if abs(c) > 1e5:
            return math.nan
        return min((c - 1) ** 2 + 5, ((c + 1e4) / 1e4) ** 2)

    assert minimise_scalar(loss) == pytest.approx(-1e4, rel=REL_TOL)


@pytest.mark.parametrize("constrained", [False, True], ids=["plain", "hard-constraint"])
def test_the_fit_returns_the_least_squares_constant(constrained):
    problem = make(constrained=constrained)
    expected = least_squares_constant(problem)
    found = problem.output_fit.apply(problem)
    assert found == pytest.approx(expected, rel=REL_TOL)
    # the network's mean output on the batch is the constant (the bias was shifted)
    with torch.no_grad():
        assert float(problem.net(problem.points(0, 0)).mean()) == pytest.approx(found, rel=1e-12)
    assert problem.output_fit.apply(problem) is None  # once only


class BiasAtStart(L.Callback):
    """Record the output layer's bias and constant when training starts."""

    def __init__(self) -> None:
        self.biases: list[float] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: PINNProblem) -> None:
        self.biases.append(float(pl_module.net.layers[-1].bias.detach()))


def test_trainer_fit_fits_once_and_output_fit_none_keeps_the_initialisation(make_trainer):
    initial = float(make().net.layers[-1].bias.detach())
    for mode in ("constant", "none"):
        problem, seen = make(mode), BiasAtStart()
        make_trainer(max_steps=2, callbacks=[seen]).fit(problem)
        after_first = float(problem.net.layers[-1].bias)
        make_trainer(max_steps=4, callbacks=[seen]).fit(problem)  # a second fit: no refit
        assert seen.biases[1] == after_first
        if mode == "none":
            assert seen.biases[0] == initial and problem.output_fit.constant is None
        else:
            assert abs(seen.biases[0] - initial) > 10  # moved to ~OFFSET
            assert problem.output_fit.constant == pytest.approx(
                least_squares_constant(make()), rel=REL_TOL)


def test_a_resume_and_a_loaded_checkpoint_keep_their_trained_offset(make_trainer, tmp_path):
    problem = make()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    make_trainer(max_steps=3, enable_checkpointing=True, callbacks=[ckpt]).fit(problem)
    trained = float(problem.net.layers[-1].bias)

    resumed, seen = make(), BiasAtStart()
    make_trainer(max_steps=5, callbacks=[seen]).fit(
        resumed, ckpt_path=tmp_path / "last.ckpt")
    assert seen.biases == [trained] and resumed.output_fit.constant is None

    loaded, seen = Offset.load_from_checkpoint(tmp_path / "last.ckpt").train(), BiasAtStart()
    make_trainer(max_steps=1, callbacks=[seen]).fit(loaded)  # fine-tuning a trained network
    assert seen.biases == [trained] and loaded.output_fit.constant is None


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_a_network_of_ones_own_is_left_as_it_is_with_a_warning():
    problem = Offset(dim=2, net=TwoLayers(), n_interior=16, n_eval=16)
    before = [p.detach().clone() for p in problem.net.parameters()]
    with pytest.warns(UserWarning, match="the library's MLP"):
        assert problem.output_fit.apply(problem) is None
    assert all(torch.equal(a, b) for a, b in zip(before, problem.net.parameters(), strict=True))


def test_bad_output_fit_is_refused_by_the_constructor():
    with pytest.raises(ValueError, match=r"output_fit must be one of \['constant', 'none'\]"):
        make("affine")


@pytest.mark.parametrize("mode", ["constant", "none"])
def test_sdze_train_starts_a_large_solution_at_its_scale(mode, tmp_path, monkeypatch):
    # Two-body Allen-Cahn at d = 1000 on coeff_seed 5: the solution's network output is
    # ~41 (best constant 40.8, relative L2 error 7.2e-3). After one step from the fitted
    # constant the error is that floor plus the initial network's O(1) variation (~2 %
    # of 41); from the initialisation (output ~0) it is ~1.
    run_dir = tmp_path / mode
    GlobalHydra.instance().clear()
    monkeypatch.setattr(sys, "argv", [
        "sdze-train", "experiment=twobody_fused", "pde.coeff_seed=5", "pde.n_eval=500",
        "trainer.max_steps=1", f"output_fit={mode}", "logger=csv", f"hydra.run.dir={run_dir}",
    ])
    main()
    rel_l2 = json.loads((run_dir / "summary.json").read_text())["rel_l2"]
    assert (rel_l2 < 0.1) if mode == "constant" else (rel_l2 > 0.9)
