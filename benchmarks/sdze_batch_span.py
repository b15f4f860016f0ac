"""SDZE with the input layer's subspace spanned by the current batch: an experiment.

SDZE moves the first layer ``W`` (``width x d``) in ``W + A C B^T`` with a random
orthonormal ``B`` (``d x r``). The first layer's gradient is ``Delta^T X`` (plus the
spatial estimator's coordinate directions): its rows lie in the span of the ``N`` batch
points ``X`` (``N x d``), so a random ``B`` holds about ``r / d`` of it and a ``B`` drawn
from the batch span about ``r / N``. Here ``B`` is the orthonormalised ``X^T R``
(``R``: a seeded ``N x r`` Gaussian, i.e. ``r`` random combinations of the step's
points), redrawn every step, since every step has fresh points (a basis of an earlier
batch is nearly orthogonal to the new gradient at ``d >> N``).

Variants, each through ``lightning.Trainer.fit`` for the same training wall time (the
setup of ``time_to_accuracy.py``, whose ``study_overrides``, ``floors`` and
``WallClockEval`` are used). Every run is built from the packaged configs as
``sdze-train <overrides>`` builds it (``_common.build_run``): ``pde=allen_cahn_twobody
method=sdze estimator=taylor`` with ``seed``, ``pde.n_eval`` (``--n-eval``), ``threads=1``,
``method.lr`` / ``method.rank`` / ``method.period`` where ``--lr`` / ``--rank`` /
``--period`` are given (else the packaged defaults), and the variant's overrides
(:func:`variant_overrides`):

* ``sdze``: the shipped SDZE (Adam in the coordinates, windows reset it);
* ``sdze_p1``: ``method.period=1`` (random bases redrawn every step; Adam restarts every
  step, i.e. ``lr * sign(g)`` per coordinate): the control of ``span_p1``;
* ``span_p1``: ``sdze_p1`` with the first layer's ``B`` from the step's batch
  (``method._target_=sdze_batch_span.BatchSpanSDZE``);
* ``span_rms``: the other layers on the shipped windows; the first layer re-based every
  step (its offset folded into ``W``), its coordinates updated by RMSprop (Adam with
  ``beta1 = 0``; the second moment is kept across the re-basings, the coordinates of
  successive bases being exchangeable): ``method._target_=sdze_batch_span.BatchSpanSDZE
  +method.first_layer_rms=true``.

The batch-span variants are no packaged method: their ``_target_`` is a class of this
script (importable with ``benchmarks/`` on ``PYTHONPATH``), and the script hands the built
optimizer the problem's batches (``batch_points``) after the build, which ``sdze-train``
does not; each row says so in ``not_in_command`` beside its overrides and command.

Reported: the final relative L2 error on the held-out points against the error of the
best constant network output (``floors``), per variant, and the load average; and, before
and after training, the share of the first layer's exact gradient that the batch-span
basis and a random basis hold, for one step's gradient and for the mean gradient of the
other steps (``captured_fractions``).

    python benchmarks/sdze_batch_span.py                          # d = 1e3, 216 s per variant
    python benchmarks/sdze_batch_span.py --variants span_p1 --tag span_p1
    python benchmarks/sdze_batch_span.py --smoke

Results: ``results/sdze_batch_span[_<tag>].json``, with the run's provenance (date,
commit, machine, loads, threads, command).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    RESULTS,
    SMOKE_OVERRIDES,
    build_run,
    finish_provenance,
    fit_run,
    load_average,
    script_provenance,
)
from time_to_accuracy import WallClockEval, floors, study_overrides  # noqa: E402

from sdze_lightning.methods import SDZE  # noqa: E402
from sdze_lightning.methods.sdze import LayerSubspace  # noqa: E402
from sdze_lightning.seeding import Stream, generator  # noqa: E402

#: Tag of the batch combinations inside the user stream (the library's streams stay apart).
_SPAN = 31
#: The variants of the experiment.
VARIANTS = ("sdze", "sdze_p1", "span_p1", "span_rms")
#: ``method._target_`` of the batch-span variants: :class:`BatchSpanSDZE`, imported by
#: Hydra from this script's folder (on ``sys.path``).
TARGET = "sdze_batch_span.BatchSpanSDZE"


def batch_span_basis(x: Tensor, rank: int, seed: int, step: int) -> Tensor:
    """Orthonormal ``(d, rank)`` basis of ``rank`` seeded random combinations of the rows of ``x``.

    Args:
        x: The batch, ``(N, d)``; ``rank <= min(N, d)``.
        rank: Number of columns.
        seed: Seed of the combinations.
        step: Step index (a fresh draw per step).

    Returns:
        ``Q`` of the QR of ``x^T R`` (``R``: ``(N, rank)`` Gaussian), signs fixed by ``diag(R)``.

    """
    gen = generator(x.device, Stream.USER, seed, _SPAN, step)
    mix = torch.randn(x.shape[0], rank, generator=gen, device=x.device, dtype=x.dtype)
    q, r = torch.linalg.qr(x.T @ mix, mode="reduced")
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1
    return q * signs


class BatchSpanSDZE(SDZE):
    """SDZE whose first layer's right factor spans the step's batch, redrawn every step.

    Args:
        module: The network.
        batch_points: ``step -> (N, d)`` interior points that the step evaluates
            (``problem.points(step, 0)``: with CRNS every evaluation uses key 0); ``None``
            when built from a config, set on the optimizer before its first step
            (:func:`bind_batches`).
        first_layer_rms: Re-base the first layer every step inside the shipped windows
            and update its coordinates by RMSprop (``beta1 = 0``, second moment kept);
            ``False`` needs ``period = 1`` (every window change re-bases everything).
        **kwargs: :class:`~sdze_lightning.methods.SDZE`'s arguments.

    """

    def __init__(self, module: nn.Module, batch_points: Callable[[int], Tensor] | None = None,
                 first_layer_rms: bool = False, **kwargs) -> None:
        super().__init__(module, **kwargs)
        if not self.crns:
            raise ValueError("BatchSpanSDZE needs crns=True (one batch per step).")
        if self.update != "adam" or not (first_layer_rms or self.period == 1):
            raise ValueError("BatchSpanSDZE needs update='adam' and first_layer_rms or period=1.")
        self.batch_points = batch_points
        self.first_layer_rms = first_layer_rms

    def _prepare(self, step: int) -> None:
        if self.batch_points is None:
            raise RuntimeError("BatchSpanSDZE needs the step's batch: set batch_points "
                               "(bind_batches) before the first step.")
        super()._prepare(step)  # window change of every layer, the step's directions
        subs = self.subspaces()
        old, st = subs[0], self.layer_state(0)
        old.fold(st["coords"])
        st["coords"].zero_()
        x = self.batch_points(step).to(old.B.dtype)
        subs[0] = LayerSubspace(old.layer, old.A, batch_span_basis(x, old.rb, self.seed, step))
        st.pop("exp_avg", None)  # a first moment of another basis means nothing here

    def _update(self, scalars: Tensor) -> None:
        super()._update(scalars)
        if self.first_layer_rms:
            # The first layer's coordinates were zero before this update and its first
            # moment fresh: m_hat = (1 - b1) g / (1 - b1^t). Rescaling the increment by
            # (1 - b1^t) / (1 - b1) makes it Adam's with beta1 = 0 (RMSprop).
            b1, t = self.betas[0], self.zo_state["rule_step"]
            self.layer_state(0)["coords"].mul_((1 - b1**t) / (1 - b1))
            self._install()


def captured_fractions(problem, steps: int, rank: int, seed: int,
                       first_step: int = 0) -> dict[str, float]:
    """Share of the first layer's exact gradient that a right factor holds, at the current weights.

    For steps ``s = first_step .. first_step + steps - 1``: ``G_s`` (``width x d``),
    the gradient of the step's loss (key 0) by back-propagation, and the mean over the
    steps of ``|G B|_F^2 / |G|_F^2`` for ``B`` = the whole batch span (the premise: 1 up to
    the estimator's coordinate directions), the batch-span basis of rank ``rank`` (about
    ``rank / N``) and a random basis as SDZE draws it (about ``rank / d``). The same
    shares of ``G`` = the mean gradient of the other steps (``mean_`` keys: the
    direction that persists from batch to batch, which a basis of one batch's points
    need not hold any better than a random one).
    """
    layer = problem.net.layers[0]
    grads, bases = [], []
    for step in range(first_step, first_step + steps):
        problem.net.zero_grad(set_to_none=True)
        problem.loss_terms(step, 0)["loss"].backward()
        x = problem.points(step, 0).double()
        grads.append(layer.weight.grad.double())
        bases.append(dict(batch_span=torch.linalg.qr(x.T)[0],
                          span_basis=batch_span_basis(x, rank, seed, step),
                          random_basis=LayerSubspace.draw(layer, rank, seed, step, 0).B.double()))
    problem.net.zero_grad(set_to_none=True)
    total = sum(grads)
    shares: dict[str, float] = {}
    for grad, step_bases in zip(grads, bases, strict=True):
        others = (total - grad) / max(steps - 1, 1)
        for name, basis in step_bases.items():
            for key, g in ((name, grad), (f"mean_{name}", others)):
                share = float((g @ basis).norm() ** 2 / g.norm() ** 2) / steps
                shares[key] = shares.get(key, 0.0) + share
    return shares


def variant_overrides(variant: str, period: int | None = None) -> list[str]:
    """The overrides of ``variant`` on top of ``method=sdze``.

    Args:
        variant: A key of :data:`VARIANTS`.
        period: ``method.period`` of the variants on windows (``sdze``, ``span_rms``);
            ``None``: the packaged one. The ``_p1`` variants have period 1.

    """
    windows = [] if period is None else [f"method.period={period}"]
    return {"sdze": windows, "sdze_p1": ["method.period=1"],
            "span_p1": [f"method._target_={TARGET}", "method.period=1"],
            "span_rms": [f"method._target_={TARGET}", "+method.first_layer_rms=true",
                         *windows]}[variant]


def bind_batches(optimizer, problem) -> bool:
    """Hand a batch-span optimizer the problem's batch of each step; whether it is one."""
    if not hasattr(optimizer, "batch_points"):
        return False
    optimizer.batch_points = lambda step: problem.points(step, 0)
    return True


