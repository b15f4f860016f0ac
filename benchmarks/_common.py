"""Shared helpers of the performance benchmarks.

One place for how a benchmark builds a run (:func:`build_run`: the packaged configs
composed with Hydra overrides, as ``sdze-train <overrides>`` builds it), the
method/estimator pairs, one training step through the library's own entry point
(:meth:`~sdze_lightning.PINNProblem.run_step`, the one ``training_step`` calls), what a
results file records about its run (:func:`provenance`), and memory probes. Every script
imports this module; it imports none of them.
"""

from __future__ import annotations

import csv
import ctypes
import datetime
import gc
import os
import re
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from sdze_lightning.stepping import step_scheduler

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def _status(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", text).group(1)) * 1024


def rss() -> int:
    """Current resident set size in bytes."""
    return _status("VmRSS")


def peak() -> int:
    """Peak resident set size since the last :func:`reset_peak`, in bytes."""
    return _status("VmHWM")


def reset_peak() -> None:
    """Return freed heap memory to the OS, then reset the peak-RSS counter to the current RSS.

    Without ``malloc_trim`` glibc keeps freed blocks below its (dynamic) mmap
    threshold in the heap, and memory freed by an earlier phase would be
    counted as resident in the next one.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass
    Path("/proc/self/clear_refs").write_text("5")


def train_step(problem, opt, k: int) -> float:
    """Training step ``k`` through ``problem.run_step`` (what ``training_step`` runs).

    Returns the loss; a non-finite step (MeZO diverging at a large learning rate) is
    skipped by the library (its evaluations ran, its update was not applied, its time
    and memory still count) and returns NaN.
    """
    return float(problem.run_step(opt, k, skip_nonfinite=True).loss)


def _cpu_name() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``"CPU"`` where it is not readable)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU"


def machine(device: str = "cpu") -> str:
    """This machine in words: cores, CPU model and RAM (or the GPU) and the torch version."""
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        return f"{props.name}, {props.total_memory / 2**30:.0f} GiB, torch {torch.__version__}"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()}-core {_cpu_name()}, {ram:.0f} GiB RAM, torch {torch.__version__}"


MACHINE = machine()

#: Method names of the scaling study: optimizer + spatial estimator.
METHODS: dict[str, tuple[str, str]] = {
    "sdze": ("sdze", "taylor"),
    "mezo": ("mezo", "taylor"),
    "adam+hte": ("adam", "hte"),
    "adam+sdgd": ("adam", "sdgd"),
    "adam+taylor": ("adam", "taylor"),
    "adam+stein": ("adam", "stein"),
    "adam+exact": ("adam", "exact"),
}

__all__ = [
    "MACHINE", "METHODS", "PDES", "RESULTS", "SMOKE_OVERRIDES", "Run", "build_run",
    "finish_provenance", "forward_pass", "method_overrides", "provenance", "run_overrides",
    "limit_memory", "peak", "reset_peak", "rss", "train_step", "peak_rss_total",
    "add_prefetch_flag", "git_commit", "machine", "median_time", "sync", "write_csv",
]


#: The tiny setup of every script's ``--smoke`` mode (the numbers mean nothing).
SMOKE_OVERRIDES: list[str] = [
    "pde.n_interior=8", "estimator.num_directions=4", "model.width=16", "model.depth=2",
    "threads=1",
]

#: ``pde=`` of the problems the studies run.
PDES: dict[str, str] = {"twobody": "allen_cahn_twobody", "cube": "allen_cahn_cube"}


def method_overrides(method: str) -> list[str]:
    """``method=<m> estimator=<e>`` of ``method``, a key of :data:`METHODS`."""
    opt_name, est_name = METHODS[method]
    return [f"method={opt_name}", f"estimator={est_name}"]


def run_overrides(method: str, dim: int, *extra: str, pde: str = "twobody") -> list[str]:
    """The ``sdze-train`` overrides of ``method`` on ``pde`` at dimension ``dim``.

    Args:
        method: A key of :data:`METHODS`.
        dim: Spatial dimension.
        *extra: Further overrides (applied last, so they win).
        pde: A key of :data:`PDES`.

    """
    return [f"pde={PDES[pde]}", f"pde.dim={dim}", *method_overrides(method), *extra]


@dataclass
class Run:
    """A problem and its optimizer built from the packaged configs.

    Attributes:
        overrides: The Hydra overrides it was composed with.
        problem: The problem, as ``sdze-train <overrides>`` builds it.
        optimizer: ``problem.configure_optimizers()``'s optimizer.
        scheduler: Its scheduler, or ``None``.
        threads: The run's torch thread count (``threads=`` resolved at build time, as
            ``on_fit_start`` resolves it; set by :func:`build_run`).

    """

    overrides: list[str]
    problem: object
    optimizer: torch.optim.Optimizer
    scheduler: object | None
    threads: int

    @property
    def command(self) -> str:
        """The ``sdze-train`` command line of these overrides."""
        return shlex.join(["sdze-train", *self.overrides])

    def fit_output(self) -> None:
        """``on_fit_start``'s output fit (``output_fit=``), as ``Trainer.fit`` runs it."""
        self.problem.output_fit.apply(self.problem)

    def step(self, k: int, *, skip_nonfinite: bool = True) -> float:
        """Training step ``k`` (and the scheduler's step); returns its loss."""
        loss = float(self.problem.run_step(self.optimizer, k, skip_nonfinite=skip_nonfinite).loss)
        step_scheduler(self.scheduler, loss)
        return loss


