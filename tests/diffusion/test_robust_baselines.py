"""The robust-erasure baselines ``meta_unlearning`` (sail-sg/Meta-Unlearning ``src/esd_meta.py``) and
``advunlearn`` (OPTML-Group/AdvUnlearn ``train-scripts/AdvUnlearn.py``) in the DDPM harness: the meta
gradient against a float64 hand computation, the outer step, the inner attack, resume and the CLI."""

import copy
import json

import ddpm_tiny
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")

from constrained_opt.diffusion.cli import main
from constrained_opt.diffusion.data import ImageData
from constrained_opt.diffusion.jobs.comparison import plan_runs
from constrained_opt.diffusion.losses import denoising_loss, diffuse, forget_target, unet_eps_with_row
from constrained_opt.diffusion.methods.advunlearn import AdvUnlearn
from constrained_opt.diffusion.methods.base import Setup
from constrained_opt.diffusion.methods.meta_unlearning import MetaUnlearning, related_classes
from constrained_opt.diffusion.methods.registry import parse_hparams
from constrained_opt.diffusion.methods.unlearn import unlearn
from constrained_opt.diffusion.models import build_unet
from constrained_opt.diffusion.runtime.errors import UsageError
from constrained_opt.diffusion.sampling import make_scheduler

BETA1, BETA2, EPS = 0.9, 0.999, 1e-8


def tiny(dtype=torch.float32):
    torch.manual_seed(0)
    return build_unet("tiny", (1, 8, 8), 10).to(dtype)


def images(labels, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    n = len(labels)
    return ImageData((torch.rand((n, 1, 8, 8), generator=g) * 2 - 1).to(dtype), torch.tensor(labels), 10, "t")


RETAIN = [1 + i % 9 for i in range(36)]


def make(cls, unet, lr=1e-3, batch_size=4, forget_class=0, **hp):
    return cls(
        Setup(unet, 10, forget_class, lr, torch.Generator().manual_seed(0), batch_size, progress=False), **hp
    )


def batch(data, n=4):
    return data.images[:n], data.labels[:n]


def grads(loss, params):
    return torch.autograd.grad(loss, params)


def mse_eps(unet, b, target):
    return F.mse_loss(unet(b.x_t, b.t, class_labels=b.cond).sample, target)


def clipped(gs, max_norm):
    total = torch.sqrt(sum((g**2).sum() for g in gs))
    coef = min(1.0, max_norm / (float(total) + 1e-6))
    return [g * coef for g in gs]


# ---------------------------------------------------------------------------------------- Meta-Unlearning


def test_meta_gradient_matches_a_float64_hand_computation():
    """δ = ∇ℓ_u(θ) + γ11∇ℓ_irt(θ) + γ12∇ℓ_tgt(θ) − [γ21∇ℓ_hrm(θ′) + γ22∇ℓ_tgt(θ′) + γ23∇ℓ_irt(θ′)], θ′ from
    an explicit copy after two hand-written clipped AdamW steps; distinct γ catch a wrong sign or weight."""
    unet = tiny(torch.float64)
    gam = dict(gamma11=0.5, gamma12=2.0, gamma21=3.0, gamma22=0.25, gamma23=1.5)
    ft = dict(finetune_steps=2, finetune_lr=1e-2, weight_decay=0.1, max_grad_norm=0.05)
    m = make(MetaUnlearning, unet, **gam, **ft)
    retain, forget = images(RETAIN, 0, torch.float64), images([0] * 12, 1, torch.float64)
    m.prepare(retain, forget)
    d = m.draw(batch(retain), batch(forget))
    theta = [p.detach().clone() for p in unet.parameters()]
    delta, _ = m.meta_gradient(d)
    assert all(torch.equal(p, q) for p, q in zip(unet.parameters(), theta, strict=True))  # θ untouched

    params = list(unet.parameters())
    g_u = grads(mse_eps(unet, d.forget, d.target), params)
    g_irt = grads(mse_eps(unet, d.retain, d.retain.noise), params)
    g_tgt = grads(mse_eps(unet, d.related, d.related.noise), params)
    tuned = copy.deepcopy(unet)
    tp = list(tuned.parameters())
    m1, m2 = [torch.zeros_like(p) for p in tp], [torch.zeros_like(p) for p in tp]
    for k, b in enumerate(d.tune, start=1):
        g = clipped(grads(mse_eps(tuned, b, b.noise), tp), ft["max_grad_norm"])
        with torch.no_grad():
            for p, gi, a, v in zip(tp, g, m1, m2, strict=True):
                a.mul_(BETA1).add_((1 - BETA1) * gi)
                v.mul_(BETA2).add_((1 - BETA2) * gi * gi)
                p.mul_(1 - ft["finetune_lr"] * ft["weight_decay"])
                denom = (v / (1 - BETA2**k)).sqrt() + EPS
                p.sub_(ft["finetune_lr"] * (a / (1 - BETA1**k)) / denom)
    g_hrm2 = grads(mse_eps(tuned, d.forget, d.forget.noise), tp)
    g_tgt2 = grads(mse_eps(tuned, d.related, d.related.noise), tp)
    g_irt2 = grads(mse_eps(tuned, d.retain, d.retain.noise), tp)
    expected = [
        u
        + gam["gamma11"] * i
        + gam["gamma12"] * t
        - (gam["gamma21"] * h2 + gam["gamma22"] * t2 + gam["gamma23"] * i2)
        for u, i, t, h2, t2, i2 in zip(g_u, g_irt, g_tgt, g_hrm2, g_tgt2, g_irt2, strict=True)
    ]
    for a, b in zip(delta, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # The test can tell θ′ from θ: the same terms taken at θ give another direction.
    at_theta = [
        u
        + gam["gamma11"] * i
        + gam["gamma12"] * t
        - (gam["gamma21"] * h + gam["gamma22"] * t + gam["gamma23"] * i)
        for u, i, t, h in zip(
            g_u, g_irt, g_tgt, grads(mse_eps(unet, d.forget, d.forget.noise), params), strict=True
        )
    ]
    gap = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(delta, at_theta, strict=True)))
    assert gap > 1e-3 * torch.sqrt(sum((a**2).sum() for a in delta))


