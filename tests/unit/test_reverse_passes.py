"""The pre-flight refuses an estimator whose estimates cannot finish: stacked back-propagation
(``estimator=exact``) takes one reverse pass per coordinate, ``d + 1`` for the Laplacian.

At d = 1e7 ``sdze-train pde=allen_cahn_twobody pde.dim=10000000 method=sdze`` (the default
``estimator=exact``) would take 1e7 reverse passes per estimate; it is refused in one line,
before the problem allocates its 5 GB network or a 4 GB batch, and nothing is written.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from sdze_lightning.builders import _check_reverse_passes, compose_config
from sdze_lightning.cli import BAD_INPUT_EXIT
from sdze_lightning.estimators import build_estimator
from sdze_lightning.estimators.exact import MAX_REVERSE_PASSES, ExactEstimator
from sdze_lightning.estimators.sdgd import SDGDEstimator
from sdze_lightning.input_checks import check_reverse_passes
from sdze_lightning.nn import MLP
from sdze_lightning.problems import TwoBody

HEADLINE = ["pde=allen_cahn_twobody", "pde.dim=10000000", "method=sdze", "trainer.max_steps=3"]
TWOBODY_OPS = TwoBody.operators  # ("u", "laplacian")


def launch(*args: str, cwd: Path) -> tuple[int, str, str, int]:
    """``sdze-train <args>`` in a fresh process: exit status, stdout, stderr, peak RSS (bytes)."""
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1")
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "HYDRA_FULL_ERROR"):
        env.pop(name, None)
    with open(cwd / "stdout", "w+") as out, open(cwd / "stderr", "w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "sdze_lightning.cli", *args], cwd=cwd,
                                env=env, stdout=out, stderr=err)
        watchdog = threading.Timer(300, proc.kill)  # a run that trains instead is stopped
        watchdog.start()
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own peak, not its siblings'
        watchdog.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return proc.returncode, out.read(), err.read(), usage.ru_maxrss * 1024


def test_the_headline_command_is_refused_in_one_line_before_anything_is_allocated(tmp_path):
    run_dir = tmp_path / "run"
    rc, stdout, stderr, peak = launch(*HEADLINE, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert rc == BAD_INPUT_EXIT, stderr[-3000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("Error: estimator=exact takes 10,000,001 reverse passes")
    assert f"estimator.max_reverse_passes={MAX_REVERSE_PASSES:,}" in lines[0]
    assert "estimator=taylor" in lines[0] and "estimator=sdgd" in lines[0]
    assert "estimator.max_reverse_passes=null" in lines[0]
    assert stdout.strip() == ""  # no summary line
    written = sorted(p.name for p in run_dir.rglob("*")) if run_dir.exists() else []
    assert not {"checkpoints", "summary.json", "metrics.csv", "hparams.yaml"} & set(written)
    assert not any(name.endswith(".ckpt") for name in written), written
    # The network alone is 1.28e9 float32 parameters (5.1 GB), one batch of 100 points
    # 4 GB: a process that allocated either peaks far above 2 GB (the interpreter with
    # torch, Lightning and Hydra imported takes ~0.5 GB).
    assert peak < 2e9, f"peak resident set {peak / 1e9:.1f} GB"
    print(f"refused with a peak resident set of {peak / 1e6:.0f} MB")


def test_the_headline_command_with_a_dimension_free_estimator_passes_the_pre_flight(tmp_path):
    for estimator in ("taylor", "sdgd"):
        cfg = compose_config([*HEADLINE, f"estimator={estimator}"], tmp_path)
        _check_reverse_passes(cfg, instantiate(cfg.estimator))  # no error
    cfg = compose_config(HEADLINE, tmp_path)
    with pytest.raises(ValueError, match="10,000,001 reverse passes"):
        _check_reverse_passes(cfg, instantiate(cfg.estimator))
    lifted = compose_config([*HEADLINE, "estimator.max_reverse_passes=null"], tmp_path)
    _check_reverse_passes(lifted, instantiate(lifted.estimator))  # the opt-out


def test_the_bound_lets_d_1e4_through_and_refuses_d_1e5():
    exact = build_estimator("exact")
    assert exact.max_reverse_passes == MAX_REVERSE_PASSES == 20_000
    check_reverse_passes(exact, TWOBODY_OPS, 10_000)  # 10,001 passes
    with pytest.raises(ValueError, match=r"100,001 reverse passes .* pde\.dim=100000"):
        check_reverse_passes(exact, TWOBODY_OPS, 100_000)
    check_reverse_passes(ExactEstimator(max_reverse_passes=None), TWOBODY_OPS, 10**7)
    check_reverse_passes(build_estimator("sdgd"), TWOBODY_OPS, 10**7)  # K + 1 = 17
    with pytest.raises(ValueError, match="smaller estimator.num_directions"):
        check_reverse_passes(SDGDEstimator(num_directions=10**5), TWOBODY_OPS, 10**7)
    for name in ("taylor", "fd", "hte", "stein"):
        check_reverse_passes(build_estimator(name), TWOBODY_OPS, 10**7)


def test_the_python_api_is_refused_by_check_inputs_too():
    problem = TwoBody(dim=30_000, net=MLP(30_000, width=4, depth=1), estimator="exact",
                      method="sdze", n_interior=4, n_eval=4)
    with pytest.raises(ValueError, match="30,001 reverse passes"):
        problem.check_inputs()


@pytest.mark.parametrize("value", [0, -1, 2.5, True])
def test_a_bad_bound_is_refused(value):
    with pytest.raises(ValueError, match="estimator.max_reverse_passes"):
        ExactEstimator(max_reverse_passes=value)


OPS = [("u", "laplacian"), ("u", "grad", "laplacian", "dt"), ("grad_norm2",),
       ("u", "grad", "third", "dt"), ("biharmonic",), ("u", "laplacian", "biharmonic")]


@pytest.mark.parametrize("ops", OPS)
@pytest.mark.parametrize("estimator", [ExactEstimator(), SDGDEstimator(num_directions=3)])
def test_the_count_is_the_number_of_reverse_passes_taken(monkeypatch, estimator, ops):
    d = 5
    time = bool({"dt"} & set(ops))
    net = MLP(d + int(time), width=8, depth=2, seed=0).double()
    x = torch.rand(4, d + int(time), dtype=torch.float64)
    calls = []
    grad = torch.autograd.grad

    def counted(*args, **kwargs):
        calls.append(1)
        return grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counted)
    with torch.no_grad():
        estimator.estimate(lambda z: net(z)[:, 0], x, ops, torch.Generator().manual_seed(0), d)
    assert len(calls) == estimator.reverse_passes(ops, d)


def test_the_headline_command_with_taylor_is_predicted_under_20_gb(monkeypatch):
    """The pre-flight of ``... method=sdze estimator=taylor`` at d = 1e7, on a network whose
    input layer lives on the meta device (its 5.1 GB are counted, not allocated)."""
    from torch import nn

    from sdze_lightning import memory_budget
    from sdze_lightning.input_checks import predicted_needs

    net = MLP(10)
    net.layers[0] = nn.Linear(10**7, 128, device="meta")
    problem = TwoBody(dim=10**7, operator="allen_cahn", net=net, estimator="taylor",
                      method="sdze")
    check_reverse_passes(problem.estimator, problem.operators, problem.dim)
    parts = {n.what.split(" (")[0]: n.bytes for n in predicted_needs(problem)}
    assert parts["network parameters"] == 1_280_049_793 * 4
    assert parts["collocation batch"] == 100 * 10**7 * 4
    # The process itself (torch, Lightning, Hydra and the Trainer's loop) adds ~0.4 GB
    # (benchmarks/preflight_accuracy.py's baseline): 10.3 + 0.4 GB, under 20 GB.
    assert sum(parts.values()) < 19.5e9
    monkeypatch.setattr(memory_budget, "available_bytes", lambda device="cpu": 19.5e9)
    memory_budget.check_fits(predicted_needs(problem))  # fits in 19.5 GB: no error
