"""The model suite: step time and peak memory of every method over d (pytest-benchmark).

Each case (``conftest.case``: one method at one ``pde.dim``, built from the packaged
config) is measured by two benchmarks:

* ``test_time_step``: rounds of [one reference block (setup, untimed by pytest-benchmark,
  timed here), one training step (timed)]; ``time_ratio`` is the median over rounds of
  the step's time over the reference pass's time of the same round;
* ``test_peakmem_step``: steps with the peak-RSS counter reset before each;
  ``memory_ratio`` is the largest peak (above the RSS before the build) over parameter +
  batch bytes.

A ``track_rel_l2`` benchmark is left out: after the few steps a case takes, the held-out
error is that of the fitted output offset, and evaluating it streams ``pde.n_eval``
held-out points through the network.

    flock /tmp/sdze-heavy.lock env OMP_NUM_THREADS=1 python -m pytest benchmarks/regression -m slow
    python -m pytest benchmarks/regression --regression-quick      # CI smoke, d = 100
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import suite

if TYPE_CHECKING:  # the fixture's type (conftest is not imported by name: tests/ has one too)
    from conftest import Case


def _describe(benchmark, run: suite.Run) -> None:
    benchmark.group = f"d = {suite.dim_label(run.dim)}"
    benchmark.extra_info.update(method=run.method, dim=run.dim,
                                overrides=suite.overrides(run.method, run.dim))


def test_time_step(benchmark, case: Case, regression_mode: str) -> None:
    """Step time over one reference forward pass, the two interleaved round by round."""
    run = case.require()
    _describe(benchmark, run)
    benchmark.pedantic(run.timed_step, setup=run.reference_block,
                       rounds=run.rounds_for(regression_mode))
    ratio = run.time_ratio()
    benchmark.extra_info.update(time_ratio=ratio, reference_s=run.reference_s,
                                step_s=run.step_s, reference_passes=run.reference_passes)
    case.row.update(suite.row(run))
    assert math.isfinite(ratio) and ratio > 0


def test_peakmem_step(benchmark, case: Case, regression_mode: str) -> None:
    """Peak RSS of a steady-state step over parameter + batch bytes."""
    run = case.require()
    _describe(benchmark, run)
    benchmark.pedantic(run.train_step, setup=run.start_memory_step,
                       teardown=run.end_memory_step, rounds=run.memory_rounds(regression_mode))
    ratio = run.memory_ratio()
    benchmark.extra_info.update(memory_ratio=ratio, peak_bytes=max(run.peak_bytes),
                                param_bytes=run.param_bytes, batch_bytes=run.batch_bytes)
    case.row.update(suite.row(run))
    assert math.isfinite(ratio) and ratio > 0
