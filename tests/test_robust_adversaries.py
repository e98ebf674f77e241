"""Robust constraints (constrained_opt.robust): each adversary's row against a float64 reference
computed by hand with torch.func on explicit parameter copies, the attackers' losses, all-or-nothing
rollback after a failure inside the adversary's loop, composition with m constraints, the rules,
clipping, the inner loop, a GradScaler and checkpoints, and the checks on bad settings."""

import copy
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad

from constrained_opt import (
    ClosureError,
    Inversion,
    MicroBatches,
    Relearn,
    SettingError,
    Sharpness,
    ValueFunctionBilevelOptimizer,
    kkt_direction,
)

LR = 0.1  # SGD step of the optimizer under test: θ_next = θ − LR·δ


class Problem:
    """A tiny float64 network, a retain loss, a constraint loss L_c and an attacker's loss L_a, as
    closures (what the optimizer sees) and as pure functions of a parameter dict (the reference).
    ``emb`` is an input tensor added to the forget inputs (a "class embedding")."""

    def __init__(self, seed=0, dtype=torch.float64):
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(dtype)
        self.x = torch.randn(8, 3, dtype=dtype)
        self.xf = torch.randn(6, 3, dtype=dtype)
        self.emb = torch.randn(3, dtype=dtype) * 0.1
        self.names = [n for n, _ in self.model.named_parameters()]

    def out(self, params, x):
        return self.model(x) if params is None else functional_call(self.model, params, (x,))

    def retain_fn(self, params=None):
        return self.out(params, self.x).pow(2).mean()

    def forget_fn(self, params=None, emb=None):  # L_c: push output 0 of the forget data to 1
        e = self.emb if emb is None else emb
        return (self.out(params, self.xf + e)[:, 0] - 1).pow(2).mean()

    def attack_fn(self, params=None, emb=None):  # L_a: relearn, i.e. pull output 0 back to -1
        e = self.emb if emb is None else emb
        return (self.out(params, self.xf + e)[:, 0] + 1).pow(2).mean()

    def retain(self):
        return self.retain_fn()

    def forget(self):
        return self.forget_fn()

    def attack(self):
        return self.attack_fn()

    def theta(self):
        return {n: p.detach().clone() for n, p in self.model.named_parameters()}

    def flat(self, params=None):
        params = params if params is not None else self.theta()
        return torch.cat([params[n].reshape(-1) for n in self.names])


def add(p, q, a=1.0):
    return {k: p[k] + a * q[k] for k in p}


def norm(p):
    return torch.sqrt(sum((v * v).sum() for v in p.values()))


# ---------------------------------------------------------------- references, by hand
def relearn_reference(pb, steps, beta, second_order):
    """∇L_c(θ_k), θ_{j+1} = θ_j − β∇L_a(θ_j); second order: ∇_θ of θ ↦ L_c(θ_k(θ)) by torch.func."""

    def unrolled(theta):
        p = theta
        for _ in range(steps):
            p = add(p, grad(pb.attack_fn)(p), -beta)
        return p

    theta = pb.theta()
    if second_order:
        return pb.flat(grad(lambda t: pb.forget_fn(unrolled(t)))(theta))
    with torch.no_grad():
        point = unrolled(theta)
    return pb.flat(grad(pb.forget_fn)(point))


def sharpness_reference(pb, rho):
    theta = pb.theta()
    g = grad(pb.attack_fn)(theta)
    point = add(theta, g, float(rho / norm(g)))
    return pb.flat(grad(pb.forget_fn)(point)), pb.forget_fn(point)


def inversion_reference(pb, steps, alpha, eps, p_norm):
    theta, x0 = pb.theta(), pb.emb.clone()
    x, losses = x0.clone(), []
    for _ in range(steps):
        losses.append(float(pb.forget_fn(theta, x)))
        g = grad(lambda e: pb.forget_fn(theta, e))(x)
        x = x + alpha * (torch.sign(g) if p_norm == math.inf else g / torch.linalg.vector_norm(g))
        if eps is not None:
            d = x - x0
            d = (
                d.clamp(-eps, eps)
                if p_norm == math.inf
                else d * min(1.0, eps / float(torch.linalg.vector_norm(d)))
            )
            x = x0 + d
    return pb.flat(grad(lambda t: pb.forget_fn(t, x))(theta)), losses, x


