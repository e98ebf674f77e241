"""The two-objective rules against torchjd's aggregators, and torchjd-style aggregator properties.

torchjd aggregates a Jacobian J whose rows are the objectives' gradients; here J = [∇L_r; ∇g].

* ``torchjd.aggregation.PCGrad`` returns the *sum* of the projected rows, not their mean, which is
  exactly our δ = r_p + f_p: the vectors are compared as they are. (torchjd draws a random projection
  order; with two rows there is only one.)
* ``torchjd.aggregation.MGDA`` returns the min-norm convex combination Jᵀw with w on the simplex,
  found by Frank-Wolfe. With two rows the simplex is a segment and the first exact line search from
  w = (½, ½) lands on the minimiser, so its output equals our closed form to rounding: again the
  vectors themselves are compared, no normalisation.

The properties follow torchjd's aggregator tests: finite output of the right shape (also for zero
and parallel gradients), non-conflicting (Jδ ≥ 0), invariant to the order of the rows, and, for
PCGrad, linear under positive scaling of the rows. Only pcgrad and mgda promise non-conflict; the KKT
rules promise ∇g·δ ≥ a_t only, and the last test shows that they may conflict with ∇L_r.
"""

import numpy as np
import pytest
import torch
from hypothesis import given, reject, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch import nn
from torchjd.aggregation import MGDA, PCGrad, UPGrad
from torchjd.linalg import QuadprogProjector

from constrained_opt import ValueFunctionBilevelOptimizer
from constrained_opt import functional as F
from constrained_opt import rules as R

finite = st.floats(-100, 100, allow_nan=False, allow_infinity=False, width=64).filter(
    lambda x: x == 0 or abs(x) > 1e-30
)
NON_CONFLICTING = {"pcgrad": R.pcgrad, "mgda": R.mgda}


@st.composite
def pairs(draw):
    """Random (r, f), with zero, parallel and anti-parallel pairs drawn on purpose."""
    n = draw(st.integers(1, 24))
    r = torch.from_numpy(draw(arrays(np.float64, n, elements=finite)))
    kind = draw(st.sampled_from(["random", "random", "random", "zero", "parallel"]))
    if kind == "random":
        f = torch.from_numpy(draw(arrays(np.float64, n, elements=finite)))
    elif kind == "zero":
        f = torch.zeros(n, dtype=torch.float64)
    else:
        f = draw(st.floats(-10, 10).filter(lambda c: abs(c) > 1e-3)) * r
    return (r, f) if draw(st.booleans()) else (f, r)


def delta(rule, r, f):
    gram = F.gram(f, r)
    combo = rule(R.Geometry(gram.gg, gram.rr, gram.gr, torch.zeros((), dtype=torch.float64)))
    return combo.retain_coef * r + combo.constraint_coef * f


def tol(r, f):
    return 1e-9 * (1 + float(r.norm()) + float(f.norm())) ** 2


@settings(max_examples=100, deadline=None)
@given(pairs())
def test_pcgrad_equals_torchjd_pcgrad(pair):
    r, f = pair
    torch.testing.assert_close(delta(R.pcgrad, r, f), PCGrad()(torch.stack([r, f])), rtol=0, atol=tol(r, f))


@settings(max_examples=100, deadline=None)
@given(pairs())
def test_mgda_equals_torchjd_mgda(pair):
    r, f = pair
    torch.testing.assert_close(delta(R.mgda, r, f), MGDA()(torch.stack([r, f])), rtol=0, atol=tol(r, f))


@pytest.mark.parametrize("name", sorted(NON_CONFLICTING))
@settings(max_examples=100, deadline=None)
@given(pair=pairs())
def test_structure_non_conflict_and_permutation_invariance(name, pair):
    rule, (r, f) = NON_CONFLICTING[name], pair
    d = delta(rule, r, f)
    assert d.shape == r.shape and bool(d.isfinite().all())
    assert float(r @ d) >= -tol(r, f) and float(f @ d) >= -tol(r, f)  # Jδ ≥ 0
    torch.testing.assert_close(delta(rule, f, r), d, rtol=0, atol=tol(r, f))


