"""EraseDiff and the baselines behind one interface, and the shared unlearning harness.

Every method sees the same stream: at each of ``steps`` steps the harness draws one retain batch and
one forget batch of ``batch_size`` images (same seeds for every method) and calls ``method.step``.
Work done once before the loop (SalUn's mask, SA's replay set and Fisher) is the *preparation* stage;
``time_s`` counts only the loop, as in the paper's Table 4, while peak memory covers both stages.

SalUn and Selective Amnesia reproduce their authors' DDPM releases (OPTML-Group/Unlearn-Saliency
``DDPM/runners/diffusion.py`` and ``DDPM/functions/losses.py``; clear-nus/selective-amnesia
``ddpm/runners/diffusion.py``): pixel-*sum* losses, antithetic timesteps, label dropout, SalUn's
pseudo label and clipped, guided mask gradients, SA's Fisher summed over all T timesteps. docs/ddpm.md
lists each hyperparameter with its source file. ``PUBLISHED`` holds each method's published
(steps, batch size).

Defaults (per method, overridable with ``--hp key=value``); all use Adam at the shared ``lr`` and clip
the update norm at 1.0 as in the authors' DDPM code:

- ``erasediff``: rule ``grad_norm``, η = 1, K = 1 inner step at ξ = 1e-4, forget target ``rl``.
- ``erasediff_shared_adam``: the same update, but the K inner steps go through the *outer* Adam (as
  in the authors' release), whose moments then carry forget-loss gradients into the next update.
- ``moo``: Eq. 3 scalarised, δ = ∇L_r + w∇L_f with w = 1 (``rule="scalarized"``, K = 0), target ``rl``.
- ``finetune``: L_r only.
- ``neggrad``: −L_denoise on the forget batch (gradient ascent), nothing else.
- ``salun``: mask = top 50% of |Σ_batches clip(∇ Σ_pixels ‖ε − ε̃_θ(x_t|c_f)‖²)| (ε̃ guided, w = 2); loss
  MSE(ε_θ(x_t|c_f), sg ε_θ(x_t|(c_f+1) mod C)) + α·(1/B)Σ_i‖ε − ε_θ(x_t|c)‖²_pixel-sum, α = 1e-3,
  label dropout 0.1; gradients clipped, then multiplied by the mask.
- ``sa``: loss Σ_pixels-loss(x̃ ~ U[−1,1]^d | c_f) + γ Σ_pixels-loss(replay) + λ Σ F(θ − θ*)², γ = 1,
  λ = 10, shared antithetic t; F = SA's Fisher (:func:`~.losses.timestep_summed_fisher`) over the
  generated samples of every class; replay = the remembered classes' samples. Samples per class:
  10% of the training images per class (SA: 500 of CIFAR-10's 5000).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from .data import BatchSampler, ImageData
from .losses import (
    FORGET_TARGETS,
    antithetic_timesteps,
    denoising_loss,
    diffuse,
    drop_labels,
    ewc_penalty,
    forget_loss,
    forget_target,
    pixel_sum_loss,
    saliency_mask,
    timestep_summed_fisher,
    unet_eps,
)
from .metrics import PeakMemory
from .models import ASSETS, null_class
from .multiclass import as_classes, class_rows, forget_sampler, is_forgotten
from .resume import check_resume, restoring, run_config
from .runtime.errors import UsageError
from .runtime.io import load_state, save_state
from .sampling import SAMPLERS, make_scheduler, sample

# Published (steps, batch size) per method: the EraseDiff paper §8 ("batch size 128, lr 1e-4, around
# 300 training steps"), also used for its MOO/FT/NG baselines; SalUn's DDPM config
# (configs/cifar10_saliency_unlearn.yml: n_iters 1000, batch_size 128); SA's
# (configs/cifar10_forget.yml: n_iters 20000, batch_size 128).
PUBLISHED: dict[str, tuple[int, int]] = {
    "erasediff": (300, 128),
    "erasediff_shared_adam": (300, 128),
    "moo": (300, 128),
    "finetune": (300, 128),
    "neggrad": (300, 128),
    "salun": (1000, 128),
    "sa": (20_000, 128),
}


@dataclass
class Setup:
    """What every method needs: the model being scrubbed, the task and the shared randomness."""

    unet: Any
    num_classes: int
    forget_class: int | tuple[int, ...]
    lr: float
    generator: torch.Generator
    batch_size: int = 64
    scheduler: Any = field(default_factory=make_scheduler)
    progress: bool = True
    cache: str | None = None  # folder where one-off preparations (SA's Fisher) may be stored and reused

    @property
    def num_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device


@dataclass
class Hyper:
    """Method hyperparameters; every numeric one must be finite and ≥ 0, and the clipping norm > 0
    (checked before anything runs)."""

    max_grad_norm: float = 1.0

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, int | float) and not (math.isfinite(value) and value >= 0):
                raise UsageError(f"hyperparameter {f.name} must be a finite number ≥ 0, got {value}")
        if not self.max_grad_norm > 0:
            raise UsageError(
                f"hyperparameter max_grad_norm must be > 0 (δ is clipped to it), got {self.max_grad_norm}"
            )


class Method:
    """Base class: ``prepare`` once, then ``step(retain_batch, forget_batch) -> stats``."""

    name: ClassVar[str]
    Hyper: ClassVar[type] = Hyper

    def __init__(self, setup: Setup, **hp: Any):
        self.s = setup
        self.hp = self.Hyper(**hp)
        self.eps = unet_eps(setup.unet)
        self.optimizer = self.build_optimizer()

    def build_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.s.unet.parameters(), lr=self.s.lr)

    def prepare(self, retain: ImageData, forget: ImageData) -> dict | None:
        """One-off work before the loop (default: none). May return ``{"prep_s": seconds,
        "prep_cached": True}`` when it reused a stored result, to report what computing it cost."""

    def step(self, retain: tuple[Tensor, Tensor], forget: tuple[Tensor, Tensor]) -> dict[str, float]:
        raise NotImplementedError

    def diffuse(self, batch: tuple[Tensor, Tensor]):
        x0, c = batch
        return diffuse(self.s.scheduler, x0.to(self.s.device), c.to(self.s.device), self.s.generator)

    def descend(self, loss: Tensor, mask: dict[str, Tensor] | None = None) -> None:
        """One Adam step on ``loss``: gradient norm clipped, then (SalUn) multiplied by the mask, in the
        order of SalUn's release."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.s.unet.parameters(), self.hp.max_grad_norm)
        if mask is not None:
            for name, p in self.s.unet.named_parameters():
                if p.grad is not None:
                    p.grad.mul_(mask[name])
        self.optimizer.step()

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])


