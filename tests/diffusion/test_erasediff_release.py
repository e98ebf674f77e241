"""``erasediff_release``: the EraseDiff authors' released DDPM loop (JingWu321/EraseDiff
``ddpm/runners/diffusion.py`` ``train_ours``) in the harness: the burst, λ, label dropout, the
``noise`` target, the phase length, resume and the CLI."""

import json
import math
import types

import ddpm_tiny
import pytest
import torch

pytest.importorskip("diffusers")

from constrained_opt.diffusion.cli import main
from constrained_opt.diffusion.data import ImageData, load_data, split_forget
from constrained_opt.diffusion.jobs.comparison import plan_runs
from constrained_opt.diffusion.methods import erasediff_release
from constrained_opt.diffusion.methods.base import Setup
from constrained_opt.diffusion.methods.erasediff_release import EraseDiffRelease
from constrained_opt.diffusion.methods.registry import PUBLISHED, parse_hparams
from constrained_opt.diffusion.methods.unlearn import unlearn
from constrained_opt.diffusion.models import build_unet
from constrained_opt.diffusion.runtime.errors import UsageError

NULL = 10


@pytest.fixture
def unet():
    torch.manual_seed(0)
    return build_unet("tiny", (1, 8, 8), 10)


def images(n, label, seed):
    g = torch.Generator().manual_seed(seed)
    return ImageData(torch.rand((n, 1, 8, 8), generator=g) * 2 - 1, torch.full((n,), label), 10, "t")


def method(model, seed=0, batch_size=4, lr=1e-3, **hp):
    gen = torch.Generator().manual_seed(seed)
    return EraseDiffRelease(Setup(model, 10, 0, lr, gen, batch_size, progress=False), **hp)


def adam_steps(m):
    return {int(s["step"]) for s in m.optimizer.state_dict()["state"].values()}


def test_burst_goes_through_the_outer_adam_unclipped_and_restores_theta_exactly(unet):
    """K = 2 passes over 10 forget images in batches of 4: 2 × 3 Adam steps that move θ, unclipped (the
    Adam moments hold full-size gradients although max_grad_norm is 1e-12), then θ back bit for bit."""
    m = method(unet, inner_steps=2, max_grad_norm=1e-12)
    m.prepare(images(12, 3, 0), images(10, 0, 1))
    theta = [p.detach().clone() for p in m.params]
    moved = []
    real_step = m.optimizer.step

    def step_and_look(*args, **kwargs):
        out = real_step(*args, **kwargs)
        moved.append(any(not torch.equal(p, q) for p, q in zip(m.params, theta, strict=True)))
        return out

    m.optimizer.step = step_and_look
    m.burst()
    assert moved == [True] * 6 and adam_steps(m) == {6}
    assert all(torch.equal(p, q) for p, q in zip(m.params, theta, strict=True))
    first_moment = torch.cat([s["exp_avg"].flatten() for s in m.optimizer.state_dict()["state"].values()])
    assert first_moment.norm() > 1e-4  # a clipped gradient (≤ 1e-12) could not leave this much
    assert math.isfinite(m.inner_value) and m.inner_value > 0


class Linear(torch.nn.Module):
    """θ ∈ R², with a UNet's ``config`` for the null class: losses are patched in, never run."""

    config = types.SimpleNamespace(num_class_embeds=NULL + 1)

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2))


@pytest.mark.parametrize(
    ("hp", "b", "lam", "delta"),
    [
        # fixed λ = 0.1 (main.py --lambda_bome 0.1): δ = a + 0.1 b
        ({}, (1.0, 1.0), 0.1, (1.1, 0.1)),
        # cosine: cos(a, b) = 1/√2, λ = max(0, η − cos)
        ({"lambda_rule": "cosine", "eta": 1.0}, (1.0, 1.0), 1 - 2**-0.5, (2 - 2**-0.5, 1 - 2**-0.5)),
        ({"lambda_rule": "cosine"}, (1.0, 1.0), 0.0, (1.0, 0.0)),  # η = 0.1 < cos: λ = 0
        ({"lambda_rule": "cosine"}, (-1.0, 1.0), 0.1 + 2**-0.5, (0.9 - 2**-0.5, 0.1 + 2**-0.5)),
    ],
)
def test_outer_direction_is_retain_plus_lambda_forget_gradient(monkeypatch, hp, b, lam, delta):
    """With L_r = ⟨a, θ⟩, a = (1, 0), and L_f = ⟨b, θ⟩, the outer step hands Adam δ = a + λb."""
    model = Linear()
    a, b = torch.tensor([1.0, 0.0]), torch.tensor(b)
    monkeypatch.setattr(erasediff_release, "denoising_loss", lambda eps, batch: model.w @ a)
    m = method(model, max_grad_norm=100.0, **hp)
    m.forget_term = lambda x0, c, t=None: model.w @ b
    m.prepare(images(8, 3, 0), images(4, 0, 1))
    seen = []
    real_step = m.optimizer.step
    m.optimizer.step = lambda: (seen.append(model.w.grad.clone()), real_step())[1]
    stats = m.step((torch.zeros(4, 1, 8, 8), torch.full((4,), 3)), (torch.zeros(4, 1, 8, 8), torch.zeros(4)))
    assert len(seen) == 3  # K = 2 passes over one batch of 4, then the outer step
    assert stats["lam"] == pytest.approx(lam) and stats["burst"] == 1.0
    assert seen[-1].tolist() == pytest.approx(delta)
    assert all(s.tolist() == pytest.approx(b.tolist()) for s in seen[:-1])  # the burst descends L_f