def build_run(overrides: list[str], *, device: str = "cpu") -> Run:
    """Compose the packaged config with ``overrides`` and build its problem and optimizer.

    The same construction as ``sdze-train`` (:func:`sdze_lightning.builders.compose_config`,
    :func:`~sdze_lightning.builders.build_problem`, ``configure_optimizers``), so a row
    measured on this run is reproducible with ``sdze-train`` and the same overrides.

    Args:
        overrides: Hydra overrides, e.g. :func:`run_overrides`'s.
        device: Where the problem and network live, before the optimizer sees them.

    """
    from sdze_lightning.builders import build_problem, compose_config

    with tempfile.TemporaryDirectory() as run_dir:  # no run directory is written
        cfg = compose_config(list(overrides), run_dir)
    problem = build_problem(cfg)
    problem.to(device)
    threads = problem.prepare_fit(on_cpu=device == "cpu")  # on_fit_start's, before any step
    configured = problem.configure_optimizers()
    if isinstance(configured, dict):
        optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    else:
        optimizer, scheduler = configured, None
    return Run(list(overrides), problem, optimizer, scheduler, threads)


def provenance(argv: list[str] | None = None) -> dict:
    """What a results file records about its run, at the start: date, commit, machine,
    load, threads and the command line (``argv``, else this process's ``sys.argv``).

    Call :func:`finish_provenance` on the same dict when the run ends.
    """
    words = [sys.executable, *sys.argv] if argv is None else ["python", *argv]
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "commit": git_commit(), "machine": machine(),
        "load_start": round(load_average(), 2),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "torch_threads_at_start": torch.get_num_threads(),
        "command": shlex.join(words),
    }


def finish_provenance(record: dict) -> dict:
    """Add the load at the end of the run to ``record``; returns it."""
    record["load_end"] = round(load_average(), 2)
    return record


def add_prefetch_flag(parser) -> None:
    """``--prefetch``: runs built with ``prefetch=true``."""
    parser.add_argument("--prefetch", action="store_true",
                        help="sample the next batch on a background thread (its source split "
                             "between the two threads): PINNProblem(prefetch=True)")


def warm_fused_kernels(device: str = "cpu") -> None:
    """Compile the fused two-body source now (the problems' default ``fused_kernels=True``).

    Long rows (``d > FUSED_MIN_DIM``) go through ``torch.compile``; compiling
    costs seconds and hundreds of MiB once per process (and device), which must
    not land in a measured step.
    """
    from sdze_lightning.problems.twobody import FUSED_MIN_DIM, two_body_terms

    x = torch.rand(2, FUSED_MIN_DIM + 2, device=device)
    for rows in (2, 1):
        two_body_terms(x[:rows], torch.ones(FUSED_MIN_DIM + 1, device=device))
    sync(device)


def sync(device: str) -> None:
    """Wait for the device's queued kernels (CUDA runs asynchronously); no-op on the CPU."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def forward_pass(problem, step: int = 0) -> tuple[float, float]:
    """Seconds of sampling the batch and of one plain forward pass ``u(x)`` on it (no grad)."""
    device = str(problem.device)
    sync(device)
    t0 = time.perf_counter()
    x = problem.sample_points(step, 0)
    sync(device)
    t1 = time.perf_counter()
    with torch.no_grad():
        problem.net(x)
    sync(device)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def peak_rss_total() -> int:
    """Peak resident set size of this process since start (``ru_maxrss``), bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def limit_memory(nbytes: int) -> None:
    """Cap this process's address space (``RLIMIT_AS``); allocations past it raise."""
    resource.setrlimit(resource.RLIMIT_AS, (nbytes, nbytes))


def git_commit() -> str:
    """The checkout's ``HEAD``, ``+dirty`` with changes to tracked files (``"unknown"``
    outside git): the commit a results file's figures come from."""
    root = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=root).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True, cwd=root).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty.strip() else "")