def check_forget_target(kind: str) -> None:
    if kind not in FORGET_TARGETS:
        raise UsageError(f"unknown forget target {kind!r}; expected one of {FORGET_TARGETS}")


KKT_RULES = ("grad_norm", "value", "cosine")  # the rules whose only hyperparameter is η


@dataclass
class BilevelHyper(Hyper):
    forget_target: str = "rl"
    rule: str = "grad_norm"
    eta: float = 1.0
    inner_steps: int = 1
    inner_lr: float = 1e-4

    def __post_init__(self):
        super().__post_init__()
        check_forget_target(self.forget_target)
        if self.rule not in KKT_RULES:
            raise UsageError(f"unknown EraseDiff rule {self.rule!r}; expected one of {', '.join(KKT_RULES)}")


class EraseDiff(Method):
    """Algorithm 1 through :class:`~constrained_opt.ValueFunctionBilevelOptimizer`.

    ε_f is computed once per step at θ_t and held fixed, so the inner problem min_φ L_f(φ) and g(θ_t)
    refer to one objective.
    """

    name = "erasediff"
    Hyper = BilevelHyper

    def optimizer_kwargs(self) -> dict[str, Any]:
        return dict(
            rule=self.hp.rule, eta=self.hp.eta, inner_steps=self.hp.inner_steps, inner_lr=self.hp.inner_lr
        )

    def build_optimizer(self):
        from constrained_opt import ValueFunctionBilevelOptimizer

        return ValueFunctionBilevelOptimizer(
            self.s.unet.parameters(),
            base_optimizer=torch.optim.Adam,
            lr=self.s.lr,
            max_grad_norm=self.hp.max_grad_norm,
            **self.optimizer_kwargs(),
        )

    def step(self, retain, forget):
        br, bf = self.diffuse(retain), self.diffuse(forget)
        target = forget_target(self.eps, bf, self.hp.forget_target, self.s.num_classes, self.s.generator)
        stats = self.optimizer.step(lambda: denoising_loss(self.eps, br), self.constraints(bf, target))
        return self.record(stats)

    def record(self, stats) -> dict[str, float]:
        return {k: v for k, v in stats.as_dict().items() if isinstance(v, float)}

    def constraints(self, bf, target):
        """One constraint on the whole (pooled) forget batch."""
        return lambda: forget_loss(self.eps, bf, target)


