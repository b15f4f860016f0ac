"""The regression suite's cases and measurements, shared by its benchmarks and its test.

A case is one method at one dimension of two-body Allen-Cahn, built from the packaged
Hydra config (:func:`overrides`: the ``sdze-train`` overrides that reproduce it) through
:func:`sdze_lightning.builders.compose_config` and
:func:`~sdze_lightning.builders.build_problem`, checked by ``problem.check_inputs()``
(the memory pre-flight and the method's own checks: what ``fit`` runs first), its
network's output offset fitted as ``fit`` does, and stepped through
``problem.run_step`` (what ``training_step`` runs) with the method's optimizer from
``problem.configure_optimizers()``.

Quantities (see :class:`Run`):

* time ratio: the step's wall time over the wall time of one reference forward pass
  ``net(x)`` of the same network over a fixed batch of the same problem (no gradient),
  the two timed in alternating blocks, so that both see the same load;
* memory ratio: the peak resident set size during a steady-state step above the
  process's resident set size before the case was built, over the bytes of the
  parameters plus one collocation batch (the floor of any method).

Tool: pytest-benchmark, because the suite runs inside pytest with the project's
fixtures and pre-flight, in one process per run (the reference and the method steps
share it), and writes one JSON file with machine and commit information that
``pytest-benchmark compare`` reads; asv would rebuild an environment per commit and run
each benchmark in a fresh process, repeating the build of a d = 1e6 network for every
quantity.
"""

from __future__ import annotations

import gc
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # benchmarks/_common.py

from _common import peak, reset_peak, rss  # noqa: E402

#: Why this tool (one line; benchmarks/regression/README.md says the same).
TOOL = ("pytest-benchmark: runs inside pytest with the project's fixtures, keeps the reference "
        "and the method steps in one process, JSON with machine/commit info, "
        "`pytest-benchmark compare`; asv needs an environment per commit and a process per "
        "benchmark (rebuilding a d = 1e6 network for each quantity).")

#: The methods (``configs/method/*.yaml``), in the order of the tables.
METHODS = ("sdze", "mezo", "adam", "pde_aware", "fused_adafactor")
#: ``pde.dim`` of the full suite.
DIMS = (1_000, 10_000, 100_000, 1_000_000)
#: ``pde.dim`` of the quick mode (CI smoke): a tiny problem, below the suite's sizes.
QUICK_DIMS = (100,)
#: The estimator of every method: forward-mode Taylor jets on 16 coordinate directions,
#: the one shipped estimator that every method accepts (``fused_adafactor`` needs a
#: forward-only one) and whose cost does not grow with d (``exact`` takes d + 1 reverse
#: passes and is refused past its 20000, at d = 1e5).
ESTIMATOR = "taylor"
#: The problem.
PDE = "allen_cahn_twobody"
#: Cases left out of the full suite, with the reason their rows record.
DROPPED: dict[tuple[str, int], str] = {
    ("pde_aware", 1_000_000): (
        "too slow for the suite's 10 minutes: the per-point gradients make its step about "
        "10x slower per decade of d; the memory pre-flight accepts it"
    ),
}

#: Seconds of timed rounds a case aims at, by mode (then clamped to the two bounds below).
ROUND_BUDGET_S = {"full": 4.0, "quick": 0.5}
MIN_ROUNDS = {"full": 3, "quick": 2}
MAX_ROUNDS = {"full": 15, "quick": 3}
#: Steps of the peak-memory benchmark, by mode (the largest peak counts).
MEMORY_ROUNDS = {"full": 2, "quick": 1}
#: A step slower than this (seconds) gets two timed rounds and one memory round.
SLOW_STEP_S = 5.0
#: A reference block repeats the forward pass until it lasts about this long (at least once).
REFERENCE_BLOCK_S = 0.05


def overrides(method: str, dim: int) -> list[str]:
    """The ``sdze-train`` overrides of one case (everything else: the packaged defaults).

    ``threads=1`` pins one intra-op thread (``threads=auto`` would pick by the load).
    """
    return [f"pde={PDE}", f"pde.dim={dim}", f"method={method}", f"estimator={ESTIMATOR}",
            "threads=1"]


def command(method: str, dim: int) -> str:
    """The ``sdze-train`` command that trains the case's configuration."""
    return "sdze-train " + " ".join(overrides(method, dim))


def dim_label(dim: int) -> str:
    """``dim`` as written in ids and tables: ``"1e5"`` for a power of ten, else the number."""
    exponent = round(math.log10(dim)) if dim > 0 else 0
    return f"1e{exponent}" if 10**exponent == dim else str(dim)


def case_id(method: str, dim: int) -> str:
    """The case's name in test ids, e.g. ``"sdze-1e5"``."""
    return f"{method}-{dim_label(dim)}"


class Refused(Exception):
    """The library refused the case before its first step (its message)."""


