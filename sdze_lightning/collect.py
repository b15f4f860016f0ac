"""``sdze-collect DIR``: every run below a directory in one table.

A run directory is one holding ``summary.json`` or ``.hydra/config.yaml`` (what
``sdze-train`` writes; a multirun sweep holds one per job). Each run becomes a row: its
path relative to ``DIR``, its config-group choices (``.hydra/choices.yaml``), seed
(``.hydra/config.yaml``), the command's overrides (``.hydra/overrides.yaml``, quoted as
a shell would need them), and its ``summary.json`` figures. A field a run did not
record is an empty cell; a run without ``summary.json`` (killed) has status
``unknown``. Examples::

    sdze-collect multirun/2026-01-01/12-00-00
    sdze-collect outputs --sort wall_time_s --descending --plot outputs/runs.png
    python -m sdze_lightning.collect multirun --csv table.csv

The table is written as CSV (``DIR/runs.csv``) and Markdown (``DIR/runs.md``, also
printed), sorted by ``--sort`` (default ``rel_l2``, ascending; runs without the value
last). ``--plot PATH`` draws ``val/rel_l2`` against ``time/wall_s`` (logged by
:class:`~sdze_lightning.callbacks.ElapsedTime`) from each run's ``csv/metrics.csv``.
No file a run wrote is ever overwritten. An unknown ``--sort`` column or a directory
without runs prints one line, ``Error: ...``, and exits with status 2.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: Config groups whose choice identifies a run.
CHOICES: tuple[str, ...] = ("pde", "method", "estimator", "experiment")
#: ``summary.json`` fields copied into the table.
SUMMARY_FIELDS: tuple[str, ...] = (
    "rel_l2", "loss", "steps", "wall_time_s", "peak_memory_bytes", "params", "threads", "status",
)
#: The table's columns, in order.
COLUMNS: tuple[str, ...] = (
    "run", *CHOICES, "seed", "overrides", *SUMMARY_FIELDS[:5], "peak_memory_gib",
    *SUMMARY_FIELDS[5:], "segments",
)
#: Names of the files this command writes; an existing file of another name inside a run
#: directory is never overwritten.
OWN_FILES: tuple[str, ...] = ("runs.csv", "runs.md", "runs.png")
#: Where a run's CSV logger writes its metrics.
METRICS_CSV = Path("csv") / "metrics.csv"
#: Logged metrics plotted by ``--plot`` (x, y).
TIME_METRIC, ERROR_METRIC = "time/wall_s", "val/rel_l2"
#: Exit status of bad input.
BAD_INPUT_EXIT = 2


def find_runs(root: str | Path) -> list[Path]:
    """Every run directory at or below ``root`` (holding ``summary.json`` or a Hydra config)."""
    root = Path(root)
    found = {p.parent for p in root.rglob("summary.json")}
    found |= {p.parent.parent for p in root.rglob(".hydra/config.yaml")}
    return sorted(found)


def _read(path: Path, parse: Any) -> Any:
    """``path`` parsed, ``None`` where it is missing or unreadable (a run killed mid-write)."""
    try:
        return parse(path.read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None


def run_row(run_dir: str | Path, root: str | Path) -> dict[str, Any]:
    """One run as a row of :data:`COLUMNS` (``None`` where the run recorded nothing).

    Args:
        run_dir: The run directory.
        root: The directory the table collects (the row names the run relative to it).

    Returns:
        The row.

    """
    run_dir = Path(run_dir)
    hydra = run_dir / ".hydra"
    choices = _read(hydra / "choices.yaml", yaml.safe_load) or {}
    config = _read(hydra / "config.yaml", yaml.safe_load) or {}
    overrides = _read(hydra / "overrides.yaml", yaml.safe_load)
    summary = _read(run_dir / "summary.json", json.loads) or {}
    row: dict[str, Any] = {
        "run": run_dir.relative_to(root).as_posix(),
        **{group: choices.get(group) for group in CHOICES},
        "seed": config.get("seed"),
        "overrides": None if overrides is None else shlex.join(overrides),
        **{field: summary.get(field) for field in SUMMARY_FIELDS},
        "segments": len(summary["segments"]) if summary.get("segments") else None,
    }
    peak = row["peak_memory_bytes"]
    row["peak_memory_gib"] = None if peak is None else round(peak / 2**30, 3)
    row["status"] = row["status"] or "unknown"
    return row


def _missing(value: Any) -> bool:
    return value is None or value == "" or (isinstance(value, float) and math.isnan(value))


def sort_rows(
    rows: Sequence[dict[str, Any]], column: str = "rel_l2", descending: bool = False
) -> list[dict[str, Any]]:
    """``rows`` sorted by ``column``; rows without a value come last, in their order."""
    present = [r for r in rows if not _missing(r[column])]
    missing = [r for r in rows if _missing(r[column])]
    return sorted(present, key=lambda r: r[column], reverse=descending) + missing


def write_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Write ``rows`` as CSV with a header of :data:`COLUMNS` (empty cells for ``None``)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return " ".join(str(value).split()).replace("|", "\\|")


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """``rows`` as a Markdown table of :data:`COLUMNS` (floats to 4 significant digits)."""
    lines = [
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
        *("| " + " | ".join(_cell(row[c]) for c in COLUMNS) + " |" for row in rows),
    ]
    return "\n".join(lines) + "\n"


def curve(run_dir: str | Path) -> list[tuple[float, float]]:
    """``(time/wall_s, val/rel_l2)`` of each validation in the run's ``csv/metrics.csv``.

    The CSV logger writes sparse rows; values logged at the same step are merged.
    Empty where the file or either metric is missing.
    """
    path = Path(run_dir) / METRICS_CSV
    if not path.is_file():
        return []
    by_step: dict[str, dict[str, str]] = {}
    with open(path, newline="") as f:
        for record in csv.DictReader(f):
            merged = by_step.setdefault(record.get("step", ""), {})
            merged.update({k: v for k, v in record.items() if v not in (None, "")})
    points = [
        (float(m[TIME_METRIC]), float(m[ERROR_METRIC]))
        for m in by_step.values()
        if TIME_METRIC in m and ERROR_METRIC in m
    ]
    return sorted(points)


def labels(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Each row's choices, seed and overrides that not every row shares (else its path)."""
    settings = [
        {f"{key}={row[key]}" for key in (*CHOICES, "seed") if row[key] is not None}
        | set(shlex.split(row["overrides"] or ""))
        for row in rows
    ]
    shared = set.intersection(*settings) if settings else set()
    return [
        " ".join(sorted(s - shared)) or row["run"] for row, s in zip(rows, settings, strict=True)
    ]


