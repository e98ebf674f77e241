"""ValueFunctionBilevelOptimizer against the float64 reference, and its torch.optim contract."""

import copy
import math

import pytest
import torch
from reference import FlatModel, call, reference_step
from torch import nn

from constrained_opt import ValueFunctionBilevelOptimizer

HP = {
    "grad_norm": {"eta": 0.7},
    "value": {"eta": 0.5},
    "barrier": {"alpha": 0.8, "beta": 0.3},
    "cosine": {"eta": 0.4},
    "scalarized": {"forget_weight": 0.2},
    "pcgrad": {},
    "mgda": {},
}


class Net(nn.Module):
    """Body shared by both objectives; ``head`` is used by the retain loss only (no forget gradient)."""

    def __init__(self, dtype=torch.float64):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))
        self.head = nn.Linear(2, 1)
        self.to(dtype)


class Problem:
    """Fixed data; the forget closure draws a fresh batch on every call, in a known order."""

    def __init__(self, seed=0, dtype=torch.float64):
        g = torch.Generator().manual_seed(seed)
        self.xr = torch.randn(12, 3, generator=g, dtype=dtype)
        self.yr = torch.randn(12, 1, generator=g, dtype=dtype)
        self.xf = [torch.randn(5, 3, generator=g, dtype=dtype) for _ in range(4)]
        self.calls = 0

    def retain_fn(self, module, params):
        return (
            (
                call(module.head, _sub(params, "head."), call(module.body, _sub(params, "body."), self.xr))
                - self.yr
            )
            ** 2
        ).mean()

    def forget_fn(self, i):
        x = self.xf[i % len(self.xf)]
        return lambda module, params: ((call(module.body, _sub(params, "body."), x) - 1.0) ** 2).mean()

    def closures(self, model):
        def retain():
            return ((model.head(model.body(self.xr)) - self.yr) ** 2).mean()

        def forget():
            x = self.xf[self.calls % len(self.xf)]
            self.calls += 1
            return ((model.body(x) - 1.0) ** 2).mean()

        return retain, forget


def _sub(params, prefix):
    return {k[len(prefix) :]: v for k, v in params.items() if k.startswith(prefix)}


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("K", [0, 1, 3])
@pytest.mark.parametrize("rule", sorted(HP))
def test_matches_float64_reference(rule, K):
    torch.manual_seed(0)
    model, problem = Net(), Problem()
    ref = FlatModel(copy.deepcopy(model))
    theta = ref.flat()
    lr, xi = 0.05, 0.3
    opt = ValueFunctionBilevelOptimizer(
        model.parameters(), torch.optim.SGD, lr=lr, inner_steps=K, inner_lr=xi, rule=rule, **HP[rule]
    )
    retain, forget = problem.closures(model)
    for step in range(4):
        stats = opt.step(retain, forget)
        base = step * (K + 1) if K > 0 else step
        fns = [problem.forget_fn(base + k) for k in range(K + 1)]
        delta, info = reference_step(ref, theta, problem.retain_fn, fns, K, xi, rule, HP[rule])
        theta = theta - lr * delta
        torch.testing.assert_close(flat(model), theta, rtol=1e-10, atol=1e-12)
        for key, expected in info.items():
            got = getattr(stats, key)
            if math.isnan(expected):
                assert math.isnan(got), key
            else:
                assert got == pytest.approx(expected, rel=1e-9, abs=1e-12), key


def test_adam_moments_see_only_the_outer_update():
    """The inner steps never go through the base optimizer (the authors' code leaks them into Adam)."""
    torch.manual_seed(1)
    model, problem = Net(), Problem(seed=1)
    ref = FlatModel(copy.deepcopy(model))
    theta = ref.flat().requires_grad_(True)
    ref_adam = torch.optim.Adam([theta], lr=1e-2)
    opt = ValueFunctionBilevelOptimizer(
        model.parameters(), torch.optim.Adam, lr=1e-2, inner_steps=2, inner_lr=0.2
    )
    retain, forget = problem.closures(model)
    for step in range(5):
        opt.step(retain, forget)
        fns = [problem.forget_fn(3 * step + k) for k in range(3)]
        delta, _ = reference_step(
            ref, theta.detach(), problem.retain_fn, fns, 2, 0.2, "grad_norm", {"eta": 1.0}
        )
        theta.grad = delta
        ref_adam.step()
        torch.testing.assert_close(flat(model), theta.detach(), rtol=1e-10, atol=1e-12)


