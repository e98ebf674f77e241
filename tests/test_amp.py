"""Mixed precision: bf16 autocast, fp32 reductions for half parameters, and GradScaler (fp16) on CPU."""

import copy
import math

import pytest
import torch
from torch import nn

from constrained_opt import ClosureError, ValueFunctionBilevelOptimizer


def net(dtype=torch.float32, width=6, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, width), nn.Tanh(), nn.Linear(width, 2)).to(dtype)


def closures(model, dtype=torch.float32, autocast=None, seed=1, forget_factor=lambda call: 1.0):
    """Deterministic retain/forget closures; the forget loss of call i is scaled by forget_factor(i)."""
    g = torch.Generator().manual_seed(seed)
    xr, xf = torch.randn(16, 3, generator=g, dtype=dtype), torch.randn(16, 3, generator=g, dtype=dtype)
    calls = {"forget": 0}

    def ctx():
        return torch.autocast("cpu", dtype=autocast) if autocast else torch.autocast("cpu", enabled=False)

    def retain():
        with ctx():
            return model(xr).float().pow(2).mean()

    def forget():
        factor = forget_factor(calls["forget"])
        calls["forget"] += 1
        with ctx():
            return (model(xf).float() - 1).pow(2).mean() * factor

    return retain, forget


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_bf16_autocast_inside_closures_tracks_fp32():
    runs = {}
    for autocast in (None, torch.bfloat16):
        model = net()
        opt = ValueFunctionBilevelOptimizer(
            model.parameters(), torch.optim.SGD, lr=0.05, inner_steps=2, inner_lr=0.2, rule="value"
        )
        retain, forget = closures(model, autocast=autocast)
        stats = [opt.step(retain, forget) for _ in range(5)]
        runs[autocast] = (flat(model), stats)
        assert all(p.dtype == torch.float32 for p in model.parameters())
    (ref, ref_stats), (got, got_stats) = runs[None], runs[torch.bfloat16]
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-3)
    for a, b in zip(got_stats, ref_stats, strict=True):
        assert a.lam == pytest.approx(b.lam, rel=5e-2, abs=1e-3)
        assert a.retain_loss == pytest.approx(b.retain_loss, rel=2e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_gram_is_accumulated_in_fp32(dtype):
    """Half-precision gradients, fp32 products: the stats match fp64 sums of the very same half
    gradients to fp32 accuracy (a half-precision sum over 4k terms would be off by ~1e-2)."""
    model = net(dtype, width=512)
    retain, forget = closures(model, dtype)
    params = list(model.parameters())
    r = torch.cat([g.reshape(-1) for g in torch.autograd.grad(retain(), params)]).double()
    f = torch.cat([g.reshape(-1) for g in torch.autograd.grad(forget(), params)]).double()
    opt = ValueFunctionBilevelOptimizer(params, torch.optim.SGD, lr=0.0, inner_steps=0)
    stats = opt.step(*closures(model, dtype))
    assert stats.retain_grad_norm == pytest.approx(float(r.norm()), rel=1e-5)
    assert stats.forget_grad_norm == pytest.approx(float(f.norm()), rel=1e-5)
    assert stats.grad_dot == pytest.approx(float(r @ f), rel=1e-4, abs=1e-6 * float(r.norm() * f.norm()))


@pytest.mark.parametrize(
    ("K", "rule", "clip"),
    [(0, "grad_norm", None), (2, "grad_norm", None), (2, "mgda", None), (1, "value", 0.05)],
)
def test_grad_scaler_without_overflow_gives_the_unscaled_trajectory(K, rule, clip):
    """A power-of-two scale is exact in fp32, and 1/s is folded into the Gram and the coefficients,
    so the scaled run is bit-identical to the unscaled one."""
    results = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)):
        model = net()
        opt = ValueFunctionBilevelOptimizer(
            model.parameters(),
            torch.optim.Adam,
            lr=1e-2,
            inner_steps=K,
            inner_lr=0.2,
            rule=rule,
            max_grad_norm=clip,
            grad_scaler=scaler,
        )
        retain, forget = closures(model)
        stats = [opt.step(retain, forget) for _ in range(5)]
        results.append((flat(model), stats))
    (ref, ref_stats), (got, got_stats) = results
    assert torch.equal(got, ref)
    assert [s.lam for s in got_stats] == [s.lam for s in ref_stats]
    assert not any(s.skipped for s in got_stats)
    # growth_interval=2: the scale doubles after every second unskipped step
    assert [s.grad_scale for s in got_stats] == [2.0**10, 2.0**10, 2.0**11, 2.0**11, 2.0**12]
    assert all(s.grad_scale == 1.0 for s in ref_stats)


