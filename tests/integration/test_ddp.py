"""DDP with scalar communication: two CPU processes (gloo) against one process.

The fixture launches this file twice as a script, as ``torchrun`` would (``LOCAL_RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT`` in the environment; Lightning then joins
the process group instead of spawning). Each worker runs the smoke mode of
``benchmarks/ddp_bytes.py`` (a function call) and a run with a NaN on one rank; the tests
compare what they saved with single-process runs in the pytest process.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import shlex
import sys
from pathlib import Path

import pytest
import torch

from sdze_lightning.distributed import Shard
from sdze_lightning.estimators.taylor import TaylorEstimator
from sdze_lightning.methods import SDZE
from sdze_lightning.nn import MLP
from sdze_lightning.problems import Poisson2D

pytestmark = pytest.mark.usefixtures("one_thread")  # small ops: 1 thread is faster here

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
STEPS = 6  # the smoke configuration of benchmarks/ddp_bytes.py
QUERIES = 2
WIDTHS = (8, 64)
BAD_STEP = 3  # the rank-1 share of this step's points gives a NaN residual


def load_benchmark():
    spec = importlib.util.spec_from_file_location("ddp_bytes", BENCHMARKS / "ddp_bytes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ddp_bytes = load_benchmark()


class NaNOnRankOne(Poisson2D):
    """Poisson 2D whose residual is NaN at step BAD_STEP, on rank 1's share only."""

    def residual(self, x, d):
        r = super().residual(x, d)
        if self.shard.rank == 1 and self._trainer is not None and self.global_step == BAD_STEP:
            r = r + float("nan")
        return r


def smoke_rows(method: str) -> list[dict]:
    return [c for c in ddp_bytes.configs(smoke=True) if c["method"] == method]


key = ddp_bytes.key


# ------------------------------------------------------------------------------ worker
def worker(out: Path) -> None:
    """Run on each rank: the benchmark's smoke mode (a function call) and a NaN on one rank."""
    rows, params = ddp_bytes.worker(ddp_bytes.parse(["--smoke", "--out", str(out)]))
    problem = NaNOnRankOne(divergence="skip", net=MLP(2, width=8, depth=2, seed=0),
                           n_interior=33, n_boundary=7, n_eval=16,
                           estimator=TaylorEstimator(2, "rademacher"),
                           method=functools.partial(SDZE, lr=1e-2, rank=2, queries=QUERIES))
    trainer = ddp_bytes.trainer(2, STEPS, "64-true")
    trainer.fit(problem)
    skip = {"params": [p.detach().clone() for p in problem.net.parameters()],
            "global_step": trainer.global_step, "skipped": problem.skipped_steps}
    ahead = ddp_bytes.make_problem(smoke_rows("sdze")[0], "prefetch=true")
    sizes: list[int] = []
    begin_step = ahead.collocation.begin_step

    def recording_begin_step(step: int) -> None:  # the batch each step gets from the thread
        begin_step(step)
        sizes.append(ahead.collocation.cache[(step, 0)].shape[0])

    ahead.collocation.begin_step = recording_begin_step
    ddp_bytes.trainer(2, STEPS, "64-true").fit(ahead)
    prefetched = {"params": [p.detach().clone() for p in ahead.net.parameters()],
                  "sizes": sizes}
    torch.save({"rows": rows, "params": params, "skip": skip, "prefetch": prefetched},
               out / f"rank{trainer.global_rank}.pt")


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    ddp_bytes.launch(__file__, [str(out)], timeout=300)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)], out


def single_process(cfg: dict) -> list[torch.Tensor]:
    problem = ddp_bytes.make_problem(cfg)
    ddp_bytes.trainer(1, STEPS, "64-true").fit(problem)
    return [p.detach() for p in problem.net.parameters()]


def assert_ranks_equal_one_process(rank0: dict, rank1: dict, cfg: dict) -> None:
    """Both ranks end bit-identical, within 1e-12 of one process on the union of their
    points (float64, 6 steps: rounding only, see each caller), and training moved the
    parameters by more than 1e-3 (one step moves them by ~lr = 1e-2)."""
    ours = rank0["params"][key(cfg)]
    for a, b in zip(ours, rank1["params"][key(cfg)], strict=True):
        assert torch.equal(a, b)
    ref = single_process(cfg)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    init = [p.detach() for p in ddp_bytes.make_problem(cfg).net.parameters()]
    assert max(float((a - b).abs().max()) for a, b in zip(ref, init, strict=True)) > 1e-3


# ------------------------------------------------------------------------------- tests
def test_shards_partition_the_batch():
    batch = torch.arange(11)
    for world in (1, 2, 3, 4):
        parts = [Shard(r, world).take(batch) for r in range(world)]
        assert torch.equal(torch.cat(parts), batch)
        assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1
        # the mean over ranks of the rank estimates is the global mean
        values = batch.double() ** 2
        est = [Shard(r, world).mean(Shard(r, world).take(values), 11) for r in range(world)]
        torch.testing.assert_close(torch.stack(est).mean(), values.mean(), rtol=1e-15, atol=0)
    with pytest.raises(ValueError, match="outside world size"):
        Shard(2, 2)