def scalarized_step(pb, constraint, **kwargs):
    """θ after one SGD step of δ = ∇L_r + 1·(the constraint's row): the row, read off θ."""
    opt = ValueFunctionBilevelOptimizer(
        pb.model.parameters(),
        torch.optim.SGD,
        lr=LR,
        inner_steps=0,
        rule="scalarized",
        forget_weight=1.0,
        **kwargs,
    )
    r = pb.flat(grad(pb.retain_fn)(pb.theta()))
    before = pb.flat()
    stats = opt.step(pb.retain, constraint)
    return (before - pb.flat()) / LR - r, stats


# ---------------------------------------------------------------- each form's row
@pytest.mark.parametrize("second_order", [False, True])
@pytest.mark.parametrize("steps", [1, 3])
def test_relearn_row_is_the_gradient_at_the_look_ahead(steps, second_order):
    pb = Problem()
    expected = relearn_reference(pb, steps, 0.3, second_order)
    losses, p = [], pb.theta()
    for _ in range(steps):
        losses.append(float(pb.attack_fn(p)))
        p = add(p, grad(pb.attack_fn)(p), -0.3)
    row, stats = scalarized_step(
        pb, Relearn(pb.forget, attack=pb.attack, steps=steps, lr=0.3, second_order=second_order)
    )
    torch.testing.assert_close(row, expected, rtol=1e-9, atol=1e-12)
    assert stats.attack_losses[0] == pytest.approx(losses, rel=1e-12)
    assert stats.forget_loss == pytest.approx(float(pb.forget_fn(p)), rel=1e-12)  # L_c at θ′, reported
    first_order = relearn_reference(pb, steps, 0.3, False)
    if second_order:  # the Hessian term is not negligible here, so the test tells the two apart
        assert (expected - first_order).norm() > 1e-3 * expected.norm()


