"""Bad input, tried as a new user would.

Every case fails before the first training step with an error that names what to fix, and
leaves nothing behind (no summary.json, checkpoint or logger files) that a later run could
mistake for a result. The list:

* wrong config types: ``pde.dim``, ``pde.n_interior``, ``pde.boundary_weight``, ``seed``,
  ``model.width``, ``method.lr`` (SDZE and torch's Adam), ``method.betas``,
  ``method.queries``, ``estimator.num_directions``, ``trainer.max_steps``;
* unknown names: config options (``pde=``, ``method=``), keys (``pde.dimm``), values
  (``model.activation``, ``method.update``, ``estimator.distribution``, ``divergence``,
  ``output_fit``),
  an estimator name in Python;
* a custom PDE whose residual returns the wrong shape, an integer dtype, another float
  dtype than the points, or not a tensor; whose points have the wrong width; whose boundary
  target has the wrong shape or is missing;
* a dimension that does not match the network (``model.in_features``, a network object,
  a custom network whose first layer takes another width, ``pde.dim`` of a 2D problem);
* an estimator lacking an operator the PDE needs (config and Python);
* an empty boundary sample (``pde.n_boundary=0`` for a soft boundary, a
  ``sample_boundary()`` returning no points);
* ``trainer.precision=16-mixed``, ``replay_log=true`` with a first-order method, a
  ``ckpt_path`` that does not exist.
"""

from __future__ import annotations

import sys

import lightning as L
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf.errors import OmegaConfBaseException
from sdze_lightning.callbacks.summary import RunSummary
from torch import nn

from sdze_lightning.cli import (
    BAD_INPUT_EXIT,
    FirstStepWatch,
    bad_input_message,
    compose_config,
    main,
    run,
    train,
)
from sdze_lightning.estimators.base import Estimator
from sdze_lightning.nn import MLP
from sdze_lightning.problems import Poisson2D

BASE = ["trainer.max_steps=2", "trainer.accelerator=cpu", "logger=csv", "model.width=8",
        "model.depth=1", "pde.n_interior=16", "pde.n_eval=16"]

CONFIG_CASES = {
    # wrong config types
    "dim-not-int": (["pde=hjb_lqg", "pde.dim=abc"],
                    "pde.dim must be a positive integer, got 'abc'"),
    "points-float": (["pde.n_interior=1.5"], "pde.n_interior must be a positive integer, got 1.5"),
    "boundary-weight": (["pde.boundary_weight=heavy"], "pde.boundary_weight must be a number"),
    "seed": (["seed=abc"], "seed must be an integer, got 'abc'"),
    "width": (["model.width=wide"], "model.width must be a positive integer, got 'wide'"),
    "lr-sdze": (["method=sdze", "method.lr=fast"],
                "method.lr must be a non-negative number, got 'fast'"),
    "lr-adam": (["method=adam", "method.lr=fast"], "method=adam rejects its configuration"),
    "lr-negative-adam": (["method=adam", "method.lr=-1"],
                         "method=adam rejects its configuration {'lr': -1,"),
    "input-lr-adam": (["method=adam", "method.input_lr=0"],
                      "method.input_lr must be > 0 or null, got 0"),
    "lr-negative-sdze": (["method=sdze", "method.lr=-1"],
                         "method.lr must be a non-negative number, got -1"),
    "threads": (["threads=0"], "threads must be 'auto' or a positive integer, got 0"),
    "betas": (["method=sdze", "method.betas=[0.9]"], "method.betas must be two numbers"),
    "queries": (["method=sdze", "method.queries=two"], "method.queries must be a positive integer"),
    "directions": (["estimator=fd", "estimator.num_directions=abc"],
                   "estimator.num_directions must be an integer"),
    "max-steps": (["trainer.max_steps=ten"], "trainer.max_steps must be an integer, got 'ten'"),
    # unknown names
    "pde-name": (["pde=no_such_pde"], "Could not find 'pde/no_such_pde'"),
    "method-name": (["method=nope"], "Could not find 'method/nope'"),
    "key": (["pde.dimm=3"], "Could not override 'pde.dimm'"),
    "activation": (["model.activation=relu"], "Unknown activation 'relu'"),
    "init": (["model.init=he"], "model.init must be one of ['xavier_normal', 'kaiming_uniform']"),
    "update-rule": (["method=sdze", "method.update=sgd"], "method.update must be one of"),
    "distribution": (["estimator=fd", "estimator.distribution=uniform"],
                     "estimator.distribution must be one of"),
    "divergence": (["divergence=maybe"], "divergence must be one of ['stop', 'skip']"),
    "output-fit": (["output_fit=affine"], "output_fit must be one of ['constant', 'none']"),
    # dimension that does not match the network
    "in-features": (["+model.in_features=3"],
                    "model.in_features=3 but the problem has input dimension 2"),
    "poisson2d-dim": (["pde.dim=3"], "poisson2d is two-dimensional; got pde.dim=3"),
    # estimator lacking an operator
    "operator": (["pde=biharmonic", "estimator=stein"],
                 "estimator=stein cannot provide ['biharmonic']"),
    # empty boundary sample
    "no-boundary-points": (["pde.n_boundary=0"], "pde.n_boundary=0, but Poisson2D imposes"),
    "precision": (["trainer.precision=16-mixed"], "precision=16-mixed is not supported"),
    "replay-first-order": (["method=adam", "replay_log=true"],
                           "replay_log=true needs a zeroth-order two-point method"),
    "resume-missing": (["ckpt_path=/no/such/last.ckpt"], "ckpt_path=/no/such/last.ckpt does not"),
}


