"""The optimizer with m constraints: against explicit gradients and the functional solver, argument
forms, per-constraint hyperparameters, rollback, GradScaler, clipping, per-group and checkpoints."""

import copy
import math

import pytest
import torch
from torch import nn

from constrained_opt import ClosureError, ValueFunctionBilevelOptimizer, kkt_direction
from constrained_opt.optimizer import Closures


def setup(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(16, 4, dtype=torch.float64)
    retain = lambda: model(x).pow(2).mean()  # noqa: E731
    forgets = {
        "a": lambda: (model(x)[:, 0] - 1).pow(2).mean(),
        "b": lambda: (model(x)[:, 1] + 1).pow(2).mean(),
        "c": lambda: (model(x)[:, 2] - 2).pow(2).mean(),
    }
    return model, retain, forgets


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def grads(model, fn):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(fn(), list(model.parameters()))])


@pytest.mark.parametrize("form", ["dict", "list", "closures"])
def test_grad_norm_step_is_the_m_constraint_projection(form):
    model, retain, forgets = setup()
    r = grads(model, retain)
    f = torch.stack([grads(model, fn) for fn in forgets.values()])
    eta = torch.tensor([1.0, 0.5, 0.2], dtype=torch.float64)
    expected, lam = kkt_direction(r, f, eta * (f * f).sum(1))
    before = flat(model)
    hp = {"dict": {"a": 1.0, "b": 0.5, "c": 0.2}}.get(form, [1.0, 0.5, 0.2])
    opt = ValueFunctionBilevelOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, inner_steps=2, eta=hp)
    args = {
        "dict": (retain, forgets),
        "list": (retain, list(forgets.values())),
        "closures": (Closures(retain, forgets),),
    }[form]
    stats = opt.step(*args)
    torch.testing.assert_close(flat(model), before - 0.1 * expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.tensor(stats.lams, dtype=torch.float64), lam, rtol=1e-9, atol=1e-12)
    assert stats.constraint_names == (("a", "b", "c") if form != "list" else ("0", "1", "2"))
    assert stats.g_values == (0.0, 0.0, 0.0)  # grad_norm does not read g: the inner loops are skipped
    assert stats.lam == pytest.approx(sum(stats.lams)) and not stats.infeasible
    assert all(c >= 0 for c in stats.cos_update_forgets)  # every target ∇g_i·δ ≥ η_i‖∇g_i‖² > 0 holds


def test_value_rule_runs_each_inner_loop_and_uses_each_g():
    model, retain, forgets = setup(1)
    calls = []
    watched = {k: (lambda k=k, fn=fn: calls.append(k) or fn()) for k, fn in forgets.items()}
    opt = ValueFunctionBilevelOptimizer(
        model.parameters(), torch.optim.SGD, lr=0.1, inner_steps=2, inner_lr=0.3, rule="value", eta=0.5
    )
    stats = opt.step(retain, watched)
    assert calls == ["a", "a", "a", "b", "b", "b", "c", "c", "c"]  # K = 2 passes + 1 forward each
    assert all(g > 0 for g in stats.g_values)
    assert stats.a_ts == pytest.approx([0.5 * g for g in stats.g_values])


def test_hyperparameters_by_name_must_match_the_constraints():
    model, retain, forgets = setup()
    opt = ValueFunctionBilevelOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, eta={"a": 1.0, "x": 2.0})
    before = flat(model)
    with pytest.raises(ValueError, match=r"no value for \['b', 'c'\].*unknown names \['x'\]"):
        opt.step(retain, forgets)
    assert torch.equal(flat(model), before)


def test_bad_second_constraint_rolls_everything_back():
    model, retain, forgets = setup()
    opt = ValueFunctionBilevelOptimizer(
        model.parameters(), torch.optim.Adam, lr=0.1, inner_steps=2, rule="value"
    )
    opt.step(retain, forgets)
    before, state = flat(model), copy.deepcopy(opt.state_dict())
    bad = dict(forgets, b=lambda: model(torch.ones(2, 4, dtype=torch.float64)).sum() * float("nan"))
    with pytest.raises(ClosureError, match=r"forget_closure\['b'\] returned a non-finite loss"):
        opt.step(retain, bad)
    assert torch.equal(flat(model), before) and opt.state_dict()["bilevel"] == state["bilevel"]
    assert all(p.grad is None for p in model.parameters())


