"""``fused_adafactor`` step / SDZE step, the two interleaved step by step in one process.

Both problems are built from the packaged configs a user gets, with
:func:`sdze_lightning.builders.compose_config` and :func:`~sdze_lightning.builders.build_problem`:

* ``fused_adafactor``: ``experiment=twobody_fused pde.dim=<d>`` (MLP 4x128 tanh with
  Kaiming-uniform initialisation, Taylor jets on 16 coordinate directions, 100 points,
  linear lr decay over ``trainer.max_steps``; no prefetching);
* ``sdze``: ``experiment=twobody_sdze_large pde.dim=<d>`` (the same network and
  estimator, SDZE rank 4, ``prefetch: true``).

Each method's steps are driven as ``training_step`` drives them: the optimizer from
``problem.configure_optimizers()`` (the ``"optimizer"`` of its dict where a scheduler is
configured), ``problem.run_step(optimizer, step)`` with the method's own step counter,
then the scheduler's ``step()``. Before the steps, the output offset is fitted as
``on_fit_start`` fits it (``output_fit``, untimed), and each method's torch intra-op
thread count is what the library's ``threads`` setting chooses (``auto``:
:func:`sdze_lightning.threads.choose_threads` on one sample of the free cores, a
prefetch thread reserving one core; ``OMP_NUM_THREADS`` or ``--threads`` win), set
before each of its steps.

Interleaving: ``--warmup`` steps of each method (alternating; not timed: the first
fused step makes an extra pass, SDZE and the two-body source compile kernels), then
``--pairs`` pairs of one step each, the order inside a pair alternating (fused first in
even pairs). Every step is timed with ``time.perf_counter`` (wall) and
``time.process_time`` (CPU of every thread of the process).

SDZE's prefetch thread builds the batch of step ``k + 1`` while step ``k`` runs. So that
it does not run during the other method's step, an SDZE step's clock stops only when
that build has finished too: the step is charged ``max(its own work, the next batch's
build)``, as in a training run's steady state (where the next step's wait is charged
to that step instead; the sum is the same). The prefetcher's split of the source term
between the threads (:class:`~sdze_lightning.prefetch.PreparePlacement`) measures the
main thread's time between hand-overs; the time spent outside SDZE's steps is taken out
of that measurement (``collocation.main_since`` moved on by it).

Per method: the median, quartiles, min and max of the per-step times (wall and CPU);
per d: the ratio of the medians (fused / SDZE) and the median, quartiles, min and max
of the per-pair ratios. Loads (``os.getloadavg``, 1 minute; ``loadavg_*``: 1, 5 and 15
minutes) at the start, after each pair and at the end; the memory available
(``/proc/meminfo``) before each d; peak RSS.

Memory: both problems live in one process. At ``d = 1e7`` each network is 5.1 GB and a
batch 4 GB (SDZE holds two while prefetching): ~19-20 GB in all, so a ``d`` of 5e6 or
more runs only with ``--min-available-gib`` (21) available, and a watchdog ends the
process (exit 3, results so far kept) if the memory available falls below
``--floor-gib`` (1) while it runs.

    flock /tmp/sdze-heavy.lock python benchmarks/fused_vs_sdze_interleaved.py \
        --dims 1000000 --pairs 20
    flock /tmp/sdze-heavy.lock python benchmarks/fused_vs_sdze_interleaved.py \
        --dims 10000000 --pairs 5
    # SDZE without its prefetch thread (one thread each, as fused_scaling.py measured):
    flock /tmp/sdze-heavy.lock python benchmarks/fused_vs_sdze_interleaved.py \
        --dims 1000000 --pairs 20 --override prefetch=false --tag 1e6_prefetch_false
    python benchmarks/fused_vs_sdze_interleaved.py --table \
        benchmarks/results/fused_vs_sdze_interleaved_*.json
    python benchmarks/fused_vs_sdze_interleaved.py --smoke   # d = 64, 2 pairs, meaningless

Results: ``results/fused_vs_sdze_interleaved_<dims>.json`` (``--tag`` replaces the
suffix; ``..._smoke.json``), rewritten after every pair.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import resource
import shlex
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when loaded by path

from _common import RESULTS, git_commit, machine  # noqa: E402

#: The packaged experiment of each method (``pde.dim`` is added).
METHODS: dict[str, list[str]] = {
    "fused_adafactor": ["experiment=twobody_fused"],
    "sdze": ["experiment=twobody_sdze_large"],
}
#: From this d on, both problems together need most of the machine's memory.
LARGE_DIM = 5_000_000


def mem_available() -> int:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (0 where unreadable)."""
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return 0
    found = re.search(r"MemAvailable:\s+(\d+)", text)
    return int(found.group(1)) * 1024 if found else 0