def load_average() -> float:
    """One-minute load average (context for the noisy timings)."""
    return os.getloadavg()[0]


def median_time(fn: Callable[[], object], repeats: int,
                clock: Callable[[], float] = time.perf_counter) -> float:
    """Median of ``repeats`` timings of ``fn()`` on ``clock`` (wall time by default)."""
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return statistics.median(times)


def write_csv(path: Path, rows: list[dict], fields: list[str] | None = None) -> None:
    """Write ``rows`` as a CSV file.

    Args:
        path: The file to write.
        rows: One dict per row.
        fields: The columns, in order (keys outside them are left out, missing ones left
            empty); default: the first row's keys.

    """
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields or list(rows[0]), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def merge_overrides(*groups: list[str] | tuple[str, ...]) -> list[str]:
    """The overrides of ``groups`` in order, one per key (the text before ``=``).

    A later override of a key already given replaces the earlier one in its place, so a
    smoke mode's tiny sizes or a flag's value win without the key appearing twice in the
    recorded command.
    """
    merged: dict[str, str] = {}
    for group in groups:
        for override in group:
            merged[override.split("=", 1)[0]] = override
    return list(merged.values())


def fit_run(run: Run, trainer) -> None:
    """``trainer.fit(run.problem)`` with the run's own optimizer and scheduler.

    Lightning asks the problem's ``configure_optimizers`` for them; here it gets those
    :func:`build_run` built (and any scheduler set on ``run`` since), not a second pair.
    The scheduler steps every training step, as the problem's own configuration has it.
    """
    configured = run.optimizer if run.scheduler is None else {
        "optimizer": run.optimizer,
        "lr_scheduler": {"scheduler": run.scheduler, "interval": "step"},
    }
    run.problem.configure_optimizers = lambda: configured
    try:
        trainer.fit(run.problem)
    finally:
        del run.problem.configure_optimizers


def script_provenance(script: str, argv: list[str] | None) -> dict:
    """:func:`provenance` of ``benchmarks/<script>`` run with ``argv`` (a script's
    ``main(argv)``), or of this process's command line where ``argv`` is ``None``."""
    return provenance(None if argv is None else [f"benchmarks/{Path(script).name}", *argv])


def compose_overrides(overrides: list[str]):
    """The packaged config composed with ``overrides``, as :func:`build_run` composes it.

    No run directory is written. For a study that instantiates a group itself
    (``hydra.utils.instantiate(cfg.estimator)``, ``cfg.method``) beside a built run.
    """
    from sdze_lightning.builders import compose_config

    with tempfile.TemporaryDirectory() as run_dir:
        return compose_config(list(overrides), run_dir)


#: ``trainer.precision=`` of a true-precision run and the dtype Lightning trains it in.
PRECISION_DTYPES: dict[str, torch.dtype] = {"32-true": torch.float32, "64-true": torch.float64}


def precision_dtype(overrides: list[str]) -> torch.dtype:
    """The parameter dtype of the last ``trainer.precision=`` in ``overrides`` (float32
    without one, the packaged ``32-true``); raises ``ValueError`` for a mixed precision."""
    value = "32-true"
    for override in overrides:
        if override.startswith("trainer.precision="):
            value = override.split("=", 1)[1]
    if value not in PRECISION_DTYPES:
        raise ValueError(f"trainer.precision={value}: not one of {list(PRECISION_DTYPES)}")
    return PRECISION_DTYPES[value]


def cast_run(run: Run) -> torch.dtype:
    """Cast ``run``'s problem (network and buffers) to its ``trainer.precision=`` dtype, as
    Lightning's precision plugin casts the module before training; returns the dtype.

    The optimizer keeps working: its parameters are cast in place, and the methods'
    state is created (SDZE's subspaces redrawn) in the parameters' dtype.
    """
    dtype = precision_dtype(run.overrides)
    run.problem.to(dtype)
    return dtype


#: ``estimator=`` configs without ``num_directions`` (they differentiate every coordinate).
ESTIMATORS_WITHOUT_DIRECTIONS: tuple[str, ...] = ("exact",)


def overrides_for_method(method: str, overrides: list[str] | tuple[str, ...]) -> list[str]:
    """``overrides`` less the ``estimator.num_directions=`` that ``method``'s estimator has
    no key for (``adam+exact``; Hydra refuses the key), e.g. of :data:`SMOKE_OVERRIDES`.

    Args:
        method: A key of :data:`METHODS`.
        overrides: Overrides shared by the runs of several methods.

    """
    if METHODS[method][1] not in ESTIMATORS_WITHOUT_DIRECTIONS:
        return list(overrides)
    return [o for o in overrides if not o.startswith("estimator.num_directions=")]