def assert_nothing_written(run_dir) -> None:
    written = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")) if \
        run_dir.exists() else []
    assert written == [], f"files left behind: {written}"


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_config_fails_early_with_a_clear_message(case, tmp_path):
    overrides, message = CONFIG_CASES[case]
    run_dir = tmp_path / "run"
    errors = (ValueError, TypeError, FileNotFoundError, HydraException, OmegaConfBaseException)
    with pytest.raises(errors) as info:
        run(BASE + overrides, run_dir)
    assert message in str(info.value)
    assert_nothing_written(run_dir)


@pytest.mark.parametrize("pde", ["poisson_twobody", "poisson_threebody", "allen_cahn_cube",
                                 "biharmonic"])
@pytest.mark.parametrize(("dim", "message"), [
    ("abc", "pde.dim must be a positive integer, got 'abc'"),
    ("2.5", "pde.dim must be a positive integer, got 2.5"),
    ("1", "needs pde.dim >= "),
])
def test_bad_dim_of_the_zoo_problems(pde, dim, message, tmp_path):
    # these problems need dim before PINNProblem.__init__ checks it (coefficient counts)
    run_dir = tmp_path / "run"
    with pytest.raises((ValueError, HydraException)) as info:  # Hydra wraps the ValueError
        run([*BASE[:5], f"pde={pde}", f"pde.dim={dim}"], run_dir)
    assert message in str(info.value)
    assert_nothing_written(run_dir)


# --------------------------------------------------------------------- custom PDEs
class WrongShape(Poisson2D):
    def residual(self, x, d):
        return super().residual(x, d)[:, None]  # (N, 1) instead of (N,)


class IntegerResidual(Poisson2D):
    def residual(self, x, d):
        return super().residual(x, d).round().long()


class Float64Residual(Poisson2D):
    def residual(self, x, d):
        return super().residual(x, d).double()  # float64 for float32 points


class NotATensor(Poisson2D):
    def residual(self, x, d):
        return float(super().residual(x, d).mean())


class WrongPoints(Poisson2D):
    def sample_interior(self, n, generator):
        return self.rand(n, 3, generator=generator)


class EmptyBoundary(Poisson2D):
    def sample_boundary(self, n, generator):
        return self.rand(0, 2, generator=generator)


class NoBoundaryTarget(Poisson2D):
    def exact_solution(self, x):
        return None


class ColumnTarget(Poisson2D):
    def boundary_target(self, x):
        return super().exact_solution(x)[:, None]  # broadcasts to (N, N) silently


CUSTOM_CASES = {
    "residual-shape": (WrongShape, {}, ValueError, r"WrongShape.residual\(\) must return a "
                       r"tensor of shape \(2,\) \(one value per point\), got \(2, 1\)"),
    "residual-int": (IntegerResidual, {}, TypeError, "must return a floating tensor, got "
                     "torch.int64"),
    "residual-dtype": (Float64Residual, {}, TypeError, "returned torch.float64 for torch.float32 "
                       "points"),
    "residual-not-tensor": (NotATensor, {}, ValueError, "got float"),
    "points-width": (WrongPoints, {}, ValueError, r"must return \(n, 2\) points \(dim=2\), "
                     r"got \(2, 3\)"),
    "empty-boundary": (EmptyBoundary, {}, ValueError, r"sample_boundary\(\) must return \(n, 2\) "
                       "points with n > 0"),
    "no-boundary-target": (NoBoundaryTarget, {}, NotImplementedError,
                           r"defines neither boundary_target\(\) nor exact_solution\(\)"),
    "boundary-target-shape": (ColumnTarget, {}, ValueError, r"boundary_residual\(\) must return "
                              r"one value per boundary point, shape \(2,\), got \(2, 2\)"),
    "network-width": (Poisson2D, {"net": nn.Sequential(nn.Linear(3, 8), nn.Tanh(),
                                                       nn.Linear(8, 1))},
                      ValueError, "must take input_dim=2 inputs"),
}


def make(cls, **kwargs):
    kwargs.setdefault("net", MLP(2, width=8, depth=1, seed=0))
    return cls(n_interior=8, n_boundary=4, n_eval=8, **kwargs)


