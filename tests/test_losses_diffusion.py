"""Unit tests of the ε-prediction losses, the SalUn mask and the Selective Amnesia Fisher/EWC terms."""

import pytest
import torch

pytest.importorskip("diffusers")

from constrained_opt.diffusion.losses import (
    denoising_fisher,
    denoising_loss,
    diffuse,
    ewc_penalty,
    forget_loss,
    forget_target,
    other_labels,
    per_sample_grad_squares,
    saliency_mask,
    unet_eps,
)
from constrained_opt.diffusion.models import build_unet
from constrained_opt.diffusion.sampling import make_scheduler


@pytest.fixture(scope="module")
def scheduler():
    return make_scheduler("ddpm")


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return build_unet("tiny", (1, 8, 8), 10)


def batch(n=6, classes=(0,)):
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand((n, 1, 8, 8), generator=g) * 2 - 1
    c = torch.tensor([classes[i % len(classes)] for i in range(n)])
    return x0, c


def test_diffuse_matches_closed_form_and_is_seeded(scheduler):
    x0, c = batch()
    b = diffuse(scheduler, x0, c, torch.Generator().manual_seed(3))
    abar = scheduler.alphas_cumprod[b.t].view(-1, 1, 1, 1)
    torch.testing.assert_close(b.x_t, abar.sqrt() * x0 + (1 - abar).sqrt() * b.noise)
    assert ((b.t >= 0) & (b.t < 1000)).all()
    again = diffuse(scheduler, x0, c, torch.Generator().manual_seed(3))
    torch.testing.assert_close(again.x_t, b.x_t)


def test_denoising_loss_is_zero_for_the_oracle_and_mse_otherwise(scheduler):
    b = diffuse(scheduler, *batch(), torch.Generator().manual_seed(0))
    assert denoising_loss(lambda x_t, t, c: b.noise, b).item() == 0.0
    zero = denoising_loss(lambda x_t, t, c: torch.zeros_like(x_t), b)
    torch.testing.assert_close(zero, b.noise.pow(2).mean())


def test_other_labels_never_return_the_own_class_and_cover_the_rest():
    labels = torch.arange(10).repeat(200)
    out = other_labels(labels, 10, torch.Generator().manual_seed(0))
    assert (out != labels).all() and ((out >= 0) & (out < 10)).all()
    assert set(out[labels == 0].tolist()) == set(range(1, 10))
    assert set(out[labels == 7].tolist()) == set(range(10)) - {7}


def test_rl_target_is_the_detached_prediction_for_another_class(scheduler, unet):
    b = diffuse(scheduler, *batch(classes=(3,)), torch.Generator().manual_seed(0))
    seen = {}

    def eps_fn(x_t, t, c):
        seen["c"] = c
        return unet(x_t, t, class_labels=c).sample

    target = forget_target(eps_fn, b, "rl", 10, torch.Generator().manual_seed(0))
    assert not target.requires_grad and target.shape == b.noise.shape
    assert (seen["c"] != 3).all()
    torch.testing.assert_close(target, unet(b.x_t, b.t, class_labels=seen["c"]).sample.detach())


def test_noise_target_is_uniform_on_unit_interval(scheduler):
    b = diffuse(scheduler, *batch(n=64), torch.Generator().manual_seed(0))
    target = forget_target(None, b, "noise", 10, torch.Generator().manual_seed(0))
    assert target.shape == b.noise.shape and target.min() >= 0 and target.max() < 1
    assert abs(target.mean().item() - 0.5) < 0.02
    with pytest.raises(ValueError, match="forget target"):
        forget_target(None, b, "bogus", 10, torch.Generator())


def test_forget_loss_pulls_the_forget_prediction_to_the_target(scheduler, unet):
    b = diffuse(scheduler, *batch(), torch.Generator().manual_seed(0))
    eps = unet_eps(unet)
    own = eps(b.x_t, b.t, b.cond).detach()
    assert forget_loss(eps, b, own).item() == pytest.approx(0.0, abs=1e-12)
    loss = forget_loss(eps, b, torch.zeros_like(own))
    loss.backward()
    assert loss.item() > 0 and any(p.grad is not None and p.grad.abs().sum() > 0 for p in unet.parameters())
    unet.zero_grad(set_to_none=True)


def test_saliency_mask_keeps_the_top_fraction_globally():
    scores = {
        "a": torch.tensor([1.0, -8.0, 3.0]),
        "b": torch.tensor([[5.0, -2.0], [7.0, 4.0]]),
        "c": torch.tensor([6.0]),
    }
    mask = saliency_mask(scores, keep=0.5)
    assert {k: v.shape for k, v in mask.items()} == {k: v.shape for k, v in scores.items()}
    kept = {abs(s) for k in scores for s, m in zip(scores[k].flatten(), mask[k].flatten(), strict=True) if m}
    assert {float(s) for s in kept} == {8.0, 7.0, 6.0, 5.0}  # the 4 largest |g| of 8 entries, across tensors
    assert all(m.all() for m in saliency_mask(scores, keep=1.0).values())
    with pytest.raises(ValueError):
        saliency_mask(scores, keep=0.0)


def test_per_sample_grad_squares_match_an_explicit_loop():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    x, y = torch.randn(5, 3), torch.randn(5, 1)

    def loss_fn(call, xi, yi):
        return (call(xi[None]) - yi[None]).pow(2).sum()

    got = per_sample_grad_squares(model, loss_fn, (x, y), chunk=2)
    want = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for i in range(5):
        model.zero_grad()
        (model(x[i : i + 1]) - y[i : i + 1]).pow(2).sum().backward()
        for k, p in model.named_parameters():
            want[k] += p.grad.pow(2)
    for k in want:
        torch.testing.assert_close(got[k], want[k])


def test_denoising_fisher_is_a_nonnegative_mean_over_samples(scheduler, unet):
    x0, c = batch(n=4, classes=(0, 5))
    fisher = denoising_fisher(unet, scheduler, x0, c, torch.Generator().manual_seed(0), chunk=3)
    params = dict(unet.named_parameters())
    assert fisher.keys() == params.keys()
    assert all(f.shape == params[k].shape and (f >= 0).all() for k, f in fisher.items())
    assert sum(f.sum() for f in fisher.values()) > 0


def test_ewc_penalty_is_the_fisher_weighted_squared_distance():
    anchor = {"w": torch.tensor([1.0, 2.0])}
    fisher = {"w": torch.tensor([0.5, 3.0])}
    assert ewc_penalty({"w": anchor["w"].clone()}, anchor, fisher).item() == 0.0
    value = ewc_penalty({"w": torch.tensor([2.0, 0.0])}, anchor, fisher)
    assert value.item() == pytest.approx(0.5 * 1 + 3.0 * 4)