def test_grad_norm_update_does_not_depend_on_K():
    results = []
    for K in (0, 1, 3):
        torch.manual_seed(2)
        model = Net()
        xr, xf = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
        opt = ValueFunctionBilevelOptimizer(
            model.parameters(), torch.optim.SGD, lr=0.1, inner_steps=K, inner_lr=0.5
        )
        stats = opt.step(
            lambda m=model, x=xr: m.head(m.body(x)).pow(2).mean(),
            lambda m=model, x=xf: (m.body(x) - 1).pow(2).mean(),
        )
        results.append((flat(model), stats.g_value))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][0], results[2][0])
    assert results[0][1] == 0.0 and results[2][1] > results[1][1] > 0  # K changes only the reported g


@pytest.mark.parametrize("K", [0, 1, 2, 3])
def test_cost_floor_closure_calls(K):
    """K forget forward+backward passes (the first at θ), 1 forget forward at φ^K, 1 retain pass."""
    model, problem = Net(), Problem()
    log = []

    def retain():
        log.append(("retain", torch.is_grad_enabled()))
        return model.head(model.body(problem.xr)).pow(2).mean()

    def forget():
        log.append(("forget", torch.is_grad_enabled()))
        return (model.body(problem.xf[0]) - 1).pow(2).mean()

    opt = ValueFunctionBilevelOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, inner_steps=K)
    opt.step(retain, forget)
    expected = [("forget", True)] * max(K, 1) + ([("forget", False)] if K > 0 else []) + [("retain", True)]
    assert log == expected


def test_theorem_3_2_pareto_stationary_point():
    """L_f = (x−1)² is stationary on the line x = 1; the minimiser of L_r = x² + (y−2)² there is (1, 2)."""
    theta = nn.Parameter(torch.tensor([-1.5, -3.0], dtype=torch.float64))
    opt = ValueFunctionBilevelOptimizer(
        [theta], torch.optim.SGD, lr=0.05, inner_steps=2, inner_lr=0.1, eta=1.0
    )
    for _ in range(1500):
        stats = opt.step(lambda: theta[0] ** 2 + (theta[1] - 2) ** 2, lambda: (theta[0] - 1) ** 2)
    torch.testing.assert_close(
        theta.detach(), torch.tensor([1.0, 2.0], dtype=torch.float64), atol=1e-4, rtol=0
    )
    assert stats.forget_grad_norm < 1e-4 and abs(stats.g_value) < 1e-8


def test_state_dict_round_trip_gives_identical_trajectory():
    torch.manual_seed(3)
    model, problem = Net(), Problem(seed=3)
    make = lambda m: ValueFunctionBilevelOptimizer(  # noqa: E731
        m.parameters(), torch.optim.Adam, lr=1e-2, inner_steps=2, inner_lr=0.1, eta=0.5
    )
    opt = make(model)
    retain, forget = problem.closures(model)
    for _ in range(3):
        opt.step(retain, forget)
    saved_model, saved_opt, saved_calls = (
        copy.deepcopy(model.state_dict()),
        copy.deepcopy(opt.state_dict()),
        problem.calls,
    )
    for _ in range(3):
        opt.step(retain, forget)
    resumed = Net()
    resumed.load_state_dict(saved_model)
    opt2 = make(resumed)
    opt2.param_groups[0]["eta"] = 9.0  # overwritten by the load
    opt2.load_state_dict(saved_opt)
    assert opt2.param_groups[0]["eta"] == 0.5 and opt2.steps_taken == 3
    problem.calls = saved_calls
    retain2, forget2 = problem.closures(resumed)
    for _ in range(3):
        opt2.step(retain2, forget2)
    assert torch.equal(flat(model), flat(resumed))
    assert opt2.param_groups is opt2.base_optimizer.param_groups


def test_param_groups_are_shared_and_schedulers_work():
    model, problem = Net(), Problem()
    opt = ValueFunctionBilevelOptimizer(model.parameters(), torch.optim.SGD, lr=1.0, inner_steps=1)
    assert opt.param_groups is opt.base_optimizer.param_groups
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    retain, forget = problem.closures(model)
    opt.step(retain, forget)
    sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == 0.5