class EraseDiffPerClass(EraseDiff):
    """EraseDiff with one constraint per forget class (``--per-class-constraints``): each class's rows of
    the stratified forget batch form their own closure, ``{"class_<c>": L_f(θ; rows of c)}``."""

    name = "erasediff_per_class"

    def constraints(self, bf, target):
        def closure(rows):
            part = type(bf)(*(field[rows] for field in bf))
            return lambda: forget_loss(self.eps, part, target[rows])

        return {
            name: closure(rows) for name, rows in class_rows(bf.cond, as_classes(self.s.forget_class)).items()
        }

    def record(self, stats):
        """The pooled figures, plus each class's λ and forget loss (``lam_class_<c>``, ...)."""
        out = super().record(stats)
        for name, lam, loss in zip(stats.constraint_names, stats.lams, stats.forget_losses, strict=True):
            out[f"lam_{name}"], out[f"forget_loss_{name}"] = lam, loss
        return out


@dataclass
class MooHyper(Hyper):
    forget_target: str = "rl"
    forget_weight: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        check_forget_target(self.forget_target)


class Moo(EraseDiff):
    """Eq. 3: min L_r + w·L_f, the same closures as EraseDiff through ``rule="scalarized"``, K = 0."""

    name = "moo"
    Hyper = MooHyper

    def optimizer_kwargs(self):
        return dict(rule="scalarized", forget_weight=self.hp.forget_weight, inner_steps=0)


class EraseDiffSharedAdam(Method):
    """EraseDiff with the inner loop of the authors' release: φ^{k+1} = Adam step on L_f from φ^k,
    taken by the *outer* Adam, then θ restored and δ = ∇L_r + λ∇g (``grad_norm`` rule) stepped by that
    same Adam. The inner steps leave forget-loss gradients in Adam's moments and advance its step
    count, so K changes the update here, unlike in :class:`EraseDiff` (docs/algorithm.md).
    """

    name = "erasediff_shared_adam"
    Hyper = BilevelHyper

    def __init__(self, setup, **hp):
        super().__init__(setup, **hp)
        if self.hp.rule != "grad_norm":
            raise UsageError("erasediff_shared_adam implements the grad_norm rule only")

    def step(self, retain, forget):
        from constrained_opt import kkt_direction

        params = [p for p in self.s.unet.parameters() if p.requires_grad]
        br, bf = self.diffuse(retain), self.diffuse(forget)
        target = forget_target(self.eps, bf, self.hp.forget_target, self.s.num_classes, self.s.generator)
        theta = [p.detach().clone() for p in params]
        for _ in range(self.hp.inner_steps):
            self.descend(forget_loss(self.eps, bf, target))
        with torch.no_grad():
            inner_value = forget_loss(self.eps, bf, target).item()
            for p, saved in zip(params, theta, strict=True):
                p.copy_(saved)
        lf = forget_loss(self.eps, bf, target)
        g_f = torch.autograd.grad(lf, params)
        lr = denoising_loss(self.eps, br)
        g_r = torch.autograd.grad(lr, params)
        flat_f, flat_r = (torch.cat([g.flatten() for g in gs]) for gs in (g_f, g_r))
        delta, lam = kkt_direction(flat_r, flat_f, self.hp.eta * flat_f.dot(flat_f))
        self.optimizer.zero_grad(set_to_none=True)
        for p, chunk in zip(params, delta.split([p.numel() for p in params]), strict=True):
            p.grad = chunk.view_as(p).clone()
        torch.nn.utils.clip_grad_norm_(params, self.hp.max_grad_norm)
        self.optimizer.step()
        g_value = lf.item() - inner_value if self.hp.inner_steps else 0.0
        return {"lam": float(lam), "retain_loss": lr.item(), "forget_loss": lf.item(), "g_value": g_value}