@pytest.mark.parametrize("case", sorted(CUSTOM_CASES))
def test_custom_pde_contract_fails_before_the_first_step(case, tmp_path):
    cls, kwargs, error, message = CUSTOM_CASES[case]
    with pytest.raises(error, match=message):
        make(cls, **kwargs).check_inputs()
    # the same through Trainer.fit: nothing trained, no checkpoint written
    problem = make(cls, **kwargs)
    trainer = L.Trainer(
        max_steps=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, accelerator="cpu", devices=1,
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1)],
    )
    with pytest.raises(error, match=message):
        trainer.fit(problem)
    assert trainer.global_step == 0
    assert_nothing_written(tmp_path)


def test_custom_pde_through_the_cli_leaves_nothing(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(ValueError, match=r"residual\(\) must return a tensor of shape"):
        run([*BASE, f"pde._target_={__name__}.WrongShape", "pde.n_boundary=8"], run_dir)
    assert_nothing_written(run_dir)


def test_run_summary_of_an_early_failure_is_marked_failed(tmp_path):
    """Python API with RunSummary: a bad input stops fit; if a summary is written at all,
    it carries no result (status failed, no error value), so it cannot pass for one."""
    summary = RunSummary(dirpath=tmp_path, echo=False)
    trainer = L.Trainer(max_steps=3, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1,
                        callbacks=[summary])
    with pytest.raises(ValueError):
        trainer.fit(make(WrongShape))
    if summary.summary is not None:
        assert summary.summary["status"].startswith("failed")
        assert summary.summary["rel_l2"] is None and summary.summary["steps"] == 0


# ------------------------------------------------------------------------ Python API
def test_python_api_names_what_to_fix():
    with pytest.raises(ValueError, match="Unknown estimator 'nope'; available"):
        make(Poisson2D, estimator="nope")
    with pytest.raises(ValueError, match="The network takes 3 inputs but the problem has input "
                       "dimension 2"):
        make(Poisson2D, net=MLP(3, width=8, depth=1))

    class ValueOnly(Estimator):
        name = "value_only"
        operators = frozenset({"u"})

        def estimate(self, model, x, ops, generator, spatial_dim):
            return {"u": model(x)}

    with pytest.raises(ValueError, match=r"estimator=value_only cannot provide \['laplacian'\]"):
        make(Poisson2D, estimator=ValueOnly())
    with pytest.raises(ValueError, match="pde.n_interior must be a positive integer"):
        Poisson2D(n_interior=0)
    with pytest.raises(TypeError, match="built from the network module"):
        from sdze_lightning.methods import SDZE

        SDZE([torch.zeros(2)])


# ------------------------------------------------------------- the CLI's one-line report
#: Cases that Hydra rejects while composing the config, before sdze-train's code runs:
#: Hydra prints its own message (the allowed options on further lines), no traceback.
COMPOSITION_CASES = {"pde-name", "method-name", "key"}


def sdze_train_main(args, run_dir, capsys, monkeypatch) -> tuple[object, str]:
    """Run the ``sdze-train`` entry point in this process; return (exit code, stderr)."""
    GlobalHydra.instance().clear()
    monkeypatch.setattr(sys, "argv", ["sdze-train", *args, f"hydra.run.dir={run_dir}"])
    with pytest.raises(SystemExit) as info:
        main()
    return info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_cli_reports_bad_config_without_a_traceback(case, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    overrides, message = CONFIG_CASES[case]
    code, err = sdze_train_main(BASE + overrides, tmp_path / "run", capsys, monkeypatch)
    assert code not in (0, None)
    assert "Traceback" not in err and 'File "' not in err
    assert message in " ".join(err.split())
    if case not in COMPOSITION_CASES:
        assert code == BAD_INPUT_EXIT
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("Error: "), err


def test_cli_reports_a_custom_pde_contract_error_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    code, err = sdze_train_main([*BASE, f"pde._target_={__name__}.WrongShape",
                                 "pde.n_boundary=8"], tmp_path / "run", capsys, monkeypatch)
    assert code == BAD_INPUT_EXIT and "Traceback" not in err
    assert err.strip().startswith("Error: WrongShape.residual() must return a tensor of shape")


def test_full_error_keeps_the_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    GlobalHydra.instance().clear()
    monkeypatch.setattr(sys, "argv", ["sdze-train", *BASE, "method=sdze", "method.lr=-1",
                                      f"hydra.run.dir={tmp_path / 'run'}"])
    with pytest.raises(ValueError, match="method.lr must be a non-negative number"):
        main()


class FailsLater(Poisson2D):
    """A bug, not bad input: a ValueError at the second step, after the checks passed."""

    def residual(self, x, d):
        if self.global_step == 1:
            raise ValueError("a bug in the second step")
        return super().residual(x, d)


def test_an_error_after_the_first_step_keeps_its_traceback(tmp_path, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    watch = FirstStepWatch()
    cfg = compose_config([*BASE, "trainer.max_steps=3", f"pde._target_={__name__}.FailsLater",
                          "logger=none"], tmp_path)
    with pytest.raises(ValueError, match="a bug in the second step"):
        train(cfg, tmp_path, callbacks=[watch])
    assert watch.reached  # so main() re-raises it for Hydra to print with its traceback
    assert bad_input_message(ValueError("x")) == "x"  # the type alone does not decide
