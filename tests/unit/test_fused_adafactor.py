"""The fused factored method: exact gradients, a dense reference, no ``width x d`` buffer.

The first layer's gradient is recorded as factors (``sdze_lightning.nn.first_layer_grad``)
and applied in column blocks by ``FusedAdafactor``. Checked against autograd and against
a dense Adafactor written from the formulas, on small problems in float64.
"""

from __future__ import annotations

import copy
import functools

import lightning as L
import pytest
import torch
from conftest import fused_steps
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from sdze_lightning.distributed import Shard
from sdze_lightning.estimators.fd import FiniteDifferenceEstimator
from sdze_lightning.estimators.stein import SteinEstimator
from sdze_lightning.estimators.taylor import TaylorEstimator
from sdze_lightning.methods import FusedAdafactor
from sdze_lightning.nn import MLP
from sdze_lightning.problems import Poisson2D, TwoBody

pytestmark = pytest.mark.usefixtures("one_thread")

DIM, WIDTH = 24, 16

ESTIMATORS = {
    "taylor-coordinate": lambda: TaylorEstimator(4, "coordinate"),
    "taylor-gaussian": lambda: TaylorEstimator(4, "gaussian"),
    "fd-coordinate": lambda: FiniteDifferenceEstimator(4, "coordinate"),
    "stein": lambda: SteinEstimator(num_directions=8),
}


def twobody(estimator=None, method=None, dim=DIM, **kwargs) -> TwoBody:
    kwargs.setdefault("n_interior", 8)
    problem = TwoBody(
        dim=dim, operator="allen_cahn", net=MLP(dim, width=WIDTH, depth=2, seed=1),
        estimator=estimator or TaylorEstimator(4), n_eval=32,
        method=method or functools.partial(FusedAdafactor, lr=1e-2), **kwargs,
    )
    return problem.double()


def autograd_grads(problem, step=0):
    """Plain autograd gradients of the step's loss on a copy (``W.grad`` formed densely)."""
    ref = copy.deepcopy(problem)
    ref.loss_terms(step, 0)["loss"].backward()
    return [p.grad for p in ref.net.parameters()]


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_recorded_factors_give_the_autograd_gradient(name):
    problem = twobody(ESTIMATORS[name]())
    expected = autograd_grads(problem)
    net = problem.net
    with net.capture_first_layer_gradient() as grad:
        problem.loss_terms(0, 0)["loss"].backward()
    assert net.layers[0].weight.grad is None  # no width x d gradient was formed
    g = grad.dense_gradient(DIM, torch.float64)
    scale = expected[0].abs().max()
    assert scale > 0
    # Same products, summed in another order: float64 rounding (~1e-16) only, amplified by
    # 1/h^2 ~ 7e7 in a second-order finite difference (h = 1.2e-4 in float64).
    rtol = 1e-12 if not name.startswith("fd") else 1e-16 / 1.2e-4**2 * 100
    torch.testing.assert_close(g, expected[0], rtol=rtol, atol=rtol * float(scale))
    for p, e in zip(list(net.parameters())[1:], expected[1:], strict=True):
        assert torch.equal(p.grad, e)  # the small layers' backward is the usual one


def test_boundary_points_are_recorded_too():
    """A soft boundary loss evaluates the first layer on other points: its factors count."""
    problem = Poisson2D(net=MLP(2, width=WIDTH, depth=2), n_interior=8, n_boundary=6,
                        estimator=TaylorEstimator(2, "gaussian"),
                        method=functools.partial(FusedAdafactor, lr=1e-2)).double()
    expected = autograd_grads(problem)
    with problem.net.capture_first_layer_gradient() as grad:
        problem.loss_terms(0, 0)["loss"].backward()
    assert len(grad.dense) >= 3  # interior points, dense directions, boundary points
    torch.testing.assert_close(grad.dense_gradient(2, torch.float64), expected[0],
                               rtol=1e-12, atol=1e-14)