def run(variant: str, overrides: list[str], budget_s: float, every: int,
        capture_steps: int = 0) -> dict:
    """One run through ``Trainer.fit``; the final error against the constant floor.

    Args:
        variant: The row's variant (a key of :data:`VARIANTS`), its label.
        overrides: The run's ``sdze-train`` overrides.
        budget_s: Training wall time after which training stops.
        every: Steps between evaluations.
        capture_steps: Steps of :func:`captured_fractions` before and after training
            (0: none).

    """
    built = build_run(overrides)
    problem = built.problem
    not_in_command = [f"training stops after {budget_s:g} s of training wall time, the "
                      f"error is recorded every {every} steps (a callback); a Trainer "
                      "without logger, checkpoints or validation"]
    if bind_batches(built.optimizer, problem):
        not_in_command.append(f"{TARGET} (PYTHONPATH=benchmarks) gets the problem's batch of "
                              "each step after the build (batch_points), which sdze-train "
                              "does not do")
    settings = problem.method.keywords  # the method's configured arguments
    cb = WallClockEval(budget_s, every)
    floor = floors(problem, affine_max_dim=0)
    captured = {}
    if capture_steps:
        captured["start"] = captured_fractions(problem, capture_steps, settings["rank"],
                                               settings["seed"])
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=10**9, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=[cb])
    load_start = load_average()
    fit_run(built, trainer)
    final = problem.relative_l2_error()
    if capture_steps:  # at the trained weights (SDZE's offset is folded at the end), fresh batches
        captured["end"] = captured_fractions(problem, capture_steps, settings["rank"],
                                             settings["seed"], first_step=trainer.global_step + 1)
    return dict(variant=variant, dim=problem.dim, seed=problem.seed, lr=settings["lr"],
                rank=settings["rank"], period=settings["period"], steps=trainer.global_step,
                train_s=cb._train_s, final_rel_l2=final, constant_floor=floor["constant"],
                below_floor=final < floor["constant"],
                explained=1 - (final / floor["constant"]) ** 2, captured=captured, curve=cb.curve,
                load_start=load_start, load_end=load_average(), threads=built.threads,
                overrides=built.overrides, command=built.command,
                not_in_command=not_in_command)