class Finetune(Method):
    """Fine-tune on D_r only: min L_r."""

    name = "finetune"

    def step(self, retain, forget):
        loss = denoising_loss(self.eps, self.diffuse(retain))
        self.descend(loss)
        return {"retain_loss": loss.item()}


class NegGrad(Method):
    """Gradient ascent on the denoising loss of D_f: min −L_denoise(D_f)."""

    name = "neggrad"

    def step(self, retain, forget):
        loss = denoising_loss(self.eps, self.diffuse(forget))
        self.descend(-loss)
        return {"forget_loss": loss.item()}


@dataclass
class SalUnHyper(Hyper):
    keep: float = 0.5  # generate_mask: threshold_list = [0.5] (train.py --mask_ratio 0.5)
    alpha: float = 1e-3  # DDPM/README.md: --alpha 1e-3
    label_dropout: float = 0.1  # configs/cifar10_saliency_unlearn.yml: model.cond_drop_prob
    mask_guidance: float = 2.0  # generate_mask: mode="test", cond_scale=args.cond_scale (default 2.0)

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.keep <= 1:
            raise UsageError(f"salun keep must be in (0, 1], got {self.keep}")
        if self.label_dropout > 1:
            raise UsageError(f"salun label_dropout must be in [0, 1], got {self.label_dropout}")


class SalUn(Method):
    """Saliency unlearning as in SalUn's DDPM release (``generate_mask`` and ``saliency_unlearn``).

    Loss: MSELoss(ε_θ(x_t | c̃_f), sg ε_θ(x_t | c̃_m)) + α·(1/B)Σ_i ‖ε_i − ε_θ(x_t,i | c̃_i)‖²_pixel-sum, with
    c_m = (c_f + 1) mod C (the release's pseudo label), c̃ = ∅ with probability ``label_dropout`` in each
    of the three forward passes, antithetic t. Relative to the pixel-mean forget term the retain term
    weighs α·d (d pixels). The gradient is clipped, then multiplied by the saliency mask.
    """

    name = "salun"
    Hyper = SalUnHyper

    def prepare(self, retain, forget):
        """mask = top-``keep`` of |Σ_batches clip(∇ (1/B)Σ_i‖ε − ε̃_θ(x_t|c_f)‖²_pixel-sum)|, one shuffled
        pass over D_f in batches of ``batch_size``; ε̃ is the guided prediction (1+w)ε(c) − wε(∅),
        the model in eval mode, each batch gradient clipped to the harness's max norm."""
        unet, s = self.s.unet, self.s
        null = null_class(unet)
        unet.eval()
        total = {n: torch.zeros_like(p) for n, p in unet.named_parameters()}
        order = torch.randperm(len(forget), generator=s.generator)
        for start in range(0, len(forget), s.batch_size):
            idx = order[start : start + s.batch_size]
            x0, c = forget.images[idx].to(s.device), forget.labels[idx].to(s.device)
            b = diffuse(
                s.scheduler, x0, c, s.generator, antithetic_timesteps(len(idx), s.num_timesteps, s.generator)
            )
            w = self.hp.mask_guidance
            guided = (1 + w) * self.eps(b.x_t, b.t, b.cond) - w * self.eps(
                b.x_t, b.t, torch.full_like(c, null)
            )
            unet.zero_grad(set_to_none=True)
            pixel_sum_loss(guided, b.noise).backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), self.hp.max_grad_norm)
            for n, p in unet.named_parameters():
                if p.grad is not None:
                    total[n] += p.grad
        self.mask = saliency_mask(total, self.hp.keep)
        unet.zero_grad(set_to_none=True)
        unet.train()

    def step(self, retain, forget):
        s, null, p = self.s, null_class(self.s.unet), self.hp.label_dropout
        x_r, c_r = (v.to(s.device) for v in retain)
        x_f, c_f = (v.to(s.device) for v in forget)
        br = diffuse(
            s.scheduler, x_r, c_r, s.generator, antithetic_timesteps(len(c_r), s.num_timesteps, s.generator)
        )
        remain = pixel_sum_loss(self.eps(br.x_t, br.t, drop_labels(c_r, null, p, s.generator)), br.noise)
        bf = diffuse(
            s.scheduler, x_f, c_f, s.generator, antithetic_timesteps(len(c_f), s.num_timesteps, s.generator)
        )
        output = self.eps(bf.x_t, bf.t, drop_labels(c_f, null, p, s.generator))
        pseudo_c = drop_labels((c_f + 1) % s.num_classes, null, p, s.generator)
        with torch.no_grad():
            pseudo = self.eps(bf.x_t, bf.t, pseudo_c)
        forget_term = F.mse_loss(output, pseudo)
        self.descend(forget_term + self.hp.alpha * remain, self.mask)
        return {"forget_loss": forget_term.item(), "retain_loss": remain.item()}

    def state_dict(self):
        return {**super().state_dict(), "mask": self.mask}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.mask = state["mask"]