def loads() -> float:
    """The 1-minute load average (the figure ``make_claims.py`` reads under ``load_*``)."""
    return round(os.getloadavg()[0], 2)


def loadavg() -> list[float]:
    """The 1-, 5- and 15-minute load averages."""
    return [round(v, 2) for v in os.getloadavg()]


def parent_command() -> str:
    """The command line of this process's parent (``flock ... python ...``), if readable."""
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return ""
    return shlex.join(a.decode(errors="replace") for a in raw.split(b"\0") if a)


def start_watchdog(floor_bytes: int, on_low) -> threading.Event:
    """A daemon thread calling ``on_low(available)`` once the memory available is below
    ``floor_bytes``; set the returned event to stop it."""
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.5):
            available = mem_available()
            if 0 < available < floor_bytes:
                on_low(available)
                return

    threading.Thread(target=watch, name="memory-watchdog", daemon=True).start()
    return stop


def spread(values: list[float]) -> dict[str, float]:
    """Median, quartiles, min and max of ``values``."""
    if len(values) >= 2:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    else:
        q1 = q3 = values[0]
    return {"median": statistics.median(values), "q1": q1, "q3": q3,
            "min": min(values), "max": max(values)}


def thread_counts(problems: dict[str, object], setting: int | None) -> dict[str, int]:
    """Each method's intra-op threads as its ``threads`` setting chooses, on one sample
    of the free cores (what ``on_fit_start`` does, one problem per process)."""
    from sdze_lightning.threads import allowed_cores, choose_threads, free_cores

    free = None
    out = {}
    for name, problem in problems.items():
        value = problem.threads if setting is None else setting
        if isinstance(value, int):
            out[name] = value
        elif os.environ.get("OMP_NUM_THREADS"):
            out[name] = torch.get_num_threads()  # the user's choice (resolve_threads)
        else:
            if free is None:
                free = free_cores()
            params = sum(p.numel() for p in problem.net.parameters())
            work = (problem.n_interior + problem.n_boundary) * params
            out[name] = choose_threads(work, free, allowed_cores(), int(problem.prefetch), 1)
    return out


class MethodRunner:
    """One method's problem, optimizer, scheduler and step counter; times its steps."""

    def __init__(self, name: str, overrides: list[str], run_dir: Path) -> None:
        from sdze_lightning.builders import build_problem, compose_config

        self.name, self.overrides = name, overrides
        t0 = time.perf_counter()
        self.cfg = compose_config(overrides, run_dir)
        self.problem = build_problem(self.cfg)
        self.build_s = time.perf_counter() - t0
        configured = self.problem.configure_optimizers()
        if isinstance(configured, dict):  # a scheduler is configured
            self.optimizer = configured["optimizer"]
            self.scheduler = configured["lr_scheduler"]["scheduler"]
        else:
            self.optimizer, self.scheduler = configured, None
        self.step_index = 0
        self.threads = torch.get_num_threads()
        self.output_fit_s = 0.0
        self._left_at: float | None = None  # when the main thread last left a step

    def fit_output(self) -> None:
        """``on_fit_start``'s output fit (untimed in the steps)."""
        torch.set_num_threads(self.threads)
        t0 = time.perf_counter()
        self.problem.output_fit.apply(self.problem)
        self.output_fit_s = time.perf_counter() - t0

    def _wait_for_prefetch(self) -> None:
        """Wait for the batch the prefetch thread is building (``BatchPrefetcher._pending``:
        no public handle; a renamed attribute raises here rather than timing nothing)."""
        prefetcher = self.problem.collocation.prefetcher
        if prefetcher is None:
            return
        pending = prefetcher._pending  # noqa: SLF001
        if pending is not None:
            pending[1].result()

    def step(self) -> dict:
        """One training step; its wall and CPU seconds and loss."""
        torch.set_num_threads(self.threads)
        collocation = self.problem.collocation
        if self._left_at is not None and collocation.main_since is not None:
            # the other method's step is not this method's main-thread work
            collocation.main_since += time.perf_counter() - self._left_at
        wall0, cpu0 = time.perf_counter(), time.process_time()
        outcome = self.problem.run_step(self.optimizer, self.step_index)
        self._left_at = time.perf_counter()
        if self.scheduler is not None:
            self.scheduler.step()
        self._wait_for_prefetch()
        wall1, cpu1 = time.perf_counter(), time.process_time()
        record = {"step": self.step_index, "wall_s": wall1 - wall0, "cpu_s": cpu1 - cpu0,
                  "loss": float(outcome.loss)}
        self.step_index += 1
        return record

    def close(self) -> None:
        """Stop the prefetch thread."""
        self.problem.collocation.stop_prefetch()


