"""pytest setup of the regression suite: options, cases, the results file and its table.

Options (this directory's conftest is loaded when its path is on the command line):

* ``--regression-quick``: the CI smoke mode: :data:`suite.QUICK_DIMS`, fewer rounds;
  its items are not marked ``slow``, so the project's ``-m 'not slow'`` runs them;
* ``--regression-dims`` / ``--regression-methods``: a subset of the full suite.

The full suite's items are marked ``slow``: the project's default ``-m 'not slow'``
deselects them, and ``-m slow`` runs them. Every case is a module-scoped parameter, so
pytest runs ``test_time_step`` and ``test_peakmem_step`` of one case one after the other
on one built problem, then frees it.

The results file is pytest-benchmark's ``--benchmark-json`` (by default
``benchmarks/results/`` + :func:`suite.results_name`), to which
:func:`pytest_benchmark_update_json` adds the run's header (date, commit, machine, load
at start and end, threads, command) and one row per case.
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import suite  # noqa: E402
from _common import RESULTS, git_commit, machine  # noqa: E402

#: The run's state: its header's start values and the rows, by ``(method, dim)``.
STATE: dict = {"rows": {}, "written": None}


def pytest_addoption(parser: pytest.Parser) -> None:
    """The suite's options."""
    group = parser.getgroup("regression", "sdze-lightning regression suite")
    group.addoption("--regression-quick", action="store_true",
                    help=f"CI smoke: d in {suite.QUICK_DIMS}, fewer rounds, not marked slow")
    group.addoption("--regression-dims", type=int, nargs="+", metavar="D",
                    help=f"pde.dim values (default {suite.DIMS})")
    group.addoption("--regression-methods", nargs="+", choices=suite.METHODS, metavar="M",
                    help=f"methods (default {suite.METHODS})")


def mode(config: pytest.Config) -> str:
    """``quick``, ``subset`` (dims or methods chosen) or ``full``."""
    if config.getoption("regression_quick"):
        return "quick"
    if config.getoption("regression_dims") or config.getoption("regression_methods"):
        return "subset"
    return "full"


def cases(config: pytest.Config) -> list[tuple[str, int]]:
    """The ``(method, dim)`` cases of this run, d-major."""
    quick = config.getoption("regression_quick")
    dims = config.getoption("regression_dims") or (suite.QUICK_DIMS if quick else suite.DIMS)
    methods = config.getoption("regression_methods") or suite.METHODS
    return [(m, d) for d in dims for m in methods]


@pytest.hookimpl(tryfirst=True)  # before pytest-benchmark reads --benchmark-json
def pytest_configure(config: pytest.Config) -> None:
    """Record the start (time, load); default ``--benchmark-json`` to the results file."""
    STATE.update(start=time.perf_counter(), date=datetime.datetime.now().isoformat(
        timespec="seconds"), load_start=list(os.getloadavg()))
    if config.getoption("benchmark_json", None) is None and hasattr(config.option,
                                                                    "benchmark_json"):
        config.option.benchmark_json = RESULTS / suite.results_name(mode(config))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrise ``case`` over the run's cases (module scope; ``slow`` unless quick)."""
    if "case" not in metafunc.fixturenames:
        return
    config = metafunc.config
    marks = [] if config.getoption("regression_quick") else [pytest.mark.slow]
    params = [pytest.param(c, id=suite.case_id(*c), marks=marks) for c in cases(config)]
    metafunc.parametrize("case", params, indirect=True, scope="module")


@dataclass
class Case:
    """A case's results row and its built run (``None`` when refused or dropped)."""

    row: dict
    run: suite.Run | None

    def require(self) -> suite.Run:
        """The built run; skips the test with the row's status when there is none."""
        if self.run is None:
            pytest.skip(f"{self.row['status']}: {self.row['reason']}")
        return self.run


