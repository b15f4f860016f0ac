"""Prefetching the next batch on a background thread: same numbers, other thread, clean stop."""

from __future__ import annotations

import copy
import functools
import threading

import pytest
import torch

from sdze_lightning import kernels
from sdze_lightning.estimators import build_estimator
from sdze_lightning.methods import SDZE
from sdze_lightning.nn import MLP
from sdze_lightning.prefetch import BatchPrefetcher, PreparePlacement
from sdze_lightning.problem import NonFiniteLossError
from sdze_lightning.problems import TwoBody, ball, twobody
from sdze_lightning.problems.twobody import _two_body_fused

pytestmark = pytest.mark.usefixtures("one_thread")


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("sdze-prefetch")]


def test_prefetcher_builds_the_next_step_on_its_thread_and_rebuilds_on_a_jump():
    built: list[tuple[int, str]] = []

    def make(step: int) -> torch.Tensor:
        built.append((step, threading.current_thread().name))
        return torch.full((3,), float(step))

    pf = BatchPrefetcher(make)
    assert torch.equal(pf.get(0), torch.zeros(3))
    assert pf.pending_step == 1
    assert torch.equal(pf.get(1), torch.ones(3))
    assert torch.equal(pf.get(5), torch.full((3,), 5.0))  # a jump: step 2 is dropped
    pf.close()
    pf.close()  # idempotent
    assert pf.pending_step is None
    main = threading.current_thread().name
    by_step = dict(built)
    assert by_step[0] == main and by_step[5] == main  # built on demand
    assert by_step[1].startswith("sdze-prefetch")  # built ahead, on the other thread
    assert not _prefetch_threads()


def test_prefetcher_raises_a_background_error_at_the_step_that_needs_it():
    def make(step: int) -> torch.Tensor:
        if step == 1:
            raise RuntimeError("sampler failed at step 1")
        return torch.zeros(1)

    pf = BatchPrefetcher(make)
    pf.get(0)
    with pytest.raises(RuntimeError, match="step 1"):
        pf.get(1)
    pf.close()


def test_prefetcher_builds_without_grad_and_copies_without_its_thread():
    pf = BatchPrefetcher(lambda step: torch.ones(2, requires_grad=True) * step)
    pf.get(0)
    clone = copy.deepcopy(pf)
    assert clone.pending_step is None
    assert pf.get(1).grad_fn is None  # made under no_grad
    pf.close()


def _two_body(prefetch: bool, dim: int = 12, **kwargs) -> TwoBody:
    kwargs.setdefault("method", functools.partial(SDZE, lr=1e-2, rank=2, period=3))
    return TwoBody(
        dim=dim, operator="allen_cahn", net=MLP(dim, width=8, depth=2, seed=0),
        estimator=build_estimator("taylor", num_directions=4, distribution="coordinate"),
        n_interior=16, n_eval=64, seed=3, prefetch=prefetch, **kwargs,
    )


@pytest.mark.parametrize("placement", ["ahead", "main", "split", "auto"])
def test_training_with_prefetch_is_identical_and_prepares_once_per_batch(
    make_trainer, monkeypatch, placement
):
    """Same losses and weights to the bit (with validations in between) wherever the source
    is prepared; pinned ahead, every source block of every batch after the first is computed
    once, on the prefetch thread; pinned on the main thread, never there; split in half
    (four blocks of 4 rows per 16-point batch), two blocks on each thread. The thread is
    gone after fit."""
    blocks = 1
    if placement == "split":
        blocks = 4
        monkeypatch.setattr(ball, "SOURCE_BLOCK", 4 * 12)  # 4 rows of d = 12 per block
    calls: list[str] = []
    original = TwoBody._block_source

    def counted(self, xb):
        calls.append(threading.current_thread().name)
        return original(self, xb)

    results = {}
    for prefetch in (False, True):
        calls.clear()
        monkeypatch.setattr(TwoBody, "_block_source", counted)
        problem = _two_body(prefetch, steps_per_epoch=3)  # validation between steps too
        if placement != "auto":
            placement_of = problem.collocation.placement
            placement_of.auto = False
            placement_of.share = {"ahead": 1.0, "main": 0.0, "split": 0.5}[placement]
        losses: list[float] = []
        problem.on_train_batch_end = lambda *a, p=problem, out=losses: out.append(p.last_loss)
        make_trainer(max_steps=8).fit(problem)
        monkeypatch.setattr(TwoBody, "_block_source", original)
        results[prefetch] = (losses, [p.detach().clone() for p in problem.parameters()],
                             list(calls))
    assert results[True][0] == results[False][0] and len(results[True][0]) == 8
    for a, b in zip(results[True][1], results[False][1], strict=True):
        assert torch.equal(a, b)
    assert not any(c.startswith("sdze-prefetch") for c in results[False][2])
    on_main = [c for c in results[True][2] if not c.startswith("sdze-prefetch")]
    on_thread = len(results[True][2]) - len(on_main)
    if placement in ("ahead", "split"):
        # steps 1..7 moved (step 8 may also have been built there before fit ended, then
        # dropped); no block of any batch is computed twice
        ahead = blocks if placement == "ahead" else blocks // 2
        assert len(on_main) == len(results[False][2]) - 7 * ahead
        assert on_thread in (7 * ahead, 8 * ahead)
    elif placement == "main":
        assert on_thread == 0 and len(on_main) == len(results[False][2])
    assert not _prefetch_threads()


