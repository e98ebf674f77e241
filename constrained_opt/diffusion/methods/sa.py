"""Selective Amnesia, as its authors' DDPM release (clear-nus/selective-amnesia): a replay set, an EWC
penalty with SA's timestep-summed Fisher, and forget samples drawn from U[−1, 1]."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from ..data import BatchSampler, ImageData
from ..evaluation.multiclass import as_classes, is_forgotten
from ..losses import antithetic_timesteps, diffuse, ewc_penalty, pixel_sum_loss, timestep_summed_fisher
from ..models import ASSETS
from ..runtime.errors import UsageError
from ..runtime.io import load_state, save_state
from ..runtime.provenance import model_digest
from ..sampling import SAMPLERS, sample
from .base import Hyper, Method

FISHER_INPUTS = ("released", "signed")


@dataclass
class SAHyper(Hyper):
    gamma: float = 1.0  # configs/cifar10_forget.yml: training.gamma
    lam: float = 10.0  # configs/cifar10_forget.yml: training.lmbda
    samples_per_class: int = 0  # 0: ⌈samples_fraction × training images per class⌉
    samples_fraction: float = 0.1  # SA's README: 500 generated per class for CIFAR-10's 5000
    n_chunks: int = 20  # fim.py --n_chunks (memory only)
    fisher_stride: int = 1  # 1: the sum runs over all T timesteps, as released; k: every k-th, × k (cheaper)
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
        if self.hp.fisher_stride > 1:  # a strided sum is rescaled by its stride (before: it was not)
            settings["fisher_scale"] = self.hp.fisher_stride
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
                scale=self.hp.fisher_stride,
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