@pytest.mark.parametrize("cfg", smoke_rows("sdze"), ids=lambda c: f"width{c['width']}")
def test_sdze_ddp_equals_single_process_on_the_union(ddp_results, cfg):
    (rank0, rank1), _ = ddp_results
    row = next(r for r in rank0["rows"] if key(r) == key(cfg))
    assert row["shard"] == [0, 2]
    # the all-reduced loss values differ from the single-process ones by summation order
    # and batch-size-dependent kernels only (a few ulp of L ~ 50); through the difference
    # quotient (eps = 1e-3: ~1e-13 on the scalars) and Adam's normalised step (lr = 1e-2)
    # that leaves ~1e-15 on the parameters after 6 steps (measured 4e-16)
    assert_ranks_equal_one_process(rank0, rank1, cfg)


def test_prefetching_ranks_build_their_own_shards(ddp_results):
    """prefetch=True under DDP: each rank's prefetch thread builds its share of the batch
    (the shard is set in setup, before the first batch); the result is the non-prefetching
    single-process run on the union, to the tolerance of the test above."""
    (rank0, rank1), _ = ddp_results
    # 33 interior points: shares of 17 and 16, at every step
    assert rank0["prefetch"]["sizes"] == [17] * STEPS
    assert rank1["prefetch"]["sizes"] == [16] * STEPS
    for a, b in zip(rank0["prefetch"]["params"], rank1["prefetch"]["params"], strict=True):
        assert torch.equal(a, b)
    ref = single_process(smoke_rows("sdze")[0])
    for a, b in zip(rank0["prefetch"]["params"], ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_sdze_bytes_per_step_do_not_depend_on_parameter_count(ddp_results):
    (rank0, _), out = ddp_results
    rows = {r["width"]: r for r in rank0["rows"] if r["method"] == "sdze"}
    small, large = rows[WIDTHS[0]], rows[WIDTHS[1]]
    assert large["params"] > 20 * small["params"]
    # one all-reduce of the 2q float64 loss values per step, nothing else
    assert small["bytes_per_step"] == large["bytes_per_step"] == [2 * QUERIES * 8] * STEPS
    assert small["calls_per_step"] == [1] * STEPS
    # the benchmark's smoke mode wrote its results: its provenance, and per row the
    # overrides of the packaged configs it was built from and their sdze-train command
    assert (out / "ddp_bytes_smoke.json").exists() and (out / "ddp_bytes_smoke.csv").exists()
    written = json.loads((out / "ddp_bytes_smoke.json").read_text())
    meta = written["meta"]
    assert meta["command"] == "python benchmarks/ddp_bytes.py --smoke"
    assert meta["world_size"] == 2 and meta["threads"] == 1
    assert all(meta[k] is not None for k in ("date", "commit", "machine", "load_start",
                                             "load_end"))
    row = next(r for r in written["rows"] if key(r) == key(smoke_rows("sdze")[0]))
    assert row["overrides"][0] == "pde=poisson2d"
    assert {"method=sdze", f"method.queries={QUERIES}", "trainer=ddp",
            f"trainer.max_steps={STEPS}", "trainer.precision=64-true"} <= set(row["overrides"])
    assert row["sdze_train_command"] == shlex.join(["sdze-train", *row["overrides"]])


def test_first_order_keeps_lightning_ddp(ddp_results):
    """Adam under DDP: gradients averaged by DDP; the rank estimates make it the global one."""
    (rank0, rank1), _ = ddp_results
    for cfg in smoke_rows("adam"):
        for a, b in zip(rank0["params"][key(cfg)], rank1["params"][key(cfg)], strict=True):
            assert torch.equal(a, b)
        for a, b in zip(rank0["params"][key(cfg)], single_process(cfg), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)  # as above
        # the gradient all-reduce (counted through a Python comm hook) carries every parameter
        row = next(r for r in rank0["rows"] if key(r) == key(cfg))
        assert all(b >= 8 * row["params"] for b in row["bytes_per_step"])


@pytest.mark.parametrize("cfg", smoke_rows("fused_adafactor"), ids=key)
def test_fused_adafactor_ddp_equals_single_process_on_the_union(ddp_results, cfg):
    """fused_adafactor on 2 ranks: the input layer's update from the gathered factors."""
    (rank0, rank1), _ = ddp_results
    # the ranks' factors are summed in another order than one process's and the batch is
    # split for each product (float64): ~1e-16 relative on each gradient entry; Adafactor's
    # step G / sqrt(V) is scale-free, so with lr = 1e-2 that is ~1e-18 per step on the
    # parameters (6 steps)
    assert_ranks_equal_one_process(rank0, rank1, cfg)


def test_fused_adafactor_bytes_per_step_do_not_depend_on_d(ddp_results):
    """The input weight never crosses ranks: the same bytes at d = 16 and d = 512."""
    (rank0, _), _ = ddp_results
    rows = {r["dim"]: r for r in rank0["rows"]
            if r["method"] == "fused_adafactor" and r.get("directions") == "rademacher"}
    small, large = rows[16], rows[512]
    assert large["params"] > 10 * small["params"]
    assert small["bytes_per_step"] == large["bytes_per_step"]
    # a width x d float64 gradient alone would be 16 * 512 * 8 bytes per step
    assert max(large["bytes_per_step"]) < 16 * 512 * 8


def test_nan_on_one_rank_is_skipped_on_every_rank(ddp_results):
    """A NaN in rank 1's share only: the reduced values are NaN, both ranks skip alike."""
    (rank0, rank1), _ = ddp_results
    a, b = rank0["skip"], rank1["skip"]
    assert a["global_step"] == b["global_step"] == STEPS
    assert a["skipped"] == b["skipped"] == 1
    for x, y in zip(a["params"], b["params"], strict=True):
        assert torch.equal(x, y)


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
