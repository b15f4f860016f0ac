"""One entry point for the benchmark studies: list them, run one, reproduce a claim.

The benchmarks are not part of the installed package (``pip install sdze-lightning`` ships
no ``benchmarks/``), so this is a script in the checkout, run from anywhere with the
Python that has the library installed::

    python benchmarks/bench.py list                        # studies, their claims
    python benchmarks/bench.py run <study> [args...]       # benchmarks/<study>.py [args...]
    python benchmarks/bench.py run scaling --smoke         # arguments pass through
    python benchmarks/bench.py reproduce                   # every claim: command recorded?
    python benchmarks/bench.py reproduce <claim-id>        # the commands behind one claim
    python benchmarks/bench.py reproduce <claim-id> --execute   # ... and run them
    python benchmarks/bench.py check                       # make_claims.py --check

A study is one script ``benchmarks/<study>.py``; those listed back a claim of
``claims.yaml`` (its ``section`` or one of its results files). A claim's commands come
from its results files (their ``command`` field, as ``make_claims.py`` reads it); for a
file without one it prints the commands its study's README section documents (some with
placeholders such as ``<d>`` or ``[--prefetch]``), which ``--execute`` does not run.
Every command runs as a subprocess from the repository root with this Python.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# The registry's reader, beside this script (loaded from its file: sys.path is left alone).
_SPEC = importlib.util.spec_from_file_location("make_claims", HERE / "make_claims.py")
assert _SPEC is not None and _SPEC.loader is not None
make_claims = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(make_claims)

#: Scripts in ``benchmarks/`` that are tools, not studies.
NOT_STUDIES = {"bench", "make_claims"}
#: A token that names a Python interpreter (``python``, ``python3.11``, ``/x/bin/python``).
PYTHON = re.compile(r"python(\d+(\.\d+)?)?")
#: Text of a documented command that stands for something to fill in.
PLACEHOLDER = re.compile(r"<[^>]*>|\[[^\]]*\]")


@dataclass
class Study:
    """One benchmark script and what it backs.

    Attributes:
        name: The script's stem (``scaling`` for ``benchmarks/scaling.py``).
        description: The first line of the script's docstring.
        claims: Ids of the claims it backs, in registry order.
        tables: Names of the generated README tables it backs.
    """

    name: str
    description: str
    claims: list[str] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)

    @property
    def script(self) -> str:
        """The script's path relative to the repository root."""
        return f"benchmarks/{self.name}.py"


def script_names() -> list[str]:
    """Stems of every study script in ``benchmarks/`` (private modules and tools left out)."""
    return sorted(p.stem for p in HERE.glob("*.py")
                  if not p.stem.startswith("_") and p.stem not in NOT_STUDIES)


def describe(name: str) -> str:
    """The first line of ``benchmarks/<name>.py``'s docstring (``-`` when it has none)."""
    doc = ast.get_docstring(ast.parse((HERE / f"{name}.py").read_text()))
    return doc.strip().splitlines()[0] if doc else "-"


def section_study(anchor: str | None, names: list[str]) -> str | None:
    """The study of a README section anchor (``scalingpy`` -> ``scaling``), if any."""
    for name in names:
        if anchor == re.sub(r"[^\w-]", "", f"{name}.py"):
            return name
    return None


def file_study(rel: str, names: list[str]) -> str | None:
    """The study that writes a results file, from its name or its folder's.

    ``results/frontier/time_to_accuracy_cube_seeds3.json`` -> ``time_to_accuracy``;
    ``results/scaling_sdze_one_thread/scaling.json`` -> ``scaling``; the longest match wins.
    """
    path = Path(rel)
    found = [n for n in names for part in (path.stem, path.parent.name)
             if part == n or part.startswith(n + "_")]
    return max(found, key=len) if found else None


def studies(registry: dict) -> dict[str, Study]:
    """The studies that back a claim or a generated table, in registry order."""
    names = script_names()
    out: dict[str, Study] = {}

    def add(name: str | None, claim: str | None = None, table: str | None = None) -> None:
        if name is None:
            return
        study = out.setdefault(name, Study(name, describe(name)))
        if claim and claim not in study.claims:
            study.claims.append(claim)
        if table and table not in study.tables:
            study.tables.append(table)

    for claim in registry["claims"]:
        add(section_study(claim.get("section"), names), claim=claim["id"])
        for rel in make_claims.claim_files(claim):
            add(file_study(rel, names), claim=claim["id"])
    for table in registry["tables"]:
        for row in table["rows"]:
            rel = row.get("file", table.get("file"))
            if rel:
                add(file_study(rel, names), table=table["name"])
    return out


# ------------------------------------------------------------------ README commands

