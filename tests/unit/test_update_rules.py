"""Direct unit tests of :mod:`sdze_lightning.methods.sdze` (``apply_rule``).

Each rule's update is computed here by hand in float64 from its textbook formula:
plain ``c - lr g``; momentum ``buf = mu buf + g``, ``c - lr buf``; Adam
``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``,
``c - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)``. torch's functional forms
evaluate the same formulas in another order, so agreement is to float64 round-off: a few
ulps of O(1) numbers; the tolerance 1e-13 is ~500 ulps, while a wrong bias correction
(t - 1 for t) or a missing term changes the result by 1e-3 or more.
"""

from __future__ import annotations

import pytest
import torch

from sdze_lightning.methods.sdze import RULE_STATE, UPDATE_RULES, apply_rule, check_rule

F64 = torch.float64
TOL = dict(rtol=1e-13, atol=1e-13)


def layers() -> tuple[list[dict[str, torch.Tensor]], list[list[torch.Tensor]]]:
    """Two layers' coordinates (shapes 3 and 2x2) and three steps of gradients each."""
    gen = torch.Generator().manual_seed(0)
    states = [{"coords": torch.randn(3, generator=gen, dtype=F64)},
              {"coords": torch.randn(2, 2, generator=gen, dtype=F64)}]
    grads = [[torch.randn(st["coords"].shape, generator=gen, dtype=F64) for st in states]
             for _ in range(3)]
    return states, grads


def test_the_rules_and_their_state():
    assert UPDATE_RULES == ("plain", "momentum", "adam")
    assert set(RULE_STATE) == set(UPDATE_RULES)
    for rule in UPDATE_RULES:
        check_rule(rule)
    with pytest.raises(ValueError, match=r"method.update must be one of \['plain', "
                                         r"'momentum', 'adam'\], got 'nesterov'"):
        check_rule("nesterov")
    states, grads = layers()
    with pytest.raises(ValueError, match="got 'sgd'"):
        apply_rule("sgd", states, grads[0], lr=0.1, t=1)


def test_plain_is_minus_lr_times_the_gradient():
    states, grads = layers()
    start = [st["coords"].clone() for st in states]
    apply_rule("plain", states, grads[0], lr=0.1, t=1)
    for st, c0, g in zip(states, start, grads[0], strict=True):
        torch.testing.assert_close(st["coords"], c0 - 0.1 * g, **TOL)
        assert set(st) == {"coords"}  # no rule state


def test_momentum_accumulates_a_heavy_ball_buffer():
    states, grads = layers()
    coords = [st["coords"].clone() for st in states]
    bufs = [None, None]
    for t, g_t in enumerate(grads, start=1):
        apply_rule("momentum", states, g_t, lr=0.05, t=t, momentum=0.8)
        for i, g in enumerate(g_t):
            bufs[i] = g.clone() if bufs[i] is None else 0.8 * bufs[i] + g
            coords[i] = coords[i] - 0.05 * bufs[i]
            torch.testing.assert_close(states[i]["momentum_buffer"], bufs[i], **TOL)
            torch.testing.assert_close(states[i]["coords"], coords[i], **TOL)
    assert all(set(st) == {"coords", *RULE_STATE["momentum"]} for st in states)


def adam_by_hand(c, m, v, g, lr, t, b1=0.9, b2=0.999, eps=1e-8):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
    return c - lr * m_hat / (v_hat.sqrt() + eps), m, v


def test_adam_is_the_bias_corrected_moment_update():
    states, grads = layers()
    coords = [st["coords"].clone() for st in states]
    ms = [torch.zeros_like(c) for c in coords]
    vs = [torch.zeros_like(c) for c in coords]
    for t, g_t in enumerate(grads, start=1):
        apply_rule("adam", states, g_t, lr=0.01, t=t)
        for i, g in enumerate(g_t):
            coords[i], ms[i], vs[i] = adam_by_hand(coords[i], ms[i], vs[i], g, 0.01, t)
            torch.testing.assert_close(states[i]["exp_avg"], ms[i], **TOL)
            torch.testing.assert_close(states[i]["exp_avg_sq"], vs[i], **TOL)
            torch.testing.assert_close(states[i]["coords"], coords[i], **TOL)
    assert all(set(st) == {"coords", *RULE_STATE["adam"]} for st in states)


def test_adam_first_step_moves_every_coordinate_by_about_lr():
    """At t = 1 the bias-corrected step is lr g / (|g| + eps): lr * sign(g) to ~eps/|g|."""
    states, grads = layers()
    start = [st["coords"].clone() for st in states]
    apply_rule("adam", states, grads[0], lr=0.01, t=1)
    for st, c0, g in zip(states, start, grads[0], strict=True):
        expected = c0 - 0.01 * g / (g.abs() + 1e-8)
        torch.testing.assert_close(st["coords"], expected, **TOL)


def test_adam_bias_correction_uses_t_of_a_restarted_state():
    """A state (re)started at update t (zero moments, as after a window change) is
    corrected with t, not with a per-tensor count of 1."""
    states, grads = layers()
    c0, g = states[0]["coords"].clone(), grads[0][0]
    apply_rule("adam", states, grads[0], lr=0.01, t=5, betas=(0.5, 0.75), eps=1e-6)
    expected, _, _ = adam_by_hand(c0, torch.zeros_like(g), torch.zeros_like(g), g, 0.01, 5,
                                  b1=0.5, b2=0.75, eps=1e-6)
    torch.testing.assert_close(states[0]["coords"], expected, **TOL)
    # and it is not the t = 1 update (which moves by lr * sign(g))
    assert not torch.allclose(states[0]["coords"], c0 - 0.01 * g / (g.abs() + 1e-6))


def test_gradients_are_cast_to_the_coordinates_dtype():
    coords = torch.tensor([1.0, -2.0], dtype=F64)
    states = [{"coords": coords}]
    grad = torch.tensor([0.1, 0.3], dtype=torch.float32)
    apply_rule("plain", states, [grad], lr=1.0, t=1)
    assert states[0]["coords"].dtype == F64
    assert states[0]["coords"] is coords  # in place
    torch.testing.assert_close(coords, torch.tensor([1.0, -2.0], dtype=F64) - grad.double(),
                               rtol=0, atol=0)


def test_mismatched_layer_counts_are_refused():
    states, grads = layers()
    start = [st["coords"].clone() for st in states]
    with pytest.raises(ValueError):
        apply_rule("plain", states, grads[0][:1], lr=0.1, t=1)
    assert all(torch.equal(st["coords"], c) for st, c in zip(states, start, strict=True))