def test_outer_step_clips_delta_to_max_grad_norm(monkeypatch):
    model = Linear()
    monkeypatch.setattr(
        erasediff_release, "denoising_loss", lambda eps, batch: model.w @ torch.tensor([1.0, 0.0])
    )
    m = method(model, max_grad_norm=0.5, inner_steps=1)
    m.forget_term = lambda x0, c, t=None: model.w.sum()
    m.prepare(images(8, 3, 0), images(4, 0, 1))
    seen = []
    real_step = m.optimizer.step
    m.optimizer.step = lambda: (seen.append(model.w.grad.clone()), real_step())[1]
    m.step((torch.zeros(4, 1, 8, 8), torch.full((4,), 3)), (torch.zeros(4, 1, 8, 8), torch.zeros(4)))
    assert seen[0].tolist() == [1.0, 1.0]  # the burst's step: unclipped
    assert seen[1].tolist() == pytest.approx(
        [0.5 * 1.1 / math.hypot(1.1, 0.1), 0.5 * 0.1 / math.hypot(1.1, 0.1)]
    )


def record_labels(model):
    """The class labels of every forward pass of ``model``."""
    calls = []
    real = model.forward

    def forward(x, t, class_labels=None, **kw):
        calls.append(class_labels.clone())
        return real(x, t, class_labels=class_labels, **kw)

    model.forward = forward
    return calls


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_label_dropout_applies_to_the_forget_passes_only(unet, p):
    """Each outer step: retain pass (labels kept), forget pass, pseudo pass (c + s mod C, one s per
    batch); the burst: forget and pseudo passes. Label dropout 1 sends every forget pass to ∅."""
    m = method(unet, inner_steps=1, label_dropout=p)
    m.prepare(images(8, 3, 0), images(4, 0, 1))
    calls = record_labels(unet)
    m.step(
        (torch.zeros(4, 1, 8, 8), torch.full((4,), 3)),
        (torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)),
    )
    burst, outer = calls[:2], calls[2:]
    assert len(burst) == 2 and len(outer) == 3
    assert outer[0].tolist() == [3] * 4
    for forget, pseudo in (burst, outer[1:]):
        if p == 1.0:
            assert forget.tolist() == [NULL] * 4 and pseudo.tolist() == [NULL] * 4
        else:
            assert forget.tolist() == [0] * 4
            assert len(set(pseudo.tolist())) == 1 and pseudo[0] not in (0, NULL)


def test_noise_target_regresses_onto_the_uniform_noise_inside_x_t(unet):
    """The release's ``noise`` lines: x_t = √ᾱ_t x_0 + √(1−ᾱ_t) u with u ~ U(0, 1), target u."""
    m = method(unet, forget_target="noise")
    seen = []
    real = unet.forward
    unet.forward = lambda x, t, class_labels=None: (
        seen.append((x, t, class_labels)),
        real(x, t, class_labels=class_labels),
    )[1]
    x0 = images(6, 0, 2).images
    loss = m.forget_term(x0, torch.zeros(6, dtype=torch.long))
    ((x_t, t, c),) = seen
    acp = m.s.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    u = (x_t - acp.sqrt() * x0) / (1 - acp).sqrt()
    assert u.min() >= -1e-4 and u.max() <= 1 + 1e-4 and u.std() > 0.1
    assert c.tolist() == [0] * 6  # no label dropout on this target
    with torch.no_grad():
        assert loss.item() == pytest.approx(
            torch.nn.functional.mse_loss(real(x_t, t, class_labels=c).sample, u).item(), rel=1e-4
        )