def readme_sections(text: str) -> dict[str, tuple[str, str]]:
    """``anchor -> (heading, body)`` for every heading of the benchmarks README."""
    out: dict[str, tuple[str, str]] = {}
    heading, body = "", []
    for line in [*text.splitlines(), "# end"]:
        if line.startswith("#"):
            if heading:
                slug = re.sub(r"[^\w\- ]", "", heading.lstrip("#").strip().lower())
                out[slug.replace(" ", "-")] = (heading.lstrip("# "), "\n".join(body))
            heading, body = line, []
        else:
            body.append(line)
    return out


def documented_commands(body: str, study: str | None) -> list[str]:
    """The commands a README section gives: indented code lines and inline code spans that
    run ``benchmarks/<study>.py`` (or ``sdze-train`` in a section of no study); a span of
    arguments alone (``--dims ...``) when the section has no full command."""
    code = re.sub(r"\\\n\s*", "", body)  # join continued lines of code blocks
    lines = [re.sub(r"\s+#\s.*$", "", ln).strip() for ln in code.splitlines()
             if ln.startswith("    ")]
    spans = [" ".join(s.split()) for s in re.findall(r"`([^`]+)`", body)]
    if study:
        wanted = f"benchmarks/{study}.py"
        found = [c for c in (*lines, *spans) if wanted in c]
        if not found:
            found = [f"python {wanted} {s}" for s in spans if s.startswith("--")]
    else:
        found = [c for c in (*lines, *spans) if c.startswith("sdze-train ")]
    return list(dict.fromkeys(found))


# -------------------------------------------------------------------- recorded commands

def normalise(command: str, names: list[str]) -> str | None:
    """A recorded command as run from the repository root with ``python``, or None when
    it does not run a study script (``threads.py`` records the job it times, not itself).

    ``/x/.venv/bin/python scale_first.py --dims 1000`` ->
    ``python benchmarks/scale_first.py --dims 1000``.
    """
    tokens = shlex.split(command)
    for i, token in enumerate(tokens[:-1]):
        if PYTHON.fullmatch(Path(token).name):
            script = Path(tokens[i + 1])
            if script.suffix == ".py" and script.stem in names:
                return shlex.join(["python", f"benchmarks/{script.name}", *tokens[i + 2:]])
    return None


@dataclass
class Source:
    """How one results file of a claim is made again.

    Attributes:
        file: The results file, relative to ``benchmarks/``.
        study: The study that writes it (None when no script matches).
        command: The command recorded in the file, normalised (None when none is).
        recorded: The file's ``command`` field as written (None when absent).
    """

    file: str
    study: str | None
    command: str | None
    recorded: str | None


def sources(claim: dict, names: list[str]) -> list[Source]:
    """One :class:`Source` per results file of ``claim``."""
    fallback = section_study(claim.get("section"), names)
    out, cache = [], {}
    for rel in make_claims.claim_files(claim):
        recorded = make_claims.file_meta(rel, cache)["command"]
        command = normalise(str(recorded), names) if recorded else None
        out.append(Source(rel, file_study(rel, names) or fallback, command, recorded))
    return out


def find_claim(registry: dict, claim_id: str) -> dict | None:
    """The registry entry with id ``claim_id``."""
    return next((c for c in registry["claims"] if c["id"] == claim_id), None)


def summary_line(claim: dict, names: list[str]) -> str:
    """One line: how many of a claim's results files record their command."""
    if "unbacked" in claim:
        return f"{claim['id']}: unbacked ({claim['unbacked']})"
    found = sources(claim, names)
    done = sum(s.command is not None for s in found)
    state = ("all" if done == len(found) else "none" if done == 0 else "some")
    return f"{claim['id']}: {state}: {done} of {len(found)} files record their command"


def claim_text(claim: dict, quoted: dict) -> str:
    """The claim's text as the README writes it (its ``{figure}`` fields filled in)."""
    text = " ".join(str(claim["claim"]).split())
    try:
        figures = {name: make_claims.compute_figure(figure, quoted, {})
                   for name, figure in claim.get("figures", {}).items()}
        return text.format(**figures)
    except Exception:  # noqa: BLE001 - a figure that fails is make_claims --check's to report
        return text


