"""Shared test setup: no W&B server, quiet Lightning, a tiny PDE."""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

from sdze_lightning import Derivatives, PINNProblem  # noqa: E402

#: The benchmark scripts (not a package: they import each other by file name).
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """Import ``benchmarks/<name>.py`` (for its ``--smoke`` mode) as module ``bench_<name>``."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test module (small ops; restored afterwards).

    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Sine1D(PINNProblem):
    """u'' = -pi^2 sin(pi x) on [0, 1] with u = sin(pi x); boundary by a loss term."""

    operators = ("u", "laplacian")

    def sample_interior(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return self.rand(n, 1, generator=generator)

    def sample_boundary(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return (self.rand(n, 1, generator=generator) < 0.5).to(self.dtype)

    def residual(self, x: torch.Tensor, d: Derivatives) -> torch.Tensor:
        return d.laplacian + math.pi**2 * torch.sin(math.pi * x[:, 0])

    def exact_solution(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(math.pi * x[:, 0])


def relative_l2_by_hand(problem: PINNProblem) -> float:
    """``|u - u*| / |u*|`` on the problem's held-out points, summed here in float64.

    Independent of :class:`~sdze_lightning.metrics.RelativeL2Error`, to check what a run
    reports against the network it leaves behind.
    """
    num = den = 0.0
    with torch.no_grad():
        for x, ref in problem.eval_batches():
            num += float((problem(x).double() - ref.double()).square().sum())
            den += float(ref.double().square().sum())
    return math.sqrt(num / den)


@pytest.fixture
def tiny_problem():
    """Factory of a small, fast 1D problem."""

    def make(**kwargs):
        from sdze_lightning.nn import MLP

        defaults = dict(
            dim=1, net=MLP(1, width=16, depth=2, seed=0), n_interior=32, n_boundary=8, n_eval=128
        )
        defaults.update(kwargs)
        return Sine1D(**defaults)

    return make


def quiet_trainer(**kwargs):
    """A Trainer with nothing written to disk and no progress bar."""
    import lightning as L

    defaults = dict(
        max_steps=20,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
        devices=1,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


@pytest.fixture
def make_trainer():
    """Factory of quiet CPU trainers."""
    return quiet_trainer


def fused_steps(problem: PINNProblem, steps: int):
    """``steps`` steps of the problem's ``FusedAdafactor`` partial, outside a Trainer."""
    from sdze_lightning.methods import FusedAdafactor

    opt = FusedAdafactor(problem.net, **problem.method.keywords)
    for t in range(steps):
        def closure(t=t):
            opt.zero_grad()
            loss = problem.loss_terms(t, 0)["loss"]
            loss.backward()
            return loss
        opt.step(closure)
    return opt


class DecayingSGD(torch.optim.SGD):
    """SGD that also halves every parameter at each step, with a gradient or without: it
    does not withhold a skipped step by itself, so the step runner must snapshot and
    restore around it."""

    def step(self, closure=None):
        loss = super().step(closure)
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    p.mul_(0.5)
        return loss
