"""Unit tests of the ε-prediction losses, the SalUn mask and the Selective Amnesia Fisher/EWC terms."""

import pytest
import torch

pytest.importorskip("diffusers")

from constrained_opt.diffusion.losses import (
    antithetic_timesteps,
    denoising_loss,
    diffuse,
    drop_labels,
    ewc_penalty,
    forget_loss,
    forget_target,
    other_labels,
    pixel_sum_loss,
    saliency_mask,
    timestep_summed_fisher,
    unet_eps,
    unet_eps_with_row,
)
from constrained_opt.diffusion.models import build_unet
from constrained_opt.diffusion.runtime.errors import UsageError
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


def test_other_labels_outside_an_excluded_set_cover_every_other_class():
    labels = torch.tensor([0, 3]).repeat(500)
    out = other_labels(labels, 10, torch.Generator().manual_seed(0), exclude=torch.tensor([0, 3]))
    for c in (0, 3):
        assert set(out[labels == c].tolist()) == set(range(10)) - {0, 3}


def test_other_labels_excluding_only_the_own_class_is_the_same_draw():
    """One forget class: the set draw gives the same c_m as (c + U{1..C−1}) mod C, draw for draw."""
    labels = torch.full((500,), 7)
    plain = other_labels(labels, 10, torch.Generator().manual_seed(3))
    excluded = other_labels(labels, 10, torch.Generator().manual_seed(3), exclude=torch.tensor([7]))
    assert torch.equal(plain, excluded)


def test_rl_target_never_lands_on_another_forgotten_class(scheduler, unet):
    """Forgetting 0 and 3 (a stratified batch holds both): c_m is neither, for every row."""
    b = diffuse(scheduler, *batch(n=90, classes=(0, 3)), torch.Generator().manual_seed(0))
    seen = {}

    def eps_fn(x_t, t, c):
        seen["c"] = c
        return torch.zeros_like(x_t)

    forget_target(eps_fn, b, "rl", 10, torch.Generator().manual_seed(0))
    assert not torch.isin(seen["c"], torch.tensor([0, 3])).any()
    assert set(seen["c"].tolist()) == set(range(10)) - {0, 3}


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


def test_saliency_mask_keeps_exactly_floor_keep_n_entries_even_with_ties():
    # SalUn's generate_mask ranks all entries and keeps ranks < int(n * keep): ties do not add entries.
    scores = {"a": torch.ones(7), "b": torch.tensor([2.0, 0.0, 1.0])}
    mask = saliency_mask(scores, keep=0.5)
    assert sum(int(m.sum()) for m in mask.values()) == 5
    assert mask["b"][0] == 1 and mask["b"][1] == 0  # the largest always survives, the 0 never


def test_antithetic_timesteps_pair_t_with_t_minus_t():
    g = torch.Generator().manual_seed(0)
    t = antithetic_timesteps(7, 1000, g)
    assert t.shape == (7,) and t.min() >= 0 and t.max() < 1000
    assert torch.equal(t[:3] + t[4:7], torch.full((3,), 999))  # t₀ = t[:4], mirrored after it


def test_pixel_sum_loss_is_d_times_the_pixel_mean():
    a, b = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
    want = (b - a).square().sum(dim=(1, 2, 3)).mean(dim=0)  # the releases' noise_estimation_loss
    torch.testing.assert_close(pixel_sum_loss(a, b), want)
    torch.testing.assert_close(pixel_sum_loss(a, b), 64 * torch.nn.functional.mse_loss(a, b))


def test_drop_labels_replaces_a_fraction_by_the_null_class():
    c = torch.zeros(20_000, dtype=torch.long)
    dropped = drop_labels(c, 10, 0.1, torch.Generator().manual_seed(0))
    assert set(dropped.unique().tolist()) == {0, 10}
    assert abs((dropped == 10).double().mean().item() - 0.1) < 0.01
    assert drop_labels(c, 10, 0.0, torch.Generator()) is c


