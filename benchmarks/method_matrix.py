"""Every method x estimator pair the configs allow, at its defaults: s/step, peak memory, verdict.

The methods and estimators are the files of ``configs/method/`` and ``configs/estimator/``
(a new config is measured without editing this script). Each pair runs in its own
process (peak RSS is per process) on the default problem (Poisson 2D, MLP 4 x 128,
1000 + 200 points), one thread: ``steps`` training steps through ``sdze-train``'s own
code path, the first one a warm-up; the median of the others is the step time. A pair
that refuses (a ``ValueError`` before the first step) is recorded with its message.

A pair is "ok" when its step is within ``10x`` Adam+exact's and its peak RSS within 2 GB.
The ratio is one of CPU time per step (one thread, so the load of other processes does
not inflate it), with Adam+exact trained right after the pair in the same process; the
wall time per step is reported beside it. The
paper presets (``PAPER_PRESETS``: Stein with He et al.'s K = 1024) are measured and
their cost stated, not held to these limits. The table goes to
``benchmarks/results/method_matrix.{json,md}`` and, where ``benchmarks/README.md`` holds
the markers ``<!-- method-matrix -->`` and ``<!-- /method-matrix -->``, between them::

    python benchmarks/method_matrix.py                # the whole matrix (~10 min here)
    python benchmarks/method_matrix.py --smoke        # tiny sizes, 2 steps, no README
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from hydra.errors import InstantiationException

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import RESULTS, finish_provenance, script_provenance  # noqa: E402

README = ROOT / "benchmarks" / "README.md"
START, END = "<!-- method-matrix -->", "<!-- /method-matrix -->"
#: Limits of a usable default (relative to Adam+exact's step, and peak RSS).
MAX_SLOWDOWN, MAX_BYTES = 10.0, 2 * 1024**3
#: Presets that reproduce a paper's setting at its cost (stated, not held to the limits).
PAPER_PRESETS = {"stein_he": "paper's setting (He et al., K = 1024)"}
SMOKE = ["model.width=8", "model.depth=2", "pde.n_interior=16", "pde.n_boundary=4",
         "pde.n_eval=32"]


def names(group: str) -> list[str]:
    """The options of a config group (its YAML files)."""
    return sorted(p.stem for p in (ROOT / "configs" / group).glob("*.yaml"))


class StepTimer(L.Callback):
    """Wall time and CPU time (this process, all threads) of every training step."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self._t = self._c = 0.0

    def on_train_batch_start(self, *args) -> None:
        self._t, self._c = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, *args) -> None:
        self.times.append(time.perf_counter() - self._t)
        self.cpu_times.append(time.process_time() - self._c)


def _fit(cfg, steps: int) -> tuple[list[float], list[float]]:
    """Train ``steps`` steps of the problem ``cfg`` builds; wall and CPU time of each step
    after the first (a warm-up)."""
    from sdze_lightning.cli import build_problem

    problem = build_problem(cfg)
    problem.check_inputs()
    timer = StepTimer()
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, accelerator="cpu",
                        callbacks=[timer])
    trainer.fit(problem)
    return timer.times[1:] or timer.times, timer.cpu_times[1:] or timer.cpu_times


def measure(method: str, estimator: str, steps: int, smoke: bool) -> dict:
    """Train ``steps`` steps of one pair in this process; the row of the matrix.

    Adam+exact is trained right after it in the same process, so the ratio compares
    two steps taken under the same load (peak RSS is read before, so it is the pair's).
    """
    from sdze_lightning.callbacks.summary import peak_memory_bytes

    from sdze_lightning.cli import compose_config

    torch.set_num_threads(1)
    row = {"method": method, "estimator": estimator}

    def config(m: str, e: str, tmp: str):
        cfg = compose_config([f"method={m}", f"estimator={e}", *(SMOKE if smoke else [])], tmp)
        if smoke and "num_directions" in cfg.estimator:
            cfg.estimator.num_directions = 4
        return cfg

    with tempfile.TemporaryDirectory() as tmp:
        try:
            times, cpu = _fit(config(method, estimator, tmp), steps)
        except (ValueError, TypeError) as err:
            return {**row, "status": "refuses", "why": str(err)}
        except InstantiationException as err:  # a constructor's refusal, wrapped by Hydra
            if not isinstance(err.__cause__, ValueError | TypeError):
                raise
            return {**row, "status": "refuses", "why": str(err.__cause__)}
        peak = peak_memory_bytes(torch.device("cpu"))
        base, base_cpu = _fit(config("adam", "exact", tmp), steps)
    return {**row, "status": "runs", "s_per_step": statistics.median(times),
            "cpu_s_per_step": statistics.median(cpu),
            "adam_exact_s_per_step": statistics.median(base),
            "adam_exact_cpu_s_per_step": statistics.median(base_cpu),
            "peak_rss_bytes": peak, "load": os.getloadavg()[0]}