def dense_reference_steps(problem, steps, lr, exact_rows, betas=(0.9, 0.999), eps=1e-8,
                          eps1=1e-30, input_lr=None):
    """Adafactor on the input weight and torch.optim.Adam on the rest, from dense gradients.

    ``exact_rows=False``: from the second step on, the update uses the previous step's row
    statistic (the column statistic is the current one). ``input_lr``: the input weight's
    learning rate (``None``: ``lr``).
    """
    input_lr = lr if input_lr is None else input_lr
    net = problem.net
    weight = net.layers[0].weight
    adam = torch.optim.Adam([p for p in net.parameters() if p is not weight], lr=lr,
                            betas=betas, eps=eps)
    row = torch.zeros(weight.shape[0], dtype=weight.dtype)
    col = torch.zeros(weight.shape[1], dtype=weight.dtype)
    b2 = betas[1]
    for t in range(1, steps + 1):
        adam.zero_grad()
        weight.grad = None
        problem.loss_terms(t - 1, 0)["loss"].backward()
        g = weight.grad
        new_row = b2 * row + (1 - b2) * ((g * g).mean(dim=1) + eps1)
        col = b2 * col + (1 - b2) * ((g * g).mean(dim=0) + eps1)
        used = new_row if exact_rows or t == 1 else row
        v = torch.outer(used, col) / used.mean() / (1 - b2**t)
        row = new_row
        with torch.no_grad():
            weight -= input_lr * g / (v.sqrt() + eps)
        adam.step()
    return row, col


