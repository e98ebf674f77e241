"""KKT properties of the closed-form projection (Theorem 3.1) on random problems."""

import numpy as np
import pytest
import scipy.optimize
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from constrained_opt import functional as F
from constrained_opt import kkt_direction

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=64).filter(
    lambda x: x == 0 or abs(x) > 1e-30  # gradients never reach fp64 subnormals
)


@st.composite
def problems(draw, min_dim=1, max_dim=24):
    n = draw(st.integers(min_dim, max_dim))
    r = draw(arrays(np.float64, n, elements=finite))
    f = draw(arrays(np.float64, n, elements=finite))
    a = draw(st.floats(0, 1e4, allow_nan=False, width=64))
    return torch.from_numpy(r), torch.from_numpy(f), a


def tol(*xs):
    return 1e-9 * (1 + sum(float(torch.as_tensor(x).abs().max()) ** 2 for x in xs))


@settings(max_examples=300, deadline=None)
@given(problems())
def test_kkt_conditions(problem):
    r, f, a = problem
    delta, lam = kkt_direction(r, f, a)
    gg, lam = float(f @ f), float(lam)
    assert lam >= 0  # dual feasibility
    torch.testing.assert_close(delta, r + lam * f, rtol=0, atol=0)  # stationarity: δ − r − λf = 0
    if gg == 0:
        assert lam == 0 and torch.equal(delta, r)
        return
    # rounding error of f·δ = f·r + λ‖f‖², scaled to the magnitudes involved
    slack_tol = 1e-12 * len(r) * (float(f.norm() * r.norm()) + abs(a) + lam * gg + 1)
    assert float(f @ delta) >= a - slack_tol  # primal feasibility
    if lam > 0:
        assert abs(a - float(f @ delta)) <= slack_tol  # complementary slackness


@settings(max_examples=60, deadline=None)
@given(problems(max_dim=8))
def test_matches_independent_qp_solver(problem):
    r, f, a = problem
    assume(float(f @ f) >= 1e-6)
    # scipy solves the problem rescaled to unit size (‖r‖ + a/‖f‖, the distances the objective
    # ½‖r − δ‖² measures), so every tolerance below is relative to the problem's magnitude
    size = float(r.norm()) + a / float(f.norm())
    size = size if size > 0 else 1.0  # r = 0 and a = 0: δ = 0 at any scale
    r_np, f_np, a_n = r.numpy() / size, f.numpy() / float(f.norm()), a / float(f.norm()) / size
    res = scipy.optimize.minimize(
        lambda d: 0.5 * np.sum((r_np - d) ** 2),
        x0=np.zeros_like(r_np),
        jac=lambda d: d - r_np,
        hess=lambda d: np.eye(len(d)),
        constraints=[scipy.optimize.LinearConstraint(f_np[None, :], a_n, np.inf)],
        method="trust-constr",
        options={"gtol": 1e-12, "xtol": 1e-14, "maxiter": 2000},
    )
    assert f_np @ res.x >= a_n - 1e-6  # the solver's point is feasible
    delta, _ = kkt_direction(r, f, a)
    objective = 0.5 * float(((r.numpy() / size - delta.numpy() / size) ** 2).sum())
    assert objective <= res.fun * (1 + 1e-6) + 1e-9
    # trust-constr is an interior-point method: it stops ~1e-4 inside an active boundary, hence the
    # point tolerance; the objective comparison above is the sharp check.
    np.testing.assert_allclose(delta.numpy() / size, res.x, atol=2e-3 * (1 + np.abs(res.x).max()))


@settings(max_examples=200, deadline=None)
@given(problems())
def test_no_conflict_means_no_correction(problem):
    r, f, _ = problem
    a = float(f @ r) - 1.0  # the constraint already holds with slack
    assume(float(f @ f) > 0)
    delta, lam = kkt_direction(r, f, a)
    assert float(lam) == 0.0
    assert torch.equal(delta, r)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_zero_constraint_gradient_gives_retain_gradient(dtype):
    r = torch.randn(100).to(dtype)
    delta, lam = kkt_direction(r, torch.zeros(100, dtype=dtype), 5.0)
    assert float(lam) == 0.0 and torch.equal(delta, r) and delta.dtype == dtype


