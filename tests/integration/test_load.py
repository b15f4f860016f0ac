"""The trained network back: a checkpoint or run directory loads, in a fresh process, as the
problem that was trained (class, arguments, estimator, method, dtype, weights), evaluates
at new points (``problem(x)``, ``Trainer.predict``) and exports (the README's snippet).

Two ``sdze-train`` runs (float32 Adam; float64 SDZE + Taylor) and two ``Trainer.fit`` runs
of user problems (``tests/helpers_load.py``: a subclass with its own arguments and its
own network; the conftest ``Sine1D`` in float64 with SDZE) are loaded by one fresh process
(``helpers_load.main``) and compared with what the training processes left: the
held-out error of ``summary.json`` and ``u`` at fixed points, bit for bit.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from conftest import Sine1D, quiet_trainer
from helpers_load import ScaledSine, TinyNet
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from sdze_lightning import PINNProblem, load_run, problems
from sdze_lightning.estimators import ESTIMATORS, build_estimator
from sdze_lightning.estimators.hte import HutchinsonEstimator
from sdze_lightning.loading import run_checkpoint
from sdze_lightning.methods.registry import build_method, method_names
from sdze_lightning.nn import MLP
from sdze_lightning.problems import Poisson2D, TwoBody
from sdze_lightning.recipes import decode, encode, unrecorded

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
COMMON = ["model.width=16", "model.depth=2", "pde.n_interior=32", "pde.n_eval=128",
          "threads=1", "~callbacks.progress"]
#: The issue's run, and a float64 SDZE run of another operator and estimator.
RUNS = {
    "run32": ["pde=allen_cahn_twobody", "pde.dim=50", "trainer.max_steps=50", *COMMON],
    "run64": ["pde=poisson_twobody", "pde.dim=20", "trainer.max_steps=30", "method=sdze",
              "estimator=taylor", "method.eps=1e-5", "trainer.precision=64-true", *COMMON],
}


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", PYTHONPATH=path)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Two ``sdze-train`` runs (in parallel, one thread each) in ``<root>/run32``, ``run64``."""
    root = tmp_path_factory.mktemp("load")
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "sdze_lightning.cli", *args, f"hydra.run.dir={root / name}"],
            cwd=root, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for name, args in RUNS.items()
    }
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name}: {err[-3000:]}"
        assert (root / name / "checkpoints" / "last.ckpt").is_file()
    return root


def _fit(problem: PINNProblem, folder: Path, **trainer_kwargs) -> Path:
    ckpt = ModelCheckpoint(dirpath=folder, save_last=True, every_n_train_steps=1000,
                           save_top_k=0)
    quiet_trainer(max_steps=20, enable_checkpointing=True, callbacks=[ckpt],
                  **trainer_kwargs).fit(problem)
    return folder / "last.ckpt"


@pytest.fixture(scope="module")
def user(root, one_thread) -> dict:
    """Problems of the user's own classes trained by ``Trainer.fit``, with ``u`` at points."""
    x = torch.rand(32, 1, generator=torch.Generator().manual_seed(5))
    torch.save(x, root / "x.pt")
    torch.save(x.double(), root / "x64.pt")
    tiny = ScaledSine(k=2, amplitude=0.5, net=TinyNet(), method="adam", n_interior=16,
                      n_boundary=4, n_eval=64, estimator=HutchinsonEstimator(num_directions=4))
    tiny_ckpt = _fit(tiny, root / "tiny", logger=CSVLogger(root, name="csv"),
                     log_every_n_steps=5)
    sine = Sine1D(dim=1, net=functools.partial(MLP, width=8, depth=2), method="sdze",
                  estimator="taylor", n_interior=16, n_boundary=4, n_eval=64)
    sine_ckpt = _fit(sine, root / "sine64", precision="64-true")
    with torch.no_grad():
        return {"tiny": tiny, "tiny_ckpt": tiny_ckpt, "tiny_u": tiny(x),
                "sine": sine, "sine_ckpt": sine_ckpt, "sine_u": sine(x.double())}