def test_grad_scaler_clipping_and_per_group_with_m_constraints():
    runs = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**10)):
        model, _, _ = setup(2)
        model.float()
        x32 = torch.randn(16, 4, generator=torch.Generator().manual_seed(3))
        fs = [lambda i=i, m=model, x=x32: (m(x)[:, i] - i).pow(2).mean() for i in range(3)]
        groups = [{"params": list(model[0].parameters())}, {"params": list(model[2].parameters())}]
        opt = ValueFunctionBilevelOptimizer(
            groups,
            torch.optim.Adam,
            lr=1e-2,
            inner_steps=1,
            rule="value",
            max_grad_norm=0.05,
            projection="per_group",
            grad_scaler=scaler,
        )
        stats = [opt.step(lambda m=model, x=x32: m(x).pow(2).mean(), fs) for _ in range(3)]
        runs.append((flat(model), stats))
    (ref, ref_stats), (got, got_stats) = runs
    assert torch.equal(got, ref)  # power-of-two scale folded into the projection: bit-identical
    assert [s.lams for s in got_stats] == [s.lams for s in ref_stats]
    assert all(s.update_norm <= 0.05 * (1 + 1e-6) for s in got_stats) and len(got_stats[0].group_lams) == 2


def test_memory_is_one_row_per_constraint_plus_the_retain_row_and_state_dict_round_trips():
    model, retain, forgets = setup()
    opt = ValueFunctionBilevelOptimizer(
        model.parameters(), torch.optim.Adam, lr=1e-2, inner_steps=1, rule="value"
    )
    opt.step(retain, forgets)
    n = sum(p.numel() for p in model.parameters())
    assert [b.rows.shape for b in opt._layout.buckets] == [(4, n)]
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    opt.step(retain, forgets)
    model2, retain2, forgets2 = setup()
    model2.load_state_dict(saved_model)
    opt2 = ValueFunctionBilevelOptimizer(
        model2.parameters(), torch.optim.Adam, lr=1e-2, inner_steps=1, rule="value"
    )
    opt2.load_state_dict(saved_opt)
    opt2.step(retain2, forgets2)
    assert torch.equal(flat(model), flat(model2))


def test_multi_objective_step_needs_a_multi_objective_rule():
    model, _, forgets = setup()
    opt = ValueFunctionBilevelOptimizer(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="needs a multi-objective rule"):
        opt.step(list(forgets.values()))
    with pytest.raises(TypeError, match="got a single function"):
        opt.step(forgets["a"])


@pytest.mark.parametrize("degrees", [0.5, 1.0])
def test_fp32_gradients_near_opposite_are_solved_as_feasible(degrees):
    """Two fp32 constraint gradients 0.5° and 1° from opposite, within fp32's dependence threshold
    (sin θ ≤ ε^¼, 1.07°): the step re-forms the Gram in fp64, meets both targets ∇g_i·δ ≥ η‖∇g_i‖²
    (δ has to travel ~2/sin θ along the small angle) and reports a feasible problem."""
    angle = math.radians(degrees)
    u = torch.tensor([1.0, 0.0, 0.0])
    v = torch.tensor([-math.cos(angle), math.sin(angle), 0.0])
    r = torch.tensor([0.1, 0.0, 1.0])
    theta = nn.Parameter(torch.zeros(3))
    opt = ValueFunctionBilevelOptimizer([theta], torch.optim.SGD, lr=1.0, eta=[1.0, 1.0])
    stats = opt.step(lambda: r @ theta, [lambda: u @ theta, lambda: v @ theta])
    delta = -theta.detach()  # SGD with lr = 1 moves by −δ
    assert not stats.infeasible and stats.shortfalls == (0.0, 0.0)
    tol = 16 * torch.finfo(torch.float32).eps * sum(stats.lams)  # δ = r + λ_1u + λ_2v rounded in fp32
    assert float(u @ delta) >= 1 - tol and float(v @ delta) >= 1 - tol
    _, lam = kkt_direction(r, torch.stack([u, v]), 1.0)  # the functional form takes the same fp64 path
    _, lam64 = kkt_direction(r.double(), torch.stack([u, v]).double(), 1.0)
    torch.testing.assert_close(lam.double(), lam64, rtol=1e-4, atol=0)
