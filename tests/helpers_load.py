"""A user's PDE and network for ``tests/integration/test_load.py``, and its loader process.

Importable by a fresh process through ``PYTHONPATH=tests``;
``helpers_load.main([<jobs.json>, <results.pt>])`` loads each job's checkpoint (or run
directory) with one thread, as a user would in a new session, and saves what the tests
compare: the class, dimension, estimator, method and dtype of the loaded problem, its
held-out error, ``u`` at given points, or the error message of a load that fails.
"""

from __future__ import annotations

import functools
import json
import math
from typing import Any

import torch
from torch import Tensor, nn

from sdze_lightning import Derivatives, PINNProblem, load_run


class ScaledSine(PINNProblem):
    """``u'' = -(k pi)^2 a sin(k pi x)`` on [0, 1], ``u = a sin(k pi x)``: its own arguments."""

    operators = ("u", "laplacian")

    def __init__(self, k: int = 1, amplitude: float = 1.0, **kwargs: Any) -> None:
        kwargs.setdefault("dim", 1)
        super().__init__(**kwargs)
        self.k, self.amplitude = k, amplitude

    def sample_interior(self, n: int, generator: torch.Generator) -> Tensor:
        return self.rand(n, 1, generator=generator)

    def sample_boundary(self, n: int, generator: torch.Generator) -> Tensor:
        return (self.rand(n, 1, generator=generator) < 0.5).to(self.dtype)

    def exact_solution(self, x: Tensor) -> Tensor:
        return self.amplitude * torch.sin(self.k * math.pi * x[:, 0])

    def residual(self, x: Tensor, d: Derivatives) -> Tensor:
        return d.laplacian + (self.k * math.pi) ** 2 * self.exact_solution(x)


class TinyNet(nn.Module):
    """A network of the user's own (no ``init_args``): a checkpoint cannot record it."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.inner = nn.Linear(1, width)
        self.outer = nn.Linear(width, 1)
        for layer in (self.inner, self.outer):
            nn.init.normal_(layer.weight, std=0.5, generator=gen)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.outer(torch.tanh(self.inner(x)))


def _target(factory: Any) -> Any:
    while isinstance(factory, functools.partial):
        factory = factory.func
    return factory


def describe(problem: PINNProblem, points: Tensor | None) -> dict[str, Any]:
    """What the tests compare of a loaded problem."""
    method = _target(problem.method)
    out = {
        "class": f"{type(problem).__module__}.{type(problem).__qualname__}",
        "dim": problem.dim,
        "estimator": type(problem.estimator).__name__,
        "estimator_state": dict(vars(problem.estimator)),
        "method": f"{method.__module__}.{method.__qualname__}",
        "method_keywords": dict(getattr(problem.method, "keywords", {})),
        "dtype": str(problem.dtype),
        "training": problem.training,
        "rel_l2": problem.relative_l2_error(),
    }
    if points is not None:
        with torch.no_grad():
            out["u"] = problem(points.to(problem.dtype))
    return out


def load(job: dict[str, Any]) -> PINNProblem:
    """Load one job: ``{"run": dir}`` or ``{"ckpt": path, "cls": name, "net": "tiny"}``."""
    kwargs: dict[str, Any] = {"net": TinyNet()} if job.get("net") == "tiny" else {}
    if "run" in job:
        return load_run(job["run"], **kwargs)
    cls = {"PINNProblem": PINNProblem, "ScaledSine": ScaledSine}.get(job.get("cls", ""))
    if cls is None:
        from hydra.utils import get_class

        cls = get_class(job["cls"])
    return cls.load_from_checkpoint(job["ckpt"], **kwargs)


def main(argv: list[str]) -> None:
    """Load every job of ``argv[0]`` (JSON: name -> job) and save the results to ``argv[1]``."""
    torch.set_num_threads(1)  # the training processes summed with one thread too
    jobs = json.loads(open(argv[0]).read())
    results: dict[str, Any] = {}
    for name, job in jobs.items():
        points = torch.load(job["points"]) if job.get("points") else None
        try:
            results[name] = describe(load(job), points)
        except (ValueError, TypeError, FileNotFoundError) as err:
            results[name] = {"error": f"{type(err).__name__}: {err}"}
    torch.save(results, argv[1])

