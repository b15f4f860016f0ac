"""The exact estimator's memory: O(N d) for a forward-only method, counted by the pre-flight
for a first-order one.

Stacked back-propagation takes one reverse pass per coordinate; each pass gives a whole
``(N, d)`` gradient of which one column is used. Kept as views, the ``d`` gradients held
``N d^2`` numbers at once even where nothing back-propagates through them (a zeroth-order
method). Where the parameters' gradient is taken, the graph keeps one ``(N, d)`` tensor per
coordinate: the memory check counts it and refuses what cannot fit. The child process
below reports how much its peak resident set grows during one estimate.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from sdze_lightning.cli import run
from sdze_lightning.input_checks import training_needs
from sdze_lightning.nn import MLP
from sdze_lightning.problems import TwoBody

N, D = 20, 1500
#: What the d gradients take when kept: N d^2 float64 numbers (360 MB here).
KEPT_GRADIENTS = N * D * D * 8

CHILD = f"""
import resource, torch
from sdze_lightning.estimators.exact import ExactEstimator
from sdze_lightning.nn import MLP
torch.set_num_threads(1)
net = MLP({D}, width=16, depth=2, seed=0).double()
x = torch.rand({N}, {D}, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
ops = ("u", "laplacian")
with torch.set_grad_enabled(GRAD):
    small = ExactEstimator().estimate(lambda z: net(z)[:, 0], x[:, :], ops, torch.Generator(),
                                      8)  # a few coordinates first: code and allocator warm
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = ExactEstimator().estimate(lambda z: net(z)[:, 0], x, ops, torch.Generator(), {D})
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert out["laplacian"].shape == ({N},)
print(after - before)
"""


def peak_growth(grad: bool) -> int:
    code = CHILD.replace("GRAD", str(grad))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return int(out.stdout.strip().splitlines()[-1])


def test_exact_laplacian_without_graph_does_not_hold_a_gradient_per_coordinate():
    growth = peak_growth(grad=False)
    # Kept gradients would add KEPT_GRADIENTS (360 MB); what is left is O(N d) numbers
    # (a few MB): far below a quarter of it, whatever the allocator's slack.
    assert growth < KEPT_GRADIENTS / 4, f"peak grew by {growth / 2**20:.0f} MiB"


def test_the_memory_check_counts_one_input_sized_tensor_per_coordinate():
    """With the parameters' gradient the graph allocates one (N, d) tensor per coordinate
    (mostly zeros: how much of it becomes resident depends on the allocator, so the count
    is checked against its formula, not against the process's resident set)."""
    problem = TwoBody(dim=D, net=MLP(D, width=16, depth=2), estimator="exact",
                      n_interior=N).double()  # the child's float64
    parts = {n.what.split(" (")[0]: n.bytes for n in training_needs(problem)}
    assert parts["estimator=exact's graph"] == KEPT_GRADIENTS
    sdze = TwoBody(dim=D, net=MLP(D, width=16, depth=2), estimator="exact", n_interior=N,
                   method="sdze").double()
    assert not any(n.what.startswith("estimator=exact") for n in training_needs(sdze))


def test_a_first_order_exact_run_that_cannot_fit_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError) as info:
        run(["pde=allen_cahn_twobody", "pde.dim=10000", "method=adam", "estimator=exact",
             "logger=none", "callbacks=none"], tmp_path / "run")
    message = str(info.value)
    assert "estimator=exact's graph (10000 reverse passes over 100 points x 10000 inputs" in (
        message)
    assert "The largest part is the estimator=exact's graph" in message
    assert "estimator=taylor" in message and "\n" not in message
    assert not (tmp_path / "run").exists()
