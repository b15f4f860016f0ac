"""Fused (``torch.compile``) kernels: same values as the eager code, clean fallback."""

from __future__ import annotations

import logging

import pytest
import torch

from sdze_lightning import kernels
from sdze_lightning.problems import twobody


def _inputs(n: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64) / d**0.5
    return x, torch.randn(d - 1, generator=gen, dtype=torch.float64)


def test_fused_two_body_terms_equal_the_eager_ones():
    # Same arithmetic, only the summation order differs: float64 sums of
    # d = 7e4 terms of size O(1) agree to ~sqrt(d) * 1e-16 relative; 1e-11 is
    # far above that and far below any wrong term (O(1) relative).
    x, c = _inputs(3, twobody.FUSED_MIN_DIM + 4464)
    fused = kernels.fused_call(twobody._two_body_fused, x, c)
    if fused is None:
        pytest.skip("torch.compile is not available here (the eager path is used)")
    eager = twobody._two_body_core(x, c, lambda t: t @ c)
    for f, e in zip(fused, eager, strict=True):
        torch.testing.assert_close(f, e, rtol=1e-11, atol=1e-11 * float(e.abs().max()))
    # the public entry point takes the fused path for long rows, also for one row
    for n in (3, 1):
        for f, e in zip(twobody.two_body_terms(x[:n], c), eager, strict=True):
            torch.testing.assert_close(f, e[:n], rtol=1e-11, atol=1e-11 * float(e.abs().max()))


def test_fused_kernels_follow_the_problems_setting_not_the_environment(monkeypatch):
    """``fused_kernels`` (config field, problem argument) decides; ``SDZE_FUSED`` is not read."""
    calls = []
    monkeypatch.setattr(twobody, "fused_call", lambda fn, *a: calls.append(fn.__name__))
    monkeypatch.setenv("SDZE_FUSED", "0")  # the old process-wide switch: no effect any more
    x = torch.rand(2, twobody.FUSED_MIN_DIM + 2, dtype=torch.float64)
    for fused in (False, True):
        problem = twobody.TwoBody(dim=x.shape[1], n_eval=0, fused_kernels=fused)
        problem.psi_terms(x)
        assert calls == (["_two_body_fused"] if fused else []), fused
    with pytest.raises(ValueError, match="pde.fused_kernels must be true or false"):
        twobody.TwoBody(dim=4, fused_kernels="no")


def test_the_report_names_the_kernels_that_ran_compiled(monkeypatch):
    def doubled(x):
        return (2 * x,)

    monkeypatch.setattr(torch, "compile", lambda f, **kw: f)
    monkeypatch.setattr(kernels, "_ran", set())
    assert kernels.fused_report(True) == {"enabled": True, "ran": []}
    kernels.fused_call(doubled, torch.ones(2))
    assert kernels.fused_report(False) == {"enabled": False, "ran": ["doubled"]}


def test_a_compiler_failure_falls_back_to_eager_once(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    def fn(x):
        return (x.sum(),)

    monkeypatch.setattr(torch, "compile", lambda f, **kw: broken)
    with caplog.at_level(logging.WARNING, logger="sdze_lightning.kernels"):
        assert kernels.fused_call(fn, torch.ones(3)) is None
        assert kernels.fused_call(fn, torch.ones(3)) is None
    assert sum("no C++ compiler" in r.getMessage() for r in caplog.records) == 1
    # and the eager path of the problem still gives its values
    monkeypatch.setattr(twobody, "fused_call", lambda *a: None)
    x, c = _inputs(1, twobody.FUSED_MIN_DIM + 10)
    expected = twobody._two_body_core(x, c, lambda t: t @ c)
    for got, e in zip(twobody.two_body_terms(x, c), expected, strict=True):
        torch.testing.assert_close(got, e, rtol=1e-12, atol=1e-12 * float(e.abs().max()))


def test_kernels_are_built_with_the_cpp_wrapper_first_then_the_default(monkeypatch, caplog):
    """The C++ wrapper releases the GIL while the kernel runs (so the prefetch thread's source
    does not stall the main thread); if it cannot be built, Inductor's default wrapper is used."""
    from torch._inductor import config as inductor_config

    # the first attempt turns on an option Inductor really has (a renamed option would make
    # every first attempt fail and silently cost a compilation), the last is the default
    first, last = kernels.COMPILE_OPTIONS[0], kernels.COMPILE_OPTIONS[-1]
    assert first.get("cpp_wrapper") is True and last == {}
    assert all(hasattr(inductor_config, key) for options in kernels.COMPILE_OPTIONS
               for key in options)
    tried: list[dict] = []

    def fake_compile(f, **kwargs):
        tried.append(kwargs["options"])
        if kwargs["options"].get("cpp_wrapper"):
            def fail(*args):
                raise RuntimeError("no C++ wrapper here")
            return fail
        return f

    def fn(x):
        return (2 * x,)

    monkeypatch.setattr(torch, "compile", fake_compile)
    with caplog.at_level(logging.INFO, logger="sdze_lightning.kernels"):
        for _ in range(2):
            (out,) = kernels.fused_call(fn, torch.ones(3))
            assert torch.equal(out, torch.full((3,), 2.0))
    assert tried == list(kernels.COMPILE_OPTIONS)  # compiled once per option, then reused
    assert fn not in kernels._failed
    assert not any(r.levelno >= logging.WARNING for r in caplog.records)


def test_running_out_of_memory_in_a_kernel_is_not_a_compiler_failure(monkeypatch):
    """An OOM inside the compiled call propagates (eager code would need the memory too);
    the kernel is neither recompiled nor switched off."""
    def fn(x):
        return (x,)

    def compiled(*args):
        raise torch.OutOfMemoryError("out of memory")

    calls = []
    monkeypatch.setattr(torch, "compile", lambda f, **kw: calls.append(kw) or compiled)
    with pytest.raises(torch.OutOfMemoryError):
        kernels.fused_call(fn, torch.ones(2))
    assert len(calls) == 1 and fn not in kernels._failed