def test_step_is_one_outer_adamw_step_on_the_clipped_meta_gradient():
    """θ₁ = θ₀(1 − lr·wd) − lr·ĉ/(|ĉ| + ε), ĉ = clip(δ): the first AdamW step on the clipped δ; the outer
    optimizer holds one state per weight at step 1 (none of the simulated fine-tuning's)."""
    unet = tiny(torch.float64)
    m = make(MetaUnlearning, unet, lr=1e-3, finetune_steps=1, max_grad_norm=0.1)
    retain, forget = images(RETAIN, 0, torch.float64), images([0] * 12, 1, torch.float64)
    m.prepare(retain, forget)
    state = m.s.generator.get_state()
    delta, _ = m.meta_gradient(m.draw(batch(retain), batch(forget)))
    m.s.generator.set_state(state)
    theta = [p.detach().clone() for p in unet.parameters()]
    stats = m.step(batch(retain), batch(forget))
    assert set(stats) == {"forget_loss", "retain_loss", "related_loss", "relearned_forget_loss"}
    c = clipped(delta, 0.1)
    for p, t, g in zip(unet.parameters(), theta, c, strict=True):
        torch.testing.assert_close(
            p.detach(), t * (1 - 1e-3 * 1e-4) - 1e-3 * g / (g.abs() + EPS), rtol=1e-9, atol=1e-12
        )
    opt_state = m.optimizer.state_dict()["state"]
    assert len(opt_state) == len(theta) and {int(s["step"]) for s in opt_state.values()} == {1}
    assert isinstance(m.optimizer, torch.optim.AdamW) and m.optimizer.defaults["weight_decay"] == 1e-4


def test_related_class_is_the_nearest_retained_embedding():
    unet = tiny()
    with torch.no_grad():
        w = unet.class_embedding.weight
        w[:10] = torch.eye(10, w.shape[1]) + 0.01 * w[:10]
        w[7] = w[0] + 0.1 * w[7]  # 7 points along 0
        w[4] = w[3] + 0.1 * w[4]  # 4 along 3
    assert related_classes(unet, (0,), 10) == [7]
    assert related_classes(unet, (0, 3), 10) == [7, 4]
    assert related_classes(unet, (0, 7), 10) != [7]  # a forgotten class is never "related"
    with pytest.raises(UsageError, match="all 10 classes"):
        related_classes(unet, tuple(range(10)), 10)


