"""Relative L2 error against wall time, and accuracy against peak memory, for every method.

Two-body Allen-Cahn on the unit ball (``--problem twobody``, ``pde=allen_cahn_twobody``,
hard constraint) or Allen-Cahn on the cube with a boundary loss (``--problem cube``,
``pde=allen_cahn_cube``), trained through ``lightning.Trainer.fit`` as users run it. Every
run is built from the packaged configs as ``sdze-train <overrides>`` builds it
(``_common.build_run``): the packaged network, batch, estimator and method settings, with
the study's settings as overrides (:func:`study_overrides`): ``seed=<s>``, ``pde.n_eval``
(``--n-eval``), ``threads`` (``--threads``), ``prefetch=true`` (``--prefetch``),
``model.init`` (``--init``), on the cube ``pde.n_interior=100 pde.n_boundary=100`` (the
two-body problem's 100 interior points per step), and per method (:func:`method_overrides`):

* ``sdze``: ``method=sdze estimator=taylor``; ``method.lr`` from ``--sdze-lr``,
  ``method.rank`` / ``method.period`` / ``method.queries`` from ``--sdze-rank`` /
  ``--sdze-period`` / ``--sdze-queries``, a cosine ``scheduler`` from
  ``--sdze-cosine-steps``;
* ``mezo``: ``method=mezo estimator=taylor`` (``--mezo-lr``);
* ``adam+taylor``, ``adam+hte``: ``method=adam`` over ``estimator=taylor`` and
  ``estimator=hte`` (``--adam-lr``, the input layer's ``--adam-input-lr``);
* ``fused_adafactor``: ``method=fused_adafactor estimator=taylor`` (``--fused-lr``, the
  input layer's ``--fused-input-lr``).

A flag left out adds no override: the run takes the packaged default. Each row records
its overrides, its ``sdze-train`` command and the learning rates that ran (``lr``,
``input_lr``); ``not_in_command`` says what the command does not reproduce (the
wall-time budget, the evaluation callback, a wall-time learning-rate decay).

Each run gets the same training wall-time budget (``--budget-s``; the evaluations
are not counted); every ``--eval-every`` steps a callback records the training wall
time and the relative L2 error on the held-out points. ``--lr-decay linear``
decays every method's learning rate linearly to 0 over the budget's wall time (the
schedule of the JAX STDE code, which decays over its step count; a scheduler set on the
built optimizer, as no config can follow a wall clock). By default every
run is a fresh subprocess whose peak RSS (``VmHWM``: parameters, optimizer state,
batch, evaluation, the torch runtime; not ``ru_maxrss``, which Linux carries over from
the launching process; counted from after the floors, which are not part of the run) is
reported beside its error. Reported: the final
(not best) error per seed and its mean, for ``--seeds`` seeds.

Reference lines (``floors``, in the JSON, the log and the plot): the error of the
best network output of the form ``e(x) c`` (a constant behind the hard
constraint's factor ``e``, 1 without one) and ``e(x) (c + a.x)`` (affine, for
``d <= --affine-max-dim``). A method whose error stops at the constant line has
learned the mean of the solution and nothing that depends on ``x``.

    python benchmarks/time_to_accuracy.py                         # d = 1e3, 3 seeds, 216 s
    python benchmarks/time_to_accuracy.py --problem cube --dims 1000 10000 --seeds 1
    python benchmarks/time_to_accuracy.py --frontier results/time_to_accuracy*.json
    python benchmarks/time_to_accuracy.py --table results/time_to_accuracy*.json  # Markdown
    python benchmarks/time_to_accuracy.py --smoke

Results: ``results/time_to_accuracy[_cube][_<dims>][_<tag>].{csv,json,png}`` (the JSON
with the run's provenance: date, commit, machine, loads, threads, command); from the
JSONs of several runs, ``--frontier`` draws ``frontier.png`` (final error against peak
RSS) and ``error_vs_time_<problem>.png`` (a panel per d).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    MACHINE,
    PDES,
    RESULTS,
    SMOKE_OVERRIDES,
    add_prefetch_flag,
    build_run,
    finish_provenance,
    fit_run,
    load_average,
    merge_overrides,
    peak,
    reset_peak,
    script_provenance,
    write_csv,
)

from sdze_lightning.nn.mlp import INITS  # noqa: E402

#: Methods: optimizer + spatial estimator.
METHODS = ("sdze", "mezo", "adam+taylor", "adam+hte", "fused_adafactor")
#: ``method=`` and ``estimator=`` of each method.
PAIRS = {"sdze": ("sdze", "taylor"), "mezo": ("mezo", "taylor"), "adam+taylor": ("adam", "taylor"),
         "adam+hte": ("adam", "hte"), "fused_adafactor": ("fused_adafactor", "taylor")}
#: Plot colours of the methods, and (in turn) of the runs with their own input-layer lr.
COLORS = {m: f"C{i}" for i, m in enumerate(METHODS)}
INPUT_LR_COLORS = ("C5", "C6", "C7", "C8", "C9", "black", "tab:olive", "tab:cyan")
#: The keys of ``lrs`` (:func:`method_overrides`) of each method's rate and of its input
#: layer's (``None``: the method has no input-layer rate).
LR_KEYS = {"sdze": ("sdze", None), "mezo": ("mezo", None), "adam+taylor": ("adam", "adam_input"),
           "adam+hte": ("adam", "adam_input"),
           "fused_adafactor": ("fused_adafactor", "fused_adafactor_input")}


def variant(row: dict) -> str:
    """The method of a result row, with its input-layer lr when one was set."""
    lr = row.get("input_lr")
    return row["method"] if lr is None else f"{row['method']}, input lr {lr:.0e}"


def variants(rows: list[dict]) -> list[str]:
    """The variants of ``rows`` in the order of :data:`METHODS` (plain one first)."""
    order = {m: i for i, m in enumerate(METHODS)}
    keys = {(order[r["method"]], r.get("input_lr") or 0.0, variant(r)) for r in rows}
    return [name for *_, name in sorted(keys)]


def palette(rows: list[dict]) -> dict[str, str]:
    """Plot colour of each variant of ``rows``.

    A run at its method's lr takes the method's colour; each variant with an input-layer lr
    takes the next of :data:`INPUT_LR_COLORS`.
    """
    colors, extra = {}, itertools.cycle(INPUT_LR_COLORS)
    for name in variants(rows):
        row = next(r for r in rows if variant(r) == name)
        colors[name] = COLORS[row["method"]] if row.get("input_lr") is None else next(extra)
    return colors


class WallClockEval(L.Callback):
    """Stop after ``budget_s`` seconds of training; record the error every ``every`` steps.

    The time spent evaluating is excluded from the recorded wall time.

    Args:
        budget_s: Training wall time after which training stops.
        every: Steps between evaluations.

    """

    def __init__(self, budget_s: float, every: int) -> None:
        self.budget_s = budget_s
        self.every = every
        self.curve: list[tuple[int, float, float]] = []
        self._train_s = 0.0
        self._t0 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        """Start the step clock."""
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """Stop the clock; evaluate every ``every`` steps; stop at the budget."""
        self._train_s += time.perf_counter() - self._t0
        step = trainer.global_step
        over = self._train_s >= self.budget_s
        if step % self.every == 0 or over:
            self.curve.append((step, self._train_s, pl_module.relative_l2_error()))
        if over:
            trainer.should_stop = True


#: ``--problem`` choices: two-body Allen-Cahn on the unit ball (hard constraint) and the
#: zoo's hard problem, Allen-Cahn on the cube with a boundary loss (``pde=allen_cahn_cube``).
PROBLEMS = ("twobody", "cube")
#: Plot titles of the problems.
TITLES = {"twobody": "two-body Allen-Cahn", "cube": "Allen-Cahn on the cube"}
#: The study's points per step on the cube (interior and boundary each): the two-body
#: problem's 100 interior points, where ``pde=allen_cahn_cube`` packages 200 + 200.
CUBE_POINTS = 100


def study_overrides(method: str, problem: str, dim: int, seed: int, *extra: str, n_eval: int = 1000,
              threads: int | str = 1) -> list[str]:
    """The ``sdze-train`` overrides of one run of the study.

    ``pde=`` of ``problem`` at ``dim``, ``method=`` and ``estimator=`` of ``method``
    (:data:`PAIRS`), ``seed`` (the points, the network and the method's directions),
    ``n_eval`` held-out points, ``threads`` torch threads and on the cube
    :data:`CUBE_POINTS` interior and boundary points per step; everything else is the
    packaged default.

    Args:
        method: A key of :data:`PAIRS`.
        problem: A key of :data:`PROBLEMS`.
        dim: Spatial dimension.
        seed: ``seed=``.
        *extra: Further overrides (:func:`method_overrides`, a smoke mode's sizes); a key
            given here replaces the study's value in place.
        n_eval: ``pde.n_eval``.
        threads: ``threads``.

    """
    opt, est = PAIRS[method]
    base = [f"pde={PDES[problem]}", f"pde.dim={dim}"]
    if problem == "cube":
        base += [f"pde.n_interior={CUBE_POINTS}", f"pde.n_boundary={CUBE_POINTS}"]
    base += [f"method={opt}", f"estimator={est}", f"seed={seed}", f"pde.n_eval={n_eval}",
             f"threads={threads}"]
    return merge_overrides(base, extra)


def method_overrides(method: str, lrs: dict[str, float | None] | None = None,
                     sdze: dict[str, int | None] | None = None) -> list[str]:
    """The learning-rate (and SDZE) overrides of ``method``; ``None`` values add none.

    Args:
        method: A key of :data:`LR_KEYS`.
        lrs: Learning rate per key of :data:`LR_KEYS` (``method.lr``, and
            ``method.input_lr`` for the input-layer keys).
        sdze: SDZE's ``rank``, ``period``, ``queries`` (``method.<key>``) and
            ``cosine_steps`` (a ``CosineAnnealingLR`` ``scheduler`` over that many steps);
            applied to ``sdze`` only.

    """
    lrs, out = lrs or {}, []
    rate, input_rate = LR_KEYS[method]
    if lrs.get(rate) is not None:
        out.append(f"method.lr={lrs[rate]!r}")
    if input_rate is not None and lrs.get(input_rate) is not None:
        out.append(f"method.input_lr={lrs[input_rate]!r}")
    if method == "sdze":
        sdze = sdze or {}
        out += [f"method.{key}={sdze[key]}" for key in ("rank", "period", "queries")
                if sdze.get(key) is not None]
        if sdze.get("cosine_steps"):
            out.append("scheduler={_target_:torch.optim.lr_scheduler.CosineAnnealingLR,"
                       f"_partial_:true,T_max:{sdze['cosine_steps']}}}")
    return out


@torch.no_grad()
def floors(problem, affine_max_dim: int = 2000, fit_seed: int = 12345) -> dict:
    """Relative L2 errors of the best constant and the best affine network output.

    The model is ``u = e(x) n(x)`` (``e``: the factor of ``problem.constraint``,
    1 without one; a custom ``hard_constraint`` override is not modelled). Best
    constant ``n = c``: least squares on the held-out points themselves (closed
    form), so no constant does better on them. Best affine
    ``n = c + a.x``: least squares on ``4 d`` fresh points of another stream,
    evaluated on the held-out points; skipped (``None``) above ``affine_max_dim``.
    Everything in float64.

    Returns:
        ``{"constant": err, "constant_value": c, "affine": err or None}``.

    """
    def envelope(x):
        if problem.constraint is None:
            return torch.ones(len(x), dtype=torch.float64)
        return problem.constraint.value(x).reshape(-1).double()

    xs, refs = zip(*problem.eval_batches(), strict=True)
    x = torch.cat(xs).double()
    ref = torch.cat(refs).reshape(-1).double()
    e = envelope(x)
    c = (e @ ref) / (e @ e)
    out = {"constant": float((e * c - ref).norm() / ref.norm()), "constant_value": float(c),
           "affine": None}
    dim = x.shape[1]
    if dim <= affine_max_dim:
        gen = torch.Generator().manual_seed(fit_seed)
        xf = problem.sample_interior(4 * dim, gen)
        uf = problem.exact_solution(xf).reshape(-1).double()
        xf = xf.double()

        def design(z):
            return torch.cat([torch.ones(len(z), 1, dtype=z.dtype), z], 1) * envelope(z)[:, None]

        coef = torch.linalg.lstsq(design(xf), uf[:, None]).solution
        out["affine"] = float(((design(x) @ coef).reshape(-1) - ref).norm() / ref.norm())
    return out


def mean_floors(items: list[dict]) -> dict:
    """Mean of :func:`floors` results over runs (``None`` stays ``None``)."""
    keys = ("constant", "affine")
    return {k: None if any(f[k] is None for f in items) else statistics.mean(f[k] for f in items)
            for k in keys}


def run(method: str, overrides: list[str], budget_s: float, every: int, *,
        problem_name: str = "twobody", affine_max_dim: int = 2000,
        lr_decay: str = "constant") -> dict:
    """One training run through ``Trainer.fit``; returns the curve and the final error.

    Args:
        method: The row's method (a key of :data:`PAIRS`), its label.
        overrides: The run's ``sdze-train`` overrides (:func:`study_overrides`).
        budget_s: Training wall time after which training stops.
        every: Steps between evaluations.
        problem_name: The row's problem (a key of :data:`PROBLEMS`), its label.
        affine_max_dim: Largest d of the best-affine floor.
        lr_decay: ``linear``: the learning rate decays to 0 over ``budget_s`` of training
            wall time (a ``LambdaLR`` on the built optimizer); ``constant``: the
            configured schedule (none unless the overrides set one).

    """
    from sdze_lightning.divergence import NonFiniteLossError

    built = build_run(overrides)
    problem = built.problem
    cb = WallClockEval(budget_s, every)
    not_in_command = [f"training stops after {budget_s:g} s of training wall time, the "
                      f"error is recorded every {every} steps (a callback); a Trainer "
                      "without logger, checkpoints or validation"]
    if lr_decay == "linear":  # to 0 over the training wall-time budget
        if built.scheduler is not None:
            raise ValueError("lr_decay='linear' and a configured scheduler: choose one")
        built.scheduler = torch.optim.lr_scheduler.LambdaLR(
            built.optimizer, lr_lambda=lambda _: max(0.0, 1.0 - cb._train_s / budget_s))
        not_in_command.append("the learning rate decays linearly to 0 over the training "
                              "wall time (a LambdaLR on the built optimizer)")
    floor = floors(problem, affine_max_dim)  # the held-out points depend on the seed
    reset_peak()  # the float64 floors are not part of the run: peak RSS counts from here
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=10**9, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=[cb])
    status = "completed"
    try:
        fit_run(built, trainer)
    except NonFiniteLossError as err:  # the weights stay those of the last finite step
        status = f"diverged at step {err.step}"
    final = problem.relative_l2_error()
    settings = problem.method.keywords  # the method's configured arguments
    return dict(problem=problem_name, method=method, dim=problem.dim, seed=problem.seed,
                status=status, steps=trainer.global_step,
                train_s=cb._train_s, final_rel_l2=final,
                s_per_step=cb._train_s / max(trainer.global_step, 1), curve=cb.curve,
                floors=floor, lr=settings["lr"], input_lr=settings.get("input_lr"),
                lr_decay=lr_decay, init=problem.net.init_args["init"],
                peak_rss_bytes=peak(),  # VmHWM: this process's own peak
                load=load_average(), pid=os.getpid(), threads=built.threads,
                overrides=built.overrides, command=built.command,
                not_in_command=not_in_command)


def run_isolated(job: dict) -> dict:
    """:func:`run` of ``job`` (its keyword arguments, the overrides among them) in a fresh
    subprocess, so that its peak RSS is its own."""
    out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)],
                         capture_output=True, text=True, check=False)
    for line in out.stdout.splitlines():
        if line.startswith("ROW "):
            return json.loads(line[4:])
    raise RuntimeError(f"worker {job['method']} ({' '.join(job['overrides'])}) failed:\n"
                       f"{out.stderr[-3000:]}")


def frontier_rows(saved: list[dict]) -> list[dict]:
    """The rows of loaded result JSONs with the shortest training budget among them.

    The longer runs of the same methods would not compare at equal time.
    """
    budget_s = min(s["budget_s"] for s in saved)
    return [r for s in saved if s["budget_s"] == budget_s for r in s["rows"]
            if r.get("peak_rss_bytes")]


def frontier(rows: list[dict], out: Path, colors: dict[str, str] | None = None) -> None:
    """Final error against peak RSS of ``rows`` (:func:`frontier_rows`), a panel per problem.

    ``colors``: per variant (default: :func:`palette` of ``rows``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = colors or palette(rows)
    problems = sorted({r["problem"] for r in rows})
    fig, axes = plt.subplots(1, len(problems), figsize=(6.5 * len(problems), 5), squeeze=False)
    markers = dict(zip(sorted({r["dim"] for r in rows}), "osD^v", strict=False))
    for ax, name in zip(axes[0], problems, strict=True):
        for r in rows:
            if r["problem"] != name:
                continue
            ax.loglog(r["peak_rss_bytes"] / 2**30, r["final_rel_l2"], markers[r["dim"]],
                      color=colors[variant(r)], alpha=0.8)
        shown = [r for r in rows if r["problem"] == name]
        for name_of in variants(shown):
            ax.plot([], [], "o", color=colors[name_of], label=name_of)
        for dim, marker in markers.items():
            ax.plot([], [], marker, color="gray", label=f"d = {dim:g}")
        ax.set_xlabel("peak RSS of the run (GiB)")
        ax.set_ylabel(f"relative L2 error after the budget ({rows[0]['train_s']:.0f} s)")
        ax.set_title(TITLES[name])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(MACHINE)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def table(paths: list[Path]) -> str:
    """The Markdown table of result JSONs: per (d, method), steps, speed, memory, error.

    Rows: mean steps, mean ms per step, largest peak RSS, load range, the final error of
    each seed and their mean; then one line of floors per d (the mean over the seeds'
    held-out points).
    """
    saved = [json.loads(Path(p).read_text()) for p in paths]
    rows = [r for s in saved for r in s["rows"]]
    lines = ["| d | method | steps (mean) | ms/step | peak RSS (GiB) | load | "
             "rel. L2 at the budget, per seed | mean |", "| --- " * 8 + "|"]
    for dim in sorted({r["dim"] for r in rows}):
        d = f"{dim:.0e}".replace("e+0", "e")
        for method in variants(rows):
            runs = sorted((r for r in rows if r["dim"] == dim and variant(r) == method),
                          key=lambda r: r["seed"])
            if not runs:
                continue
            errs = [r["final_rel_l2"] for r in runs]
            loads = [r["load"] for r in runs]
            status = {r["status"] for r in runs} - {"completed"}
            lines.append(
                f"| {d} | {method} | {statistics.mean(r['steps'] for r in runs):.0f} | "
                f"{statistics.mean(r['s_per_step'] for r in runs) * 1e3:.1f} | "
                f"{max(r['peak_rss_bytes'] for r in runs) / 2**30:.2f} | "
                f"{min(loads):.1f}-{max(loads):.1f} | "
                + " / ".join(f"{e:.3g}" for e in errs)
                + (f" ({', '.join(sorted(status))})" if status else "")
                + f" | {statistics.mean(errs):.3g} |")
        floor = mean_floors([r["floors"] for r in rows if r["dim"] == dim])
        affine = "-" if floor["affine"] is None else f"{floor['affine']:.3g}"
        lines.append(f"| {d} | floors | | | | | constant {floor['constant']:.3g}, "
                     f"affine {affine} | |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str = "two-body Allen-Cahn",
         floor: dict | None = None, colors: dict[str, str] | None = None) -> None:
    """Relative L2 error against training wall time, one panel per d (dashed: ``floors``).

    ``colors``: per variant (default: :func:`palette` of ``rows``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = sorted({r["dim"] for r in rows})
    order = {name: i for i, name in enumerate(variants(rows))}  # the same legend order per panel
    colors = colors or palette(rows)
    fig, axes = plt.subplots(1, len(dims), figsize=(6 * len(dims), 4.5), squeeze=False)
    for ax, dim in zip(axes[0], dims, strict=True):
        labelled = set()
        panel = [r for r in rows if r["dim"] == dim and r["curve"]]
        for r in sorted(panel, key=lambda r: order[variant(r)]):
            _, t, e = zip(*r["curve"], strict=True)
            name = variant(r)
            ax.semilogy(t, e, color=colors[name], alpha=0.7,
                        label=None if name in labelled else name)  # one entry per variant
            labelled.add(name)
        for key, style in (("constant", "--"), ("affine", ":")):
            level = (floor or {}).get(dim, {}).get(key)
            if level is not None:
                ax.axhline(level, color="gray", ls=style, label=f"best {key} n(x)")
        ax.set_xlabel("training wall time (s)")
        ax.set_ylabel("relative L2 error")
        ax.set_title(f"{title}, d = {dim}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(MACHINE)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    """Run every (d, method, seed)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--problem", choices=PROBLEMS, default="twobody")
    ap.add_argument("--dims", type=int, nargs="+", default=[1000])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=216.0, help="training seconds per run")
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--n-eval", type=int, default=1000, help="held-out points (pde.n_eval)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (threads=)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="runs at once, each in its own subprocess (give each a core: "
                         "jobs x threads <= cores, or the runs slow each other down)")
    ap.add_argument("--sdze-lr", type=float, default=None,
                    help="SDZE's method.lr (default: the packaged one); 0.1 was better at "
                         "d = 1e4 (benchmarks/README.md)")
    ap.add_argument("--mezo-lr", type=float, default=None,
                    help="MeZO's method.lr (default: the packaged one)")
    ap.add_argument("--adam-lr", type=float, default=None,
                    help="Adam's method.lr, adam+taylor and adam+hte (default: the packaged one)")
    ap.add_argument("--fused-lr", type=float, default=None,
                    help="the fused method's method.lr (default: the packaged one)")
    ap.add_argument("--fused-input-lr", type=float, default=None,
                    help="the fused method's method.input_lr (default: the packaged one)")
    ap.add_argument("--adam-input-lr", type=float, default=None,
                    help="Adam's method.input_lr, adam+taylor and adam+hte (default: the "
                         "packaged one)")
    ap.add_argument("--lr-decay", choices=("constant", "linear"), default="constant",
                    help="linear: every method's lr decays to 0 over the wall-time budget")
    ap.add_argument("--init", choices=list(INITS), default=None,
                    help="the MLP's initialisation, model.init (default: the packaged one)")
    ap.add_argument("--sdze-rank", type=int, default=None, help="SDZE's method.rank")
    ap.add_argument("--sdze-period", type=int, default=None, help="SDZE's method.period")
    ap.add_argument("--sdze-queries", type=int, default=None, help="SDZE's method.queries")
    ap.add_argument("--sdze-cosine-steps", type=int, default=0,
                    help="cosine decay of SDZE's lr to 0 over this many steps (a scheduler "
                         "override; 0: none)")
    ap.add_argument("--affine-max-dim", type=int, default=2000,
                    help="largest d for the best-affine reference line")
    ap.add_argument("--in-process", action="store_true",
                    help="run every configuration in this process (peak RSS is then the "
                         "running maximum, not each run's own)")
    ap.add_argument("--frontier", type=Path, nargs="+",
                    help="only draw, from these result JSONs, the accuracy-vs-peak-memory plot "
                         "of the runs with the shortest budget among them, and one error-vs-time "
                         "plot per problem (a panel per d, every run)")
    add_prefetch_flag(ap)
    ap.add_argument("--table", type=Path, nargs="+", metavar="JSON",
                    help="only print the Markdown table of these result JSONs")
    ap.add_argument("--tag", default="", help="suffix of the result files")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        row = run(**json.loads(args.worker))
        print("ROW " + json.dumps(row), flush=True)
        return [row]
    if args.table:
        print(table(args.table))
        return []
    if args.frontier:
        args.out.mkdir(parents=True, exist_ok=True)
        saved = [json.loads(Path(p).read_text()) for p in args.frontier]
        colors = palette([r for s in saved for r in s["rows"]])  # the same in every plot
        frontier(frontier_rows(saved), args.out / "frontier.png", colors)
        for name in sorted({s["problem"] for s in saved}):
            rows = [r for s in saved if s["problem"] == name for r in s["rows"]]
            floor = {int(d): f for s in saved if s["problem"] == name
                     for d, f in s["floors"].items()}
            plot(rows, args.out / f"error_vs_time_{name}.png", TITLES[name], floor, colors)
        return []
    if args.jobs < 1:
        ap.error(f"--jobs must be at least 1, got {args.jobs}")
    if args.in_process and args.jobs > 1:
        ap.error("--in-process runs one configuration at a time; drop --jobs")
    if args.lr_decay == "linear" and args.sdze_cosine_steps:
        ap.error("--lr-decay linear and --sdze-cosine-steps both set SDZE's schedule; choose one")
    record = script_provenance(__file__, argv)
    extra: list[str] = []
    if args.smoke:
        args.dims, args.seeds, args.budget_s, args.eval_every, args.n_eval = [50], 1, 1.0, 5, 64
        extra = [*SMOKE_OVERRIDES, *(["pde.n_boundary=8"] if args.problem == "cube" else [])]
    if args.prefetch:
        extra.append("prefetch=true")
    if args.init is not None:
        extra.append(f"model.init={args.init}")
    lrs = {"sdze": args.sdze_lr, "mezo": args.mezo_lr, "adam": args.adam_lr,
           "fused_adafactor": args.fused_lr, "fused_adafactor_input": args.fused_input_lr,
           "adam_input": args.adam_input_lr}
    sdze = {"rank": args.sdze_rank, "period": args.sdze_period, "queries": args.sdze_queries,
            "cosine_steps": args.sdze_cosine_steps}
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = [dict(method=method, problem_name=args.problem, budget_s=args.budget_s,
                 every=args.eval_every, affine_max_dim=args.affine_max_dim,
                 lr_decay=args.lr_decay,
                 overrides=study_overrides(method, args.problem, dim, seed,
                                           *method_overrides(method, lrs, sdze), *extra,
                                           n_eval=args.n_eval, threads=args.threads))
            for dim in args.dims for method in args.methods for seed in range(args.seeds)]

    def report(r: dict) -> dict:
        print(f"d={r['dim']:>6} {r['method']:15s} seed {r['seed']}: {r['steps']} steps in "
              f"{r['train_s']:.0f} s ({r['s_per_step'] * 1e3:.1f} ms/step), final rel L2 "
              f"{r['final_rel_l2']:.3e}, peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB "
              f"({r['status']}): {r['command']}", flush=True)
        return r

    if args.in_process:
        rows = [report(run(**job)) for job in jobs]
    else:
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            futures = [pool.submit(run_isolated, job) for job in jobs]
            rows = [report(f.result()) for f in futures]  # in job order
    floor: dict[int, dict] = {}
    for dim in args.dims:
        for method in args.methods:
            errs = [r["final_rel_l2"] for r in rows if r["dim"] == dim and r["method"] == method]
            print(f"d={dim:>6} {method:15s} mean final rel L2 {statistics.mean(errs):.3e} "
                  f"(min {min(errs):.3e}, max {max(errs):.3e})", flush=True)
        floor[dim] = mean_floors([r["floors"] for r in rows if r["dim"] == dim])
        affine = floor[dim]["affine"]
        print(f"d={dim:>6} reference: best constant n {floor[dim]['constant']:.3e}, best affine "
              f"n {'-' if affine is None else format(affine, '.3e')}", flush=True)
    stem = "time_to_accuracy_smoke" if args.smoke else "time_to_accuracy"
    if args.problem != "twobody":
        stem += f"_{args.problem}"
    stem += "".join(f"_{d}" for d in args.dims) if args.dims != [1000] and not args.smoke else ""
    stem += f"_{args.tag}" if args.tag else ""
    write_csv(args.out / f"{stem}.csv",
              [dict(method=r["method"], dim=r["dim"], seed=r["seed"], step=step,
                    train_s=f"{t:.3f}", rel_l2=f"{e:.6e}")
               for r in rows for step, t, e in r["curve"]],
              ["method", "dim", "seed", "step", "train_s", "rel_l2"])  # a header also when empty
    (args.out / f"{stem}.json").write_text(json.dumps(
        {**finish_provenance(record), "problem": args.problem, "budget_s": args.budget_s,
         "eval_every": args.eval_every, "n_eval": args.n_eval, "lr_decay": args.lr_decay,
         "lrs": lrs, "init": args.init, "sdze_settings": sdze, "floors": floor, "rows": rows},
        indent=2))
    plot(rows, args.out / f"{stem}.png", TITLES[args.problem], floor)
    return rows


if __name__ == "__main__":
    main()
