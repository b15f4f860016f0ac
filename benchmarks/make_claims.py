"""Write the claims table and the sweep tables of ``benchmarks/README.md`` from the results.

The registry ``benchmarks/claims.yaml`` lists every claim: its text, its figures, and for
each figure the results file and an expression that finds it there, the format it is
written in and the value as stated. This script evaluates every figure on its file,
formats it, and writes the table between ``<!-- claims:begin -->`` and
``<!-- claims:end -->``; the date, machine and load of a row come from the files'
metadata (the registry gives them, marked, where a file does not record them). The
registry's ``tables`` are written the same way, each between
``<!-- table:<name>:begin -->`` and ``<!-- table:<name>:end -->``::

    python benchmarks/make_claims.py           # rewrite the generated blocks of README.md
    python benchmarks/make_claims.py --check   # exit 1 if README.md differs from them, or
                                               # a figure is not its stated value
    python benchmarks/make_claims.py --list    # every figure: file, value, stated value

Expressions are Python expressions over the loaded file (``J``; ``F[name]`` where a
figure names several files) and the functions of ``NAMESPACE``: ``where(rows, k=v)``,
``one(rows, k=v)``, ``col(rows, key)``, ``rows(J)`` (a file's rows: the list itself, or its
``"rows"``), ``mean``, ``median``, ``span`` (the pair
``(min, max)``), ``GiB``, ``MiB``. A CSV file loads as a list of rows (dicts, numbers
converted).
"""

from __future__ import annotations

import argparse
import csv
import difflib
import json
import math
import re
import statistics
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
REGISTRY = HERE / "claims.yaml"
README = HERE / "README.md"
CLAIMS_BEGIN, CLAIMS_END = "<!-- claims:begin -->", "<!-- claims:end -->"
#: Keys under which the scripts record the load average (1 minute).
LOAD_KEYS = {"load", "load_start", "load_end", "load_before", "load_after",
             "load_avg_before", "load_at_start", "load_at_end"}
#: Parts of a claim in which ``{name}`` stands for a figure.
TEMPLATED = ("claim", "value", "target", "met")
#: Mark of a date, machine or load that the registry states and the file does not record.
NOT_IN_FILE = "*"


# --------------------------------------------------------------------------- loading

def load_result(path: Path) -> Any:
    """A results file: JSON as parsed; CSV as a list of dicts with numbers converted."""
    if path.suffix == ".csv":
        with path.open(newline="") as f:
            return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]
    return json.loads(path.read_text())


