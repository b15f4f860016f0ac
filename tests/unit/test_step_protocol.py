"""The optimizer-problem contract: one step entry point, the zeroth-order protocol, offset
hooks held once per layer, one seeding module, and benchmarks that import no circle."""

from __future__ import annotations

import ast
import copy
import functools
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import BENCHMARKS, quiet_trainer
from sdze_lightning.callbacks import EstimatorVarianceMonitor
from torch import Tensor, nn

import sdze_lightning
from sdze_lightning import NonFiniteLossError, seeding
from sdze_lightning.estimators import build_estimator
from sdze_lightning.methods import SDZE, MeZO, ZerothOrderOptimizer
from sdze_lightning.nn import MLP
from sdze_lightning.nn.perturb import delta_of, has_offset_hook, linear_layers
from sdze_lightning.problems import Poisson2D
from sdze_lightning.seeding import Stream

pytestmark = pytest.mark.usefixtures("one_thread")  # small ops: 1 thread is faster here

F64 = torch.float64


def sequential(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(),
                         nn.Linear(12, 1)).double()


def explicit(net: nn.Module) -> nn.Module:
    """Copy of ``net`` with every layer's current offset written into its weights."""
    out = copy.deepcopy(net)
    with torch.no_grad():
        for source, layer in zip(linear_layers(net), linear_layers(out), strict=True):
            delta = delta_of(source)  # the copy's layers carry no offsets (they are the net's)
            weight, bias = delta.effective(layer) if delta else (None, None)
            if weight is not None:
                layer.weight.copy_(weight)
                if bias is not None:
                    layer.bias.copy_(bias)
    for layer in linear_layers(out):  # the copy computes without any hook
        layer.register_forward_hook(lambda m, i, o: None)
    return out


def poisson(net: nn.Module | None = None, method=None, **kwargs) -> Poisson2D:
    est = build_estimator("taylor", num_directions=2, distribution="rademacher")
    method = method or functools.partial(SDZE, lr=1e-2, rank=2, period=2, queries=2)
    return Poisson2D(net=net if net is not None else MLP(2, width=12, depth=2, seed=0),
                     n_interior=16, n_boundary=8, n_eval=32, estimator=est, method=method,
                     **kwargs)