@dataclass
class Run:
    """One built case and its measurements.

    Attributes:
        method: The method's config name.
        dim: ``pde.dim``.
        problem: The built problem.
        optimizer: Its method's optimizer.
        baseline_rss: Resident bytes of the process before the case was built.
        param_bytes: Bytes of the network's parameters.
        batch_bytes: Bytes of one collocation batch (``n_interior x input_dim``).
        step: Index of the next training step.
        reference_passes: Forward passes per reference block.
        reference_s: Seconds of one forward pass, one per timed round.
        step_s: Seconds of one step, one per timed round.
        peak_bytes: Peak resident bytes above :attr:`baseline_rss`, one per memory round.
        increase_bytes: Peak resident bytes above the resident bytes right before the
            step (what the step adds to the parameters and state), one per memory round.
        losses: Loss of every step taken.
        warmup_s: Seconds of the first (warm-up) step.
        build_s: Seconds from the config to the end of the warm-up.
        forward_s: Seconds of one forward pass, measured when calibrating.

    """

    method: str
    dim: int
    problem: object
    optimizer: object
    baseline_rss: int
    param_bytes: int
    batch_bytes: int
    step: int = 0
    reference_passes: int = 1
    reference_s: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)
    peak_bytes: list[int] = field(default_factory=list)
    increase_bytes: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    warmup_s: float = 0.0
    build_s: float = 0.0
    forward_s: float = 0.0
    _x: torch.Tensor | None = None
    _before: int = 0

    # ---------------------------------------------------------------- the two operations
    def train_step(self) -> float:
        """One training step (``problem.run_step``, non-finite steps skipped); its loss."""
        out = self.problem.run_step(self.optimizer, self.step, skip_nonfinite=True)
        self.step += 1
        loss = float(out.loss)
        self.losses.append(loss)
        return loss

    def reference_batch(self) -> torch.Tensor:
        """The fixed batch of the reference pass (step 0's points, drawn once)."""
        if self._x is None:
            self._x = self.problem.sample_points(0, 0)
        return self._x

    def drop_reference_batch(self) -> None:
        """Free the reference batch (it must not count in the step's memory)."""
        self._x = None

    def forward(self) -> None:
        """One reference forward pass ``net(x)`` without gradients."""
        with torch.no_grad():
            self.problem.net(self.reference_batch())

    # ---------------------------------------------------------------- timing
    def calibrate_reference(self) -> None:
        """Choose :attr:`reference_passes` so that a block lasts ~:data:`REFERENCE_BLOCK_S`."""
        self.forward()  # warm
        t0 = time.perf_counter()
        self.forward()
        self.forward_s = time.perf_counter() - t0
        self.reference_passes = max(1, min(50, round(REFERENCE_BLOCK_S / max(self.forward_s,
                                                                             1e-6))))

    def reference_block(self) -> None:
        """Time one block of reference passes; append the seconds per pass."""
        t0 = time.perf_counter()
        for _ in range(self.reference_passes):
            self.forward()
        self.reference_s.append((time.perf_counter() - t0) / self.reference_passes)

    def timed_step(self) -> None:
        """Time one training step; append its seconds."""
        t0 = time.perf_counter()
        self.train_step()
        self.step_s.append(time.perf_counter() - t0)

    def time_ratio(self) -> float:
        """Median over rounds of step seconds over the reference pass of the same round."""
        return statistics.median(s / r for s, r in zip(self.step_s, self.reference_s,
                                                        strict=True))

    # ---------------------------------------------------------------- memory
    def start_memory_step(self) -> None:
        """Free the reference batch and reset the peak-RSS counter (before a memory step)."""
        self.drop_reference_batch()
        reset_peak()
        self._before = rss()

    def end_memory_step(self) -> None:
        """Append the step's peak resident bytes above :attr:`baseline_rss` and its increase."""
        top = peak()
        self.peak_bytes.append(top - self.baseline_rss)
        self.increase_bytes.append(top - self._before)

    def memory_ratio(self) -> float:
        """The largest step peak over parameter + batch bytes."""
        return max(self.peak_bytes) / (self.param_bytes + self.batch_bytes)

    def rounds_for(self, mode: str) -> int:
        """Timed rounds that fit the mode's budget, from the warm-up step's time.

        At least :data:`MIN_ROUNDS` (two where a step takes over :data:`SLOW_STEP_S`).
        """
        per_round = self.warmup_s + self.reference_passes * self.forward_s
        wanted = math.ceil(ROUND_BUDGET_S[mode] / max(per_round, 1e-6))
        least = 2 if self.warmup_s > SLOW_STEP_S else MIN_ROUNDS[mode]
        return max(least, min(MAX_ROUNDS[mode], wanted))

    def memory_rounds(self, mode: str) -> int:
        """Steps of the peak-memory benchmark: one where a step takes over :data:`SLOW_STEP_S`."""
        return 1 if self.warmup_s > SLOW_STEP_S else MEMORY_ROUNDS[mode]