def _number(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def load_registry(path: Path = REGISTRY) -> dict:
    """The registry, with ``claims`` and ``tables`` lists (empty when absent)."""
    registry = yaml.safe_load(path.read_text()) or {}
    registry.setdefault("claims", [])
    registry.setdefault("tables", [])
    registry.setdefault("quoted", {})
    return registry


# ------------------------------------------------------------------------ expressions

def _matches(row: dict, filters: dict) -> bool:
    for key, want in filters.items():
        have = row.get(key) if isinstance(row, dict) else None
        if have != want and str(have) != str(want):
            return False
    return True


def where(rows: list, **filters: Any) -> list:
    """The rows whose fields equal ``filters`` (compared as values, then as strings)."""
    return [r for r in rows if _matches(r, filters)]


def one(rows: list, **filters: Any) -> dict:
    """The one row that matches ``filters``; an error when none or several do."""
    found = where(rows, **filters)
    if len(found) != 1:
        raise LookupError(f"{len(found)} rows match {filters}, expected one")
    return found[0]


def col(rows: list, key: str) -> list:
    """The values of ``key`` over ``rows`` (an error when a row lacks it)."""
    return [r[key] for r in rows]


def span(values: Any) -> tuple:
    """``(min, max)`` of ``values``: written ``a-b``, or ``a`` when both format alike."""
    values = list(values)
    if not values:
        raise ValueError("span of no values")
    return (min(values), max(values))


def mean(values: Any) -> float:
    values = list(values)
    if not values:
        raise ValueError("mean of no values")
    return statistics.fmean(values)


def median(values: Any) -> float:
    return statistics.median(list(values))


def rel_l2_loss(row: dict) -> str:
    """A ``method_accuracy.py`` row as ``rel. L2 / final loss`` (medians over its seeds),
    or the step at which it stopped on a non-finite loss."""
    if row.get("rel_l2_median") is None:
        found = re.search(r"at step (\d+)", str(row.get("status_all")))
        return f"non-finite loss at step {found.group(1)}" if found else "failed"
    loss = median(row["final_loss_all"])
    loss_text = (fmt_number(loss, "e1") if not 1e-3 <= abs(loss) < 1e4
                 else format(loss, ".2g"))
    return f"{row['rel_l2_median']:#.3g} / {loss_text}"


def lowest(run: dict) -> float:
    """The lowest error on a ``time_to_accuracy.py`` run's curve (``[step, s, error]``)."""
    return min(point[2] for point in run["curve"])


def rows(data: Any) -> list:
    """A results file's rows: the file itself when it is a list, else its ``"rows"``."""
    return data if isinstance(data, list) else data["rows"]


NAMESPACE = {
    "rel_l2_loss": rel_l2_loss, "lowest": lowest, "rows": rows,
    "where": where, "one": one, "col": col, "span": span, "mean": mean, "median": median,
    "min": min, "max": max, "len": len, "sum": sum, "abs": abs, "all": all, "any": any,
    "round": round, "sorted": sorted, "set": set, "list": list, "zip": zip, "str": str,
    "int": int, "float": float,
    "GiB": lambda b: b / 2**30, "MiB": lambda b: b / 2**20, "GB": lambda b: b / 1e9,
    "MB": lambda b: b / 1e6,
}


def evaluate(expr: str, data: dict, quoted: dict) -> Any:
    """Value of ``expr`` with ``J`` (the figure's file), ``F`` (its named files) and ``Q``
    (the registry's quoted constants) bound."""
    scope = dict(NAMESPACE, **data, Q=quoted, __builtins__={})
    return eval(expr, scope)  # noqa: S307 - the repository's own registry


# ------------------------------------------------------------------------- formatting

def fmt_number(value: Any, spec: str) -> str:
    """``value`` written as ``spec`` says.

    ``eN``: mantissa with N decimals and a short exponent (``e1``: ``1.6e-2``);
    ``sigN``: N significant digits, no exponent (``sig2``: 422.9 -> ``420``);
    ``int,``: an integer with thousands separators; ``text``: ``str(value)``;
    ``yesno``: ``yes`` / ``no``; anything else is a Python format spec (``.2f``, ``.1%``).
    """
    if spec == "text":
        return str(value)
    if spec == "yesno":
        return "yes" if value else "no"
    if isinstance(value, bool):
        raise TypeError(f"a truth value formatted as {spec!r}")
    match = re.fullmatch(r"e(\d)", spec)
    if match:
        mantissa, exponent = f"{value:.{match.group(1)}e}".split("e")
        return f"{mantissa}e{int(exponent)}"
    match = re.fullmatch(r"sig(\d)", spec)
    if match:
        if value == 0:
            return "0"
        digits = int(match.group(1))
        magnitude = math.floor(math.log10(abs(value)))
        rounded = round(value, digits - 1 - magnitude)
        decimals = max(digits - 1 - magnitude, 0)
        return f"{rounded:.{decimals}f}"
    if spec == "int,":
        return f"{round(value):,}"
    return format(value, spec)


def fmt_value(value: Any, spec: str) -> str:
    """A number, or a span ``(lo, hi)`` written ``lo-hi`` (one figure when they agree)."""
    if isinstance(value, tuple) and len(value) == 2:
        lo, hi = fmt_number(value[0], spec), fmt_number(value[1], spec)
        return lo if lo == hi else f"{lo}-{hi}"
    if isinstance(value, (list, tuple)):
        return " / ".join(fmt_number(v, spec) for v in value)
    return fmt_number(value, spec)


# ------------------------------------------------------------------------ the figures

def figure_files(figure: dict) -> dict[str, str]:
    """The files a figure reads: ``{"J": path}`` or ``{name: path, ...}``."""
    if "file" in figure:
        return {"J": figure["file"]}
    return dict(figure.get("files", {}))


def claim_files(claim: dict) -> list[str]:
    """Every results file the figures of ``claim`` read, in order, once each."""
    seen: list[str] = []
    for figure in claim.get("figures", {}).values():
        for path in figure_files(figure).values():
            if path not in seen:
                seen.append(path)
    return seen


def compute_figure(figure: dict, quoted: dict, cache: dict) -> str:
    """The figure as written from its file(s); raises if a file is missing or the
    expression fails."""
    files = figure_files(figure)
    if not files:
        raise ValueError("figure names no results file")
    data: dict[str, Any] = {}
    named: dict[str, Any] = {}
    for name, rel in files.items():
        path = HERE / rel
        if not path.is_file():
            raise FileNotFoundError(f"results file {rel} does not exist")
        if rel not in cache:
            cache[rel] = load_result(path)
        if name == "J":
            data["J"] = cache[rel]
        else:
            named[name] = cache[rel]
    if named:
        data["F"] = named
    value = evaluate(figure["expr"], data, quoted)
    return fmt_value(value, str(figure.get("format", ".3g")))


def check_registry(registry: dict) -> tuple[list[str], dict[str, dict[str, str]]]:
    """Problems (missing files, failing expressions, figures that differ from their
    stated value, unbacked entries without a reason) and the computed figures."""
    problems: list[str] = []
    computed: dict[str, dict[str, str]] = {}
    cache: dict = {}
    quoted = registry.get("quoted", {})
    ids = [c.get("id") for c in registry["claims"]]
    for dup in sorted({i for i in ids if ids.count(i) > 1}):
        problems.append(f"claim id {dup!r} appears more than once")
    for claim in registry["claims"]:
        cid = claim.get("id", "?")
        computed[cid] = {}
        if "unbacked" in claim:
            if not str(claim["unbacked"]).strip():
                problems.append(f"{cid}: unbacked without a reason")
            if claim.get("figures"):
                problems.append(f"{cid}: unbacked but lists figures")
            continue
        if not claim.get("figures"):
            problems.append(f"{cid}: no figures and not marked unbacked")
            continue
        for name, figure in claim["figures"].items():
            try:
                got = compute_figure(figure, quoted, cache)
            except Exception as exc:  # noqa: BLE001 - reported, with the claim's id
                problems.append(f"{cid}.{name}: {type(exc).__name__}: {exc}")
                continue
            computed[cid][name] = got
            if got != str(figure.get("stated")):
                problems.append(f"{cid}.{name}: the file gives {got!r}, the registry states "
                                f"{figure.get('stated')!r}")
        for part in TEMPLATED:
            try:
                str(claim.get(part, "")).format(**{n: "" for n in claim["figures"]})
            except (KeyError, IndexError) as exc:
                problems.append(f"{cid}: the {part} text names an unknown figure {exc}")
        written = "".join(str(claim.get(part, "")) for part in TEMPLATED)
        unused = [n for n in claim["figures"] if "{" + n + "}" not in written]
        if unused:
            problems.append(f"{cid}: figures not written in the row: {unused}")
    return problems, computed


# ---------------------------------------------------------------------- the metadata

def _loads(obj: Any, depth: int = 0) -> list[float]:
    """Every load-average reading in ``obj`` (keys of ``LOAD_KEYS``, any depth but the
    learning curves)."""
    found: list[float] = []
    if depth > 4:
        return found
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key in LOAD_KEYS:
                values = value if isinstance(value, list) else [value]
                found += [float(v) for v in values if isinstance(v, (int, float))]
            elif isinstance(value, (dict, list)) and key not in ("curve", "earlier_runs"):
                found += _loads(value, depth + 1)
    elif isinstance(obj, list):
        for item in obj:
            found += _loads(item, depth + 1)
    return found


def _first(obj: Any, keys: tuple[str, ...]) -> Any:
    """The first of ``keys`` at the top of ``obj`` or under its ``meta``."""
    for holder in (obj, obj.get("meta") if isinstance(obj, dict) else None):
        if isinstance(holder, dict):
            for key in keys:
                if holder.get(key):
                    return holder[key]
    return None


def short_machine(text: str) -> str:
    """``2-core AMD EPYC, 24 GiB RAM, torch ...`` -> ``2-core AMD EPYC``."""
    text = re.sub(r"\(R\)|\(TM\)", "", str(text)).replace(" Processor", "")
    return text.split(",")[0].strip()


def file_meta(rel: str, cache: dict) -> dict:
    """Date, machine, loads, commit and command recorded in one results file."""
    if rel not in cache:
        cache[rel] = load_result(HERE / rel)
    obj = cache[rel]
    meta = {"date": None, "machine": None, "loads": _loads(obj), "commit": None,
            "command": None}
    if isinstance(obj, dict):
        date = _first(obj, ("date", "date_utc"))
        meta["date"] = str(date)[:10] if date else None
        machine = _first(obj, ("machine",))
        meta["machine"] = short_machine(machine) if machine else None
        meta["commit"] = _first(obj, ("commit",))
        meta["command"] = _first(obj, ("command",))
    return meta


def _join(values: list[str]) -> str:
    unique = []
    for v in values:
        if v not in unique:
            unique.append(v)
    return "; ".join(unique)


def claim_meta(claim: dict, cache: dict) -> dict[str, str]:
    """The date, machine and load cells of a claim's row: from its files, else from the
    registry's ``recorded`` (marked ``*``)."""
    recorded = claim.get("recorded", {})
    dates, machines, loads = [], [], []
    missing = {"date": False, "machine": False, "load": False}
    for rel in claim_files(claim):
        meta = file_meta(rel, cache)
        if meta["date"]:
            dates.append(meta["date"])
        else:
            missing["date"] = True
        if meta["machine"] and meta["machine"] != "x86_64":
            machines.append(meta["machine"])
        else:
            missing["machine"] = True
        if meta["loads"]:
            loads += meta["loads"]
        else:
            missing["load"] = True
    cells = {}
    date_cell = " to ".join(sorted({min(dates), max(dates)})) if dates else ""
    if missing["date"] and "date" in recorded:
        date_cell = _join([d for d in (date_cell, f"{recorded['date']}{NOT_IN_FILE}") if d])
    cells["date"] = date_cell or "-"
    machine_cell = _join(machines)
    if missing["machine"] and "machine" in recorded:
        machine_cell = _join([m for m in (machine_cell, f"{recorded['machine']}{NOT_IN_FILE}")
                              if m])
    cells["machine"] = machine_cell or "-"
    load_cell = fmt_value(span(loads), ".1f") if loads else ""
    if missing["load"] and "load" in recorded:
        load_cell = _join([x for x in (load_cell, f"{recorded['load']}{NOT_IN_FILE}") if x])
    cells["load"] = load_cell or "-"
    return cells


# ------------------------------------------------------------------------- rendering

def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ").strip()


#: Above this many files a row names their folders and points to the registry.
MAX_FILES_LISTED = 3


def files_cell(claim: dict) -> str:
    """The results files of a claim: each one, or (many) their folders and the count."""
    files = claim_files(claim)
    if len(files) <= MAX_FILES_LISTED:
        return ", ".join(f"`{f}`" for f in files)
    folders = []
    for f in files:
        folder = f.rsplit("/", 1)[0] + "/"
        if folder not in folders:
            folders.append(folder)
    where_ = ", ".join(f"`{d}`" for d in folders)
    return f"{len(files)} files in {where_} (`claims.yaml`, `{claim['id']}`)"


def section_link(claim: dict) -> str:
    """The link to the README section that reproduces a claim (``-`` when none)."""
    anchor = claim.get("section")
    if not anchor:
        return "-"
    title = claim.get("section_title")
    if not title:
        title = f"`{anchor[:-2]}.py`" if anchor.endswith("py") else anchor.replace("-", " ")
    return f"[{title}](#{anchor})"


def render_claims(registry: dict) -> str:
    """The claims table, in registry order (raises if a figure cannot be computed)."""
    cache: dict = {}
    quoted = registry.get("quoted", {})
    lines = [
        "| claim | value | target | met | date | machine | load | results | reproduce |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for claim in registry["claims"]:
        reproduce = section_link(claim)
        text, target, met = claim["claim"], claim.get("target", "-"), claim.get("met", "-")
        if "unbacked" in claim:
            recorded = claim.get("recorded", {})
            value = f"{claim['value']} (not backed by a results file)"
            date = f"{recorded['date']}{NOT_IN_FILE}" if "date" in recorded else "-"
            machine = (f"{recorded['machine']}{NOT_IN_FILE}" if "machine" in recorded
                       else "-")
            load = f"{recorded['load']}{NOT_IN_FILE}" if "load" in recorded else "-"
            results = f"none: {claim['unbacked']}"
        else:
            figures = {name: compute_figure(fig, quoted, cache)
                       for name, fig in claim["figures"].items()}
            value, text, target, met = (str(claim.get(part, "-")).format(**figures)
                                        for part in ("value", "claim", "target", "met"))
            meta = claim_meta(claim, cache)
            date, machine, load = meta["date"], meta["machine"], meta["load"]
            results = files_cell(claim)
        row = [text, value, target, met, date,
               machine, load, results, reproduce]
        lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    return "\n".join(lines)


def render_table(spec: dict, quoted: dict) -> str:
    """One generated table: ``rows`` lists its rows, each with the file (or ``file`` on
    the table) and one expression per column."""
    cache: dict = {}
    columns = spec["columns"]
    lines = ["| " + " | ".join(c["header"] for c in columns) + " |",
             "| " + " | ".join("---" for _ in columns) + " |"]
    for row in spec["rows"]:
        cells = []
        for column in columns:
            key = column["key"]
            if key in row.get("text", {}):
                cells.append(row["text"][key])
                continue
            figure = {"file": row.get("file", spec.get("file")),
                      "expr": _bind(column["expr"], row.get("bind", {})),
                      "format": column.get("format", ".3g")}
            cells.append(compute_figure(figure, quoted, cache))
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def _bind(expr: str, bind: dict) -> str:
    """``expr`` with ``{name}`` replaced by the row's values (as Python literals)."""
    for name, value in bind.items():
        expr = expr.replace("{" + name + "}", repr(value))
    return expr


def blocks(registry: dict) -> dict[tuple[str, str], str]:
    """Every generated block: ``(begin marker, end marker) -> content``."""
    out = {(CLAIMS_BEGIN, CLAIMS_END): render_claims(registry)}
    for spec in registry["tables"]:
        name = spec["name"]
        out[(f"<!-- table:{name}:begin -->", f"<!-- table:{name}:end -->")] = render_table(
            spec, registry.get("quoted", {}))
    return out


def replace_blocks(text: str, generated: dict[tuple[str, str], str]) -> str:
    """``text`` with the content between each pair of markers replaced."""
    for (begin, end), content in generated.items():
        if text.count(begin) != 1 or text.count(end) != 1:
            raise ValueError(f"README.md must hold {begin} and {end} once each")
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = f"{head}{begin}\n{content}\n{end}{tail}"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if README.md differs or a figure is not as stated")
    parser.add_argument("--list", action="store_true", help="print every figure")
    parser.add_argument("--registry", type=Path, default=REGISTRY)
    parser.add_argument("--readme", type=Path, default=README)
    args = parser.parse_args(argv)
    registry = load_registry(args.registry)
    problems, computed = check_registry(registry)
    if args.list:
        for claim in registry["claims"]:
            if "unbacked" in claim:
                print(f"{claim['id']}: unbacked: {claim['unbacked']}")
            for name, figure in claim.get("figures", {}).items():
                got = computed.get(claim["id"], {}).get(name, "?")
                files = ", ".join(figure_files(figure).values())
                print(f"{claim['id']}.{name}: {got} (stated {figure.get('stated')}) [{files}]")
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 1
    text = args.readme.read_text()
    new = replace_blocks(text, blocks(registry))
    if args.check:
        if new != text:
            diff = difflib.unified_diff(text.splitlines(), new.splitlines(), "README.md",
                                        "generated", lineterm="", n=0)
            print("\n".join(diff), file=sys.stderr)
            print("benchmarks/README.md differs from the generated tables: run "
                  "python benchmarks/make_claims.py", file=sys.stderr)
            return 1
        return 0
    if not args.list and new != text:
        args.readme.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