FISHER_INPUTS = ("released", "signed")


@dataclass
class SAHyper(Hyper):
    gamma: float = 1.0  # configs/cifar10_forget.yml: training.gamma
    lam: float = 10.0  # configs/cifar10_forget.yml: training.lmbda
    samples_per_class: int = 0  # 0: ⌈samples_fraction × training images per class⌉
    samples_fraction: float = 0.1  # SA's README: 500 generated per class for CIFAR-10's 5000
    n_chunks: int = 20  # fim.py --n_chunks (memory only)
    fisher_stride: int = 1  # 1: the sum runs over all T timesteps, as released; k: every k-th (cheaper)
    fisher_label_dropout: float = 0.1  # save_fim's loss runs the model with cond_drop_prob 0.1
    fisher_input: str = "released"  # released: samples read back in [0, 1]; signed: in [-1, 1]
    sampler: str = "ddpm"  # sample.py: generalized sampler, 1000 steps, eta 1 (ancestral)
    guidance: float = 2.0  # sample.py --cond_scale
    sample_seed: int = 1234  # sample.py --seed

    def __post_init__(self):
        super().__post_init__()
        if self.fisher_input not in FISHER_INPUTS:
            raise UsageError(
                f"sa fisher_input must be one of {', '.join(FISHER_INPUTS)}, got {self.fisher_input!r}"
            )
        if self.sampler not in SAMPLERS:
            raise UsageError(f"sa sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if self.n_chunks < 1 or self.fisher_stride < 1 or self.fisher_label_dropout > 1:
            raise UsageError("sa n_chunks and fisher_stride must be ≥ 1, fisher_label_dropout in [0, 1]")


def model_digest(unet) -> str:
    """SHA-256 of a model's state (names, shapes, bytes): the key of preparations cached per model."""
    h = hashlib.sha256()
    for name, tensor in sorted(unet.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def quantize_8bit(images: Tensor) -> Tensor:
    """Images in [-1, 1] as written to PNG and read back by ToTensor: round to 1/255 steps in [0, 1]."""
    return torch.round((images.clamp(-1, 1) + 1) / 2 * 255) / 255


class SelectiveAmnesia(Method):
    """Selective Amnesia (Heng & Soh 2023) as in its DDPM release (``sample_classes``, ``save_fim``,
    ``train_forget``).

    Preparation (depends on the base model only, so it is cached per model, as the release keeps
    ``class_samples/`` and ``fisher_dict.pkl`` beside the checkpoint): generate ``samples_per_class``
    images of every class with the frozen model θ* (1000-step ancestral sampling, w = 2, seed 1234),
    stored as 8-bit images; F = :func:`~.losses.timestep_summed_fisher` over all of them (read back in
    [0, 1] as the release's ``ImageFolder`` + ``ToTensor`` loader gives them, unless
    ``fisher_input=signed``); replay set = the remembered classes' samples (in [−1, 1]).

    Step: (1/B)Σ‖ε − ε_θ(x_t|c_f)‖²_pixel-sum at x̃ ~ U[−1, 1]^d + γ·(same on a replay batch, same t)
    + λ Σ F(θ − θ*)², antithetic t, no label dropout. D_r itself is not used.
    """

    name = "sa"
    Hyper = SAHyper

    def per_class(self, retain: ImageData, forget: ImageData) -> int:
        if self.hp.samples_per_class:
            return self.hp.samples_per_class
        images_per_class = (len(retain) + len(forget)) / retain.num_classes
        return max(2, round(self.hp.samples_fraction * images_per_class))

    def prepare(self, retain, forget):
        s, n = self.s, self.per_class(retain, forget)
        settings = {k: v for k, v in dataclasses.asdict(self.hp).items() if k not in ("gamma", "lam")}
        key = hashlib.sha256(f"{model_digest(s.unet)}{sorted(settings.items())}{n}".encode()).hexdigest()[:16]
        name = f"sa-prep-{key}.safetensors"
        path = os.path.join(s.cache, name) if s.cache else None
        stored = [p for p in (path, os.path.join(ASSETS, name)) if p and os.path.isfile(p)]
        info = None
        if stored:  # computed before, or shipped for a shipped base model (assets/README.md)
            prep = load_state(stored[0])
            info = {"prep_s": prep["prep_s"], "prep_cached": True}
        else:
            t0 = time.perf_counter()
            labels = torch.arange(s.num_classes).repeat_interleave(n)
            images = quantize_8bit(
                sample(
                    s.unet,
                    labels,
                    sampler=self.hp.sampler,
                    guidance=self.hp.guidance,
                    seed=self.hp.sample_seed,
                    desc="SA samples",
                    progress=s.progress,
                )
            )
            fisher_x = images if self.hp.fisher_input == "released" else images * 2 - 1
            fisher = timestep_summed_fisher(
                s.unet,
                s.scheduler,
                fisher_x.to(s.device),
                labels.to(s.device),
                torch.Generator().manual_seed(self.hp.sample_seed),
                label_dropout=self.hp.fisher_label_dropout,
                n_chunks=self.hp.n_chunks,
                timesteps=torch.arange(0, s.num_timesteps, self.hp.fisher_stride),
                progress=s.progress,
            )
            prep = {"images": images, "labels": labels, "fisher": fisher, "prep_s": time.perf_counter() - t0}
            if path:
                save_state(path, prep)
        keep = ~is_forgotten(prep["labels"], s.forget_class)
        self.replay = ImageData(
            prep["images"][keep] * 2 - 1, prep["labels"][keep], s.num_classes, "sa-replay"
        )
        self.fisher = {k: v.to(s.device) for k, v in prep["fisher"].items()}
        self.anchor = {k: v.detach().clone() for k, v in s.unet.named_parameters()}
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=s.generator))
        self.replay_batches = BatchSampler(self.replay, s.batch_size, seed)
        return info

    def step(self, retain, forget):
        s = self.s
        x_r, c_r = (v.to(s.device) for v in self.replay_batches.next())
        n = len(c_r)
        x_f = ((torch.rand(x_r.shape, generator=s.generator) - 0.5) * 2).to(s.device)
        classes = as_classes(s.forget_class)
        if len(classes) == 1:  # the release: every surrogate conditioned on the forget class
            c_f = torch.full_like(c_r, classes[0])
        else:  # several forget classes: each surrogate's class drawn uniformly among them
            pick = torch.randint(0, len(classes), c_r.shape, generator=s.generator)
            c_f = torch.tensor(classes)[pick].to(c_r.device)
        t = antithetic_timesteps(n, s.num_timesteps, s.generator)
        bf, br = (
            diffuse(s.scheduler, x_f, c_f, s.generator, t),
            diffuse(s.scheduler, x_r, c_r, s.generator, t),
        )
        l_forget = pixel_sum_loss(self.eps(bf.x_t, bf.t, bf.cond), bf.noise)
        l_replay = pixel_sum_loss(self.eps(br.x_t, br.t, br.cond), br.noise)
        ewc = ewc_penalty(dict(s.unet.named_parameters()), self.anchor, self.fisher)
        self.descend(l_forget + self.hp.gamma * l_replay + self.hp.lam * ewc)
        return {"forget_loss": l_forget.item(), "retain_loss": l_replay.item(), "ewc": ewc.item()}

    def state_dict(self):
        replay = {"images": self.replay.images, "labels": self.replay.labels}
        return {
            **super().state_dict(),
            "fisher": self.fisher,
            "anchor": self.anchor,
            "replay": replay,
            "replay_batches": self.replay_batches.state_dict(),
        }

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.fisher, self.anchor = state["fisher"], state["anchor"]
        replay = state["replay"]
        self.replay = ImageData(replay["images"], replay["labels"], self.s.num_classes, "sa-replay")
        self.replay_batches = BatchSampler(self.replay, self.s.batch_size, 0)
        self.replay_batches.load_state_dict(state["replay_batches"])