def test_per_group_inner_lr_and_frozen_parameters():
    torch.manual_seed(4)
    model, problem = Net(), Problem(seed=4)
    model.head.bias.requires_grad_(False)
    frozen_bias = model.head.bias.detach().clone()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    ref = FlatModel(copy.deepcopy(model), trainable=trainable)
    theta = ref.flat()
    groups = [
        {"params": list(model.body.parameters()), "inner_lr": 0.4},
        {"params": [model.head.weight, model.head.bias], "inner_lr": 0.0},
    ]
    opt = ValueFunctionBilevelOptimizer(groups, torch.optim.SGD, lr=0.1, inner_steps=2, rule="value", eta=1.0)
    xi = torch.cat(
        [
            torch.full((p.numel(),), 0.4 if n.startswith("body") else 0.0, dtype=torch.float64)
            for n, p in model.named_parameters()
            if p.requires_grad
        ]
    )
    retain, forget = problem.closures(model)
    for step in range(3):
        opt.step(retain, forget)
        fns = [problem.forget_fn(3 * step + k) for k in range(3)]
        delta, _ = reference_step(ref, theta, problem.retain_fn, fns, 2, xi, "value", {"eta": 1.0})
        theta = theta - 0.1 * delta
    got = torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(got, theta, rtol=1e-10, atol=1e-12)
    assert torch.equal(model.head.bias, frozen_bias) and model.head.bias.grad is None


def test_global_projection_rejects_per_group_eta_and_per_group_projection_solves_each_block():
    torch.manual_seed(5)
    model, problem = Net(), Problem(seed=5)
    groups = [
        {"params": list(model.body.parameters()), "eta": 0.2},
        {"params": list(model.head.parameters())},
    ]
    opt = ValueFunctionBilevelOptimizer(groups, torch.optim.SGD, lr=0.1, inner_steps=0, eta=1.0)
    retain, forget = problem.closures(model)
    before = flat(model)
    with pytest.raises(ValueError, match="projection='per_group'"):
        opt.step(retain, forget)
    assert torch.equal(flat(model), before)

    opt = ValueFunctionBilevelOptimizer(
        groups, torch.optim.SGD, lr=0.1, inner_steps=0, eta=1.0, projection="per_group"
    )
    ref = FlatModel(copy.deepcopy(model))
    n_body = sum(p.numel() for p in model.body.parameters())
    stats = opt.step(retain, forget)
    _, f = ref.grad(ref.flat(), problem.forget_fn(0))
    _, r = ref.grad(ref.flat(), problem.retain_fn)
    deltas, lams = [], []
    for sl, eta in ((slice(0, n_body), 0.2), (slice(n_body, None), 1.0)):
        gg, gr = float(f[sl] @ f[sl]), float(f[sl] @ r[sl])
        lam = max(0.0, (eta * gg - gr) / gg) if gg > 0 else 0.0
        deltas.append(r[sl] + lam * f[sl])
        lams.append(lam)
    torch.testing.assert_close(flat(model), before - 0.1 * torch.cat(deltas), rtol=1e-10, atol=1e-12)
    assert stats.group_lams == pytest.approx(lams)
    assert lams[1] == 0.0  # the head gets no forget gradient


def test_max_grad_norm_clips_the_update():
    model, problem = Net(), Problem()
    opt = ValueFunctionBilevelOptimizer(
        model.parameters(), torch.optim.SGD, lr=1.0, inner_steps=1, max_grad_norm=1e-3
    )
    before = flat(model)
    stats = opt.step(*problem.closures(model))
    assert stats.clip_scale < 1
    assert float((before - flat(model)).norm()) == pytest.approx(1e-3, rel=1e-9)
    assert stats.update_norm == pytest.approx(1e-3, rel=1e-9)