def measure_dim(dim: int, args, result: dict, write) -> dict:
    """Build both methods at ``dim``, warm up, run the pairs; the d's entry."""
    entry: dict = {"dim": dim, "status": "running", "mem_available_gib_before":
                   round(mem_available() / 2**30, 2), "load_before": loads()}
    result["dims"].append(entry)
    if dim >= LARGE_DIM and mem_available() < args.min_available_gib * 2**30:
        entry["status"] = (f"skipped: {entry['mem_available_gib_before']} GiB available, "
                           f"fewer than --min-available-gib {args.min_available_gib}")
        write()
        print(entry["status"], flush=True)
        return entry
    runners: dict[str, MethodRunner] = {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for name, base in METHODS.items():
                overrides = [*base, f"pde.dim={dim}", *args.override]
                if args.threads is not None:
                    overrides.append(f"threads={args.threads}")
                runners[name] = MethodRunner(name, overrides, Path(tmp) / name)
            counts = thread_counts({n: r.problem for n, r in runners.items()}, args.threads)
            for name, runner in runners.items():
                runner.threads = counts[name]
                runner.fit_output()
            entry["methods"] = {n: {"overrides": r.overrides, "threads": r.threads,
                                    "threads_setting": r.problem.threads,
                                    "prefetch": bool(r.problem.prefetch),
                                    "optimizer": type(r.optimizer).__name__,
                                    "scheduler": type(r.scheduler).__name__
                                    if r.scheduler is not None else None,
                                    "params": sum(p.numel() for p in r.problem.net.parameters()),
                                    "build_s": round(r.build_s, 3),
                                    "output_fit_s": round(r.output_fit_s, 3),
                                    "warmup": [], "steps": []}
                                for n, r in runners.items()}
            names = list(runners)
            for i in range(args.warmup):
                for name in names if i % 2 == 0 else names[::-1]:
                    entry["methods"][name]["warmup"].append(runners[name].step())
            entry["load_after_warmup"] = loads()
            entry["pairs"] = []
            for i in range(args.pairs):
                order = names if i % 2 == 0 else names[::-1]
                pair: dict = {"pair": i, "order": order}
                for name in order:
                    record = runners[name].step()
                    entry["methods"][name]["steps"].append(record)
                    pair[name] = record
                pair["ratio_wall"] = pair["fused_adafactor"]["wall_s"] / pair["sdze"]["wall_s"]
                pair["ratio_cpu"] = pair["fused_adafactor"]["cpu_s"] / pair["sdze"]["cpu_s"]
                pair["load"] = loads()
                entry["pairs"].append({k: v for k, v in pair.items() if k not in names})
                summarise(entry)
                write()
                print(json.dumps({"dim": dim, "pair": i, "order": order,
                                  **{f"{n}_wall_s": round(pair[n]["wall_s"], 3) for n in names},
                                  **{f"{n}_cpu_s": round(pair[n]["cpu_s"], 3) for n in names},
                                  "ratio_wall": round(pair["ratio_wall"], 3),
                                  "load": pair["load"]}), flush=True)
            entry["status"] = "ok"
        finally:
            for runner in runners.values():
                runner.close()
            entry["load_after"] = loads()
            entry["peak_rss_gib"] = round(
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
            write()
    return entry


def summarise(entry: dict) -> None:
    """Per-method spreads and the ratios of ``entry`` from its steps so far."""
    methods = entry["methods"]
    for m in methods.values():
        m["wall_s"] = spread([s["wall_s"] for s in m["steps"]])
        m["cpu_s"] = spread([s["cpu_s"] for s in m["steps"]])
    fused, sdze = methods["fused_adafactor"], methods["sdze"]
    entry["ratio_of_medians_wall"] = fused["wall_s"]["median"] / sdze["wall_s"]["median"]
    entry["ratio_of_medians_cpu"] = fused["cpu_s"]["median"] / sdze["cpu_s"]["median"]
    entry["pair_ratio_wall"] = spread([p["ratio_wall"] for p in entry["pairs"]])
    entry["pair_ratio_cpu"] = spread([p["ratio_cpu"] for p in entry["pairs"]])


def main(argv: list[str] | None = None) -> dict | None:
    """Run the interleaved comparison (or print ``--table``); the results written."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--pairs", type=int, default=10, help="timed pairs per d")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per method")
    parser.add_argument("--threads", type=int,
                        help="threads=<n> for both configs (default: the configs' auto)")
    parser.add_argument("--override", nargs="*", default=[],
                        help="more overrides for both methods (recorded)")
    parser.add_argument("--min-available-gib", type=float, default=21.0,
                        help=f"needed available memory for d >= {LARGE_DIM:.0e}")
    parser.add_argument("--floor-gib", type=float, default=1.0,
                        help="end the run if the available memory falls below this")
    parser.add_argument("--tag", help="results file suffix (default: the dims)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    parser.add_argument("--table", nargs="+", type=Path, help="print results as Markdown")
    parser.add_argument("--smoke", action="store_true", help="d = 64, 2 pairs, 1 warm-up step")
    args = parser.parse_args(argv)
    if args.table:
        print(markdown(args.table))
        return None
    if args.smoke:
        args.dims, args.pairs, args.warmup, args.tag = [64], 2, 1, args.tag or "smoke"
    tag = args.tag or "_".join(f"{d:.0e}".replace("e+0", "e").replace("e+", "e")
                               for d in args.dims)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"fused_vs_sdze_interleaved_{tag}.json"
    result = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "commit": git_commit(), "machine": machine(), "load_start": loads(),
        "loadavg_start": loadavg(),
        "command": shlex.join([sys.executable, *sys.argv]) if argv is None
        else shlex.join(["main", *argv]),
        "parent_command": parent_command(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "torch_threads_at_start": torch.get_num_threads(),
        "methods": {n: [*o, "pde.dim=<d>"] for n, o in METHODS.items()},
        "extra_overrides": args.override, "threads_option": args.threads,
        "warmup": args.warmup, "pairs": args.pairs,
        "timing": "per step: perf_counter (wall) and process_time (CPU, all threads) around "
                  "run_step + scheduler.step (+ the wait for SDZE's prefetched next batch)",
        "dims": [],
    }

    def write() -> None:
        path.write_text(json.dumps(result, indent=1) + "\n")

    def on_low(available: int) -> None:
        result["aborted"] = f"memory available fell to {available / 2**30:.2f} GiB"
        result["load_end"], result["loadavg_end"] = loads(), loadavg()
        write()
        print(result["aborted"], "- stopping", flush=True)
        os._exit(3)

    before = torch.get_num_threads()
    stop = start_watchdog(int(args.floor_gib * 2**30), on_low)
    try:
        for dim in args.dims:
            measure_dim(dim, args, result, write)
            ok = result["dims"][-1]
            if ok["status"] == "ok":
                print(json.dumps({k: ok[k] for k in (
                    "dim", "ratio_of_medians_wall", "ratio_of_medians_cpu")}
                    | {"pair_ratio_wall": ok["pair_ratio_wall"]}), flush=True)
    finally:
        stop.set()
        torch.set_num_threads(before)
        result["load_end"], result["loadavg_end"] = loads(), loadavg()
        write()
    print(f"wrote {path}")
    return result


def dim_text(dim: int) -> str:
    """``1e6`` for 1000000, the number itself where it is not a power of ten."""
    exponent = len(str(dim)) - 1
    return f"1e{exponent}" if dim == 10**exponent and dim >= 1000 else str(dim)


def markdown(paths: list[Path]) -> str:
    """One Markdown table of the results in ``paths`` (ratios: fused / SDZE)."""
    lines = ["| d | run (extra overrides) | method | threads | steps | median s/step wall "
             "(q1-q3) | median s/step CPU (q1-q3) | ratio of medians wall / CPU | "
             "median pair ratio wall (q1-q3; min-max) | median pair ratio CPU (q1-q3) | "
             "load start-end |",
             "|" + "---|" * 11]
    for path in paths:
        data = json.loads(path.read_text())
        extra = " ".join(data.get("extra_overrides") or [])
        extra = path.stem.removeprefix("fused_vs_sdze_interleaved_") + (f" ({extra})" if extra
                                                                        else "")
        for e in data["dims"]:
            if e["status"] != "ok":
                lines.append(f"| {dim_text(e['dim'])} | {extra} | {e['status']} |" + " |" * 8)
                continue
            pw, pc = e["pair_ratio_wall"], e["pair_ratio_cpu"]
            for name, m in e["methods"].items():
                w, c = m["wall_s"], m["cpu_s"]
                ratios = (f"**{e['ratio_of_medians_wall']:.2f}** / "
                          f"{e['ratio_of_medians_cpu']:.2f} | **{pw['median']:.2f}** "
                          f"({pw['q1']:.2f}-{pw['q3']:.2f}; {pw['min']:.2f}-{pw['max']:.2f}) | "
                          f"{pc['median']:.2f} ({pc['q1']:.2f}-{pc['q3']:.2f}) | "
                          f"{e['load_before']:.1f}-{e['load_after']:.1f}"
                          if name == "fused_adafactor" else " | | | ")
                lines.append(
                    f"| {dim_text(e['dim'])} | {extra} | {name} | {m['threads']} | "
                    f"{len(m['steps'])} | {w['median']:.3g} ({w['q1']:.3g}-{w['q3']:.3g}) | "
                    f"{c['median']:.3g} ({c['q1']:.3g}-{c['q3']:.3g}) | {ratios} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