@pytest.fixture(scope="module")
def loaded(root, user) -> dict:
    """What one fresh process (``helpers_load.main``) loads of every run."""
    ckpt32 = str(root / "run32" / "checkpoints" / "last.ckpt")
    ckpt64 = str(root / "run64" / "checkpoints" / "last.ckpt")
    tiny, sine = str(user["tiny_ckpt"]), str(user["sine_ckpt"])
    x, x64 = str(root / "x.pt"), str(root / "x64.pt")
    jobs = {
        "run32": {"run": str(root / "run32")},
        "run32_class": {"ckpt": ckpt32, "cls": "sdze_lightning.problems.TwoBody"},
        "run64": {"run": str(root / "run64")},
        "run64_class": {"ckpt": ckpt64, "cls": "sdze_lightning.problems.TwoBody"},
        "tiny": {"ckpt": tiny, "cls": "ScaledSine", "net": "tiny", "points": x},
        "tiny_base": {"ckpt": tiny, "cls": "PINNProblem", "net": "tiny", "points": x},
        "tiny_without_net": {"ckpt": tiny, "cls": "ScaledSine"},
        "sine": {"ckpt": sine, "cls": "PINNProblem", "points": x64},
        "sine_class": {"ckpt": sine, "cls": "conftest.Sine1D", "points": x64},
        "sine_as_other_class": {"ckpt": sine, "cls": "ScaledSine"},
    }
    (root / "jobs.json").write_text(json.dumps(jobs))
    out = subprocess.run(
        [sys.executable, "-c", "import sys, helpers_load; helpers_load.main(sys.argv[1:])",
         str(root / "jobs.json"), str(root / "out.pt")],
        cwd=root, env=_env(), capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return torch.load(root / "out.pt", weights_only=False)


def _summary(root: Path, name: str) -> dict:
    return json.loads((root / name / "summary.json").read_text())


# ------------------------------------------------------------------- (a), (c), (d): sdze-train
def test_a_cli_run_loads_in_a_fresh_process_with_the_error_the_run_reported(root, loaded):
    """The issue's acceptance test: the loaded network's held-out error is summary.json's,
    bit for bit (same points, one thread in both processes)."""
    got = loaded["run32"]
    assert got["class"] == "sdze_lightning.problems.twobody.TwoBody"
    assert got["dim"] == 50 and got["dtype"] == "torch.float32" and got["training"] is False
    assert got["rel_l2"] == _summary(root, "run32")["rel_l2"]


def test_c_loading_through_the_class_gives_the_runs_problem_not_the_class_defaults(
    root, loaded
):
    """``TwoBody.load_from_checkpoint``: dim 50 (the class default is 100), the run's
    estimator and method (the class defaults are exact and torch's Adam)."""
    got = loaded["run32_class"]
    assert got["dim"] == 50 and got["estimator"] == "ExactEstimator"
    assert got["method"] == "sdze_lightning.methods.adam.Adam"
    assert got["method_keywords"]["lr"] == 1e-3
    assert got["rel_l2"] == _summary(root, "run32")["rel_l2"]
    got = loaded["run64_class"]
    assert got["dim"] == 20 and got["estimator"] == "TaylorEstimator"
    assert got["method"] == "sdze_lightning.methods.sdze.SDZE"
    assert got["method_keywords"]["eps"] == 1e-5 and got["method_keywords"]["rank"] == 4


def test_d_a_64_true_run_loads_as_float64_with_the_same_numbers(root, loaded, user):
    """The weights keep their dtype (no round trip through float32), and SDZE's offset of the
    last window is folded in as the end of fit folds it."""
    got = loaded["run64"]
    assert got["dtype"] == "torch.float64"
    assert got["rel_l2"] == _summary(root, "run64")["rel_l2"]
    got = loaded["sine"]
    assert got["dtype"] == "torch.float64" and got["u"].dtype == torch.float64
    assert torch.equal(got["u"], user["sine_u"])


# ----------------------------------------------------------------------- (b): Trainer.fit
def test_b_a_user_subclass_loads_with_its_own_arguments_estimator_and_method(loaded, user):
    trained = user["tiny"]
    for name in ("tiny", "tiny_base"):
        got = loaded[name]
        assert got["class"] == "helpers_load.ScaledSine"
        assert torch.equal(got["u"], user["tiny_u"])
        # k = 2 and amplitude 0.5 are the subclass's own arguments: the reference differs
        assert got["rel_l2"] == trained.relative_l2_error()
        assert got["estimator"] == "HutchinsonEstimator"
        assert got["estimator_state"] == vars(trained.estimator)
        assert got["method"] == "sdze_lightning.methods.adam.Adam"
    assert trained.hparams["k"] == 2 and trained.hparams["amplitude"] == 0.5


def test_b_the_conftest_problem_without_a_constructor_loads_by_its_class(loaded, user):
    for name in ("sine", "sine_class"):
        got = loaded[name]
        assert got["class"] == "conftest.Sine1D" and got["estimator"] == "TaylorEstimator"
        assert got["method"] == "sdze_lightning.methods.sdze.SDZE"
        assert torch.equal(got["u"], user["sine_u"])


def test_a_network_of_ones_own_is_not_recorded_and_must_be_passed_again(loaded, user):
    ckpt = torch.load(user["tiny_ckpt"], weights_only=True)  # plain data: resume reads it so
    assert unrecorded(ckpt["hyper_parameters"]["net"]) == "TinyNet"
    assert not any(k.startswith("net.") for k in json.dumps(ckpt["hyper_parameters"]))
    message = loaded["tiny_without_net"]["error"]
    assert message.startswith("ValueError") and "net=" in message and "TinyNet" in message
    assert "\n" not in message


def test_a_checkpoint_of_another_class_is_refused(loaded):
    message = loaded["sine_as_other_class"]["error"]
    assert message.startswith("TypeError") and "conftest.Sine1D" in message
    assert "ScaledSine" in message


def test_the_user_runs_logger_got_no_hyperparameters(user, root):
    """The recorded arguments stay out of the loggers (the CLI records its config itself)."""
    logged = list((root / "csv").rglob("hparams.yaml"))
    assert all("net" not in p.read_text() for p in logged)
    assert list((root / "csv").rglob("metrics.csv"))


# ------------------------------------------------------------------- in this process
@pytest.fixture(scope="module")
def problem(root, one_thread) -> TwoBody:
    loaded = load_run(root / "run32")
    assert isinstance(loaded, TwoBody)
    return loaded


def test_overrides_replace_the_runs_arguments(root, problem):
    again = load_run(root / "run32", n_eval=64, threads=1,
                     net=functools.partial(MLP, width=16, depth=2))
    assert again.n_eval == 64 and again.threads == 1 and problem.n_eval == 128
    x = problem.sample_interior(8, torch.Generator().manual_seed(0))
    assert torch.equal(again(x), problem(x))
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
        load_run(root / "run32", bogus=1)


def test_another_method_loads_the_weights_the_trained_method_left(root, one_thread):
    """SDZE's pending offset is folded by the method that was trained, whatever replaces it."""
    trained, other = load_run(root / "run64"), load_run(root / "run64", method="adam")
    assert other.method.func.__name__ == "Adam" and trained.method.func.__name__ == "SDZE"
    x = trained.sample_interior(8, torch.Generator().manual_seed(0))
    assert torch.equal(other(x), trained(x))


def test_e_predict_gives_u_with_the_hard_constraint(problem):
    x = problem.sample_interior(100, torch.Generator().manual_seed(1))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    predicted = trainer.predict(problem, DataLoader(x, batch_size=32))
    with torch.no_grad():
        expected = [problem(b) for b in x.split(32)]
    assert all(torch.equal(p, e) for p, e in zip(predicted, expected, strict=True))
    as_tensors = trainer.predict(problem, DataLoader(TensorDataset(x), batch_size=32))
    assert torch.equal(torch.cat(as_tensors), torch.cat(expected))
    # u = (1 - |x|^2) net(x): zero on the unit sphere, whatever the network gives there
    sphere = x / x.norm(dim=1, keepdim=True)
    with torch.no_grad():
        assert float(problem(sphere).abs().max()) < 1e-5 < float(problem.net(sphere).abs().max())


def test_f_a_run_without_a_checkpoint_says_so(root, tmp_path):
    """The run directory of ``callbacks=none``: the run's files, its config without callbacks."""
    bare = tmp_path / "bare"
    shutil.copytree(root / "run32", bare, ignore=shutil.ignore_patterns("*.ckpt"))
    config = yaml.safe_load((bare / ".hydra" / "config.yaml").read_text())
    config["callbacks"] = None
    (bare / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(FileNotFoundError, match="holds no checkpoint.*callbacks=none") as err:
        load_run(bare)
    assert "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_run(tmp_path / "missing")


def test_the_newest_last_checkpoint_is_chosen_and_the_replay_start_never(tmp_path):
    def touch(relative: str, mtime: int) -> Path:
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
        os.utime(path, (mtime, mtime))
        return path

    touch("replay/initial.ckpt", 30)  # the seed-replay log's untrained start
    other = touch("elsewhere/epoch=0.ckpt", 10)
    assert run_checkpoint(tmp_path) == other
    last = touch("elsewhere/last.ckpt", 5)
    assert run_checkpoint(tmp_path) == last  # a last*.ckpt before a newer other one
    touch("checkpoints/last.ckpt", 1)
    newest = touch("checkpoints/last-v1.ckpt", 2)
    assert run_checkpoint(tmp_path) == newest  # checkpoints/ first, the newest there


def test_g_the_readme_export_snippet_runs(root, problem, tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    block = text.split("## The trained network", 1)[1].split("```python\n", 1)[1]
    block = block.split("```", 1)[0]
    assert 'load_run("outputs/mine")' in block
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    code = block.replace('"outputs/mine"', repr(str(root / "run32")))
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    x, u = namespace["x"], namespace["u"]
    with torch.no_grad():
        expected = problem(x)
    assert u.shape == (1000,) and torch.equal(u, expected)
    assert torch.equal(namespace["u_program"], expected)
    assert torch.equal(namespace["u_net"], problem.net(x)[:, 0])
    saved = torch.load(tmp_path / "u_net.pt", weights_only=True)
    assert saved["config"] == problem.net.init_args and (tmp_path / "u.pt2").is_file()


class WidePoisson(Poisson2D):
    """A subclass that builds the network it passes to its base class from its own argument."""

    def __init__(self, width: int = 8, **kwargs) -> None:
        super().__init__(net=MLP(2, width=width, depth=1, seed=1), **kwargs)


def _fit_and_save(problem: PINNProblem, path: Path) -> Path:
    trainer = quiet_trainer(max_steps=3)
    trainer.fit(problem)
    trainer.save_checkpoint(path)
    return path


def test_a_shipped_problems_own_arguments_are_recorded(tmp_path, one_thread):
    """TwoBody's ``operator`` and ``coeff_seed`` (BallProblem's constructor) come back."""
    trained = TwoBody(dim=7, operator="poisson", coeff_seed=3, n_interior=8, n_eval=16,
                      net=functools.partial(MLP, width=8, depth=1))
    assert trained.hparams["coeff_seed"] == 3 and trained.hparams["dim"] == 7
    got = PINNProblem.load_from_checkpoint(_fit_and_save(trained, tmp_path / "tb.ckpt"))
    assert isinstance(got, TwoBody) and (got.operator, got.coeff_seed) == ("poisson", 3)
    assert torch.equal(got.coeffs, trained.coeffs)
    assert got.relative_l2_error() == trained.eval().relative_l2_error()


def _older(path: Path, out: Path) -> Path:
    """``path`` as written before problems recorded their arguments and class."""
    checkpoint = torch.load(path, weights_only=True)
    for key in ("hyper_parameters", "sdze_lightning_problem"):
        del checkpoint[key]
    torch.save(checkpoint, out)
    return out


def test_older_checkpoints_load_from_their_config_or_with_the_arguments_given(
    root, tmp_path, one_thread
):
    older = _older(root / "run32" / "checkpoints" / "last.ckpt", tmp_path / "cli.ckpt")
    assert TwoBody.load_from_checkpoint(older).dim == 50  # sdze-train's stored config
    trained = TwoBody(dim=7, n_interior=8, n_eval=16, net=functools.partial(MLP, width=8))
    older = _older(_fit_and_save(trained, tmp_path / "tb.ckpt"), tmp_path / "fit.ckpt")
    with pytest.raises(ValueError, match="records no constructor arguments.*dim=") as err:
        TwoBody.load_from_checkpoint(older)
    assert "\n" not in str(err.value)
    again = TwoBody.load_from_checkpoint(older, dim=7, net=functools.partial(MLP, width=8))
    x = trained.sample_interior(4, torch.Generator().manual_seed(0))
    assert torch.equal(again(x), trained(x))


def test_a_subclass_that_builds_its_bases_arguments_is_rebuilt_from_its_own(tmp_path, one_thread):
    trained = WidePoisson(width=6, n_interior=8, n_boundary=4, n_eval=16)
    assert "net" not in trained.hparams and trained.hparams["width"] == 6
    got = WidePoisson.load_from_checkpoint(_fit_and_save(trained, tmp_path / "wide.ckpt"))
    x = torch.rand(5, 2)
    assert got.net.init_args["width"] == 6 and torch.equal(got(x), trained(x))


@pytest.mark.parametrize("name", [n for n in problems.__all__
                                  if n not in ("BallProblem", "IntervalProblem")])
def test_every_shipped_problem_exports_with_torch_export(name, one_thread):
    """The README's export: the library's MLP with each problem's hard constraint (if any),
    any number of points, the same numbers as the problem."""
    kwargs = {"dim": 5} if name in ("TwoBody", "ThreeBody", "HardCube") else {}
    problem = getattr(problems, name)(net=functools.partial(MLP, width=8, depth=2), n_eval=16,
                                      **kwargs).eval()
    x = problem.sample_interior(7, torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch")
    program = torch.export.export(problem, (x,), dynamic_shapes={"x": {0: batch}})
    y = problem.sample_interior(11, torch.Generator().manual_seed(1))
    assert torch.equal(program.module()(y), problem(y))


# ----------------------------------------------------------------------------- recipes
@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_every_packaged_estimator_is_recorded_as_plain_data(name):
    estimator = build_estimator(name, num_directions=4) if name != "exact" else \
        build_estimator(name)
    recipe = encode(estimator)
    rebuilt = decode(recipe)
    assert unrecorded(recipe) is None and type(rebuilt) is type(estimator)
    assert vars(rebuilt) == vars(estimator)


def _plain(value):
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value)
    return list(value) if isinstance(value, tuple) else value


@pytest.mark.parametrize("name", method_names())
def test_every_packaged_method_is_recorded_as_plain_data(name):
    method = build_method(name, seed=3)
    rebuilt = decode(encode(method))
    assert rebuilt.func is method.func
    assert rebuilt.keywords == {k: _plain(v) for k, v in method.keywords.items()}


def test_what_cannot_be_recorded_is_marked():
    assert unrecorded(encode(lambda x: x)) == "function"
    assert unrecorded(encode(TinyNet())) == "TinyNet"
    assert encode((1, "a", None, torch.float64)) == (1, "a", None, torch.float64)
    assert decode(encode(torch.optim.SGD)) is torch.optim.SGD