METHODS: dict[str, type[Method]] = {
    m.name: m for m in (EraseDiff, Finetune, NegGrad, Moo, SalUn, SelectiveAmnesia, EraseDiffSharedAdam)
}
BASELINES = ("finetune", "neggrad", "moo", "salun", "sa")  # the demo's default comparison


def parse_hparams(method: str, pairs: list[str]) -> dict[str, Any]:
    """``["eta=0.5", "forget_target=noise"]`` → typed kwargs for ``method``'s Hyper dataclass."""
    if method not in METHODS:
        raise UsageError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    fields = {f.name: f for f in dataclasses.fields(METHODS[method].Hyper)}
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in fields:
            raise UsageError(f"bad hyperparameter {pair!r} for {method}; known: {', '.join(fields)}")
        kind = type(fields[key].default)
        try:
            out[key] = kind(value)
        except ValueError:
            raise UsageError(
                f"hyperparameter {key} of {method} needs a {kind.__name__}, got {value!r}"
            ) from None
    METHODS[method].Hyper(**out)  # range checks
    return out


# Variants chosen by a flag rather than by --method (they take the hyperparameters of the method named).
VARIANTS: dict[str, type[Method]] = {EraseDiffPerClass.name: EraseDiffPerClass}


def method_class(name: str) -> type[Method]:
    """The class of method (or variant) ``name``; unknown names raise :class:`UsageError`."""
    if name not in METHODS and name not in VARIANTS:
        raise UsageError(f"unknown method {name!r}; expected one of {', '.join(METHODS)}")
    return METHODS.get(name) or VARIANTS[name]