@settings(max_examples=100, deadline=None)
@given(pairs(), st.lists(st.floats(0.1, 10), min_size=6, max_size=6))
def test_pcgrad_is_linear_under_positive_scaling_of_the_rows(pair, c):
    """A(diag(αc1 + βc2) J) = α A(diag(c1) J) + β A(diag(c2) J) for positive c1, c2, α, β."""
    r, f = pair
    c1, c2, alpha, beta = c[0:2], c[2:4], c[4], c[5]

    def scaled(w):
        return delta(R.pcgrad, w[0] * r, w[1] * f)

    mixed = scaled([alpha * c1[0] + beta * c2[0], alpha * c1[1] + beta * c2[1]])
    torch.testing.assert_close(mixed, alpha * scaled(c1) + beta * scaled(c2), rtol=0, atol=1e3 * tol(r, f))


@pytest.mark.parametrize(("rule", "aggregator"), [("pcgrad", PCGrad()), ("mgda", MGDA())])
def test_optimizer_step_equals_sgd_on_the_torchjd_aggregate(rule, aggregator):
    """End to end through the flat buffers: one step equals θ − lr·A(J), J from torch.autograd."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x = torch.randn(8, 3, dtype=torch.float64)
    params = list(model.parameters())

    def retain():
        return model(x).pow(2).mean()

    def forget():
        return (model(x) - 1).pow(2).mean()

    jac = torch.stack(
        [torch.cat([g.reshape(-1) for g in torch.autograd.grad(fn(), params)]) for fn in (retain, forget)]
    )
    expected = torch.cat([p.detach().reshape(-1) for p in params]) - 0.1 * aggregator(jac)
    opt = ValueFunctionBilevelOptimizer(params, torch.optim.SGD, lr=0.1, inner_steps=0, rule=rule)
    opt.step(retain, forget)
    torch.testing.assert_close(torch.cat([p.detach().reshape(-1) for p in params]), expected)


def test_kkt_rules_promise_the_constraint_side_only():
    """grad_norm guarantees ∇g·δ ≥ η‖∇g‖² but not ∇L_r·δ ≥ 0: with strongly conflicting gradients and
    η = 1 the retain objective is sacrificed to first order. (The non-conflicting rules above never do.)"""
    r = torch.tensor([1.0, 0.0], dtype=torch.float64)
    f = torch.tensor([-1.0, 0.1], dtype=torch.float64)
    gram = F.gram(f, r)
    combo = R.grad_norm(R.Geometry(gram.gg, gram.rr, gram.gr, torch.zeros((), dtype=torch.float64)), eta=1.0)
    d = combo.retain_coef * r + combo.constraint_coef * f
    assert float(f @ d) >= float(gram.gg) - 1e-12
    assert float(r @ d) < 0
    for rule in NON_CONFLICTING.values():
        assert float(r @ delta(rule, r, f)) >= 0


# ---------------------------------------------------------------- k = 3..9 objectives (m = 2..8 constraints)


@st.composite
def jacobians(draw):
    """k gradients (k = 3..9: m = 2..8 constraints plus the retain row) of controlled rank, with zero,
    duplicated and opposite rows drawn on purpose."""
    k = draw(st.integers(3, 9))
    n = draw(st.integers(2, 14))
    rank = draw(st.integers(1, min(k, n)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    j = rng.standard_normal((k, rank)) @ rng.standard_normal((rank, n)) * rng.uniform(0.1, 10, (k, 1))
    kind = draw(st.sampled_from(["plain", "plain", "zero", "opposite"]))
    if kind == "zero":
        j[draw(st.integers(0, k - 1))] = 0
    elif kind == "opposite":
        j[1] = -0.5 * j[0]
    return torch.from_numpy(j)


def aggregate(rule, j):
    """δ from one of our rules on the Gram of J's rows (constraints first, retain last)."""
    g = j @ j.T
    m = j.shape[0] - 1
    combo = rule(R.Geometry(g[:m, :m], g[m, m], g[:m, m], torch.zeros(m, dtype=j.dtype)))
    return combo.constraint_coef @ j[:m] + combo.retain_coef * j[m]