@settings(max_examples=200, deadline=None)
@given(problems(), st.floats(1e-3, 1e3), st.floats(1e-3, 1e3))
def test_scaling(problem, c, s):
    """(f, a) → (c f, c a) keeps δ and divides λ by c; (r, f, a) → (s r, s f, s² a) keeps λ."""
    r, f, a = problem
    assume(float(f @ f) >= 1e-6)
    delta, lam = kkt_direction(r, f, a)
    delta_c, lam_c = kkt_direction(r, c * f, c * a)  # the same feasible set, so the same δ
    torch.testing.assert_close(delta_c, delta, rtol=1e-7, atol=tol(r, f) * 10)
    torch.testing.assert_close(lam_c * c, lam, rtol=1e-7, atol=1e-7)
    _, lam_s = kkt_direction(s * r, s * f, s * s * a)
    torch.testing.assert_close(lam_s, lam, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("blocked", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_gram_accumulates_in_fp32(dtype, blocked, monkeypatch):
    monkeypatch.setattr(F, "_PASS", 1000)  # force several passes
    monkeypatch.setattr(F, "_BLOCK", 128)  # and several blocks per pass
    monkeypatch.setattr(F, "_BLOCKED_MIN_COLUMNS", 0 if blocked else 10**9)
    torch.manual_seed(0)
    rows = torch.randn(2, 4321).to(dtype)
    m = F.gram_rows(rows)
    assert m.dtype == torch.float32
    exact = rows.double() @ rows.double().T
    torch.testing.assert_close(m.double(), exact, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("n", [0, 1, 127, 128, 129, 5 * 128 + 3])
def test_blocked_gram_matches_fp64_at_every_block_boundary(n, monkeypatch):
    monkeypatch.setattr(F, "_BLOCK", 128)
    monkeypatch.setattr(F, "_BLOCKED_MIN_COLUMNS", 0)
    torch.manual_seed(n)
    rows = torch.randn(3, n)[:2]  # a (2, n) view of a larger buffer, as the optimizer passes it
    exact = rows.double() @ rows.double().T
    torch.testing.assert_close(F.gram_rows(rows).double(), exact, rtol=1e-6, atol=1e-5)


def test_blocked_gram_of_millions_of_fp32_elements_keeps_relative_accuracy(monkeypatch):
    """One long fp32 dot drifts by ~3e-5 relative at 4M elements; the blocked sum must not."""
    monkeypatch.setattr(F, "_BLOCKED_MIN_COLUMNS", 0)
    torch.manual_seed(0)
    rows = torch.randn(2, 1 << 22) + 0.5
    exact = rows.double() @ rows.double().T
    torch.testing.assert_close(F.gram_rows(rows).double(), exact, rtol=2e-6, atol=0.0)


def test_gram_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes differ"):
        F.gram(torch.zeros(3), torch.zeros(4))


def test_kkt_direction_rejects_integer_gradients():
    with pytest.raises(TypeError, match="floating-point"):
        kkt_direction(torch.zeros(3, dtype=torch.int64), torch.zeros(3), 1.0)


@settings(max_examples=200, deadline=None)
@given(problems(), st.floats(-3, 3), st.floats(-3, 3))
def test_direction_products_match_explicit_vectors(problem, c_r, c_f):
    r, f, _ = problem
    g = F.gram(f, r)
    p = F.direction_products(
        g, torch.tensor(c_r, dtype=torch.float64), torch.tensor(c_f, dtype=torch.float64)
    )
    delta = c_r * r + c_f * f
    t = tol(r, f) * 10
    assert abs(float(p.dot_retain) - float(delta @ r)) <= t
    assert abs(float(p.dot_constraint) - float(delta @ f)) <= t
    assert abs(float(p.sq_norm) - float(delta @ delta)) <= t


def test_clip_scale():
    g = F.gram(torch.tensor([0.0, 0.0]), torch.tensor([3.0, 4.0]))
    one, zero = torch.tensor(1.0), torch.tensor(0.0)
    p = F.direction_products(g, one, zero)
    assert float(F.clip_scale(p, 1.0)) == pytest.approx(0.2)
    assert float(F.clip_scale(p, 10.0)) == 1.0
    assert float(F.clip_scale(p, None)) == 1.0
    assert float(F.clip_scale(F.direction_products(g, zero, zero), 1.0)) == 1.0