def run_pair(method: str, estimator: str, steps: int, timeout: float) -> dict:
    """One pair in a fresh process (its own peak RSS)."""
    cmd = [sys.executable, __file__, "--pair", method, estimator, "--steps", str(steps)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"method": method, "estimator": estimator, "status": "timeout",
                "why": f"{steps} steps took more than {timeout:.0f} s"}
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {"method": method, "estimator": estimator, "status": "error",
                "why": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "?"}


def verdicts(rows: list[dict]) -> list[dict]:
    """Add ``x_adam_exact`` and ``verdict`` (ok / too slow / too much memory / refuses)."""
    for r in rows:
        if r["status"] != "runs":
            r["verdict"] = r["status"]
            continue
        r["x_adam_exact"] = r["cpu_s_per_step"] / r["adam_exact_cpu_s_per_step"]
        bad = []
        if r["x_adam_exact"] > MAX_SLOWDOWN:
            bad.append(f"> {MAX_SLOWDOWN:g}x Adam+exact")
        if r["peak_rss_bytes"] > MAX_BYTES:
            bad.append("> 2 GB")
        if bad and r["estimator"] in PAPER_PRESETS:
            bad = [f"{PAPER_PRESETS[r['estimator']]}: " + ", ".join(bad)]
        r["verdict"] = "ok" if not bad else ", ".join(bad)
    return rows


def markdown(rows: list[dict], command: str) -> str:
    """The matrix as a Markdown table with its command, machine and date."""
    lines = [
        f"Command: `{command}` ({datetime.date.today()}, {platform.machine()} CPU, "
        f"1 torch thread, torch {torch.__version__}; "
        "2-core machine shared with other jobs: s/step is wall time and carries the load; "
        "the ratio to Adam+exact is one of CPU time, in the same process).",
        "",
        "| method | estimator | s/step | adam+exact s/step | CPU-time ratio | peak RSS (GB) "
        "| load | verdict |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if r["status"] == "runs":
            lines.append(
                f"| {r['method']} | {r['estimator']} | {r['s_per_step']:.3f} | "
                f"{r['adam_exact_s_per_step']:.3f} | {r['x_adam_exact']:.1f} | "
                f"{r['peak_rss_bytes'] / 1e9:.2f} | {r['load']:.1f} | {r['verdict']} |"
            )
        else:
            lines.append(f"| {r['method']} | {r['estimator']} | - | - | - | - | - | "
                         f"{r['status']}: {r.get('why', '')} |")
    return "\n".join(lines)


def write_readme(table: str) -> None:
    """Replace the text between the markers of benchmarks/README.md, where it has them
    (the table itself is ``results/method_matrix.md``)."""
    text = README.read_text()
    if START not in text or END not in text:
        return
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    README.write_text(f"{head}{START}\n{table}\n{END}{tail}")


def main() -> None:
    """Measure the matrix (or one pair, ``--pair``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", nargs=2, metavar=("METHOD", "ESTIMATOR"))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    record = script_provenance(__file__, None)
    if args.pair:
        print(json.dumps(measure(*args.pair, args.steps, args.smoke)), flush=True)
        return
    if args.smoke:
        rows = [measure(m, e, 2, True) for m in names("method") for e in names("estimator")]
        print(json.dumps(verdicts(rows), indent=1))
        return
    rows = []
    for m in names("method"):
        for e in names("estimator"):
            rows.append(run_pair(m, e, args.steps, args.timeout))
            print(json.dumps(rows[-1]), flush=True)
    rows = verdicts(rows)
    command = "python benchmarks/method_matrix.py" + (
        f" --steps {args.steps}" if args.steps != 4 else "") + (
        f" --timeout {args.timeout:g}" if args.timeout != 300 else "")
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = finish_provenance({**record, "rows": rows})
    (RESULTS / "method_matrix.json").write_text(json.dumps(data, indent=1) + "\n")
    table = markdown(rows, command)
    (RESULTS / "method_matrix.md").write_text(table + "\n")
    write_readme(table)
    print(table)


if __name__ == "__main__":
    main()
