"""Meta-Unlearning (Gao et al., ICCV 2025) as its ESD release trains it (sail-sg/Meta-Unlearning at
5a2a7600895a2885323cbbf599acaf3f74a96f64, ``src/esd_meta.py``; ``src/meta.py`` is the same meta step
without an unlearning loss, for UCE/RECE models), transcribed to class forgetting."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ..data import ImageData
from ..evaluation.multiclass import as_classes
from ..losses import Noised, class_table, denoising_loss, forget_loss, forget_target, unet_eps
from ..runtime.errors import UsageError
from .base import Hyper, Method, check_forget_target

BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # esd_meta.py L129-131: --adam_beta1/2, --adam_epsilon


@dataclass
class MetaHyper(Hyper):
    # esd_meta.py L90-94: every γ defaults to 1.0. (scripts/esd_meta.sh passes gamma1_1 0.1, gamma1_2
    # 0.01 and --gamma2_1 three times, so 0.01 wins and γ22 = γ23 stay 1; README: "change the
    # hyperparameter refer to our paper".)
    gamma11: float = 1.0  # ∇ℓ_irt(θ)
    gamma12: float = 1.0  # ∇ℓ_tgt(θ)
    gamma21: float = 1.0  # −∇ℓ_hrm(θ′)
    gamma22: float = 1.0  # −∇ℓ_tgt(θ′)
    gamma23: float = 1.0  # −∇ℓ_irt(θ′)
    # The simulated attack is one epoch over hrm_train (L1005-1007): 30 images per prompt
    # (gen_images.py L91) in batches of train_batch_size 10 (esd_meta.sh), i.e. 3 AdamW steps.
    finetune_steps: int = 3
    finetune_lr: float = 1e-5  # L120 --learning_rate, the task optimizers' lr (L949-955, L965-971)
    weight_decay: float = 1e-4  # L132, the outer (L867-873) and the simulated AdamW alike
    forget_target: str = "rl"  # ℓ_u: the harness's unlearning loss in place of ESD's (see the class)
    # max_grad_norm 1.0 (inherited): L133, clipping every simulated step (L619-620) and the outer (L1055)

    def __post_init__(self):
        super().__post_init__()
        check_forget_target(self.forget_target)
        if self.finetune_steps < 1:
            raise UsageError(
                f"meta_unlearning finetune_steps must be ≥ 1 (the simulated fine-tuning), got "
                f"{self.finetune_steps}"
            )


class Draw(NamedTuple):
    """One step's noised batches: retain (ℓ_irt), related classes (ℓ_tgt), forget (ℓ_u at θ, ℓ_hrm at
    θ′) with ℓ_u's target, and the simulated fine-tuning's forget batches."""

    retain: Noised
    related: Noised
    forget: Noised
    target: Tensor
    tune: list[Noised]


class MetaUnlearning(Method):
    """Meta-Unlearning: unlearn, and make a later fine-tuning on the forgotten class hurt.

    Per step, with θ′ = θ after ``finetune_steps`` AdamW steps (lr ``finetune_lr``, weight decay 1e-4,
    each gradient clipped) of the plain denoising loss on forget batches, run on a *copy* of the UNet
    (every weight, ``gather_parameters_full`` L308-315), the outer AdamW (lr = ``--lr``, betas 0.9/0.999,
    weight decay 1e-4) steps on the clipped

        δ = ∇ℓ_u(θ) + γ11∇ℓ_irt(θ) + γ12∇ℓ_tgt(θ) − [γ21∇ℓ_hrm(θ′) + γ22∇ℓ_tgt(θ′) + γ23∇ℓ_irt(θ′)],

    first order: the θ′ gradients are applied to θ as they are (esd_meta.py L992-1000 add the θ terms
    to ``sum_grads``, L1003 backpropagates ℓ_u, L1007 fine-tunes the copy, L1030-1045 *subtract* the θ′
    terms, L1049-1056 add ``sum_grads`` to the gradient, clip and step). Descending −∇ℓ_hrm(θ′) raises
    the fine-tuned copy's loss on the forgotten class; descending −∇ℓ_tgt(θ′) and −∇ℓ_irt(θ′) raises
    its loss on retained data too: the release's "self-destruct" of benign knowledge under relearning.

    Transcription to class forgetting:

    - ℓ_u = the harness's unlearning loss ``forget_loss`` (target ``rl``: ε_θ(x_t | c_m), c_m a random
      retained class; or ``noise``), not ESD's ‖ε_θ(z_t|c) − [ε*(∅) − 3(ε*(c) − ε*(∅))]‖² on the
      model's own samples (L506-584). The meta step is the release's contribution and is stacked on
      any base unlearning (``meta.py`` runs it on UCE/RECE models); with the harness's loss every
      baseline shares ℓ_u, so the comparison isolates the meta term.
    - ℓ_hrm = denoising loss on the step's forget batch (the harmful data, ``hrm_test``); the simulated
      fine-tuning draws its own batches from D_f (``hrm_train``).
    - ℓ_irt = denoising loss on the step's retain batch (the unrelated concepts).
    - ℓ_tgt = denoising loss on a batch of the *related* retained classes (the README's "target
      dataset: the concept related to the unlearned concept"): for each forget class, the retained
      class whose class-embedding row in the base model is nearest in cosine (:func:`related_classes`).
    - Each term is one batch's mean; the release sums batch means over its 30-image test sets (3
      batches), scaling each meta term by 3 relative to ℓ_u. ℓ_irt and ℓ_tgt use the same noised
      batch at θ and θ′ (the release draws fresh noise for each pass).
    """

    name = "meta_unlearning"
    Hyper = MetaHyper

    def params(self, unet=None) -> list[Tensor]:
        return [p for p in (self.s.unet if unet is None else unet).parameters() if p.requires_grad]

    def build_optimizer(self):
        return torch.optim.AdamW(
            self.params(), lr=self.s.lr, betas=BETAS, eps=ADAM_EPS, weight_decay=self.hp.weight_decay
        )

    def prepare(self, retain, forget):
        self.related = related_classes(self.s.unet, as_classes(self.s.forget_class), self.s.num_classes)
        self.related_data = retain.subset(torch.isin(retain.labels, torch.tensor(self.related)))
        if len(self.related_data) == 0:
            raise UsageError(f"meta_unlearning: no retained images of the related classes {self.related}")
        self.forget_data = forget

    def batches(self, data: ImageData, n: int) -> list[Noised]:
        """``n`` noised batches of ``batch_size`` from consecutive shuffled passes over ``data``."""
        s, need = self.s, n * self.s.batch_size
        order = torch.cat(
            [torch.randperm(len(data), generator=s.generator) for _ in range(-(-need // len(data)))]
        )[:need]
        return [self.diffuse((data.images[i], data.labels[i])) for i in order.split(s.batch_size)]

    def draw(self, retain, forget) -> Draw:
        bf = self.diffuse(forget)
        target = forget_target(self.eps, bf, self.hp.forget_target, self.s.num_classes, self.s.generator)
        return Draw(
            self.diffuse(retain),
            self.batches(self.related_data, 1)[0],
            bf,
            target,
            self.batches(self.forget_data, self.hp.finetune_steps),
        )

    def finetuned(self, tune: list[Noised]):
        """θ′: a copy of the UNet after one AdamW step of the denoising loss per batch (fresh optimizer,
        each gradient clipped to ``max_grad_norm``); the live UNet and the outer optimizer are untouched."""
        tuned = copy.deepcopy(self.s.unet).train()
        params = self.params(tuned)
        opt = torch.optim.AdamW(
            params, lr=self.hp.finetune_lr, betas=BETAS, eps=ADAM_EPS, weight_decay=self.hp.weight_decay
        )
        for b in tune:
            opt.zero_grad(set_to_none=True)
            denoising_loss(unet_eps(tuned), b).backward()
            torch.nn.utils.clip_grad_norm_(params, self.hp.max_grad_norm)
            opt.step()
        opt.zero_grad(set_to_none=True)
        return tuned

    def meta_gradient(self, d: Draw) -> tuple[list[Tensor], dict[str, float]]:
        """δ of the class docstring (unclipped) and the step's losses."""
        hp = self.hp
        l_u = forget_loss(self.eps, d.forget, d.target)
        l_irt, l_tgt = denoising_loss(self.eps, d.retain), denoising_loss(self.eps, d.related)
        at_theta = torch.autograd.grad(
            l_u + hp.gamma11 * l_irt + hp.gamma12 * l_tgt, self.params(), materialize_grads=True
        )
        tuned = self.finetuned(d.tune)
        eps_t = unet_eps(tuned)
        l_hrm = denoising_loss(eps_t, d.forget)
        meta = hp.gamma21 * l_hrm + hp.gamma22 * denoising_loss(eps_t, d.related)
        meta = meta + hp.gamma23 * denoising_loss(eps_t, d.retain)
        at_tuned = torch.autograd.grad(meta, self.params(tuned), materialize_grads=True)
        delta = [a - b for a, b in zip(at_theta, at_tuned, strict=True)]
        stats = {
            "forget_loss": l_u.item(),
            "retain_loss": l_irt.item(),
            "related_loss": l_tgt.item(),
            "relearned_forget_loss": l_hrm.item(),
        }
        return delta, stats

    def step(self, retain, forget):
        delta, stats = self.meta_gradient(self.draw(retain, forget))
        params = self.params()
        self.optimizer.zero_grad(set_to_none=True)
        for p, g in zip(params, delta, strict=True):
            p.grad = g
        torch.nn.utils.clip_grad_norm_(params, self.hp.max_grad_norm)
        self.optimizer.step()
        return stats

    def state_dict(self):
        return {
            **super().state_dict(),
            "related": torch.tensor(self.related),
            "forget": {"images": self.forget_data.images, "labels": self.forget_data.labels},
            "related_data": {"images": self.related_data.images, "labels": self.related_data.labels},
        }

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.related = [int(c) for c in state["related"]]
        n = self.s.num_classes
        self.forget_data = ImageData(state["forget"]["images"], state["forget"]["labels"], n, "forget")
        rel = state["related_data"]
        self.related_data = ImageData(rel["images"], rel["labels"], n, "related")


def related_classes(unet, forgotten: tuple[int, ...], num_classes: int) -> list[int]:
    """For each forget class c, argmax over retained k of cos(E[c], E[k]) on the UNet's class-embedding
    table: the class-forgetting analogue of the release's concepts related to the erased one."""
    table = class_table(unet)
    kept = [k for k in range(num_classes) if k not in forgotten]
    if not kept:
        raise UsageError(f"all {num_classes} classes are forgotten: meta_unlearning has no related class")
    rows = torch.nn.functional.normalize(table.weight.detach()[:num_classes], dim=1)
    out = []
    for c in forgotten:
        k = kept[int((rows[kept] @ rows[c]).argmax())]
        if k not in out:
            out.append(k)
    return out