def test_split_source_matches_the_whole_batch_source(monkeypatch):
    """Blocks prepared in two calls (as the two threads do) give ``source(x)`` to the bit."""
    monkeypatch.setattr(ball, "SOURCE_BLOCK", 3 * 12)  # 3 rows per block, 6 blocks of 16 rows
    problem = _two_body(False)
    x = problem.sample_interior(16, problem.generator(0))
    problem.prepare_batch(x, rows=7)  # rounds to 2 blocks (6 rows)
    entry = problem._batch_cache[(id(x), "source")]
    assert len(entry.parts) == 2 and entry.full is None
    assert torch.equal(problem._source_of(x), problem.source(x))
    x.mul_(1.0)  # modified in place: recomputed, not served from the cache
    assert problem._batch_cache[(id(x), "source")].version != x._version
    assert torch.equal(problem._source_of(x), problem.source(x))


@pytest.mark.parametrize("share", [0.7, 0.3])
def test_a_one_argument_prepare_batch_override_still_works(make_trainer, share):
    """Subclasses written for the older hook ``prepare_batch(self, x)`` keep training with
    prefetching: the batch is prepared whole, ahead when most of it would be."""
    seen: list[tuple[str, int]] = []

    class OldStyle(TwoBody):
        def prepare_batch(self, x):  # the one-argument hook
            seen.append((threading.current_thread().name, len(x)))
            super().prepare_batch(x)

    losses = {}
    for prefetch in (False, True):
        seen.clear()
        problem = OldStyle(
            dim=12, operator="allen_cahn", net=MLP(12, width=8, depth=2, seed=0),
            estimator=build_estimator("taylor", num_directions=4, distribution="coordinate"),
            n_interior=16, seed=3, prefetch=prefetch,
            method=functools.partial(SDZE, lr=1e-2, rank=2, period=3),
        )
        problem.collocation.placement.auto = False
        problem.collocation.placement.share = share
        out: list[float] = []
        problem.on_train_batch_end = lambda *a, p=problem, o=out: o.append(p.last_loss)
        make_trainer(max_steps=4).fit(problem)
        losses[prefetch] = out
    assert losses[True] == losses[False] and len(losses[True]) == 4
    ahead = [name for name, _ in seen if name.startswith("sdze-prefetch")]
    assert all(n == 16 for _, n in seen)  # always the whole batch
    assert (len(ahead) >= 3) if share > 0.5 else not ahead


def test_placement_balances_the_two_threads():
    """A share s ahead makes a step ~ max(S + s P, M + (1 - s) P); s balances the two."""
    pl = PreparePlacement(smoothing=1.0)
    assert pl.share == 1.0  # before any measurement
    pl.record(sample_s=0.1, prepare_s=0.5, main_s=None)
    assert pl.share == 1.0  # main thread's time not known yet
    pl.record(sample_s=0.1, prepare_s=0.5, main_s=1.0)  # all ahead: 0.6 vs 1.0, still short
    assert pl.share == 1.0
    pl.record(sample_s=1.5, prepare_s=0.5, main_s=0.5)  # sampling alone outlasts the step
    assert pl.share == 0.0
    pl.record(sample_s=0.8, prepare_s=0.7, main_s=0.5)
    s = pl.share
    assert 0 < s < 1
    assert 0.8 + s * 0.7 == pytest.approx(0.5 + (1 - s) * 0.7)  # both threads busy 1.0 s
    assert max(0.8 + s * 0.7, 0.5 + (1 - s) * 0.7) < min(max(1.5, 0.5), max(0.8, 1.2))
    assert pl.rows_ahead(100) == round(100 * s)
    pl.auto = False
    pl.record(sample_s=0.1, prepare_s=0.5, main_s=1.0)
    assert pl.share == s  # pinned
    smooth = PreparePlacement(smoothing=0.5)
    smooth.record(1.0, 1.0, 1.0)
    smooth.record(3.0, 1.0, 1.0)
    assert smooth.times["sample"] == pytest.approx(2.0)


