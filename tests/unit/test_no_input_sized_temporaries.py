"""No ``width x d`` temporary beside the input weight, under every supported precision.

Under ``bf16-mixed`` autocast would cast the first layer's weight ``W`` (``width x d``)
to bfloat16 for every matrix product with it; the products of
``sdze_lightning.nn.first_layer_grad`` cast one block of columns at a time instead. The
training test records, with a ``TorchDispatchMode``, every tensor an op allocates during
a few training steps of each method that evaluates the first layer, in each precision the
library supports, at the default block sizes and an input dimension of several blocks.
The other tests check the products under autocast against float64 within the rounding of
bfloat16, and their derivatives (first and second order) exactly in float64.
"""

from __future__ import annotations

import functools
import gc

import lightning as L
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from sdze_lightning.directions import Directions
from sdze_lightning.estimators.exact import ExactEstimator
from sdze_lightning.estimators.hte import HutchinsonEstimator
from sdze_lightning.estimators.taylor import TaylorEstimator
from sdze_lightning.input_checks import SUPPORTED_PRECISIONS
from sdze_lightning.methods import SDZE, Adam, FusedAdafactor, MeZO
from sdze_lightning.methods.fused_adafactor import BLOCK_BYTES
from sdze_lightning.nn import MLP, LowRankDelta
from sdze_lightning.nn import first_layer_grad as flg
from sdze_lightning.nn.perturb import set_offset
from sdze_lightning.problems import TwoBody

pytestmark = pytest.mark.usefixtures("one_thread")

#: bfloat16's unit roundoff: 8 significant bits.
U_BF16 = 2.0**-8
#: float32's unit roundoff (the sums of a bfloat16 product are float32 sums).
U_F32 = 2.0**-24

#: The training test's network: ``W`` has ``WIDTH * DIM`` = 8.4e6 entries.
WIDTH, DIM = 32, 2**18

#: The methods that evaluate the first layer, at rates that keep 3 steps finite at this d.
METHODS = {
    "fused_adafactor": functools.partial(FusedAdafactor, lr=1e-3),
    "sdze": functools.partial(SDZE, lr=1e-2),
    "mezo": functools.partial(MeZO, lr=1e-6, normalize=True),
    "adam": functools.partial(Adam, lr=1e-3),
}

#: Estimators that differentiate the network in ``x`` (batches of fewer rows than ``WIDTH``).
ESTIMATORS = {"hte": lambda: HutchinsonEstimator(num_directions=2), "exact": ExactEstimator}

#: Every supported precision, and the dtype of the network's weights under it.
PRECISIONS = {"64-true": torch.float64, "32-true": torch.float32,
              "bf16-mixed": torch.float32, "bf16-true": torch.bfloat16}