def build(method: str, dim: int, run_dir: str | Path) -> Run:
    """Build, check and warm up one case.

    The warm-up is one training step (optimizer state, first-touch pages) and the
    calibration of the reference block; the fused kernels must be compiled before
    (:func:`_common.warm_fused_kernels`), or their compilation lands in the baseline.

    Raises:
        Refused: The library refused the case (pre-flight, method or estimator checks).

    """
    from sdze_lightning.builders import build_problem, compose_config
    from sdze_lightning.cli import bad_input_message

    reset_peak()  # garbage of the previous case collected, freed memory returned
    baseline = rss()
    t0 = time.perf_counter()
    try:
        cfg = compose_config(overrides(method, dim), run_dir)
        torch.set_num_threads(int(cfg.threads))
        problem = build_problem(cfg)
        problem.check_inputs()
    except Exception as err:  # noqa: BLE001 - a refusal is recorded, a bug re-raised
        message = bad_input_message(err)
        if message is None:
            raise
        raise Refused(message) from None
    problem.output_fit.apply(problem)  # what fit does before the first step
    optimizer = problem.configure_optimizers()
    if isinstance(optimizer, dict):  # with a scheduler
        optimizer = optimizer["optimizer"]
    params = sum(p.numel() * p.element_size() for p in problem.net.parameters())
    itemsize = torch.empty((), dtype=problem.dtype).element_size()
    run = Run(method, dim, problem, optimizer, baseline, params,
              problem.n_interior * problem.input_dim * itemsize)
    t1 = time.perf_counter()
    run.train_step()
    run.warmup_s = time.perf_counter() - t1
    run.calibrate_reference()
    run.build_s = time.perf_counter() - t0
    return run


def release(run: Run) -> None:
    """Stop the case's prefetching and drop its problem, optimizer and reference batch.

    The next :func:`build` collects what is left before it measures its baseline.
    """
    run.problem.stop_prefetch()
    run.problem = run.optimizer = None
    run.drop_reference_batch()


def freeze_imports() -> None:
    """Import the library and move every object alive now out of the garbage collector's way.

    ``gc.freeze``: each later :func:`_common.reset_peak` (a full collection) then scans
    only the objects of the cases, not those of torch, Lightning and Hydra.
    """
    import sdze_lightning.cli  # noqa: F401 - imported for its objects

    gc.collect()
    gc.freeze()


def row(run: Run) -> dict:
    """The results row of a measured case (times in seconds, memory in bytes)."""
    return {
        "time_ratio": run.time_ratio() if run.step_s else None,
        "memory_ratio": run.memory_ratio() if run.peak_bytes else None,
        "step_s": statistics.median(run.step_s) if run.step_s else None,
        "reference_s": statistics.median(run.reference_s) if run.reference_s else None,
        "rounds": len(run.step_s),
        "reference_passes": run.reference_passes,
        "peak_bytes": max(run.peak_bytes) if run.peak_bytes else None,
        "step_increase_bytes": max(run.increase_bytes) if run.increase_bytes else None,
        "param_bytes": run.param_bytes,
        "batch_bytes": run.batch_bytes,
        "memory_rounds": len(run.peak_bytes),
        "warmup_s": run.warmup_s,
        "build_s": run.build_s,
        "losses_finite": all(math.isfinite(v) for v in run.losses),
    }


def results_name(mode: str) -> str:
    """The results file of a mode (``full``, ``quick`` or ``subset``), named after its content."""
    suffix = {"full": "", "quick": "_quick", "subset": "_subset"}[mode]
    return f"regression_{PDE}_{ESTIMATOR}{suffix}.json"


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def _cell(row: dict | None, old: dict | None) -> str:
    """``time / memory`` ratio of a row (with ``(x new/old)`` against a baseline row)."""
    if row is None:
        return ""
    if row["status"] != "ok":
        return row["status"]
    text = f"{_fmt(row['time_ratio'])} / {_fmt(row['memory_ratio'])}"
    if old is not None and old.get("status") == "ok":
        text += (f" (x{row['time_ratio'] / old['time_ratio']:.2f} / "
                 f"x{row['memory_ratio'] / old['memory_ratio']:.2f})")
    return text


def markdown(result: dict, baseline: dict | None = None) -> str:
    """The table of a results file: method x d, ``time ratio / memory ratio`` or the status.

    With ``baseline`` (an earlier results file) each cell adds the change of both ratios.
    """
    rows = {(r["method"], r["dim"]): r for r in result["rows"]}
    old = {(r["method"], r["dim"]): r for r in (baseline or {}).get("rows", [])}
    dims = sorted({d for _, d in rows})
    methods = [m for m in METHODS if any(k[0] == m for k in rows)]
    lines = ["| method | " + " | ".join(f"d = {dim_label(d)}" for d in dims) + " |",
             "| --- |" + " --- |" * len(dims)]
    for m in methods:
        cells = [_cell(rows.get((m, d)), old.get((m, d))) for d in dims]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Print the table of a results file, against a baseline file if one is given."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("file", type=Path)
    parser.add_argument("baseline", type=Path, nargs="?")
    args = parser.parse_args(argv)
    baseline = json.loads(args.baseline.read_text()) if args.baseline else None
    print(markdown(json.loads(args.file.read_text()), baseline))


if __name__ == "__main__":
    main()