def test_meta_unlearning_related_batch_holds_only_related_classes():
    unet = tiny()
    m = make(MetaUnlearning, unet)
    m.prepare(images(RETAIN, 0), images([0] * 12, 1))
    assert set(m.related_data.labels.tolist()) == set(m.related) and len(m.related) == 1
    d = m.draw(batch(images(RETAIN, 0)), batch(images([0] * 12, 1)))
    assert set(d.related.cond.tolist()) == set(m.related) and len(d.tune) == 3
    assert all(set(b.cond.tolist()) == {0} for b in d.tune)


# ------------------------------------------------------------------------------------------- AdvUnlearn


def fixed_loss(unet, forget, vector):
    """The denoising loss of class 0 read from ``vector``, on a fixed large noised batch."""
    g = torch.Generator().manual_seed(5)
    x0 = forget.images.repeat(8, 1, 1, 1)
    b = diffuse(make_scheduler(), x0, forget.labels.repeat(8), g)
    with torch.no_grad():
        return float(denoising_loss(unet_eps_with_row(unet, 0, vector), b))


def test_attack_lowers_the_denoising_loss_over_the_vector_and_changes_no_weight():
    unet = tiny()
    m = make(AdvUnlearn, unet, attack_steps=30, attack_lr=3e-2, batch_size=12)
    forget = images([0] * 12, 1)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    flags = [p.requires_grad for p in unet.parameters()]
    clean = unet.class_embedding.weight[0].detach().clone()
    vectors, _ = m.attack(batch(forget, 12))
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in before.items())
    assert [p.requires_grad for p in unet.parameters()] == flags and unet.training
    assert all(p.grad is None for p in unet.parameters())
    assert fixed_loss(unet, forget, vectors[0]) < fixed_loss(unet, forget, clean) - 1e-3


def test_fast_at_moves_each_coordinate_by_the_attack_lr_in_one_step():
    """One Adam step on sign(∇): |c* − E[c_f]| = lr where ∇ ≠ 0 (attack_util.py L208-210)."""
    unet = tiny()
    m = make(AdvUnlearn, unet, attack_steps=1, attack_lr=1e-2, attack_method="fast_at")
    vectors, _ = m.attack(batch(images([0] * 4, 1)))
    step = (vectors[0] - unet.class_embedding.weight[0].detach()).abs()
    torch.testing.assert_close(step, torch.full_like(step, 1e-2), rtol=1e-5, atol=1e-7)


def test_latest_init_starts_from_the_previous_attack():
    unet = tiny()
    m = make(AdvUnlearn, unet, attack_steps=1, attack_lr=1e-2, attack_method="fast_at", attack_init="latest")
    forget = batch(images([0] * 4, 1))
    first, _ = m.attack(forget)
    first = first[0].clone()
    second, _ = m.attack(forget)
    torch.testing.assert_close((second[0] - first).abs(), torch.full_like(first, 1e-2), rtol=1e-5, atol=1e-7)


def test_advunlearn_step_takes_the_unlearning_loss_at_c_star_after_warmup():
    """loss = ℓ_u(θ, c*) + 0.3·ℓ_r(θ) with c* in class 0's row; the warmup step runs no attack."""
    unet = tiny()
    m = make(AdvUnlearn, unet, warmup_steps=1)
    retain, forget = batch(images(RETAIN, 0)), batch(images([0] * 4, 1))
    v = torch.randn(unet.class_embedding.weight.shape[1], generator=torch.Generator().manual_seed(3))
    calls, captured = [], []

    def stub_attack(f):
        calls.append(1)
        return {0: v}, 0.5

    m.attack = stub_attack
    m.descend = lambda loss, mask=None: captured.append(loss.item())
    assert m.step(retain, forget)["attacked"] == 0.0 and not calls
    state = m.s.generator.get_state()
    stats = m.step(retain, forget)
    assert stats["attacked"] == 1.0 and stats["attack_loss"] == 0.5 and calls == [1]
    m.s.generator.set_state(state)
    br, bf = m.diffuse(retain), m.diffuse(forget)
    target = forget_target(m.eps, bf, "rl", 10, m.s.generator)
    with torch.no_grad():
        unlearn_at = F.mse_loss(unet_eps_with_row(unet, 0, v)(bf.x_t, bf.t, bf.cond), target)
        clean = F.mse_loss(m.eps(bf.x_t, bf.t, bf.cond), target)
        remain = denoising_loss(m.eps, br)
    assert captured[1] == pytest.approx(float(unlearn_at + 0.3 * remain), rel=1e-6)
    assert abs(float(clean - unlearn_at)) > 1e-4  # c* matters