@pytest.mark.parametrize("exact_rows", [False, True])
@pytest.mark.parametrize("block_bytes", [8 * WIDTH * 5, 2**26])  # 5-column blocks, one block
def test_fused_steps_match_a_dense_adafactor_reference(block_bytes, exact_rows):
    problem = twobody(method=functools.partial(FusedAdafactor, lr=1e-2, block_bytes=block_bytes,
                                               exact_rows=exact_rows))
    reference = copy.deepcopy(problem)
    opt = fused_steps(problem, 4)
    row, col = dense_reference_steps(reference, 4, lr=1e-2, exact_rows=exact_rows)
    state = opt.state[problem.net.layers[0].weight]
    assert int(state["step"]) == 4
    torch.testing.assert_close(state["row_sq"], row, rtol=1e-9, atol=0)
    torch.testing.assert_close(state["col_sq"], col, rtol=1e-9, atol=0)
    for a, b in zip(problem.net.parameters(), reference.net.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_input_lr_sets_the_input_layer_rate_only():
    """``input_lr`` scales the input weight's step; the small layers keep ``lr``."""
    problem = twobody(method=functools.partial(FusedAdafactor, lr=1e-2, input_lr=1e-3))
    reference = copy.deepcopy(problem)
    fused_steps(problem, 3)
    dense_reference_steps(reference, 3, lr=1e-2, exact_rows=False, input_lr=1e-3)
    for a, b in zip(problem.net.parameters(), reference.net.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # Not vacuous: with the same rate on every layer the input weight ends elsewhere.
    same = twobody(method=functools.partial(FusedAdafactor, lr=1e-2))
    fused_steps(same, 3)
    assert not torch.allclose(same.net.layers[0].weight, problem.net.layers[0].weight,
                              rtol=1e-6, atol=0)


@pytest.mark.parametrize("input_lr", [0.0, -1e-3, float("nan")])
def test_a_non_positive_input_lr_is_refused(input_lr):
    with pytest.raises(ValueError, match="input_lr"):
        FusedAdafactor(MLP(DIM, width=WIDTH, depth=2), input_lr=input_lr)


def test_the_row_statistic_lag_changes_the_trajectory():
    """The two row modes differ from the second step on (the test above is not vacuous)."""
    weights = []
    for exact_rows in (False, True):
        problem = twobody(method=functools.partial(FusedAdafactor, lr=1e-2,
                                                   exact_rows=exact_rows))
        fused_steps(problem, 3)
        weights.append(problem.net.layers[0].weight.detach().clone())
    assert not torch.allclose(weights[0], weights[1], rtol=1e-6, atol=0)


def test_block_size_changes_only_rounding():
    """Blocks split the columns; only the order of the row sums' additions changes."""
    runs = []
    for block_bytes in (8 * WIDTH * 3, 8 * WIDTH * 7, 2**26):
        problem = twobody(method=functools.partial(FusedAdafactor, lr=1e-2,
                                                   block_bytes=block_bytes))
        fused_steps(problem, 3)
        runs.append([p.detach().clone() for p in problem.net.parameters()])
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


class LargestNewTensor(TorchDispatchMode):
    """Largest new storage (in elements of float64) an op allocates; views and in-place
    results share an input's storage and are not counted."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0
        self.op = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                numel = t.untyped_storage().nbytes() // 8
                if numel > self.largest:
                    self.largest, self.op = numel, func._schema.name
        return out


def one_step_peak(problem, opt_factory) -> LargestNewTensor:
    opt = opt_factory(problem)

    def closure():
        opt.zero_grad()
        loss = problem.loss_terms(0, 0)["loss"]
        loss.backward()
        return loss

    with LargestNewTensor() as mode:
        opt.step(closure)
    return mode


def test_no_width_by_d_buffer_is_ever_allocated():
    dim = 256  # width x d = 4096; the batch is 8 x 256 = 2048
    block = 8 * WIDTH * 16  # 16 columns per block
    fused = one_step_peak(
        twobody(dim=dim, method=functools.partial(FusedAdafactor, lr=1e-2, block_bytes=block)),
        lambda p: FusedAdafactor(p.net, **p.method.keywords),
    )
    assert fused.largest < WIDTH * dim, fused.op
    assert fused.largest <= 8 * dim  # the largest is batch-sized
    # the detector sees a dense gradient where one is formed: Adam over the same loss
    adam = one_step_peak(twobody(dim=dim), lambda p: torch.optim.Adam(p.net.parameters()))
    assert adam.largest >= WIDTH * dim


def trainer(tmp_path=None, max_steps=6, **kwargs) -> L.Trainer:
    callbacks = []
    if tmp_path is not None:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3,
                                         save_last=True, save_top_k=0))
    kwargs.setdefault("precision", "64-true")
    return L.Trainer(max_steps=max_steps, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu",
                     devices=1, enable_checkpointing=tmp_path is not None,
                     callbacks=callbacks, limit_val_batches=0, **kwargs)


def test_trainer_fit_learns_and_resumes_bit_for_bit(tmp_path):
    scheduler = functools.partial(torch.optim.lr_scheduler.StepLR, step_size=2, gamma=0.5)

    def make(seed=1):
        p = twobody(scheduler=scheduler)
        p.net = MLP(DIM, width=WIDTH, depth=2, seed=seed).double()
        return p

    whole = make()
    before = whole.relative_l2_error()
    trainer(max_steps=6).fit(whole)
    assert whole.net.layers[0].weight.grad is None
    assert whole.relative_l2_error() < before
    # the scheduler acted on both groups: lr 1e-2 halved after steps 2 and 4 (and 6)
    opt = whole.trainer.optimizers[0]
    assert [g["lr"] for g in opt.param_groups] == [1e-2 * 0.5**3] * 2

    trainer(tmp_path, max_steps=3).fit(make())
    resumed = make(seed=7)  # other weights: everything comes from the checkpoint
    trainer(tmp_path, max_steps=6).fit(resumed, ckpt_path=str(tmp_path / "last.ckpt"))
    for a, b in zip(resumed.net.parameters(), whole.net.parameters(), strict=True):
        assert torch.equal(a, b)
    w_resumed = resumed.trainer.optimizers[0].state[resumed.net.layers[0].weight]
    w_whole = opt.state[whole.net.layers[0].weight]
    assert torch.equal(w_resumed["col_sq"], w_whole["col_sq"])


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_trains_under_other_precisions(precision):
    problem = twobody().float()
    trainer(max_steps=3, precision=precision).fit(problem)
    weight = problem.net.layers[0].weight
    state = problem.trainer.optimizers[0].state[weight]
    assert weight.dtype == torch.float32 and state["col_sq"].dtype == torch.float32
    assert torch.isfinite(torch.tensor(problem.last_loss))


def test_bf16_weights_keep_float32_statistics_across_a_checkpoint():
    problem = twobody().to(torch.bfloat16)
    opt = fused_steps(problem, 2)
    weight = problem.net.layers[0].weight
    saved = copy.deepcopy(opt.state_dict())
    assert saved["state"][0]["col_sq"].dtype == torch.float32
    fresh = FusedAdafactor(problem.net, lr=1e-2)
    fresh.load_state_dict(saved)
    state = fresh.state[weight]
    assert state["col_sq"].dtype == torch.float32  # torch alone would cast it to bfloat16
    assert torch.equal(state["col_sq"], saved["state"][0]["col_sq"])


def test_estimators_that_backpropagate_through_x_are_refused():
    with pytest.raises(ValueError, match="forward-mode estimator"):
        twobody(estimator="exact")
    with pytest.raises(ValueError, match="forward-mode estimator"):
        twobody(estimator="hte")


def test_other_networks_are_refused_before_training():
    net = torch.nn.Sequential(torch.nn.Linear(DIM, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    with pytest.raises(TypeError, match="library's MLP"):
        FusedAdafactor(net)
    problem = twobody()
    problem.net = net.double()
    with pytest.raises(ValueError, match="library's MLP"):
        problem.check_inputs()


def test_data_parallel_refuses_points_that_are_not_the_sampled_rows():
    """Under DDP a rank rebuilds the others' points from the sampled batch; a network input
    that is not this rank's rows of that batch (a copy, a transformed input) is refused
    before any collective."""
    batch = torch.randn(9, DIM, dtype=torch.float64)
    shard = Shard(1, 2)
    share = shard.take(batch)
    assert shard.full_batch(share) is batch
    assert shard.full_batch(share.clone()) is None
    assert Shard(0, 2).full_batch(share) is None  # another rank's rows
    net = MLP(DIM, width=8, depth=1, seed=0).double()
    for inputs, ok in ((share, True), (share * 1.0, False)):
        with net.capture_first_layer_gradient() as grad:
            net(inputs).sum().backward()
        if ok:
            with pytest.raises(ValueError, match="process group has not been initialized"):
                grad.across_ranks(shard)  # got past the check, to the first collective
        else:
            with pytest.raises(ValueError, match="sampled points themselves"):
                grad.across_ranks(shard)


def test_method_input_lr_reaches_the_input_layer_group(tmp_path):
    from sdze_lightning.builders import build_problem, compose_config

    cfg = compose_config(["method=fused_adafactor", "estimator=taylor",
                          "pde=allen_cahn_twobody", "pde.dim=12",
                          "model.width=8", "model.depth=1", "method.input_lr=1e-4"],
                         tmp_path / "run")
    opt = build_problem(cfg).configure_optimizers()
    assert [g["lr"] for g in opt.param_groups] == [1e-4, 1e-3]


def test_step_without_closure_is_refused():
    with pytest.raises(ValueError, match="closure"):
        FusedAdafactor(MLP(4, width=8, depth=1)).step()


def test_cli_trains_with_method_fused_adafactor(tmp_path):
    from sdze_lightning.cli import run

    summary = run(["method=fused_adafactor", "estimator=taylor", "pde=allen_cahn_twobody",
                   "pde.dim=30", "pde.n_eval=64", "model.width=16", "model.depth=2",
                   "trainer.max_steps=20", "logger=none", "~callbacks.progress",
                   "~callbacks.memory"], tmp_path / "run")
    assert summary["status"] == "completed" and summary["steps"] == 20
    assert summary["rel_l2"] < 1.0  # started from the network's initial error of ~1


def test_experiment_preset_follows_stde_lr_decay_and_init(tmp_path):
    from hydra.utils import instantiate

    from sdze_lightning.cli import compose_config, run

    overrides = ["experiment=twobody_fused", "pde.dim=30", "pde.n_eval=64", "model.width=16",
                 "model.depth=2", "trainer.max_steps=8", "logger=none", "~callbacks.progress",
                 "~callbacks.memory"]
    cfg = compose_config(overrides, tmp_path / "cfg")
    assert cfg.method._target_ == "sdze_lightning.methods.FusedAdafactor"
    assert cfg.model.init == "kaiming_uniform"
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    scheduler = instantiate(cfg.scheduler)(opt)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    assert lrs[0] == 1e-3 and all(a > b for a, b in zip(lrs, lrs[1:], strict=False))
    assert opt.param_groups[0]["lr"] == 0.0  # reached after trainer.max_steps steps
    summary = run(overrides, tmp_path / "run")
    assert summary["status"] == "completed" and summary["steps"] == 8


def test_the_memory_check_counts_no_input_layer_gradient(monkeypatch):
    """The pre-flight memory check charges Adam a gradient per parameter, the fused method
    only its small layers' (the input layer's gradient is never formed)."""
    from sdze_lightning import memory_budget

    monkeypatch.setattr(memory_budget, "available_bytes", lambda device="cpu": 1)
    messages = {}
    for name, method in (("adam", torch.optim.Adam), ("fused", FusedAdafactor)):
        problem = twobody(method=functools.partial(method), dim=400)
        with pytest.raises(ValueError) as err:
            problem.check_inputs()
        messages[name] = str(err.value)
    weight = WIDTH * 400
    small = sum(p.numel() for p in twobody(dim=400).net.parameters()) - weight
    assert f"gradients ({weight + small:,})" in messages["adam"]
    assert f"gradients ({small:,})" in messages["fused"]