class NewTensors(TorchDispatchMode):
    """Records every new tensor of at least ``numel`` elements an op returns.

    A view or an in-place result shares an input's storage and is not new: ``W`` itself
    and its in-place updates are never recorded. Each record is ``(phase, op, dtype,
    shape)``; ``phase`` is whatever the test sets (``"forward"``, ``"backward"``).
    """

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel = numel
        self.phase = "forward"
        self.records: list[tuple[str, str, torch.dtype, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if (isinstance(t, torch.Tensor) and t.numel() >= self.numel
                    and t.untyped_storage().data_ptr() not in inputs):
                self.records.append((self.phase, func._schema.name, t.dtype, tuple(t.shape)))
        return out


class RecordTrainingSteps(L.Callback):
    """Runs every training step (forward, backward, update) under a :class:`NewTensors`."""

    def __init__(self, numel: int) -> None:
        self.mode = NewTensors(numel)

    def on_fit_start(self, trainer: L.Trainer, problem: L.LightningModule) -> None:
        backward = problem.manual_backward

        def marked_backward(loss, *args, **kwargs):
            self.mode.phase = "backward"  # until the next step: backward and update
            return backward(loss, *args, **kwargs)

        problem.manual_backward = marked_backward

    def on_train_batch_start(self, *args) -> None:
        self.mode.phase = "forward"
        self.mode.__enter__()

    def on_train_batch_end(self, *args) -> None:
        self.mode.__exit__(None, None, None)


def inherent(method: str, record: tuple, weight: torch.Tensor) -> bool:
    """Whether a weight-sized tensor is the method's own, not a temporary of a product.

    MeZO draws each direction of the size of its parameter (by design); Adam keeps a
    dense gradient and moments of ``W`` (formed in the backward pass and the update).
    Both are in ``W``'s dtype and shape. Nothing else may be of ``W``'s size.
    """
    phase, op, dtype, shape = record
    own = dtype == weight.dtype and shape == tuple(weight.shape)
    if method == "mezo":
        return own and op == "aten::randn"
    if method == "adam":
        return own and phase == "backward"
    return False


def test_the_training_test_covers_every_supported_precision_and_several_blocks():
    # the others are Lightning's short spellings of these
    assert set(SUPPORTED_PRECISIONS) - set(PRECISIONS) == {"64", "32", "bf16"}
    # the weight spans several blocks of the cast products and of the fused update
    assert WIDTH * DIM * 2 >= 4 * flg.CAST_BLOCK_BYTES  # bfloat16 blocks
    assert WIDTH * DIM * 4 >= 8 * BLOCK_BYTES  # the fused update's float32 blocks


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("precision", PRECISIONS)
def test_no_weight_sized_temporary_in_training_steps(precision, method):
    problem = TwoBody(dim=DIM, operator="allen_cahn", net=MLP(DIM, width=WIDTH, depth=2, seed=1),
                      estimator=TaylorEstimator(2, "gaussian"), n_interior=4, n_eval=8,
                      method=METHODS[method])
    weight_numel = WIDTH * DIM
    record = RecordTrainingSteps(weight_numel)
    # 3 steps: the fused method's update takes its lagged (one-pass) path from step 2 on
    L.Trainer(max_steps=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
              num_sanity_val_steps=0, accelerator="cpu", devices=1, enable_checkpointing=False,
              limit_val_batches=0, precision=precision, callbacks=[record]).fit(problem)
    assert problem.global_step == 3
    weight = problem.net.layers[0].weight
    assert weight.dtype == PRECISIONS[precision]  # the Trainer's precision reached the network
    records = record.mode.records
    extra = [r for r in records if not inherent(method, r, weight)]
    del problem, weight, record
    gc.collect()  # the next case's weight and moments need the memory
    assert not extra, extra
    # the detector sees the tensors it allows: it would see a temporary too
    if method in ("adam", "mezo"):
        assert records


# ----------------------------------------------------------------- the products themselves
D, N = 512, 4


@pytest.fixture
def small_blocks(monkeypatch):
    """16-column blocks of the cast products (a small ``W`` of many blocks)."""
    monkeypatch.setattr(flg, "CAST_BLOCK_BYTES", WIDTH * 2 * 16)


def _operands(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(N, D, generator=gen, dtype=dtype)
    w = torch.randn(WIDTH, D, generator=gen, dtype=dtype) / D**0.5
    return z, w


def _record(fn) -> list[tuple]:
    with NewTensors(WIDTH * D) as mode:
        fn()
    return mode.records


def _assert_bf16_product(value, exact, bound_scale, length):
    """``value`` is a bfloat16 product of ``exact``'s operands: inputs and result rounded.

    Elementwise: two input roundings and the result's (``u`` each, relative), one more
    for the block sums, and float32 sums over ``length`` terms, all relative to
    ``bound_scale = |a| @ |b|``. Root mean square: the roundings do not all share one
    sign, and the error stays within two units of ``u`` of the result.
    """
    err = (value.double() - exact).abs()
    bound = (4 * U_BF16 + length * U_F32) * 1.01 * bound_scale
    assert bool((err <= bound).all()), float((err / bound).max())
    assert float(err.square().mean().sqrt()) <= 2 * U_BF16 * float(exact.square().mean().sqrt())


def test_outside_autocast_the_product_is_the_plain_one():
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        z, w = _operands(dtype)
        w.requires_grad_(True)
        out = flg.input_product(z, w)
        assert torch.equal(out, z @ w.T)
        assert type(out.grad_fn).__name__ == "MmBackward0"


def test_under_autocast_the_product_is_bfloat16_within_its_rounding(small_blocks):
    z, w = _operands()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = flg.input_product(z, w)
        assert out.dtype == (z @ w.T).dtype == torch.bfloat16  # what autocast gives
    exact = z.double() @ w.double().T
    _assert_bf16_product(out, exact, z.abs().double() @ w.abs().double().T, D)


def test_under_autocast_the_gradients_are_within_bfloat16_rounding(small_blocks):
    z, w = _operands()
    z.requires_grad_(True)
    w.requires_grad_(True)
    cot = torch.randn(N, WIDTH, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = flg.input_product(z, w)
    (out.float() * cot).sum().backward()
    g = cot.bfloat16().double()  # the gradient that reaches the bfloat16 product
    assert w.grad.dtype == w.dtype and z.grad.dtype == z.dtype
    # dL/dW = g^T z in W's dtype: float32 sums over the N points only
    exact_w = g.T @ z.double()
    bound_w = (N + 1) * U_F32 * 1.01 * (g.abs().T @ z.abs().double())
    assert bool(((w.grad.double() - exact_w).abs() <= bound_w).all())
    # dL/dz = g W, a bfloat16 product per block (W rounded, the result rounded)
    exact_z = g @ w.double()
    bound_z = (2 * U_BF16 + WIDTH * U_F32) * 1.01 * (g.abs() @ w.abs().double())
    assert bool(((z.grad.double() - exact_z).abs() <= bound_z).all())


def test_the_cast_product_has_exact_first_and_second_derivatives(monkeypatch):
    """In float64 (the compute dtype is a parameter of the functions), by finite differences:
    reverse and forward mode, batched by ``vmap`` (``torch.func`` runs them so)."""
    monkeypatch.setattr(flg, "CAST_BLOCK_BYTES", 3 * 8 * 7)  # 7-column blocks of a 3-row W
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(2, 40, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 40, generator=gen, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 3, generator=gen, dtype=torch.float64, requires_grad=True)

    def product(a, b):
        return flg._CastProduct.apply(a, b, torch.float64)

    def transposed(a, b):
        return flg._CastProductT.apply(a, b, torch.float64)

    for fn, args in ((product, (z, w)), (transposed, (g, w))):
        assert torch.autograd.gradcheck(fn, args, check_forward_ad=True,
                                        check_batched_grad=True, check_batched_forward_grad=True)
        assert torch.autograd.gradgradcheck(fn, args, check_fwd_over_rev=True,
                                            check_batched_grad=True)
    torch.testing.assert_close(product(z, w), z @ w.T, rtol=1e-15, atol=1e-14)
    torch.testing.assert_close(transposed(g, w), g @ w, rtol=1e-15, atol=1e-14)


def test_no_weight_sized_temporary_in_the_products_and_their_derivatives(small_blocks):
    z, w = _operands()
    w.requires_grad_(True)
    ac = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16)

    def forward():
        with ac(), torch.no_grad():
            flg.input_product(z, w)

    assert _record(forward) == []

    def backward_to_w():
        with ac():
            out = flg.input_product(z, w)
        out.float().sum().backward()

    records = _record(backward_to_w)  # W's gradient alone, in W's dtype
    assert [r[2:] for r in records] == [(torch.float32, (WIDTH, D))]

    x = z.clone().requires_grad_(True)
    kept = []

    def derivative_in_x():  # an estimator that differentiates in x (exact, hte)
        with ac():
            out = torch.tanh(flg.input_product(x, w)).sum()
            kept.extend(torch.autograd.grad(out, x, create_graph=True))

    assert _record(derivative_in_x) == []  # W's gradient is not formed when not asked for
    records = _record(lambda: kept[0].float().square().sum().backward())
    assert records and all(r[2:] == (torch.float32, (WIDTH, D)) for r in records)

    net = MLP(D, width=WIDTH, depth=1, seed=0)
    layer = net.layers[0]
    gen = torch.Generator().manual_seed(3)
    set_offset(layer, LowRankDelta(A=torch.randn(WIDTH, 2, generator=gen),
                                   B=torch.randn(D, 2, generator=gen),
                                   C=torch.randn(2, 2, generator=gen), cb=None))
    dirs = Directions(D, dense=torch.randn(3, D, generator=gen))

    def offset_forward():  # a zeroth-order step's evaluations: cached W x, dense directions
        with ac(), torch.no_grad(), net.first_layer_cache():
            net.first_layer(z)
            net.first_layer(z)
            net.first_layer_directions(dirs)
            net.line(z, dirs, [0.5])

    assert _record(offset_forward) == []
    with torch.no_grad():
        wv = net.first_layer_directions(dirs)
        with ac():
            wv_ac = net.first_layer_directions(dirs)
    assert wv_ac.dtype == torch.bfloat16
    torch.testing.assert_close(wv_ac.float(), wv, rtol=0, atol=8 * U_BF16 * float(wv.abs().max()))
    set_offset(layer, None)

    x = z.clone().requires_grad_(True)

    def captured():  # the fused method's recorded products, through x as well
        with net.capture_first_layer_gradient() as grad:
            with ac():
                h = net.first_layer(x) + net.first_layer_directions(dirs).sum(0)
            h.float().square().sum().backward()
        assert len(grad.dense) == 2 and layer.weight.grad is None

    assert _record(captured) == []
    assert x.grad is not None and x.grad.dtype == x.dtype


@pytest.mark.parametrize("estimator", ["hte", "exact"])  # hte: 2 directions x 4 points < width
def test_estimators_that_differentiate_in_x_make_no_weight_sized_temporary(small_blocks,
                                                                             estimator):
    """``hte`` differentiates the network with ``torch.func.grad`` (nested, batched),
    ``exact`` with ``torch.autograd.grad``: under ``bf16-mixed`` both run through the cast
    products, and Adam's dense gradient of ``W`` is all of ``W``'s size."""
    d = 256  # 16 blocks of 16 columns
    problem = TwoBody(dim=d, operator="allen_cahn", net=MLP(d, width=WIDTH, depth=2, seed=1),
                      estimator=ESTIMATORS[estimator](), n_interior=4, n_eval=8,
                      method=METHODS["adam"])
    record = RecordTrainingSteps(WIDTH * d)
    L.Trainer(max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
              num_sanity_val_steps=0, accelerator="cpu", devices=1, enable_checkpointing=False,
              limit_val_batches=0, precision="bf16-mixed", callbacks=[record]).fit(problem)
    assert problem.global_step == 2 and torch.isfinite(torch.tensor(problem.last_loss))
    weight = problem.net.layers[0].weight
    records = record.mode.records
    assert records  # the gradient and the moments
    assert all(inherent("adam", r, weight) for r in records), records


def test_bf16_mixed_network_output_is_within_bfloat16_rounding_of_float64():
    """Layer by layer, each product is rounded to 8 bits (``u``) and the activations do not
    amplify errors (``|tanh'| <= 1``; this network's weights have norm about 1): the output
    of the 3 layers stays within one ``u`` per layer and one for the first layer's block
    sums, relative to the output's size."""
    d = 2**17  # 2 blocks of the default bfloat16 cast
    assert WIDTH * d * 2 >= 2 * flg.CAST_BLOCK_BYTES
    net = MLP(d, width=WIDTH, depth=2, seed=1)
    x = torch.rand(8, d, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x)
            h = net.first_layer(x)
        exact = net.double()(x.double())
        layer = net.layers[0]
        exact_h = x.double() @ layer.weight.T + layer.bias
        bound = x.double() @ layer.weight.abs().T + layer.bias.abs()
    scale = float(exact.abs().max())
    torch.testing.assert_close(out.double(), exact, rtol=0, atol=4 * U_BF16 * scale)
    # the bias adds one float32 rounding of a bfloat16 sum: within the product's bound
    _assert_bf16_product(h, exact_h, bound, d)