def test_fp16_overflow_skips_the_step_and_backs_off_the_scale():
    """fp16 parameters: at the initial scale 2^16 the scaled gradients overflow fp16. Each such step
    is skipped with θ, the Adam state and .grad untouched and the scale halved, until it fits."""
    model = net(torch.float16)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    opt = ValueFunctionBilevelOptimizer(
        model.parameters(), torch.optim.Adam, lr=1e-2, inner_steps=1, inner_lr=0.1, grad_scaler=scaler
    )
    retain, forget = closures(model, torch.float16, forget_factor=lambda call: 8.0)
    history = []
    for _ in range(12):
        before, state_before = flat(model).clone(), copy.deepcopy(opt.base_optimizer.state_dict())
        stats = opt.step(retain, forget)
        history.append(stats)
        assert all(p.grad is None for p in model.parameters())
        if stats.skipped:
            assert torch.equal(flat(model), before)
            assert opt.base_optimizer.state_dict() == state_before
        else:
            assert not torch.equal(flat(model), before)
            assert all(math.isfinite(v) for v in (stats.lam, stats.update_norm, stats.retain_grad_norm))
    skipped = [s.skipped for s in history]
    assert skipped[0] and not skipped[-1] and skipped == sorted(skipped, reverse=True)
    scales = [s.grad_scale for s in history]
    for prev, nxt, s in zip(scales, scales[1:], history, strict=False):
        assert nxt == (prev / 2 if s.skipped else prev)
    assert opt.steps_taken == skipped.count(False)


def test_overflow_inside_the_inner_loop_is_a_skip_not_an_error():
    """The scaled forget gradient at φ^1 overflows fp32. With a scaler that is a skipped step; without
    one the same closures diverge and raise ClosureError (θ untouched in both cases)."""
    huge = lambda call: 1e36 if call % 3 == 1 else 1.0  # noqa: E731  (2nd forget call of each step: φ^1)
    for scaler in (torch.amp.GradScaler("cpu"), None):
        model = net()
        opt = ValueFunctionBilevelOptimizer(
            model.parameters(), torch.optim.SGD, lr=0.1, inner_steps=2, inner_lr=0.5, grad_scaler=scaler
        )
        before = flat(model).clone()
        if scaler is None:
            with pytest.raises(ClosureError, match="φ\\^2"):
                opt.step(*closures(model, forget_factor=huge))
        else:
            stats = opt.step(*closures(model, forget_factor=huge))
            assert stats.skipped and stats.grad_scale == 2.0**16
            assert scaler.get_scale() == 2.0**15
        assert torch.equal(flat(model), before)


def test_non_finite_loss_is_still_an_error_with_a_scaler():
    model = net()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    opt = ValueFunctionBilevelOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, grad_scaler=scaler)
    retain, _ = closures(model)
    before = flat(model).clone()
    with pytest.raises(ClosureError, match="non-finite loss"):
        opt.step(retain, lambda: model(torch.ones(2, 3)).sum() * float("nan"))
    assert torch.equal(flat(model), before) and scaler.get_scale() == 2.0**8


def test_scaler_state_round_trips_through_the_optimizer_state_dict():
    model = net()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**5, growth_interval=1)
    opt = ValueFunctionBilevelOptimizer(model.parameters(), torch.optim.Adam, lr=1e-2, grad_scaler=scaler)
    retain, forget = closures(model)
    for _ in range(3):
        opt.step(retain, forget)
    sd = copy.deepcopy(opt.state_dict())
    assert sd["bilevel"]["grad_scaler"]["scale"] == 2.0**8
    fresh = torch.amp.GradScaler("cpu")
    other = ValueFunctionBilevelOptimizer(net().parameters(), torch.optim.Adam, lr=1e-2, grad_scaler=fresh)
    other.load_state_dict(sd)
    assert fresh.get_scale() == 2.0**8 and fresh.get_growth_interval() == 1


def test_disabled_scaler_is_ignored_and_bad_scaler_rejected():
    model = net()
    opt = ValueFunctionBilevelOptimizer(
        model.parameters(), torch.optim.SGD, lr=0.1, grad_scaler=torch.amp.GradScaler("cpu", enabled=False)
    )
    assert opt.step(*closures(model)).grad_scale == 1.0
    with pytest.raises(TypeError, match=r"grad_scaler must be a torch\.amp\.GradScaler"):
        ValueFunctionBilevelOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, grad_scaler=2.0**16)
