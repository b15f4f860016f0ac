"""The memory pre-flight's parts, each against its formula (benchmarks/preflight_accuracy.py
compares their sum with measured peaks: benchmarks/README.md)."""

from __future__ import annotations

import functools

import pytest
import torch

from sdze_lightning.input_checks import predicted_needs, training_needs
from sdze_lightning.methods import MeZO, PDEAware
from sdze_lightning.methods.base import state_numel, step_temporary_numel
from sdze_lightning.nn import MLP
from sdze_lightning.problems import TwoBody

D, N = 300, 10


def parts(problem) -> dict[str, int]:
    return {n.what.split(" (")[0]: n.bytes for n in training_needs(problem)}


def twobody(method: str, estimator: str = "taylor", **kwargs) -> TwoBody:
    kwargs.setdefault("n_eval", 8)
    return TwoBody(dim=D, net=MLP(D, width=16, depth=2), estimator=estimator, method=method,
                   n_interior=N, **kwargs)


def params(problem) -> int:
    return sum(p.numel() for p in problem.net.parameters())


def test_predicted_needs_are_the_network_and_the_training_needs():
    problem = twobody("sdze")
    needs = predicted_needs(problem)
    assert needs[0].what.startswith("network parameters")
    assert needs[0].bytes == params(problem) * 4
    assert [n.what for n in needs[1:]] == [n.what for n in training_needs(problem)]


def test_sdgd_counts_its_k_coordinates_not_d():
    """SDGD is the exact estimator on K coordinates: its graph keeps K (N, d) tensors."""
    problem = twobody("adam", "sdgd")
    assert parts(problem)["estimator=sdgd's graph"] == 16 * N * D * 4
    assert parts(twobody("adam", "exact"))["estimator=exact's graph"] == D * N * D * 4


@pytest.mark.parametrize(("method", "per_parameter"), [
    ("adam", 2), ("pde_aware", 3), ("sdze", 0), ("mezo", 0),
])
def test_optimizer_state_is_counted_per_parameter(method, per_parameter):
    problem = twobody(method)
    assert state_numel(problem.method, problem.net) == per_parameter * params(problem)
    assert parts(problem).get("optimizer state", 0) == per_parameter * params(problem) * 4


def test_optimizer_state_of_other_methods():
    net = MLP(D, width=16, depth=2)
    total = sum(p.numel() for p in net.parameters())
    assert state_numel(functools.partial(PDEAware, adam_floor=False), net) == 2 * total
    assert state_numel(functools.partial(torch.optim.Adam, amsgrad=True), net) == 3 * total
    assert state_numel(functools.partial(torch.optim.SGD, lr=0.1), net) == 0
    assert state_numel(functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9), net) == total
    # the fused method keeps Adam's moments for its small layers only
    problem = twobody("fused_adafactor")
    small = total - net.layers[0].weight.numel()
    assert state_numel(problem.method, problem.net) == 2 * small


def test_step_temporaries_of_pde_aware_and_mezo():
    net = MLP(D, width=16, depth=2)
    sizes = [p.numel() for p in net.parameters()]
    # pde_aware: a chunk of per-point gradients (chunk_size per parameter), the square of
    # the largest, and eight parameter-sized sums, means and update terms
    pde_aware = functools.partial(PDEAware, chunk_size=4)
    assert step_temporary_numel(pde_aware, net) == 12 * sum(sizes) + 4 * max(sizes)
    # MeZO regenerates one parameter's direction at a time
    assert step_temporary_numel(functools.partial(MeZO, lr=1e-3), net) == max(sizes)
    assert step_temporary_numel(functools.partial(torch.optim.Adam), net) == 0
    problem = twobody("pde_aware")
    expected = step_temporary_numel(problem.method, problem.net) * 4
    assert parts(problem)["method's step temporaries"] == expected


@pytest.mark.parametrize("method", ["adam", "sdze"])
def test_hte_counts_its_copies_of_the_points(method):
    from sdze_lightning.estimators.hte import HutchinsonEstimator

    problem = twobody(method, "hte")  # as many copies without the parameters' graph
    copies = HutchinsonEstimator.INPUT_COPIES
    assert parts(problem)["estimator=hte's temporaries"] == int(copies * 16 * N * D) * 4