def released_fisher(unet, scheduler, x0, cond, seed, timesteps, n_chunks, p_drop):
    """Transcription of SA's ``save_fim``: per sample, the pixel-summed loss of every timestep (one ε per
    (sample, t), the condition dropped with probability p) is added into one total, whose gradient is
    squared; the squares are averaged over the samples. Draws follow the chunk order (mask, then ε)."""
    g = torch.Generator().manual_seed(seed)
    params = dict(unet.named_parameters())
    out = {k: torch.zeros_like(v) for k, v in params.items()}
    acp = scheduler.alphas_cumprod
    unet.eval()
    for i in range(len(x0)):
        total = 0.0
        for chunk in torch.chunk(timesteps, n_chunks):
            drop = torch.rand(len(chunk), generator=g) < p_drop
            noise = torch.randn((len(chunk), *x0.shape[1:]), generator=g)
            for j, t in enumerate(chunk.tolist()):
                x_t = acp[t].sqrt() * x0[i] + (1 - acp[t]).sqrt() * noise[j]
                c = torch.tensor([10 if drop[j] else int(cond[i])])
                e_hat = unet(x_t[None], torch.tensor([t]), class_labels=c).sample[0]
                total = total + (noise[j] - e_hat).square().sum()
        grads = torch.autograd.grad(total, list(params.values()))
        for k, gr in zip(params, grads, strict=True):
            out[k] += gr.square() / len(x0)
    return out


def test_timestep_summed_fisher_matches_the_released_formula(scheduler, unet):
    x0, c = batch(n=3, classes=(0, 5, 9))
    x0 = (x0 + 1) / 2  # the release reads its samples back in [0, 1]
    timesteps = torch.tensor([0, 7, 250, 500, 998])
    got = timestep_summed_fisher(
        unet,
        scheduler,
        x0,
        c,
        torch.Generator().manual_seed(3),
        label_dropout=0.3,
        n_chunks=2,
        timesteps=timesteps,
    )
    want = released_fisher(unet, scheduler, x0, c, 3, timesteps, 2, 0.3)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-3, atol=1e-7)
    # A sum over T timesteps squared is ~T² times a single-t estimate: the release's Fisher is large.
    assert sum(f.sum() for f in got.values()) > 0 and all((f >= 0).all() for f in got.values())


def test_timestep_summed_fisher_scale_multiplies_the_summed_gradient(scheduler, unet):
    """A strided sum rescaled by its stride s: F(s) = s² F(1) on the same draws."""
    x0, c = batch(n=2, classes=(0, 5))
    timesteps = torch.tensor([0, 500])

    def fisher(scale):
        return timestep_summed_fisher(
            unet,
            scheduler,
            x0,
            c,
            torch.Generator().manual_seed(4),
            label_dropout=0.0,
            timesteps=timesteps,
            scale=scale,
        )

    plain, scaled = fisher(1.0), fisher(500.0)
    for k in plain:
        torch.testing.assert_close(scaled[k], 500.0**2 * plain[k], rtol=1e-3, atol=1e-9)


def test_ewc_penalty_is_the_fisher_weighted_squared_distance():
    anchor = {"w": torch.tensor([1.0, 2.0])}
    fisher = {"w": torch.tensor([0.5, 3.0])}
    assert ewc_penalty({"w": anchor["w"].clone()}, anchor, fisher).item() == 0.0
    value = ewc_penalty({"w": torch.tensor([2.0, 0.0])}, anchor, fisher)
    assert value.item() == pytest.approx(0.5 * 1 + 3.0 * 4)


def test_unet_eps_with_row_reads_the_vector_for_its_class_only(unet):
    """Rows of class 3 are conditioned on the vector (E[3] itself gives ε_θ exactly, another vector
    changes only those rows); gradients reach both the vector and θ; the table is put back."""
    g = torch.Generator().manual_seed(2)
    x_t, t = torch.randn((4, 1, 8, 8), generator=g), torch.tensor([5, 50, 500, 900])
    c = torch.tensor([3, 1, 3, 2])
    table = unet.class_embedding
    same = unet_eps_with_row(unet, 3, table.weight[3].detach().clone())(x_t, t, c)
    torch.testing.assert_close(same, unet_eps(unet)(x_t, t, c), rtol=0, atol=0)
    vector = torch.randn(table.embedding_dim, generator=g, requires_grad=True)
    out = unet_eps_with_row(unet, 3, vector)(x_t, t, c)
    assert unet.class_embedding is table
    base = unet_eps(unet)(x_t, t, c)
    torch.testing.assert_close(out[[1, 3]], base[[1, 3]], rtol=0, atol=0)
    assert (out[[0, 2]] - base[[0, 2]]).abs().max() > 1e-4
    out.square().sum().backward()
    assert vector.grad is not None and vector.grad.abs().sum() > 0
    assert table.weight.grad[3].abs().sum() == 0 and table.weight.grad[1].abs().sum() > 0
    unet.zero_grad(set_to_none=True)


def test_unet_eps_with_row_needs_a_class_table():
    with pytest.raises(UsageError, match="class-embedding table"):
        unet_eps_with_row(torch.nn.Module(), 0, torch.zeros(4))