def make_method(name: str, setup: Setup, hparams: dict[str, Any]) -> Method:
    """Instantiate method ``name``; unknown names and invalid values raise :class:`UsageError`."""
    return method_class(name)(setup, **hparams)


@dataclass
class UnlearnResult:
    unet: Any
    history: list[dict[str, float]]
    time_s: float
    prep_s: float
    peak_mem_mb: float
    probes: list[dict[str, float]] = field(default_factory=list)
    prep_cached: bool = False


def unlearn(
    method: str,
    unet,
    retain: ImageData,
    forget: ImageData,
    forget_class: int | tuple[int, ...],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    hparams: dict[str, Any] | None = None,
    checkpoint: str | None = None,
    checkpoint_every: int = 50,
    resume: bool = False,
    progress: bool = True,
    probe: Callable[[Any], dict[str, float]] | None = None,
    probe_every: int = 0,
    inputs: dict[str, Any] | None = None,
    cache: str | None = None,
) -> UnlearnResult:
    """Scrub ``forget_class`` from a copy of ``unet`` with ``method``; the input model is not modified.

    With ``checkpoint``, the model, method state (optimizer, mask, Fisher, ...), samplers, RNG states
    and history are saved there every ``checkpoint_every`` steps; after a Ctrl-C, ``resume=True``
    continues from that file (bit-for-bit the same run as an uninterrupted one). The checkpoint stores
    the run's configuration (these arguments, the resolved hyperparameters and ``inputs``, which
    identify the data and the base model); resuming with any other configuration raises
    :class:`UsageError`, except more ``steps`` (see :mod:`.resume`).

    With ``probe``, ``probe(unet)`` is called after every ``probe_every`` steps and its figures are
    recorded in ``UnlearnResult.probes`` with the step and the unlearning time so far; the probe's own
    time is not counted, and it must not draw from the global RNG (``sampling.sample`` does not).

    With ``cache``, a method may store one-off preparations that depend on the base model only (SA's
    replay samples and Fisher) in that folder and reuse them; ``prep_s`` then reports what computing
    them cost, and ``prep_cached`` is true.
    """
    if probe is not None and probe_every < 1:
        raise UsageError(
            f"probe_every must be a positive number of steps when a probe is given, got {probe_every}"
        )
    from tqdm.auto import tqdm

    unet = copy.deepcopy(unet).train()
    generator = torch.Generator().manual_seed(seed + 2)
    setup = Setup(
        unet, retain.num_classes, forget_class, lr, generator, batch_size, progress=progress, cache=cache
    )
    m = make_method(method, setup, hparams or {})
    config = run_config(
        method, forget_class, steps, batch_size, lr, seed, dataclasses.asdict(m.hp), **(inputs or {})
    )
    samplers = {
        "retain": BatchSampler(retain, batch_size, seed),
        "forget": forget_sampler(forget, forget_class, batch_size, seed + 1),
    }
    start, history, probes, elapsed, prep_s, peak, cached = 0, [], [], 0.0, 0.0, 0.0, False

    def save(step: int) -> None:
        save_state(
            checkpoint,
            {
                "method": method,
                "config": config,
                "step": step,
                "history": history,
                "probes": probes,
                "elapsed": elapsed,
                "prep_s": prep_s,
                "prep_cached": cached,
                "peak_mem_mb": max(peak, meter.peak_mb),
                "model": unet.state_dict(),
                "method_state": m.state_dict(),
                "samplers": {k: s.state_dict() for k, s in samplers.items()},
                "generator": generator.get_state(),
                "torch_rng": torch.get_rng_state(),
            },
        )

    meter = PeakMemory(setup.device)
    with meter:
        if resume and checkpoint and os.path.exists(checkpoint):
            state = load_state(checkpoint)
            with restoring(checkpoint):
                note = check_resume(checkpoint, state.get("config"), config, int(state["step"]))
                if note:
                    print(note, flush=True)
                unet.load_state_dict(state["model"])
                m.load_state_dict(state["method_state"])
                for k, s in samplers.items():
                    s.load_state_dict(state["samplers"][k])
                generator.set_state(state["generator"])
                torch.set_rng_state(state["torch_rng"])
                start, history, elapsed = state["step"], state["history"], state["elapsed"]
                probes = state.get("probes", [])
                prep_s, peak = state["prep_s"], state["peak_mem_mb"]
                cached = state.get("prep_cached", False)
        else:
            t0 = time.perf_counter()
            info = m.prepare(retain, forget) or {}
            prep_s = info.get("prep_s", time.perf_counter() - t0)
            cached = info.get("prep_cached", False)
        for step in tqdm(range(start, steps), initial=start, total=steps, desc=method, disable=not progress):
            t0 = time.perf_counter()
            history.append(m.step(samplers["retain"].next(), samplers["forget"].next()))
            elapsed += time.perf_counter() - t0
            if probe is not None and (step + 1) % probe_every == 0:
                probes.append({"step": step + 1, "time_s": elapsed, **probe(unet)})
            if checkpoint and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
                save(step + 1)
    return UnlearnResult(unet.eval(), history, elapsed, prep_s, max(peak, meter.peak_mb), probes, cached)