def test_advunlearn_several_forget_classes_each_get_their_vector():
    unet = tiny()
    m = make(AdvUnlearn, unet, forget_class=(0, 3), attack_steps=2, warmup_steps=0)
    m.prepare(images(RETAIN, 0), images([0, 3] * 4, 1))
    stats = m.step(batch(images(RETAIN, 0)), batch(images([0, 3] * 4, 1), 8))
    assert set(m.vectors) == {0, 3} and stats["attacked"] == 1.0
    assert m.step(batch(images(RETAIN, 0)), batch(images([0] * 4, 1)))["attacked"] == 1.0  # no row of 3


# ------------------------------------------------------------------------------------ both: harness, CLI


def test_hyperparameters_are_parsed_and_checked():
    assert parse_hparams("advunlearn", ["attack_steps=10", "attack_method=fast_at"]) == {
        "attack_steps": 10,
        "attack_method": "fast_at",
    }
    assert parse_hparams("meta_unlearning", ["gamma21=0.01", "finetune_steps=1"]) == {
        "gamma21": 0.01,
        "finetune_steps": 1,
    }
    bad = {
        "advunlearn": (
            ["attack_steps=0"],
            ["attack_method=free_at"],
            ["attack_init=random"],
            ["retain_loss_w=-1"],
        ),
        "meta_unlearning": (["finetune_steps=0"], ["gamma11=-1"], ["forget_target=blue"]),
    }
    for method, cases in bad.items():
        for pairs in cases:
            with pytest.raises(UsageError):
                parse_hparams(method, pairs)


def test_published_budgets_run_these_at_the_demo_budget():
    runs = plan_runs(("meta_unlearning", "advunlearn", "salun"), steps=300, batch_size=64, published=True)
    budgets = {r.label: (r.steps, r.batch_size) for r in runs}
    assert budgets["meta_unlearning"] == budgets["advunlearn"] == (300, 64)
    assert budgets["salun"] == (1000, 128)


@pytest.mark.parametrize(
    ("method", "hparams"),
    [("meta_unlearning", {"finetune_steps": 2}), ("advunlearn", {"warmup_steps": 2, "attack_steps": 2})],
)
def test_interrupted_run_resumes_to_the_same_model(tmp_path, monkeypatch, method, hparams):
    """Checkpoint after step 2 (for advunlearn: after warmup, with attack_init latest, so c* is state)."""
    if method == "advunlearn":
        hparams = {**hparams, "attack_init": "latest"}
    cls = MetaUnlearning if method == "meta_unlearning" else AdvUnlearn
    retain, forget = images(RETAIN, 0), images([0] * 12, 1)
    kwargs = dict(steps=4, batch_size=4, lr=1e-3, seed=0, progress=False, hparams=hparams)
    straight = unlearn(method, tiny(), retain, forget, 0, **kwargs)
    ckpt = str(tmp_path / "ckpt.safetensors")
    real_step, calls = cls.step, {"n": 0}

    def flaky_step(self, r, f):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_step(self, r, f)

    monkeypatch.setattr(cls, "step", flaky_step)
    with pytest.raises(KeyboardInterrupt):
        unlearn(method, tiny(), retain, forget, 0, checkpoint=ckpt, checkpoint_every=3, **kwargs)
    monkeypatch.setattr(cls, "step", real_step)
    resumed = unlearn(
        method, tiny(), retain, forget, 0, checkpoint=ckpt, checkpoint_every=3, resume=True, **kwargs
    )
    assert resumed.history == straight.history
    for k, v in straight.unet.state_dict().items():
        assert torch.equal(v, resumed.unet.state_dict()[k]), k


@pytest.mark.parametrize(
    ("method", "hp", "keys"),
    [
        ("meta_unlearning", "--hp finetune_steps=1", {"relearned_forget_loss", "related_loss"}),
        ("advunlearn", "--hp attack_steps=2 --hp warmup_steps=1", {"attack_loss", "attacked"}),
    ],
)
def test_cli_unlearn_runs_the_method(tmp_path, method, hp, keys):
    paths = ddpm_tiny.write_base(tmp_path)
    out = tmp_path / "u"
    command = (
        f"unlearn ddpm --method {method} --forget-class 0 --checkpoint {paths['unet']} --no-eval "
        f"--steps 2 --batch-size 8 {hp} --out {out} --quiet"
    )
    assert main(command.split()) == 0
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 2 and keys <= set(history[-1])