def reproduce(claim: dict, names: list[str], readme: str, execute: bool,
              quoted: dict | None = None) -> int:
    """Print (and with ``execute`` run) the commands behind ``claim``.

    Only commands recorded in the results files are executed; a documented one is printed
    for a person to adapt, as the file does not say which of its arguments made it.

    Returns:
        0 when printing; when executing, the first failing command's status, 1 when a
        file records no command (after running the others), else 0.
    """
    sections = readme_sections(readme)
    print(f"{claim['id']}: {claim_text(claim, quoted or {})}")
    if "unbacked" in claim:
        print(f"  unbacked: {claim['unbacked']}")
        heading, body = sections.get(claim.get("section", ""), ("", ""))
        documented = documented_commands(body, None)
        if documented:
            print(f"  commands of README section '{heading}' (not tied to this claim):")
            print("\n".join(f"    {c}" for c in documented))
        if execute:
            print(f"bench.py: {claim['id']} is not backed by a results file: nothing run",
                  file=sys.stderr)
            return 1
        return 0
    found = sources(claim, names)
    missing: dict[str | None, list[Source]] = {}
    for src in found:
        if src.command is None:
            missing.setdefault(src.study, []).append(src)
            continue
        print(f"  {src.file}: recorded in the file")
        print(f"    {src.command}")
        if src.recorded != src.command:
            print(f"    (as recorded: {src.recorded})")
    for study, srcs in missing.items():
        print(f"  {', '.join(s.file for s in srcs)}: no command recorded in the file")
        for src in srcs:
            if src.recorded:
                print(f"    ({src.file} records {src.recorded!r}: the job it times, not "
                      "the command that wrote it)")
        anchor = re.sub(r"[^\w-]", "", f"{study}.py") if study else ""
        heading, body = sections.get(anchor, ("", ""))
        documented = documented_commands(body, study) if study else []
        if not documented:
            print("    not reproducible automatically: no documented command found")
            continue
        print(f"    documented in README section {heading} (not executed: the file's "
              "own arguments may differ):")
        for command in documented:
            filled = "   [placeholders to fill]" if PLACEHOLDER.search(command) else ""
            print(f"    {command}{filled}")
    if not execute:
        return 0
    for command in dict.fromkeys(s.command for s in found if s.command):
        status = run_command(command)
        if status:
            print(f"bench.py: exit status {status}: {command}", file=sys.stderr)
            return status
    if missing:
        print(f"bench.py: {claim['id']}: not every results file records its command; "
              "the documented ones above were not run", file=sys.stderr)
        return 1
    return 0


def run_command(command: str) -> int:
    """Run a shell-style command from the repository root: leading ``VAR=value`` words set
    the environment, ``python`` is this interpreter, ``sdze-train`` the one beside it."""
    tokens = shlex.split(command)
    env = dict(os.environ)
    while tokens and re.fullmatch(r"[A-Za-z_]\w*=\S*", tokens[0]):
        key, value = tokens.pop(0).split("=", 1)
        env[key] = value
    bindir = Path(sys.executable).parent
    for i, token in enumerate(tokens):
        if PYTHON.fullmatch(token):
            tokens[i] = sys.executable
        elif token.startswith("sdze-") and (bindir / token).exists():
            tokens[i] = str(bindir / token)
    print(f"$ {command}", flush=True)
    return subprocess.run(tokens, cwd=ROOT, env=env, check=False).returncode


# ---------------------------------------------------------------------------- main

def error(message: str) -> int:
    """Print a one-line error and return the usage-error status, 2."""
    print(f"bench.py: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the sub-command; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="every study that backs a claim, with its claims")
    run = sub.add_parser("run", help="run benchmarks/<study>.py with the arguments given")
    run.add_argument("study")
    run.add_argument("args", nargs=argparse.REMAINDER, help="passed to the script")
    rep = sub.add_parser("reproduce",
                         help="the commands behind a claim (no id: one line per claim)")
    rep.add_argument("claim", nargs="?", help="a claim id of claims.yaml")
    rep.add_argument("--execute", action="store_true", help="run the commands too")
    sub.add_parser("check", help="python benchmarks/make_claims.py --check")
    args = parser.parse_args(argv)
    registry = make_claims.load_registry()
    names = script_names()

    if args.command == "list":
        found = studies(registry)
        for study in found.values():
            print(f"{study.name} ({study.script}): {study.description}")
            backs = f"claims: {', '.join(study.claims) or '-'}"
            if study.tables:
                backs += f"; tables: {', '.join(study.tables)}"
            print(f"    {backs}")
        others = [n for n in names if n not in found]
        print(f"other scripts (no claim; `run` takes them too): {', '.join(others)}")
        loose = [c["id"] for c in registry["claims"]
                 if not any(c["id"] in s.claims for s in found.values())]
        if loose:
            print(f"claims of no study (README sections of command lines): {', '.join(loose)}")
        return 0
    if args.command == "run":
        name = args.study.removesuffix(".py")
        if name not in names:
            return error(f"unknown study {args.study!r} (python benchmarks/bench.py list)")
        command = [sys.executable, f"benchmarks/{name}.py", *args.args]
        return subprocess.run(command, cwd=ROOT, check=False).returncode
    if args.command == "reproduce":
        if args.claim is None:
            for claim in registry["claims"]:
                print(summary_line(claim, names))
            return 0
        claim = find_claim(registry, args.claim)
        if claim is None:
            return error(f"unknown claim {args.claim!r} (ids: benchmarks/claims.yaml)")
        return reproduce(claim, names, make_claims.README.read_text(), args.execute,
                         registry["quoted"])
    command = [sys.executable, "benchmarks/make_claims.py", "--check"]
    return subprocess.run(command, cwd=ROOT, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
