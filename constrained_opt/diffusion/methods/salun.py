"""SalUn, as its authors' DDPM release (OPTML-Group/Unlearn-Saliency): a saliency mask, then a
relabelling loss on the masked weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..evaluation.multiclass import as_classes
from ..losses import antithetic_timesteps, diffuse, drop_labels, pixel_sum_loss, saliency_mask
from ..models import null_class
from ..runtime.errors import UsageError
from .base import Hyper, Method


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
    c_m = (c_f + 1) mod C (the release's pseudo label; with several forget classes, our extension: the
    next class after c_f, cyclically, that is not forgotten, see :func:`next_kept_class`), c̃ = ∅ with
    probability ``label_dropout`` in each of the three forward passes, antithetic t. Relative to the
    pixel-mean forget term the retain term weighs α·d (d pixels). The gradient is clipped, then
    multiplied by the saliency mask.
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
        pseudo_c = drop_labels(
            next_kept_class(c_f, s.num_classes, as_classes(s.forget_class)), null, p, s.generator
        )
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


def next_kept_class(labels: Tensor, num_classes: int, forgotten: tuple[int, ...]) -> Tensor:
    """SalUn's pseudo label for each forget label c: (c + j) mod C for the smallest j ≥ 1 with
    (c + j) mod C ∉ C_f. One forget class gives the release's (c + 1) mod C; for several (our
    multi-class extension of the release's rule) the target never lands on another forgotten class."""
    kept = [c for c in range(num_classes) if c not in forgotten]
    if not kept:
        raise UsageError(f"all {num_classes} classes are forgotten: SalUn has no class to relabel to")
    table = torch.tensor(
        [
            next((c + j) % num_classes for j in range(1, num_classes + 1) if (c + j) % num_classes in kept)
            for c in range(num_classes)
        ],
        device=labels.device,
    )
    return table[labels]
