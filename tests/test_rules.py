"""Invariants of each combination rule, checked on explicit random gradients (TorchJD style)."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from constrained_opt import functional as F
from constrained_opt import rules as R

finite = st.floats(-100, 100, allow_nan=False, allow_infinity=False, width=64).filter(
    lambda x: x == 0 or abs(x) > 1e-30  # gradients never reach fp64 subnormals
)


@st.composite
def gradients(draw):
    n = draw(st.integers(1, 16))
    r = torch.from_numpy(draw(arrays(np.float64, n, elements=finite)))
    f = torch.from_numpy(draw(arrays(np.float64, n, elements=finite)))
    g = draw(st.floats(0, 10, width=64))
    return r, f, torch.tensor(g, dtype=torch.float64)


def geometry(r, f, g):
    gram = F.gram(f, r)
    return R.Geometry(gram.gg, gram.rr, gram.gr, g)


def delta_of(combo, r, f):
    return combo.retain_coef * r + combo.constraint_coef * f


def tol(r, f):
    return 1e-9 * (1 + float(r.norm()) + float(f.norm())) ** 2


@settings(max_examples=200, deadline=None)
@given(gradients(), st.floats(0, 5))
def test_grad_norm_target_and_closed_form(grads, eta):
    r, f, g = grads
    geo = geometry(r, f, g)
    combo = R.grad_norm(geo, eta=eta)
    assert float(combo.retain_coef) == 1.0
    torch.testing.assert_close(combo.a_t, eta * geo.gg)
    if float(geo.gg) > 0:
        expected = max(0.0, eta - float(geo.gr) / float(geo.gg))
        assert float(combo.constraint_coef) == pytest.approx(expected, rel=1e-9, abs=1e-9)
        assert float(f @ delta_of(combo, r, f)) >= float(combo.a_t) - tol(r, f)


@settings(max_examples=200, deadline=None)
@given(gradients(), st.floats(0, 5), st.floats(0.01, 5), st.floats(0.01, 5))
def test_value_and_barrier_targets(grads, eta, alpha, beta):
    r, f, g = grads
    geo = geometry(r, f, g)
    torch.testing.assert_close(R.value(geo, eta=eta).a_t, eta * g)
    barrier = R.barrier(geo, alpha=alpha, beta=beta)
    torch.testing.assert_close(barrier.a_t, torch.minimum(alpha * g, beta * geo.gg))
    for combo in (R.value(geo, eta=eta), barrier):
        assert float(combo.constraint_coef) >= 0
        if float(geo.gg) > 0:
            assert float(f @ delta_of(combo, r, f)) >= float(combo.a_t) - tol(r, f)


@settings(max_examples=200, deadline=None)
@given(gradients(), st.floats(0, 2))
def test_cosine_rule(grads, eta):
    r, f, g = grads
    combo = R.cosine(geometry(r, f, g), eta=eta)
    cos = float(r @ f) / (float(r.norm() * f.norm()) or math.inf)
    assert float(combo.constraint_coef) == pytest.approx(max(0.0, eta - cos), abs=1e-9)
    assert math.isnan(float(combo.a_t))


@settings(max_examples=300, deadline=None)
@given(gradients())
def test_pcgrad_and_mgda_are_non_conflicting(grads):
    """δ·∇L_r ≥ 0 and δ·∇g ≥ 0: neither objective increases to first order."""
    r, f, g = grads
    geo = geometry(r, f, g)
    for rule in (R.pcgrad, R.mgda):
        delta = delta_of(rule(geo), r, f)
        assert float(delta @ r) >= -tol(r, f), rule.__name__
        assert float(delta @ f) >= -tol(r, f), rule.__name__


@settings(max_examples=200, deadline=None)
@given(gradients())
def test_mgda_is_min_norm_on_segment(grads):
    r, f, g = grads
    delta = delta_of(R.mgda(geometry(r, f, g)), r, f)
    for gamma in torch.linspace(0, 1, 21, dtype=torch.float64):
        assert float(delta.norm()) <= float((gamma * r + (1 - gamma) * f).norm()) + 1e-9 * (
            1 + float(r.norm())
        )


@settings(max_examples=200, deadline=None)
@given(gradients())
def test_pcgrad_matches_explicit_projection(grads):
    r, f, g = grads
    delta = delta_of(R.pcgrad(geometry(r, f, g)), r, f)
    dot = float(r @ f)
    r_p = r - min(0.0, dot) / float(f @ f) * f if float(f @ f) > 0 else r
    f_p = f - min(0.0, dot) / float(r @ r) * r if float(r @ r) > 0 else f
    torch.testing.assert_close(delta, r_p + f_p, atol=tol(r, f), rtol=1e-9)


def test_scalarized_is_fixed_weight():
    geo = geometry(torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0]), torch.tensor(0.0))
    combo = R.scalarized(geo, forget_weight=0.3)
    assert float(combo.retain_coef) == 1.0 and float(combo.constraint_coef) == pytest.approx(0.3)


def test_user_callables():
    geo = geometry(torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0]), torch.tensor(0.5))
    as_target = R.resolve(lambda geo: 2 * geo.g)
    combo = as_target(geo)
    torch.testing.assert_close(combo.a_t, torch.tensor(1.0, dtype=geo.gg.dtype))
    # λ = (a − gr)/gg = (1 − (−1))/2 = 1
    assert float(combo.constraint_coef) == pytest.approx(1.0)
    as_lambda = R.multiplier(lambda geo: 0.25)
    assert float(as_lambda(geo).constraint_coef) == 0.25


def test_resolve_errors():
    with pytest.raises(ValueError, match="unknown rule 'gradnorm'"):
        R.resolve("gradnorm")
    with pytest.raises(TypeError, match="rule must be"):
        R.resolve(3)