def plot(rows: Sequence[dict[str, Any]], root: str | Path, path: str | Path) -> Figure:
    """Draw each run's validation error against wall time into ``path`` (PNG, PDF, ...).

    One line per run, labelled by what tells it from the other plotted runs
    (:func:`labels`); runs without both metrics are left out with a note on stderr.

    Returns:
        The figure (its axes hold one line per plotted run).

    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    curves = {}
    for row in rows:
        curves[row["run"]] = curve(Path(root) / row["run"])
        if not curves[row["run"]]:
            print(f"Note: {row['run']} has no {ERROR_METRIC} with {TIME_METRIC} in "
                  f"{METRICS_CSV.as_posix()}: not plotted.", file=sys.stderr)
    plotted = [row for row in rows if curves[row["run"]]]
    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for row, label in zip(plotted, labels(plotted), strict=True):
        seconds, errors = zip(*curves[row["run"]], strict=True)
        ax.plot(seconds, errors, marker=".", label=label)
    ax.set(xlabel="wall time (s)", ylabel="validation relative L2 error", yscale="log")
    if ax.lines:
        ax.legend(fontsize="small")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig


def _check_output(path: Path, runs: Sequence[Path]) -> None:
    """Refuse to overwrite a file a run wrote (an existing file inside a run directory)."""
    inside = any(path.resolve().is_relative_to(run.resolve()) for run in runs)
    if inside and path.exists() and path.name not in OWN_FILES:
        raise ValueError(f"{path} belongs to a run and is not overwritten; choose another path.")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdze-collect", description="Collect every run below DIR into one table."
    )
    parser.add_argument("dir", metavar="DIR", type=Path, help="directory holding the runs")
    parser.add_argument("--sort", default="rel_l2", metavar="METRIC",
                        help=f"column to sort by (default rel_l2); one of: {', '.join(COLUMNS)}")
    parser.add_argument("--descending", action="store_true", help="largest value first")
    parser.add_argument("--csv", type=Path, metavar="PATH", help="CSV file (default DIR/runs.csv)")
    parser.add_argument("--markdown", type=Path, metavar="PATH",
                        help="Markdown file (default DIR/runs.md)")
    parser.add_argument("--plot", type=Path, metavar="PATH",
                        help="plot val/rel_l2 against time/wall_s of every run into PATH")
    return parser


def console(argv: Sequence[str] | None = None) -> int:
    """Run ``sdze-collect`` with ``argv`` (default: the command line); return the exit status."""
    args = _parser().parse_args(argv)
    root: Path = args.dir
    try:
        if args.sort not in COLUMNS:
            raise ValueError(f"--sort {args.sort} is not a column; choose one of: "
                             f"{', '.join(COLUMNS)}.")
        runs = find_runs(root)
        if not runs:
            raise ValueError(f"no runs below {root} (no summary.json or .hydra/config.yaml).")
        outputs = [args.csv or root / "runs.csv", args.markdown or root / "runs.md"]
        for path in [*outputs, *([args.plot] if args.plot else [])]:
            _check_output(path, runs)
    except ValueError as err:
        print(f"Error: {err}", file=sys.stderr)
        return BAD_INPUT_EXIT
    rows = sort_rows([run_row(run, root) for run in runs], args.sort, args.descending)
    table = markdown_table(rows)
    for path in outputs:
        path.parent.mkdir(parents=True, exist_ok=True)
    write_csv(rows, outputs[0])
    outputs[1].write_text(table)
    if args.plot:
        fig = plot(rows, root, args.plot)
        print(f"Plotted {len(fig.axes[0].lines)} of {len(rows)} runs: {args.plot}",
              file=sys.stderr)
    print(table, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(console())