def jtol(j):
    return 1e-9 * (1 + float(j.norm())) ** 2


@settings(max_examples=60, deadline=None)
@given(jacobians())
def test_pcgrad_with_m_objectives_equals_torchjd_in_ascending_order(j):
    """torchjd visits the other rows in a random permutation; with torch.randperm fixed to the identity
    it visits them in ascending order, which is our deterministic order."""
    original = torch.randperm
    torch.randperm = lambda n, *a, **kw: torch.arange(n)
    try:
        expected = PCGrad()(j)
    finally:
        torch.randperm = original
    torch.testing.assert_close(aggregate(R.pcgrad, j), expected, rtol=0, atol=jtol(j))


@settings(max_examples=60, deadline=None)
@given(jacobians())
def test_mgda_with_m_objectives_is_the_min_norm_point_and_beats_torchjd_frank_wolfe(j):
    """Our δ is in the convex hull, satisfies the optimality condition g_i·δ ≥ ‖δ‖², and, the min-norm
    point being unique, ‖y − δ‖² ≤ ‖y‖² − ‖δ‖² for torchjd's Frank-Wolfe point y."""
    d = aggregate(R.mgda, j)
    g = j @ j.T
    m = j.shape[0] - 1
    combo = R.mgda(R.Geometry(g[:m, :m], g[m, m], g[:m, m], torch.zeros(m, dtype=j.dtype)))
    w = torch.cat([combo.constraint_coef, combo.retain_coef[None]])
    assert float(w.min()) >= -1e-12 and float(w.sum()) == pytest.approx(1.0)
    assert float((j @ d).min()) >= float(d @ d) - jtol(j)
    y = MGDA(epsilon=1e-9, max_iters=2000)(j)
    assert float((y - d) @ (y - d)) <= float(y @ y) - float(d @ d) + 10 * jtol(j)


@settings(max_examples=40, deadline=None)
@given(jacobians())
def test_upgrad_with_m_objectives_equals_torchjd_upgrad(j):
    """torchjd's quadprog projector solves the same QPs on the trace-normalised Gram plus reg·I (reg =
    1e-4 by default; quadprog needs a positive definite matrix). With reg = 1e-10 the answers agree to
    ~1e-4 of ‖J‖ even for rank-deficient J, and our δ is in the dual cone (Jδ ≥ 0) exactly."""
    d = aggregate(R.upgrad, j)
    assert float((j @ d).min()) >= -jtol(j)
    try:
        expected = UPGrad(projector=QuadprogProjector(norm_eps=0.0, reg_eps=1e-10))(j)
    except ValueError:  # quadprog gave up on a numerically singular matrix: no reference to compare
        reject()
    if float((j @ expected).min()) < -jtol(j):  # its reg·I moved it out of the dual cone: no reference
        reject()  # (e.g. J = [[2.78, 2.06], [7.46, -6.41], [-0.068, -0.048]], whose cone is {0})
    assert float((d - expected).norm()) <= 1e-4 * (1 + float(j.norm()))


@pytest.mark.parametrize("rule", ["pcgrad", "mgda", "upgrad"])
def test_multi_objective_step_equals_sgd_on_the_aggregate(rule):
    """opt.step([f_1, f_2, f_3]) on a multi-objective rule: θ − lr·A(J), J from torch.autograd."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(8, 3, dtype=torch.float64)
    params = list(model.parameters())
    objectives = [lambda i=i: (model(x)[:, i] - i).pow(2).mean() for i in range(3)]
    jac = torch.stack(
        [torch.cat([g.reshape(-1) for g in torch.autograd.grad(fn(), params)]) for fn in objectives]
    )
    expected = torch.cat([p.detach().reshape(-1) for p in params]) - 0.1 * aggregate(R.RULES[rule], jac)
    opt = ValueFunctionBilevelOptimizer(params, torch.optim.SGD, lr=0.1, rule=rule)
    stats = opt.step(objectives)
    torch.testing.assert_close(torch.cat([p.detach().reshape(-1) for p in params]), expected)
    assert len(stats.weights) == 3 and stats.constraint_names == ()