def test_closure_that_resets_grads_is_still_differentiated():
    torch.manual_seed(6)
    model_a = Net()
    model_b = copy.deepcopy(model_a)
    opt_a = ValueFunctionBilevelOptimizer(
        model_a.parameters(), torch.optim.SGD, lr=0.1, inner_steps=2, inner_lr=0.1
    )
    opt_b = ValueFunctionBilevelOptimizer(
        model_b.parameters(), torch.optim.SGD, lr=0.1, inner_steps=2, inner_lr=0.1
    )
    ra, fa = Problem().closures(model_a)
    rb, fb = Problem().closures(model_b)

    def rb_zeroing():
        model_b.zero_grad(set_to_none=True)
        return rb()

    def fb_zeroing():
        model_b.zero_grad(set_to_none=True)
        return fb()

    for _ in range(2):
        opt_a.step(ra, fa)
        opt_b.step(rb_zeroing, fb_zeroing)
    assert torch.equal(flat(model_a), flat(model_b))


def test_base_optimizer_instance_and_add_param_group():
    torch.manual_seed(7)
    model, problem = Net(), Problem()
    base = torch.optim.SGD(model.body.parameters(), lr=0.1)
    opt = ValueFunctionBilevelOptimizer(base_optimizer=base, inner_steps=1, inner_lr=0.2)
    assert opt.param_groups is base.param_groups and base.param_groups[0]["inner_lr"] == 0.2
    head_before = model.head.weight.detach().clone()
    retain, forget = problem.closures(model)
    opt.step(retain, forget)
    assert torch.equal(model.head.weight, head_before)  # not handed to the optimizer: never modified
    opt.add_param_group({"params": list(model.head.parameters())})
    assert opt.param_groups[1]["inner_lr"] == 0.2 and len(base.param_groups) == 2
    opt.step(retain, forget)
    assert not torch.equal(model.head.weight, head_before)


def test_params_given_as_generators_in_param_groups_are_kept_as_torch_keeps_them():
    """A generator in a param group (at construction and in add_param_group) is read once: the groups
    hold the same parameters as torch.optim.SGD's, and every group is trained."""
    model, problem = Net(), Problem()

    def groups():
        return [{"params": model.body.parameters()}, {"params": list(model.head.parameters())}]

    opt = ValueFunctionBilevelOptimizer(groups(), torch.optim.SGD, lr=0.1)
    sgd = torch.optim.SGD(groups(), lr=0.1)
    sizes = [len(g["params"]) for g in sgd.param_groups]
    assert [len(g["params"]) for g in opt.param_groups] == sizes == [4, 2]
    assert all(
        a is b
        for g, h in zip(opt.param_groups, sgd.param_groups, strict=True)
        for a, b in zip(g["params"], h["params"], strict=True)
    )
    body_before = model.body[0].weight.detach().clone()
    opt.step(*problem.closures(model))
    assert not torch.equal(model.body[0].weight, body_before)  # the generator's group is trained

    later = ValueFunctionBilevelOptimizer(model.body.parameters(), torch.optim.SGD, lr=0.1)
    later.add_param_group({"params": model.head.parameters()})
    sgd_later = torch.optim.SGD(model.body.parameters(), lr=0.1)
    sgd_later.add_param_group({"params": model.head.parameters()})
    assert [len(g["params"]) for g in later.param_groups] == [
        len(g["params"]) for g in sgd_later.param_groups
    ]
    assert len(later.param_groups[1]["params"]) == 2
    with pytest.raises(ValueError, match="more than once"):
        later.add_param_group({"params": (p for p in [model.head.weight, model.head.weight])})


def test_zero_grad_and_grads_after_step():
    model, problem = Net(), Problem()
    opt = ValueFunctionBilevelOptimizer(model.parameters(), torch.optim.SGD, lr=0.1)
    opt.step(*problem.closures(model))
    assert all(p.grad is None for p in model.parameters())
    model.head(model.body(problem.xr)).sum().backward()
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_channels_last_parameters_keep_their_layout(recwarn):
    torch.manual_seed(8)
    conv = nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    conv_ref = copy.deepcopy(conv).to(memory_format=torch.contiguous_format)
    x = torch.randn(2, 3, 6, 6)
    results = []
    for m, xm in ((conv, x.to(memory_format=torch.channels_last)), (conv_ref, x)):
        opt = ValueFunctionBilevelOptimizer(m.parameters(), torch.optim.SGD, lr=0.1, inner_steps=1)
        opt.step(lambda m=m, xm=xm: m(xm).pow(2).mean(), lambda m=m, xm=xm: (m(xm) - 1).abs().mean())
        results.append(m.weight.detach().contiguous())
    torch.testing.assert_close(results[0], results[1])
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not [w for w in recwarn if "layout contract" in str(w.message)]