@pytest.mark.parametrize("method", ["adam", "sdze"])
def test_stein_counts_its_samples_and_activations(method):
    from sdze_lightning.estimators.stein import SteinEstimator

    problem = twobody(method, "stein")
    graph = method == "adam"
    hidden = 16 + 16 + 1  # MLP(width=16, depth=2): two hidden layers and the output
    rows = (2 * 16 + 1) * N  # antithetic pairs and the points themselves
    expected = int(16 * D + SteinEstimator.ACTIVATIONS[graph] * rows * hidden)
    assert parts(problem)["estimator=stein's temporaries"] == expected * 4


def test_forward_mode_estimators_count_no_temporaries():
    for estimator in ("taylor", "fd"):
        assert not any("temporaries" in k for k in parts(twobody("adam", estimator)))


def test_compiled_kernels_are_counted_where_the_problem_uses_them():
    from sdze_lightning.kernels import COMPILE_BYTES
    from sdze_lightning.problems.twobody import FUSED_MIN_DIM

    d = FUSED_MIN_DIM + 1
    problem = TwoBody(dim=d, net=MLP(d, width=4, depth=1), estimator="taylor", n_eval=4)
    assert problem.uses_compiled_kernels
    assert parts(problem)["compiled kernels"] == COMPILE_BYTES
    off = TwoBody(dim=d, net=MLP(d, width=4, depth=1), estimator="taylor", n_eval=4,
                  fused_kernels=False)
    assert not off.uses_compiled_kernels and "compiled kernels" not in parts(off)
    assert "compiled kernels" not in parts(twobody("sdze"))  # d = 300: eager code


@pytest.mark.parametrize(("method", "estimator"), [("sdze", "taylor"), ("adam", "hte")])
def test_the_held_out_chunk_counts_what_the_step_has_freed(method, estimator):
    """Validation runs between steps: its chunk takes the place of the batch and the
    temporaries of a step, and counts only where it is larger."""
    problem = twobody(method, estimator)
    needs = parts(problem)
    chunk = 8 * D * 4  # n_eval = 8 points
    step = sum(b for k, b in needs.items()
               if k.startswith(("collocation batch", "estimator=", "method's")))
    assert needs["held-out chunk"] == max(0, chunk - step)
    big = twobody(method, estimator, n_eval=4000)  # 512-point chunks
    assert parts(big)["held-out chunk"] == max(0, 512 * D * 4 - step)
    # sdze + taylor: a batch of 10 points and no temporaries, the chunk counts 502 points;
    # adam + hte: its 16 x 10 copies of the points (x 8) outweigh a 512-point chunk
    assert (parts(big)["held-out chunk"] > 0) == (estimator == "taylor")


def _load_benchmark():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "preflight_accuracy.py"
    spec = importlib.util.spec_from_file_location("preflight_accuracy", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_preflight_benchmark_table():
    bench = _load_benchmark()
    rows = [
        {"pair": "sdze+taylor", "dim": 10_000, "status": "completed", "needs": [["a", 10**8]],
         "measured": 5 * 10**8},
        {"pair": "adam+exact", "dim": 100_000, "status": "refused: estimator=exact takes "
         "100,001 reverse passes", "needs": None, "measured": 4 * 10**8},
    ]
    rows = [bench.finish(r, 4 * 10**8) for r in rows]
    assert rows[0]["ratio"] == 1.0 and rows[0]["within"]
    assert rows[1]["ratio"] is None
    table = bench.markdown_table({"rows": rows}).splitlines()
    assert table[0] == "| method + estimator | d = 1e4 | d = 1e5 |"
    assert table[2] == "| adam+exact | - | refused (reverse passes) |"
    assert table[3] == "| sdze+taylor | 500 MB / 500 MB (1.00) | - |"


@pytest.mark.slow  # four sdze-train processes (~17 s): a benchmark's smoke, kept out of CI's budget
def test_preflight_benchmark_smoke(tmp_path):
    bench = _load_benchmark()
    result = bench.main(["--smoke", "--out", str(tmp_path)])
    assert [r["status"] for r in result["rows"]] == ["completed", "completed"]
    assert all(r["measured"] > 0 and r["predicted"] > 0 for r in result["rows"])
    assert (tmp_path / "preflight_accuracy_smoke.json").exists()