def main(argv: list[str] | None = None) -> list[dict]:
    """Run every variant in turn; print and save the final errors against the floor."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--dim", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-s", type=float, default=216.0, help="training seconds per run")
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--n-eval", type=int, default=1000, help="held-out points (pde.n_eval)")
    ap.add_argument("--lr", type=float, default=None,
                    help="every variant's method.lr (default: SDZE's packaged one)")
    ap.add_argument("--rank", type=int, default=None,
                    help="method.rank (default: the packaged one)")
    ap.add_argument("--period", type=int, default=None,
                    help="method.period of sdze and span_rms (default: the packaged one)")
    ap.add_argument("--capture-steps", type=int, default=40,
                    help="steps over which the captured share of the gradient is averaged")
    ap.add_argument("--tag", default="", help="suffix of the result file")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    record = script_provenance(__file__, argv)
    extra = [f"method.{key}={value!r}" for key, value in (("lr", args.lr), ("rank", args.rank))
             if value is not None]
    if args.smoke:
        args.dim, args.budget_s, args.eval_every, args.n_eval = 50, 1.0, 5, 64
        args.capture_steps, args.period = 10, 3
        extra = [*SMOKE_OVERRIDES, *extra]
    rows = []
    for variant in args.variants:
        overrides = study_overrides("sdze", "twobody", args.dim, args.seed, *extra,
                                    *variant_overrides(variant, args.period),
                                    n_eval=args.n_eval, threads=1)
        row = run(variant, overrides, args.budget_s, args.eval_every, args.capture_steps)
        rows.append(row)
        print(f"d={args.dim} {variant:9s}: {row['steps']} steps in {row['train_s']:.0f} s, final "
              f"rel L2 {row['final_rel_l2']:.5f}, best constant {row['constant_floor']:.5f} "
              f"(1 - (err/floor)^2 = {row['explained']:+.4f}), load "
              f"{row['load_start']:.1f}-{row['load_end']:.1f}: {row['command']}", flush=True)
        for when, shares in row["captured"].items():
            print(f"share of the first layer's gradient held ({when}): " + ", ".join(
                f"{k} {v:.4f}" for k, v in shares.items()), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "sdze_batch_span_smoke" if args.smoke else "sdze_batch_span"
    stem += f"_{args.tag}" if args.tag else ""
    (args.out / f"{stem}.json").write_text(json.dumps(
        {**finish_provenance(record), "budget_s": args.budget_s, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