# ------------------------------------------------------------------ offset hooks
def test_second_sdze_on_a_hooked_network_adds_the_offset_once():
    """Two SDZE on one nn.Sequential (a second fit, a replay in the same process): the
    network must still compute W + A C B^T, not W + 2 A C B^T."""
    net = sequential()
    SDZE(net, rank=2, seed=1)  # a first optimizer, e.g. of an earlier fit
    opt = SDZE(net, lr=0.1, rank=2, seed=2, update="plain")
    x = torch.rand(16, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    for _ in range(3):
        opt.step(lambda: (net(x) - 1).square().mean())
    assert any(delta_of(layer) is not None for layer in linear_layers(net))
    torch.testing.assert_close(net(x), explicit(net)(x), rtol=1e-12, atol=1e-12)


def test_close_folds_and_removes_the_hooks_and_a_later_step_holds_them_again():
    net = sequential()
    first, second = SDZE(net, lr=0.1, rank=2, seed=1), SDZE(net, lr=0.1, rank=2, seed=2)
    x = torch.rand(8, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    first.step(lambda: net(x).square().mean())
    before = net(x)
    first.close()
    torch.testing.assert_close(net(x), before, rtol=1e-12, atol=1e-12)  # folded, same function
    assert all(has_offset_hook(layer) for layer in linear_layers(net))  # `second` holds them
    second.close()
    assert not any(has_offset_hook(layer) for layer in linear_layers(net))
    second.step(lambda: net(x).square().mean())  # used again: holds the hooks again
    assert all(has_offset_hook(layer) for layer in linear_layers(net))
    torch.testing.assert_close(net(x), explicit(net)(x), rtol=1e-12, atol=1e-12)


def test_fit_twice_on_a_hooked_network_applies_the_offset_once_and_leaves_no_hook():
    net = sequential()
    x = torch.rand(8, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    gaps: list[float] = []

    class Check(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            with torch.no_grad():
                gaps.append(float((net(x) - explicit(net)(x)).abs().max()))

    for _ in range(2):
        problem = poisson(net=net)
        quiet_trainer(max_steps=3, precision="64-true", callbacks=[Check()]).fit(problem)
        assert not any(has_offset_hook(layer) for layer in linear_layers(net))
    assert len(gaps) == 6 and max(gaps) < 1e-12


# ------------------------------------------------------------------ step protocol
class CountSteps(L.Callback):
    def __init__(self) -> None:
        self.before_optimizer_step = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.before_optimizer_step += 1


@pytest.mark.parametrize("method", [
    functools.partial(SDZE, lr=1e-2, rank=2, queries=2),
    functools.partial(MeZO, lr=1e-4, queries=2, normalize=False),
    functools.partial(torch.optim.Adam, lr=1e-3),
], ids=["sdze", "mezo", "adam"])
def test_callbacks_see_one_before_optimizer_step_per_training_step(method):
    counter = CountSteps()
    trainer = quiet_trainer(max_steps=3, callbacks=[counter])
    trainer.fit(poisson(method=method))
    assert trainer.global_step == 3
    assert counter.before_optimizer_step == 3


class RandomSearch(ZerothOrderOptimizer):
    """A zeroth-order method written against the protocol only: keep the better of
    ``theta`` and ``theta + lr z``. Records what the problem passed."""

    def __init__(self, module: nn.Module, lr: float = 1e-2, seed: int = 0) -> None:
        super().__init__(module, {"lr": lr})
        self.seed = seed
        self.calls: list[tuple[int, list[int]]] = []

    @torch.no_grad()
    def step(self, closure=None, *, loss_at=None, step_index=None, skip_nonfinite=False):
        keys: list[int] = []

        def evaluate(key: int) -> Tensor:
            keys.append(key)
            return loss_at(key)

        params = self.param_groups[0]["params"]
        gen = seeding.generator("cpu", Stream.USER, self.seed, step_index)
        z = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
        base = evaluate(0)
        for p, zi in zip(params, z, strict=True):
            p.add_(zi, alpha=self.lr_value)
        trial = evaluate(0)
        if closure is not None:
            closure()
        if not trial < base:
            for p, zi in zip(params, z, strict=True):
                p.sub_(zi, alpha=self.lr_value)
        self.calls.append((step_index, keys))
        return torch.minimum(base, trial)

    @property
    def lr_value(self) -> float:
        return float(self.param_groups[0]["lr"])


def test_a_method_written_against_the_protocol_trains_through_the_problem():
    problem = poisson(method=RandomSearch)
    start = [p.detach().clone() for p in problem.net.parameters()]
    counter = CountSteps()
    trainer = quiet_trainer(max_steps=6, callbacks=[counter])
    trainer.fit(problem)
    opt = trainer.optimizers[0]
    assert [step for step, _ in opt.calls] == list(range(6))  # step_index = global_step
    assert all(keys == [0, 0] for _, keys in opt.calls)
    assert counter.before_optimizer_step == 6
    moved = [not torch.equal(a, b) for a, b in zip(start, problem.net.parameters(), strict=True)]
    assert all(moved)  # some trial was kept (the update went to the network)


def test_skip_under_a_profiler_counts_the_step(tmp_path):
    """A skipped step completes Lightning's optimizer step through its public path (no
    private call to finish it): the profiler's 'optimizer_step' action is stopped before
    it starts again, and global_step counts the skipped step."""

    class BadAt(Poisson2D):
        def residual(self, x, d):
            r = super().residual(x, d)
            if self._trainer is not None and self.trainer.training and self.global_step == 2:
                r = r + float("nan")
            return r

    for method in (functools.partial(SDZE, lr=1e-2, rank=2), functools.partial(
            torch.optim.Adam, lr=1e-3)):
        est = build_estimator("taylor", num_directions=2, distribution="rademacher")
        problem = BadAt(net=MLP(2, width=12, depth=2, seed=0), n_interior=16, n_boundary=8,
                        n_eval=32, estimator=est, method=method, divergence="skip")
        trainer = quiet_trainer(max_steps=5, profiler="simple", default_root_dir=tmp_path)
        trainer.fit(problem)
        assert trainer.global_step == 5 and problem.skipped_steps == 1


# ------------------------------------------------------------------ public step entry
@pytest.mark.parametrize("method", [
    functools.partial(SDZE, lr=1e-2, rank=2, period=2, queries=2),
    functools.partial(MeZO, lr=1e-3, normalize=False),
    functools.partial(torch.optim.Adam, lr=1e-2),
], ids=["sdze", "mezo", "adam"])
def test_run_step_is_what_training_step_runs(method):
    """The benchmarks' entry point (no Trainer) and Lightning's fit give the same network
    bit for bit (float64)."""
    fitted = poisson(method=method)
    manual = copy.deepcopy(fitted)
    quiet_trainer(max_steps=4, precision="64-true").fit(fitted)
    manual = manual.double()
    opt = manual.configure_optimizers()
    manual.output_fit.apply(manual)  # what fit does before the first step
    losses = [float(manual.run_step(opt, k).loss) for k in range(4)]
    if isinstance(opt, ZerothOrderOptimizer):
        opt.fold()
    for a, b in zip(fitted.parameters(), manual.parameters(), strict=True):
        assert torch.equal(a, b)
    assert losses[-1] == fitted.last_loss


def test_run_step_reports_or_skips_a_non_finite_step_and_applies_nothing():
    problem = poisson(method=functools.partial(torch.optim.Adam, lr=1e-2)).double()
    opt = problem.configure_optimizers()
    problem.run_step(opt, 0)
    before = copy.deepcopy((problem.state_dict(), opt.state_dict()))
    problem.boundary_weight = float("nan")
    with pytest.raises(NonFiniteLossError, match="step 1"):
        problem.run_step(opt, 1)
    outcome = problem.run_step(opt, 1, skip_nonfinite=True)
    assert outcome.skipped is not None and outcome.skipped.step == 1
    assert torch.isnan(outcome.loss)
    for k, v in problem.state_dict().items():
        assert torch.equal(v, before[0][k])
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], before[1]["state"][0]["exp_avg"])


# ------------------------------------------------------------------ seeding
def test_every_stream_in_use_is_a_distinct_member_and_no_seed_is_shared(monkeypatch):
    """Record every seed drawn while training SDZE with the variance monitor (its own
    probes and the fallback probes) and a MeZO step: each names a Stream, and no two
    streams ever produce the same generator seed."""
    seen: dict[int, set[Stream]] = {}
    streams: set[Stream] = set()
    original = seeding.mix

    def recording(stream, *parts):
        value = original(stream, *parts)
        assert isinstance(stream, Stream)
        streams.add(stream)
        seen.setdefault(value, set()).add(stream)
        return value

    from sdze_lightning.callbacks import plots, variance

    import sdze_lightning.collocation as collocation_module

    for module in (seeding, collocation_module, variance, plots):
        monkeypatch.setattr(module, "mix", recording)
    for method in (functools.partial(SDZE, lr=1e-2, rank=2, queries=2),
                   functools.partial(MeZO, lr=1e-4, normalize=False)):
        monitor = EstimatorVarianceMonitor(every_n_steps=1, spatial_seeds=2, spatial_points=8,
                                           probes=2)
        problem = poisson(method=method)
        quiet_trainer(max_steps=2, callbacks=[monitor], log_every_n_steps=1).fit(problem)
        problem.relative_l2_error()
    assert len(set(Stream)) == len(list(Stream))  # distinct values (enum.unique)
    expected = {Stream.INTERIOR, Stream.BOUNDARY, Stream.ESTIMATOR, Stream.EVAL,
                Stream.SUBSPACE_LEFT, Stream.SUBSPACE_RIGHT, Stream.SDZE_DIRECTIONS,
                Stream.SDZE_PROBES, Stream.MEZO_DIRECTIONS, Stream.VARIANCE_SPATIAL,
                Stream.VARIANCE_POINTS, Stream.VARIANCE_DIRECTIONS}
    assert expected <= streams
    assert all(len(s) == 1 for s in seen.values())


def test_mix_needs_a_stream_and_user_draws_have_their_own():
    with pytest.raises(TypeError, match="Stream"):
        seeding.mix(1, 2, 3)
    problem = poisson()
    # parts that spell out the interior stream's inputs still give other numbers
    mine = torch.rand(4, generator=problem.generator(5, 0, int(Stream.INTERIOR)))
    points = torch.rand(4, generator=problem.generator(5, 0, stream=Stream.INTERIOR))
    assert not torch.equal(mine, points)


# ------------------------------------------------------------------ import circles
def _imported_modules(path: Path) -> set[str]:
    """Every module an import statement anywhere in ``path`` names (functions included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


PACKAGE = Path(sdze_lightning.__file__).resolve().parent


@pytest.mark.parametrize("path, other, back", [
    (PACKAGE / "replay.py", PACKAGE / "cli.py", "sdze_lightning.cli"),
    (BENCHMARKS / "_common.py", BENCHMARKS / "step_memory.py", "step_memory"),
])
def test_no_import_circle(path, other, back):
    """The second module may use the first; the first imports nothing of the second."""
    assert back not in _imported_modules(path)
    assert other.exists()
