"""Clipping of δ, weight decay through the base optimizer, and EMA of the weights."""

import copy

import pytest
import torch
from reference import FlatModel, reference_step
from torch import nn
from torch.func import functional_call

from constrained_opt import ValueFunctionBilevelOptimizer


class ClippedSGD(torch.optim.SGD):
    """SGD that first clips whatever is in ``.grad`` (here δ) explicitly: g ← g·min(1, c/‖g‖)."""

    max_norm = 1.0

    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads]))
        for g in grads:
            g.mul_(torch.clamp(self.max_norm / norm, max=1.0))
        return super().step(closure)


def setup(seed=0, scale=1.0):
    """Model, closures, and the data they read: the retain batch and the forget batches, used in turn."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    g = torch.Generator().manual_seed(seed + 1)
    xr = torch.randn(16, 4, generator=g, dtype=torch.float64)
    xf = [torch.randn(16, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    calls = {"n": 0}

    def retain():
        return scale * model(xr).pow(2).mean()

    def forget():
        x = xf[calls["n"] % 3]
        calls["n"] += 1
        return scale * (model(x) - 1).pow(2).mean()

    return model, retain, forget, (xr, xf)


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize(("rule", "scale"), [("grad_norm", 1.0), ("mgda", 3.0), ("pcgrad", 1.0)])
def test_max_grad_norm_equals_an_explicit_clip_of_delta(rule, scale):
    """Clipping folded into δ's coefficients (from the Gram, no pass over the vectors) equals an
    explicit clip of the vector δ at the authors' max norm 1.0; the run crosses the threshold, so
    both the clipped and the unclipped regime are exercised."""
    runs = []
    for clip, base in ((1.0, torch.optim.SGD), (None, ClippedSGD)):
        model, retain, forget, _ = setup(scale=scale)
        opt = ValueFunctionBilevelOptimizer(
            model.parameters(), base, lr=0.1, inner_steps=1, inner_lr=0.1, rule=rule, max_grad_norm=clip
        )
        stats = [opt.step(retain, forget) for _ in range(30)]
        runs.append((flat(model), stats))
    (clipped, stats), (explicit, _) = runs
    torch.testing.assert_close(clipped, explicit, rtol=1e-10, atol=1e-12)
    scales = [s.clip_scale for s in stats]
    assert min(scales) < 1.0 and max(scales) == 1.0
    for s in stats:
        assert s.update_norm <= 1.0 + 1e-12


def test_adamw_decay_is_applied_once_per_outer_step_and_never_in_inner_steps():
    """A parameter that no loss touches only decays: after N outer steps with K = 3 inner steps it is
    θ0·(1 − lr·wd)^N, applied by AdamW itself. The rest follows AdamW fed with the reference δ."""
    model, retain, forget, (xr, xf) = setup(seed=2)
    idle = nn.Parameter(torch.randn(5, dtype=torch.float64))
    ref = FlatModel(copy.deepcopy(model))
    theta = ref.flat().requires_grad_(True)
    idle_ref = idle.detach().clone()
    lr, wd, K, xi = 1e-2, 0.1, 3, 0.2
    opt = ValueFunctionBilevelOptimizer(
        [*model.parameters(), idle], torch.optim.AdamW, lr=lr, weight_decay=wd, inner_steps=K, inner_lr=xi
    )
    ref_opt = torch.optim.AdamW([theta], lr=lr, weight_decay=wd)

    def retain_fn(module, params):
        return functional_call(module, params, (xr,)).pow(2).mean()

    def forget_fn(i):
        return lambda module, params: (functional_call(module, params, (xf[i % 3],)) - 1).pow(2).mean()

    for step in range(4):
        opt.step(retain, forget)
        fns = [forget_fn((K + 1) * step + k) for k in range(K + 1)]
        delta, _ = reference_step(ref, theta.detach(), retain_fn, fns, K, xi, "grad_norm", {"eta": 1.0})
        theta.grad = delta
        ref_opt.step()
        idle_ref.mul_(1 - lr * wd)
    assert torch.equal(idle.detach(), idle_ref)
    torch.testing.assert_close(flat(model), theta.detach(), rtol=1e-10, atol=1e-12)


def test_ema_with_averaged_model_follows_the_outer_iterates():
    """torch.optim.swa_utils.AveragedModel, updated after each step, averages the outer iterates θ_t
    only (the inner φ^k never reach it): ema_1 = θ_1, ema_t = 0.9·ema_{t−1} + 0.1·θ_t."""
    model, retain, forget, _ = setup(seed=3)
    ema = torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9)
    )
    opt = ValueFunctionBilevelOptimizer(model.parameters(), torch.optim.Adam, lr=1e-2, inner_steps=2)
    expected = None
    for _ in range(5):
        opt.step(retain, forget)
        ema.update_parameters(model)  # the first update copies θ_1
        expected = flat(model).clone() if expected is None else 0.9 * expected + 0.1 * flat(model)
    torch.testing.assert_close(flat(ema.module), expected, rtol=1e-12, atol=1e-14)