def test_phase_length_is_the_released_zip_and_rem_num():
    """n = min(⌈|D_r|/B⌉, ⌈|D_f|/B⌉, ⌊rem_num/B⌋ + 1): 36 on CIFAR-10, 2 on digits' class 0."""
    m = method(Linear(), batch_size=128)
    assert m.phase_length(45_000, 5_000) == 36
    assert m.phase_length(1_617, 178) == 2
    assert method(Linear(), batch_size=128, phase_steps=36).phase_length(1_617, 178) == 36
    assert PUBLISHED["erasediff_release"] == (4 * 2 * 36, 128)


def test_bursts_precede_every_phase_and_resume_is_bit_identical(tmp_path, unet, monkeypatch):
    """|D_f| = 178 in batches of 64: phases of 3 outer steps, each opened by K × 3 Adam steps; a run
    interrupted after its step-2 checkpoint resumes (forget data and phase from the checkpoint) to the
    same model."""
    retain, forget = split_forget(load_data("digits"), 0)
    kwargs = dict(steps=5, batch_size=64, lr=1e-3, seed=0, progress=False, hparams={"inner_steps": 2})
    straight = unlearn("erasediff_release", unet, retain, forget, 0, **kwargs)
    assert [h["burst"] for h in straight.history] == [1.0, 0.0, 0.0, 1.0, 0.0]
    assert all(h["lam"] == 0.1 for h in straight.history)
    ckpt = str(tmp_path / "ckpt.safetensors")
    real_step, calls = EraseDiffRelease.step, {"n": 0}

    def flaky_step(self, r, f):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_step(self, r, f)

    monkeypatch.setattr(EraseDiffRelease, "step", flaky_step)
    with pytest.raises(KeyboardInterrupt):
        unlearn("erasediff_release", unet, retain, forget, 0, checkpoint=ckpt, checkpoint_every=2, **kwargs)
    monkeypatch.setattr(EraseDiffRelease, "step", real_step)
    resumed = unlearn(
        "erasediff_release",
        unet,
        retain,
        forget,
        0,
        checkpoint=ckpt,
        checkpoint_every=2,
        resume=True,
        **kwargs,
    )
    assert resumed.history == straight.history
    for k, v in straight.unet.state_dict().items():
        assert torch.equal(v, resumed.unet.state_dict()[k]), k


def test_hyperparameters_are_checked():
    assert parse_hparams("erasediff_release", ["inner_steps=4", "lambda_rule=cosine"]) == {
        "inner_steps": 4,
        "lambda_rule": "cosine",
    }
    for bad in (["inner_steps=0"], ["lambda_rule=grad_norm"], ["label_dropout=2"], ["forget_target=blue"]):
        with pytest.raises(UsageError):
            parse_hparams("erasediff_release", bad)
    runs = plan_runs((), variants=("release_k4=erasediff_release:inner_steps=4",), published=True)
    assert (runs[-1].method, runs[-1].hparams, runs[-1].steps) == (
        "erasediff_release",
        {"forget_target": "rl", "inner_steps": 4},
        288,
    )


def test_demo_takes_the_method_and_its_hyperparameters_by_name(tmp_path, capsys):
    runs = plan_runs(("erasediff_release",), hp=("erasediff_release.inner_steps=2",))
    assert (runs[1].label, runs[1].hparams["inner_steps"]) == ("erasediff_release", 2)
    out = tmp_path / "demo"
    bad = ["--methods", "erasediff_release", "--hp", "erasediff_release.inner_steps=0"]
    assert main(["demo", *bad, "--out", str(out), "--quiet"]) == 2
    assert "inner_steps" in capsys.readouterr().err and not out.exists()


def test_cli_unlearn_runs_the_released_loop(tmp_path):
    paths = ddpm_tiny.write_base(tmp_path)
    out = tmp_path / "u"
    command = (
        f"unlearn ddpm --method erasediff_release --forget-class 0 --checkpoint {paths['unet']} --no-eval "
        f"--steps 2 --batch-size 64 --hp inner_steps=1 --hp lambda_rule=cosine --out {out} --quiet"
    )
    assert main(command.split()) == 0
    history = json.loads((out / "history.json").read_text())
    assert [h["burst"] for h in history] == [1.0, 0.0] and all(h["lam"] >= 0 for h in history)