@pytest.mark.parametrize("max_norm", [1e-3, 1e3])
def test_relearn_steps_clipped_to_max_norm(max_norm):
    """θ_{j+1} = θ_j − β·min(1, c/‖∇L_a‖)∇L_a: a small c binds (each step moves βc), a large one does not."""
    pb = Problem()
    p = pb.theta()
    for _ in range(2):
        g = grad(pb.attack_fn)(p)
        p = add(p, g, -0.3 * min(1.0, max_norm / float(norm(g))))
    expected = pb.flat(grad(pb.forget_fn)(p))
    relearn = Relearn(pb.forget, attack=pb.attack, steps=2, lr=0.3, max_norm=max_norm)
    row, stats = scalarized_step(pb, relearn)
    torch.testing.assert_close(row, expected, rtol=1e-9, atol=1e-12)
    assert stats.forget_loss == pytest.approx(float(pb.forget_fn(p)), rel=1e-12)
    unclipped = relearn_reference(Problem(), 2, 0.3, False)
    if max_norm < 1:
        assert (row - unclipped).norm() > 1e-3 * unclipped.norm()
    else:
        torch.testing.assert_close(row, unclipped, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("steps", [1, 2])
def test_relearn_sign_steps_move_every_weight_by_lr(steps):
    """θ_{j+1} = θ_j − β·sign(∇L_a(θ_j)): the row is ∇L_c there, and it differs from the gradient step's."""
    pb = Problem()
    p = pb.theta()
    for _ in range(steps):
        p = add(p, {k: torch.sign(v) for k, v in grad(pb.attack_fn)(p).items()}, -0.05)
    expected = pb.flat(grad(pb.forget_fn)(p))
    row, stats = scalarized_step(pb, Relearn(pb.forget, attack=pb.attack, steps=steps, lr=0.05, sign=True))
    torch.testing.assert_close(row, expected, rtol=1e-9, atol=1e-12)
    assert stats.forget_loss == pytest.approx(float(pb.forget_fn(p)), rel=1e-12)
    gradient_step = relearn_reference(Problem(), steps, 0.05, False)
    assert (row - gradient_step).norm() > 1e-3 * gradient_step.norm()


def test_sharpness_row_is_the_gradient_at_the_worst_weight_perturbation():
    pb = Problem(1)
    expected, loss_at = sharpness_reference(pb, 0.2)
    row, stats = scalarized_step(pb, Sharpness(pb.forget, rho=0.2, attack=pb.attack))
    torch.testing.assert_close(row, expected, rtol=1e-9, atol=1e-12)
    assert stats.forget_loss == pytest.approx(float(loss_at), rel=1e-12)
    pb = Problem(1)  # default attacker: the constraint itself (SAM on L_c)
    theta = pb.theta()
    g = grad(pb.forget_fn)(theta)
    expected = pb.flat(grad(pb.forget_fn)(add(theta, g, float(0.2 / norm(g)))))
    row, _ = scalarized_step(pb, Sharpness(pb.forget, rho=0.2))
    torch.testing.assert_close(row, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("p_norm", [2, math.inf])
@pytest.mark.parametrize("eps", [None, 0.05])
def test_inversion_row_is_the_gradient_at_the_worst_input_and_the_input_is_put_back(p_norm, eps):
    pb = Problem(2)
    expected, losses, x_star = inversion_reference(pb, 4, 0.04, eps, p_norm)
    if eps is not None:
        assert float(torch.linalg.vector_norm(x_star - pb.emb, ord=p_norm)) <= eps * (1 + 1e-12)
    emb_before = pb.emb.clone()
    row, stats = scalarized_step(
        pb, Inversion(pb.forget, input=pb.emb, steps=4, lr=0.04, eps=eps, norm=p_norm)
    )
    torch.testing.assert_close(row, expected, rtol=1e-9, atol=1e-12)
    assert stats.attack_losses[0] == pytest.approx(losses, rel=1e-12)
    assert torch.equal(pb.emb, emb_before) and not pb.emb.requires_grad


def test_inversion_is_danskin_the_row_matches_finite_differences_of_the_worst_case():
    """∇_θ max_{‖x‖≤ε} L(θ, x) = ∇_θ L(θ, x*) (Danskin): for L = w·x − ½‖w‖² the worst case is
    x* = εw/‖w‖, max_x L = ε‖w‖ − ½‖w‖², and three steps of length 0.05 reach x* exactly (ε = 0.1)."""
    torch.manual_seed(3)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    x = torch.zeros(3, dtype=torch.float64)
    loss = lambda: (w * x).sum() - 0.5 * w.pow(2).sum()  # noqa: E731
    opt = ValueFunctionBilevelOptimizer(
        [w], torch.optim.SGD, lr=1.0, inner_steps=0, rule="scalarized", forget_weight=1.0
    )
    before = w.detach().clone()
    opt.step(lambda: 0.0 * w.sum(), Inversion(loss, input=x, steps=3, lr=0.05, eps=0.1))
    row = before - w.detach()

    def worst(v):
        return 0.1 * float(torch.linalg.vector_norm(v)) - 0.5 * float((v * v).sum())

    h = 1e-6
    fd = torch.tensor(
        [
            (worst(before + h * e) - worst(before - h * e)) / (2 * h)
            for e in torch.eye(3, dtype=torch.float64)
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(row, fd, rtol=1e-7, atol=1e-9)


def test_micro_batched_closures_give_the_rows_of_the_whole_batch():
    """MicroBatches over two equal halves of the forget batch stand for the mean, so every adversary's
    row equals the row on the whole batch (to rounding)."""

    def rows(split):
        pb = Problem(11)
        halves = (slice(0, 3), slice(3, 6))

        def loss(target, part):
            return lambda: (pb.model(pb.xf[part] + pb.emb)[:, 0] - target).pow(2).mean()

        def closure(target):
            return MicroBatches([loss(target, h) for h in halves]) if split else loss(target, slice(None))

        forget, attack = closure(1.0), closure(-1.0)
        constraints = {
            "relearn": Relearn(forget, attack=attack, steps=2, lr=0.3),
            "sam": Sharpness(forget, rho=0.1, attack=attack),
            "inv": Inversion(forget, input=pb.emb, steps=2, lr=0.05, eps=0.1, attack=attack),
        }
        opt = ValueFunctionBilevelOptimizer(
            pb.model.parameters(), torch.optim.SGD, lr=LR, inner_steps=0, rule="scalarized"
        )
        stats = opt.step(pb.retain, constraints)
        return pb.flat(), stats.attack_losses

    (whole, whole_losses), (split, split_losses) = rows(False), rows(True)
    torch.testing.assert_close(split, whole, rtol=1e-12, atol=1e-14)
    for a, b in zip(split_losses, whole_losses, strict=True):
        assert a == pytest.approx(b, rel=1e-12)


# ---------------------------------------------------------------- all or nothing
def _forms(pb, fail):
    return {
        "relearn": Relearn(pb.forget, attack=fail, steps=3, lr=0.3),
        "relearn_second_order": Relearn(pb.forget, attack=fail, steps=3, lr=0.3, second_order=True),
        "sharpness": Sharpness(fail, rho=0.1, attack=pb.attack),  # fails at θ′
        "inversion": Inversion(pb.forget, input=pb.emb, steps=3, lr=0.05, eps=0.1, attack=fail),
    }


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("form", ["relearn", "relearn_second_order", "sharpness", "inversion"])
def test_a_failure_inside_the_adversary_loop_leaves_theta_state_grad_and_input_bit_identical(form, error):
    pb = Problem(4)
    opt = ValueFunctionBilevelOptimizer(
        pb.model.parameters(), torch.optim.Adam, lr=0.01, inner_steps=2, rule="value"
    )
    opt.step(pb.retain, {"plain": pb.forget, "robust": _forms(pb, pb.attack)[form]})  # Adam has state now
    theta, state, emb = pb.flat(), copy.deepcopy(opt.state_dict()), pb.emb.clone()
    sentinels = [torch.full_like(p, 7.0) for p in pb.model.parameters()]
    for p, s in zip(pb.model.parameters(), sentinels, strict=True):
        p.grad = s
    # fail where θ (or the input) has moved: the last attack step, a Hessian-vector product at θ_2, the
    # constraint's pass at θ′
    last = {"relearn": 3, "relearn_second_order": 3 + 3, "sharpness": 1, "inversion": 3}[form]
    calls = []

    def failing():
        calls.append(1)
        if len(calls) == last:
            raise error("boom")
        return pb.attack()

    with pytest.raises(error, match="boom"):
        opt.step(pb.retain, {"plain": pb.forget, "robust": _forms(pb, failing)[form]})
    assert torch.equal(pb.flat(), theta) and torch.equal(pb.emb, emb) and not pb.emb.requires_grad
    after = opt.state_dict()
    assert after["bilevel"] == state["bilevel"]
    for k, v in state["state"].items():
        for name, t in v.items():
            assert torch.equal(after["state"][k][name], t)
    for p, s in zip(pb.model.parameters(), sentinels, strict=True):
        assert p.grad is s and torch.equal(s, torch.full_like(p, 7.0))


def test_a_non_finite_attacker_loss_is_reported_as_the_attack_and_changes_nothing():
    pb = Problem(5)
    opt = ValueFunctionBilevelOptimizer(pb.model.parameters(), torch.optim.SGD, lr=0.1, inner_steps=0)
    theta = pb.flat()
    bad = Relearn(pb.forget, attack=lambda: pb.attack() * float("nan"), steps=2, lr=0.1)
    with pytest.raises(ClosureError, match=r"the attack of forget_closure\['r'\] returned a non-finite loss"):
        opt.step(pb.retain, {"f": pb.forget, "r": bad})
    assert torch.equal(pb.flat(), theta) and all(p.grad is None for p in pb.model.parameters())


# ---------------------------------------------------------------- composition
def test_plain_and_robust_rows_for_one_forget_set_compose_as_m_constraints_with_their_own_eta():
    pb = Problem(6)
    r = pb.flat(grad(pb.retain_fn)(pb.theta()))
    f = torch.stack(
        [
            pb.flat(grad(pb.forget_fn)(pb.theta())),
            relearn_reference(pb, 2, 0.3, False),
            sharpness_reference(pb, 0.1)[0],
            inversion_reference(pb, 2, 0.05, 0.1, 2)[0],
        ]
    )
    eta = torch.tensor([1.0, 0.5, 0.3, 0.2], dtype=torch.float64)
    expected, lam = kkt_direction(r, f, eta * (f * f).sum(1))
    opt = ValueFunctionBilevelOptimizer(
        pb.model.parameters(),
        torch.optim.SGD,
        lr=LR,
        inner_steps=0,
        eta={"plain": 1.0, "relearn": 0.5, "sam": 0.3, "inv": 0.2},
        max_grad_norm=1e6,
    )
    before = pb.flat()
    constraints = {
        "plain": pb.forget,
        "relearn": Relearn(pb.forget, attack=pb.attack, steps=2, lr=0.3),
        "sam": Sharpness(pb.forget, rho=0.1, attack=pb.attack),
        "inv": Inversion(pb.forget, input=pb.emb, steps=2, lr=0.05, eps=0.1),
    }
    stats = opt.step(pb.retain, constraints)
    torch.testing.assert_close(pb.flat(), before - LR * expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(torch.tensor(stats.lams, dtype=torch.float64), lam, rtol=1e-8, atol=1e-12)
    assert [len(a) for a in stats.attack_losses] == [0, 2, 1, 2]
    n = sum(p.numel() for p in pb.model.parameters())
    assert [b.rows.shape for b in opt._layout.buckets] == [(5, n)]  # one row per constraint, no more
    ptr = opt._layout.buckets[0].rows.data_ptr()
    clipped = ValueFunctionBilevelOptimizer(
        pb.model.parameters(), torch.optim.SGD, lr=LR, inner_steps=0, max_grad_norm=1e-3
    )
    assert clipped.step(pb.retain, constraints).update_norm <= 1e-3 * (1 + 1e-9)
    opt.step(pb.retain, constraints)
    assert opt._layout.buckets[0].rows.data_ptr() == ptr  # the adversaries reuse the buffer


def test_the_inner_loop_of_a_robust_constraint_starts_at_the_adversary_point():
    pb = Problem(7)
    p = add(pb.theta(), grad(pb.attack_fn)(pb.theta()), -0.3)  # θ′, one relearning step
    phi = p
    for _ in range(2):
        phi = add(phi, grad(pb.forget_fn)(phi), -0.2)
    g = float(pb.forget_fn(p) - pb.forget_fn(phi))
    opt = ValueFunctionBilevelOptimizer(
        pb.model.parameters(), torch.optim.SGD, lr=LR, inner_steps=2, inner_lr=0.2, rule="value", eta=0.5
    )
    stats = opt.step(pb.retain, {"plain": pb.forget, "relearn": Relearn(pb.forget, attack=pb.attack, lr=0.3)})
    assert stats.g_values[1] == pytest.approx(g, rel=1e-10)
    assert stats.a_ts[1] == pytest.approx(0.5 * g, rel=1e-10)


def test_a_power_of_two_grad_scaler_gives_bit_identical_robust_steps_and_an_attacker_overflow_skips():
    runs = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**10)):
        pb = Problem(8, torch.float32)
        opt = ValueFunctionBilevelOptimizer(
            pb.model.parameters(), torch.optim.Adam, lr=1e-2, inner_steps=1, rule="value", grad_scaler=scaler
        )
        constraints = {
            "relearn": Relearn(pb.forget, attack=pb.attack, steps=2, lr=0.3),
            "sam": Sharpness(pb.forget, rho=0.1),
            "inv": Inversion(pb.forget, input=pb.emb, steps=2, lr=0.05, eps=0.1),
        }
        stats = [opt.step(pb.retain, constraints) for _ in range(3)]
        runs.append((pb.flat(), [s.lams for s in stats], [s.attack_losses for s in stats]))
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1:] == runs[1][1:]
    pb = Problem(8, torch.float32)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt = ValueFunctionBilevelOptimizer(
        pb.model.parameters(), torch.optim.Adam, lr=1e-2, inner_steps=0, grad_scaler=scaler
    )
    theta = pb.flat()
    huge = Relearn(pb.forget, attack=lambda: pb.attack() * 3e36, steps=2, lr=0.3)  # scaled: inf gradient
    stats = opt.step(pb.retain, {"f": pb.forget, "r": huge})
    assert stats.skipped and torch.equal(pb.flat(), theta) and scaler.get_scale() < 2.0**10


def test_a_checkpoint_round_trip_continues_the_robust_trajectory_bit_for_bit():
    def run(pb, opt, n):
        c = {"r": Relearn(pb.forget, attack=pb.attack, lr=0.3), "s": Sharpness(pb.forget, rho=0.1)}
        for _ in range(n):
            opt.step(pb.retain, c)

    make = lambda pb: ValueFunctionBilevelOptimizer(pb.model.parameters(), torch.optim.Adam, lr=1e-2)  # noqa: E731
    pb = Problem(9)
    opt = make(pb)
    run(pb, opt, 1)
    saved_model, saved_opt = copy.deepcopy(pb.model.state_dict()), copy.deepcopy(opt.state_dict())
    run(pb, opt, 2)
    pb2 = Problem(9)
    pb2.model.load_state_dict(saved_model)
    opt2 = make(pb2)
    opt2.load_state_dict(saved_opt)
    run(pb2, opt2, 2)
    assert torch.equal(pb.flat(), pb2.flat())


# ---------------------------------------------------------------- bad settings
@pytest.mark.parametrize(
    "make, match",
    [
        (lambda pb: Relearn(pb.forget, attack=pb.attack, steps=0), r"steps=\) must be an int >= 1"),
        (lambda pb: Relearn(pb.forget, attack=pb.attack, lr=-1.0), r"lr=\) must be a finite number >= 0"),
        (
            lambda pb: Relearn(pb.forget, attack=pb.attack, max_norm=0.0),
            r"max_norm=\) must be a finite number > 0",
        ),
        (
            lambda pb: Relearn(pb.forget, attack=pb.attack, max_norm=1.0, second_order=True),
            r"max_norm=\) clips the steps",
        ),
        (
            lambda pb: Relearn(pb.forget, attack=pb.attack, sign=True, max_norm=1.0),
            r"sign=True\) moves every weight by exactly lr",
        ),
        (
            lambda pb: Relearn(pb.forget, attack=pb.attack, sign=True, second_order=True),
            r"no derivative to carry back",
        ),
        (lambda pb: Relearn(pb.forget, attack=pb.attack, sign=1), r"sign=\) must be a bool"),
        (lambda pb: Sharpness(pb.forget, rho=float("nan")), r"rho=\) must be a finite number"),
        (lambda pb: Inversion(pb.forget, input=pb.emb, norm=1), r"norm=\) must be 2 or math.inf"),
        (lambda pb: Inversion(pb.forget, input=pb.emb, eps=0.0), r"eps=\) must be a finite number > 0"),
        (
            lambda pb: Inversion(pb.forget, input=pb.emb.requires_grad_() * 2),
            r"must be a floating-point leaf tensor",
        ),
    ],
)
def test_bad_adversary_settings_are_refused_when_declared(make, match):
    with pytest.raises(SettingError, match=match):
        make(Problem())


def test_setups_an_adversary_cannot_serve_are_refused_before_anything_moves():
    pb = Problem(10, torch.float32)
    theta = pb.flat()
    scaled = ValueFunctionBilevelOptimizer(
        pb.model.parameters(), torch.optim.SGD, lr=0.1, grad_scaler=torch.amp.GradScaler("cpu")
    )
    with pytest.raises(SettingError, match=r"second_order=True.*a GradScaler is in use"):
        scaled.step(pb.retain, Relearn(pb.forget, attack=pb.attack, second_order=True))
    opt = ValueFunctionBilevelOptimizer(pb.model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(SettingError, match="adversaries apply to constraints only"):
        opt.step(Sharpness(pb.retain), pb.forget)
    weight = pb.model[0].bias
    with pytest.raises(SettingError, match="Inversion over a tensor this optimizer trains"):
        opt.step(pb.retain, Inversion(lambda: pb.model(pb.xf + weight[:3]).sum(), input=weight))
    assert torch.equal(pb.flat(), theta) and all(p.grad is None for p in pb.model.parameters())
    with pytest.raises(ClosureError, match="does not depend on the Inversion's input"):
        opt.step(pb.retain, Inversion(pb.forget, input=torch.zeros(3)))
    assert torch.equal(pb.flat(), theta)