@pytest.fixture(scope="session")
def compiled_kernels(request: pytest.FixtureRequest) -> None:
    """Prepare the process before any case.

    Compiles the fused two-body kernel where a case needs it, then freezes the objects
    alive (:func:`suite.freeze_imports`).
    """
    from sdze_lightning.problems.twobody import FUSED_MIN_DIM

    if max(d for _, d in cases(request.config)) > FUSED_MIN_DIM:
        from _common import warm_fused_kernels

        warm_fused_kernels()
    suite.freeze_imports()


@pytest.fixture(scope="session")
def regression_mode(request: pytest.FixtureRequest) -> str:
    """The run's mode (sets the rounds per case)."""
    return "quick" if request.config.getoption("regression_quick") else "full"


@pytest.fixture(scope="module")
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
         compiled_kernels: None) -> Case:
    """One case, built, checked and warmed up; refused or dropped ones carry the reason."""
    method, dim = request.param
    row = {"method": method, "dim": dim, "overrides": suite.overrides(method, dim),
           "command": suite.command(method, dim)}
    STATE["rows"][(method, dim)] = row
    if (method, dim) in suite.DROPPED:
        row.update(status="dropped", reason=suite.DROPPED[(method, dim)])
        yield Case(row, None)
        return
    try:
        run = suite.build(method, dim, tmp_path_factory.mktemp(suite.case_id(method, dim)))
    except suite.Refused as err:
        row.update(status="refused", reason=str(err))
        yield Case(row, None)
        return
    row.update(status="built", reason="")
    try:
        yield Case(row, run)
    finally:
        row.update(suite.row(run), load=os.getloadavg()[0])
        if row["time_ratio"] is not None and row["memory_ratio"] is not None:
            row["status"] = "ok"
        suite.release(run)


def header(config: pytest.Config) -> dict:
    """The results file's header: what ran where, when, under which load and threads."""
    import torch

    args = [str(a) for a in config.invocation_params.args]
    return {
        "date": STATE["date"],
        "commit": git_commit(),
        "machine": machine(),
        "load_start": STATE["load_start"],
        "load_end": list(os.getloadavg()),
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "command": shlex.join(["python", "-m", "pytest", *args]),
        "wall_s": round(time.perf_counter() - STATE["start"], 1),
        "mode": mode(config),
        "tool": suite.TOOL,
        "pde": suite.PDE,
        "estimator": suite.ESTIMATOR,
        "reference": "one forward pass net(x) without gradients of the same network over a "
                     "fixed batch of the same problem, timed in a block before every step",
        "memory": "peak RSS of a steady-state step above the RSS before the case was built, "
                  "over parameter + batch bytes",
    }


def rows() -> list[dict]:
    """The rows, d-major in the order the cases ran."""
    return list(STATE["rows"].values())


def pytest_benchmark_update_json(config: pytest.Config, benchmarks: list,
                                 output_json: dict) -> None:
    """Add the header and the rows to pytest-benchmark's JSON."""
    output_json.update(header(config), rows=rows())
    STATE["written"] = output_json


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Write the file where pytest-benchmark did not (no case reached a benchmark)."""
    path = session.config.getoption("benchmark_json", None)
    if STATE["written"] is None and STATE["rows"] and path is not None:
        STATE["written"] = {**header(session.config), "rows": rows(), "benchmarks": []}
        Path(path).write_text(json.dumps(STATE["written"], indent=4))


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """Print the table (time ratio / memory ratio per method and d) and the file."""
    result = STATE["written"]
    if result is None:
        if not STATE["rows"] and terminalreporter.stats.get("deselected"):
            terminalreporter.write_line(
                "regression suite: the full suite is marked slow; run it with -m slow "
                "(or --regression-quick for the smoke mode)")
        return
    terminalreporter.section("regression suite: time ratio / memory ratio")
    terminalreporter.write_line(suite.markdown(result))
    terminalreporter.write_line(
        f"{result['wall_s']:.0f} s, load {result['load_start'][0]:.2f} -> "
        f"{result['load_end'][0]:.2f}; results: {config.getoption('benchmark_json')}")