def test_prefetch_must_be_a_bool():
    with pytest.raises(ValueError, match="pde.prefetch"):
        _two_body(prefetch="yes")


def test_a_failed_fit_stops_the_thread_and_drops_its_batch(make_trainer):
    """Lightning skips teardown when fit raises: training_step stops the prefetch itself."""
    problem = _two_body(True)
    original = problem.physics_loss.terms

    def nan_at_step_3(step, key=0):
        out = original(step, key)
        if step == 3:
            out["loss"] = out["loss"] * float("nan")
        return out

    problem.physics_loss.terms = nan_at_step_3
    with pytest.raises(NonFiniteLossError):
        make_trainer(max_steps=8).fit(problem)
    assert problem.collocation.prefetcher.pending_step is None
    assert not _prefetch_threads()


def test_a_batch_prefetched_before_fit_is_dropped_at_train_start(make_trainer):
    problem = _two_body(True)
    problem.begin_step(0)  # leaves step 1 pending, as a failed or manual run could
    assert problem.collocation.prefetcher.pending_step == 1
    problem.on_train_start()
    assert problem.collocation.prefetcher.pending_step is None


def test_prefetch_is_turned_off_without_crns(make_trainer):
    problem = _two_body(True, method=functools.partial(SDZE, lr=1e-2, rank=2, crns=False))
    with pytest.warns(UserWarning, match="crns=false"):
        make_trainer(max_steps=2).fit(problem)
    assert problem.collocation.prefetcher is None and not _prefetch_threads()


@pytest.mark.parametrize("precision", ["32-true", "64-true", "bf16-mixed"])
def test_prefetch_gives_the_same_losses_under_every_accepted_precision(
    make_trainer, monkeypatch, precision
):
    """Autocast is thread-local: the prefetch thread must prepare its share of the source
    under the main thread's autocast state. The share is pinned at one half (the measured
    split depends on timing) and the source is forced through autocast-affected products:
    with and without prefetching, and twice with it, the losses are the same to the bit."""

    class MatmulSource(TwoBody):
        def _block_source(self, xb):  # a product autocast runs in bfloat16 under bf16-mixed
            extra = (xb @ torch.linspace(0, 1, xb.shape[1], dtype=xb.dtype)[:, None]).squeeze(1)
            return super()._block_source(xb) + extra.to(xb.dtype)

    monkeypatch.setattr(ball, "SOURCE_BLOCK", 4 * 12)  # 4 rows of d = 12 per block
    runs = []
    for prefetch in (False, True, True):
        problem = MatmulSource(
            dim=12, operator="allen_cahn", net=MLP(12, width=8, depth=2, seed=0),
            estimator=build_estimator("taylor", num_directions=4, distribution="coordinate"),
            n_interior=16, n_eval=0, seed=3, prefetch=prefetch,
            method=functools.partial(SDZE, lr=1e-2, rank=2, period=3),
        )
        problem.collocation.placement.auto = False
        problem.collocation.placement.share = 0.5
        losses: list[float] = []
        problem.on_train_batch_end = lambda *a, p=problem, out=losses: out.append(p.last_loss)
        make_trainer(max_steps=6, precision=precision).fit(problem)
        runs.append(losses)
    assert len(runs[0]) == 6
    assert runs[1] == runs[0] and runs[2] == runs[0]


def test_fused_source_on_the_prefetch_thread_gives_the_same_losses():
    """Past FUSED_MIN_DIM the source is a torch.compile kernel, called from the thread."""
    dim = twobody.FUSED_MIN_DIM + 8
    losses = {}
    for prefetch in (False, True):
        problem = _two_body(prefetch, dim=dim)
        opt = problem.method(problem.net)
        out = []
        for step in range(3):
            out.append(float(problem.run_step(opt, step).loss))
        problem.stop_prefetch()
        losses[prefetch] = out
    assert losses[True] == losses[False]
    assert _two_body_fused in kernels._compiled and _two_body_fused not in kernels._failed