def _tensors_in(obj, seen=None):
    """Every tensor reachable from ``obj`` through attributes, lists, tuples and dicts."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, list | tuple | set | frozenset):
        children = list(obj)
    elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("constrained_opt"):
        children = list(vars(obj).values())
    else:
        return []
    return [t for c in children for t in _tensors_in(c, seen)]


@pytest.mark.parametrize("K", [1, 3])
def test_the_step_holds_no_memory_beyond_the_two_gradient_rows(K):
    """θ's snapshot lives in the retain row, and inner gradients at φ^k (k ≥ 2) are autograd's own,
    freed before the next pass: every tensor the optimizer owns is a view of the (2, n) rows."""
    model, problem = Net(), Problem()
    opt = ValueFunctionBilevelOptimizer(
        model.parameters(), torch.optim.SGD, lr=0.1, inner_steps=K, inner_lr=0.1
    )
    retain, forget = problem.closures(model)
    grads_seen = []

    def watched_forget():
        grads_seen.append([p.grad for p in model.parameters()])
        return forget()

    opt.step(retain, watched_forget)
    (bucket,) = opt._layout.buckets
    n = sum(p.numel() for p in model.parameters())
    assert bucket.rows.shape == (2, n)
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    owned = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for t in _tensors_in(opt._layout)
        if t.untyped_storage().data_ptr() not in param_storages
    }
    assert owned == {bucket.rows.untyped_storage().data_ptr(): 2 * n * 8}
    assert len(grads_seen) == K + 1
    rows_storage = bucket.rows.untyped_storage().data_ptr()
    for grads in grads_seen[1:]:  # at φ^1 … φ^K no gradient lives outside the rows
        assert all(g is None or g.untyped_storage().data_ptr() == rows_storage for g in grads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_parameters(dtype):
    torch.manual_seed(9)
    model, problem = Net(dtype), Problem(dtype=dtype)
    before = flat(model).clone()
    opt = ValueFunctionBilevelOptimizer(
        model.parameters(), torch.optim.SGD, lr=0.1, inner_steps=1, inner_lr=0.1
    )
    stats = opt.step(*problem.closures(model))
    assert all(math.isfinite(v) for v in (stats.lam, stats.cos_update_retain, stats.update_norm))
    assert not torch.equal(flat(model), before)


def test_mixed_dtype_buckets_match_reference():
    """Parameters of two dtypes live in two buffers; the Gram and λ are still global."""
    torch.manual_seed(10)
    model = Net()
    model.head.float()
    problem = Problem()
    opt = ValueFunctionBilevelOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, inner_steps=0)
    assert len(opt._current_layout()[0].buckets) == 2
    xr = problem.xr

    def retain():
        return ((model.head(model.body(xr).float()).double() - problem.yr) ** 2).mean()

    ref = FlatModel(copy.deepcopy(model).double())
    theta = ref.flat()
    stats = opt.step(retain, lambda: ((model.body(problem.xf[0]) - 1.0) ** 2).mean())
    delta, info = reference_step(
        ref, theta, problem.retain_fn, [problem.forget_fn(0)], 0, 0.0, "grad_norm", {"eta": 1.0}
    )
    torch.testing.assert_close(flat(model).double(), theta - 0.1 * delta, rtol=1e-5, atol=1e-6)
    assert stats.lam == pytest.approx(info["lam"], rel=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"inner_steps": -1}, "inner_steps"),
        ({"inner_steps": 1.5}, "inner_steps"),
        ({"inner_lr": -1.0}, "inner_lr"),
        ({"rule": "nope"}, "unknown rule"),
        ({"rule": "scalarized", "eta": 1.0}, "does not use eta"),
        ({"eta": float("nan")}, "eta"),
        ({"projection": "blocks"}, "projection"),
        ({"max_grad_norm": 0.0}, "max_grad_norm"),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ValueFunctionBilevelOptimizer(Net().parameters(), torch.optim.SGD, lr=0.1, **kwargs)


def test_all_frozen_is_an_error():
    model = Net().requires_grad_(False)
    opt = ValueFunctionBilevelOptimizer(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="no trainable parameters"):
        opt.step(lambda: torch.zeros(()), lambda: torch.zeros(()))
