"""Shared helpers of the performance benchmarks.

One place for the benchmark configuration (two-body Allen-Cahn on the unit
ball, MLP 4x128 tanh, 100 points, 16 directions), the method/estimator pairs,
one training step through the library's own entry point
(:meth:`~sdze_lightning.PINNProblem.run_step`, the one ``training_step`` calls),
and memory probes. Every script imports this module; it imports none of them.
"""

from __future__ import annotations

import csv
import ctypes
import gc
import os
import re
import resource
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

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
    "MACHINE", "METHODS", "RESULTS", "SMOKE", "BenchConfig", "build", "forward_pass",
    "limit_memory", "peak", "reset_peak", "rss", "train_step", "peak_rss_total",
    "add_prefetch_flag", "git_commit", "machine", "median_time", "sync", "write_csv",
]


@dataclass
class BenchConfig:
    """Shared setup: network, batch, estimator directions and SDZE settings.

    Attributes:
        points: Collocation points per step.
        directions: Directions (or samples) of the spatial estimator.
        width: Hidden width of the MLP.
        depth: Hidden layers of the MLP.
        rank: SDZE subspace rank.
        period: SDZE window length.
        lr: Learning rate of SDZE and Adam.
        mezo_lr: Learning rate of MeZO (plain SGD on a loss of order 1e7 at
            initialisation: larger values diverge within a few steps).
        threads: ``torch.set_num_threads``.
        seed: Seed of the problem, the network and the method.
        prefetch: Build the next batch (and its source) on a background thread
            (``PINNProblem(prefetch=True)``).
        device: Where the problem, network and optimizer live (``"cpu"``, ``"cuda"``).

    """

    points: int = 100
    directions: int = 16
    width: int = 128
    depth: int = 4
    rank: int = 4
    period: int = 100
    lr: float = 1e-3
    mezo_lr: float = 1e-9
    threads: int = 1
    seed: int = 0
    prefetch: bool = False
    device: str = "cpu"

    def dict(self) -> dict:
        """Plain dict (JSON)."""
        return asdict(self)


#: The tiny setup of every script's ``--smoke`` mode (the numbers mean nothing).
SMOKE = BenchConfig(points=8, directions=4, width=16, depth=2, threads=1)


def make_estimator(name: str, k: int):
    """Spatial estimator ``name`` with ``k`` directions.

    ``taylor`` uses coordinate directions (the first-layer column lookup),
    ``hte`` Rademacher vectors, ``stein`` ``k`` antithetic Gaussian samples
    (sigma 0.1), ``sdgd`` ``k`` coordinates, ``exact`` every coordinate.
    """
    from sdze_lightning.estimators import build_estimator

    if name == "taylor":
        return build_estimator("taylor", num_directions=k, distribution="coordinate")
    if name == "fd":
        return build_estimator("fd", num_directions=k, distribution="coordinate")
    if name == "hte":
        return build_estimator("hte", num_directions=k, distribution="rademacher")
    if name == "stein":
        return build_estimator("stein", num_directions=k, sigma=0.1, variant="antithetic")
    if name == "sdgd":
        return build_estimator("sdgd", num_directions=k)
    if name == "exact":
        return build_estimator("exact")
    raise ValueError(f"unknown estimator {name!r}")


def make_optimizer(opt_name: str, net: torch.nn.Module, cfg: BenchConfig):
    """SDZE, MeZO or Adam on ``net``."""
    from sdze_lightning.methods import SDZE, MeZO

    if opt_name == "sdze":
        return SDZE(net, lr=cfg.lr, rank=cfg.rank, period=cfg.period, seed=cfg.seed)
    if opt_name == "mezo":
        return MeZO(net, lr=cfg.mezo_lr, normalize=False, seed=cfg.seed)
    if opt_name == "adam":
        return torch.optim.Adam(net.parameters(), lr=cfg.lr)
    raise ValueError(f"unknown optimizer {opt_name!r}")


def build(method: str, dim: int, cfg: BenchConfig, n_eval: int = 0):
    """Two-body Allen-Cahn problem and optimizer of ``method`` (a key of :data:`METHODS`)."""
    from sdze_lightning.nn import MLP
    from sdze_lightning.problems import TwoBody

    opt_name, est_name = METHODS[method]
    net = MLP(dim, width=cfg.width, depth=cfg.depth, seed=cfg.seed)
    problem = TwoBody(dim=dim, operator="allen_cahn", net=net,
                      estimator=make_estimator(est_name, cfg.directions),
                      n_interior=cfg.points, n_eval=n_eval, seed=cfg.seed,
                      prefetch=cfg.prefetch)
    problem.to(cfg.device)  # the network too (a submodule), before the optimizer sees it
    return problem, make_optimizer(opt_name, net, cfg)


def add_prefetch_flag(parser) -> None:
    """``--prefetch``: problems built with ``prefetch=True`` (:attr:`BenchConfig.prefetch`)."""
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
