"""EraseDiff as its authors' DDPM release trains it (JingWu321/EraseDiff, ``ddpm/runners/diffusion.py``
``train_ours``, run by ``ddpm/main.py --mode erasediff`` with ``ddpm/configs/cifar10_erasediff.yml``):
bursts of K passes over D_f through the outer Adam, θ restored, then plain λ-weighted steps."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data import ImageData
from ..losses import antithetic_timesteps, denoising_loss, diffuse, drop_labels
from ..models import null_class
from ..runtime.errors import UsageError
from .base import Hyper, Method, check_forget_target

LAMBDA_RULES = ("fixed", "cosine")


@dataclass
class ReleaseHyper(Hyper):
    inner_steps: int = 2  # main.py --K_steps 2: passes over D_f in each burst
    rem_num: int = 4500  # main.py --rem_num 4500: a phase's outer loop stops after more retain images
    phase_steps: int = 0  # 0: as released (see EraseDiffRelease.phase_length); n > 0: n outer steps
    lam: float = 0.1  # main.py --lambda_bome 0.1 (the fixed rule)
    lambda_rule: str = "fixed"  # fixed: λ = lam; cosine: the release's --lambda_bome < 0 branch
    eta: float = 0.1  # main.py --eta_bome 0.1 (the cosine rule)
    label_dropout: float = 0.1  # cifar10_erasediff.yml: model.cond_drop_prob (forget passes only)
    forget_target: str = "rl"  # train_ours: the "# rl" lines; "noise": its commented "normal noise" lines
    # max_grad_norm 1.0 (inherited): cifar10_erasediff.yml optim.grad_clip, the outer step only

    def __post_init__(self):
        super().__post_init__()
        check_forget_target(self.forget_target)
        if self.lambda_rule not in LAMBDA_RULES:
            raise UsageError(
                f"erasediff_release lambda_rule must be one of {', '.join(LAMBDA_RULES)}, "
                f"got {self.lambda_rule!r}"
            )
        if self.inner_steps < 1 or self.rem_num < 1:
            raise UsageError(
                "erasediff_release inner_steps and rem_num must be ≥ 1 (the release's K passes over D_f "
                "and retain images per phase)"
            )
        if self.label_dropout > 1:
            raise UsageError(f"erasediff_release label_dropout must be in [0, 1], got {self.label_dropout}")


class EraseDiffRelease(Method):
    """The authors' released EraseDiff loop, in this harness's one-retain-one-forget-batch steps.

    The release runs ``unl_eps`` (4) epochs × ``S_steps`` (2) phases. A phase:

    1. θ_i saved; K = ``inner_steps`` shuffled passes over all of D_f in batches of B, each batch one
       *unclipped* step of the outer Adam on L_f (its moments and step count advance); θ restored to θ_i.
       ū = mean L_f over the last pass's batches.
    2. Outer steps on (retain, forget) batches: δ = ∇L_r + λ∇q with q = L_f − sg(ū), so ∇q = ∇L_f;
       δ clipped to ``max_grad_norm``, one Adam step. λ = ``lam`` (0.1), or, with ``lambda_rule=cosine``,
       λ = max(0, η − cos(∇L_r, ∇q)).

    The release's outer loop is a ``zip_longest`` over the retain and forget loaders that stops when
    either runs out or after more than ``rem_num`` retain images, so a phase has
    n = min(⌈|D_r|/B⌉, ⌈|D_f|/B⌉, ⌊rem_num/B⌋ + 1) outer steps: 36 on CIFAR-10 (|D_f| = 5000, B = 128),
    where a burst of K passes is 40K Adam steps, ≈ K per outer step. Here the harness's ``steps`` are
    the outer steps, and a burst precedes every n-th one (n from the data in ``prepare``, or
    ``phase_steps``); on digits (|D_f| ≈ 180, B = 128) n = 2, a burst is 2K steps, so the ratio of
    inner to outer steps stays ≈ K as released. The epochs × S phases are the budget:
    :data:`~.registry.PUBLISHED` holds 4 × 2 × 36 = 288 steps at B = 128.

    Losses as released: L_r = MSE(ε_θ(x_t|c), ε) with no label dropout; antithetic t (the forget batch
    of an outer step reuses the retain batch's t, as the release indexes it). Forget target ``rl``:
    L_f = MSE(ε_θ(x_t|c̃_f), sg ε_θ(x_t|c̃_m)) at the same x_t, c̃ = ∅ with probability
    ``label_dropout`` in each of the two passes (the model's ``cond_drop_prob`` in ``mode="train"``),
    c_m = (c_f + s) mod C with one s ~ U{1..C−1} per batch (the release draws one class in 1..9 per
    batch, right for forget class 0 only). The release's ``criteria`` is undefined in ``train_ours``;
    ``torch.nn.MSELoss()`` is taken, as ``saliency_unlearn`` defines it. Target ``noise``:
    x_t = √ᾱ_t x_0 + √(1−ᾱ_t) u with u ~ U(0, 1)^d, L_f = MSE(ε_θ(x_t|c_f), u), no label dropout,
    its own antithetic t (``noise_estimation_loss_conditional`` with ``torch.rand_like`` noise); unlike
    the other methods' ``noise`` target, whose uniform ε_f is independent of the Gaussian-noised x_t.
    Not carried over: the release's EMA copy (ema_rate 0.99), which its sampling uses.
    """

    name = "erasediff_release"
    Hyper = ReleaseHyper

    def __init__(self, setup, **hp):
        super().__init__(setup, **hp)
        self.params = [p for p in self.s.unet.parameters() if p.requires_grad]
        self.null = null_class(self.s.unet)
        self.phase = self.hp.phase_steps
        self.taken = 0  # outer steps so far
        self.inner_value = math.nan  # ū of the last burst
        self.forget_data: ImageData | None = None

    def phase_length(self, n_retain: int, n_forget: int) -> int:
        """n = min(⌈|D_r|/B⌉, ⌈|D_f|/B⌉, ⌊rem_num/B⌋ + 1), unless ``phase_steps`` sets it."""
        if self.hp.phase_steps:
            return self.hp.phase_steps
        b = self.s.batch_size
        return min(math.ceil(n_retain / b), math.ceil(n_forget / b), self.hp.rem_num // b + 1)

    def prepare(self, retain, forget):
        self.forget_data = forget
        self.phase = self.phase_length(len(retain), len(forget))

    def forget_term(self, x0: Tensor, c: Tensor, t: Tensor | None = None) -> Tensor:
        """L_f on a forget batch (``t``: the outer step's shared timesteps; None: antithetic of its own)."""
        s, gen = self.s, self.s.generator
        x0, c = x0.to(s.device), c.to(s.device)
        if self.hp.forget_target == "noise":
            t_u = antithetic_timesteps(len(x0), s.num_timesteps, gen).to(s.device)
            u = torch.rand(x0.shape, generator=gen).to(s.device)
            return F.mse_loss(self.eps(s.scheduler.add_noise(x0, u, t_u), t_u, c), u)
        if t is None:
            t = antithetic_timesteps(len(x0), s.num_timesteps, gen)
        b = diffuse(s.scheduler, x0, c, gen, t)
        p = self.hp.label_dropout
        output = self.eps(b.x_t, b.t, drop_labels(c, self.null, p, gen))
        shift = int(torch.randint(1, s.num_classes, (1,), generator=gen))
        with torch.no_grad():
            pseudo = self.eps(b.x_t, b.t, drop_labels((c + shift) % s.num_classes, self.null, p, gen))
        return F.mse_loss(output, pseudo)

    def burst(self) -> None:
        """K shuffled passes over D_f, one unclipped outer-Adam step per batch; θ restored after."""
        data, gen = self.forget_data, self.s.generator
        saved = [p.detach().clone() for p in self.params]
        for _ in range(self.hp.inner_steps):
            total, count = 0.0, 0
            for rows in torch.randperm(len(data), generator=gen).split(self.s.batch_size):
                loss = self.forget_term(data.images[rows], data.labels[rows])
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                total, count = total + loss.item() * len(rows), count + len(rows)
        self.inner_value = total / count
        with torch.no_grad():
            for p, theta in zip(self.params, saved, strict=True):
                p.copy_(theta)

    def step(self, retain, forget):
        from constrained_opt.functional import safe_cosine

        burst = self.taken % self.phase == 0
        if burst:
            self.burst()
        self.taken += 1
        (x_r, c_r), s = retain, self.s
        t = antithetic_timesteps(len(x_r), s.num_timesteps, s.generator)
        l_r = denoising_loss(
            self.eps, diffuse(s.scheduler, x_r.to(s.device), c_r.to(s.device), s.generator, t)
        )
        l_f = self.forget_term(*forget, t=t[: len(forget[0])])
        self.optimizer.zero_grad(set_to_none=True)
        if self.hp.lambda_rule == "fixed":
            lam = self.hp.lam
            (l_r + lam * l_f).backward()
        else:
            g_r = torch.autograd.grad(l_r, self.params)
            g_f = torch.autograd.grad(l_f, self.params)
            flat_r, flat_f = (torch.cat([g.flatten() for g in gs]) for gs in (g_r, g_f))
            cos = safe_cosine(flat_r.dot(flat_f), flat_r.dot(flat_r), flat_f.dot(flat_f))
            lam = max(0.0, self.hp.eta - float(cos))
            for p, a, b in zip(self.params, g_r, g_f, strict=True):
                p.grad = a + lam * b
        torch.nn.utils.clip_grad_norm_(self.params, self.hp.max_grad_norm)
        self.optimizer.step()
        return {
            "lam": float(lam),
            "retain_loss": l_r.item(),
            "forget_loss": l_f.item(),
            "g_value": l_f.item() - self.inner_value,
            "burst": float(burst),
        }

    def state_dict(self):
        data = self.forget_data
        return {
            **super().state_dict(),
            "phase": self.phase,
            "taken": self.taken,
            "inner_value": self.inner_value,
            "forget": {"images": data.images, "labels": data.labels},
        }

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.phase, self.taken = int(state["phase"]), int(state["taken"])
        self.inner_value = float(state["inner_value"])
        forget = state["forget"]
        self.forget_data = ImageData(forget["images"], forget["labels"], self.s.num_classes, "forget")
