"""AdvUnlearn (Zhang et al., NeurIPS 2024) as released (OPTML-Group/AdvUnlearn at
9d231249f9af13626e8bb9dcef5521f11d262498: ``train-scripts/AdvUnlearn.py``,
``train-scripts/utils/attack_util.py``, ``train-scripts/utils/get_loss.py``), transcribed to class
forgetting: adversarial training against an attacker who re-learns the forget class's embedding."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..evaluation.multiclass import as_classes, class_rows
from ..losses import Noised, class_table, denoising_loss, forget_target, unet_eps_with_row
from ..runtime.errors import UsageError
from .base import Hyper, Method, check_forget_target

ATTACK_METHODS = ("pgd", "fast_at")  # AdvUnlearn.py L247 choices that attack_util.py L206-212 implements
ATTACK_INITS = ("fresh", "latest")


@dataclass
class AdvUnlearnHyper(Hyper):
    retain_loss_w: float = 0.3  # README's commands (AdvUnlearn.py L243 argparse default: 1.0)
    attack_steps: int = 30  # L258 --attack_step
    attack_lr: float = 1e-3  # L260 --attack_lr (Adam, attack_util.py L168)
    attack_method: str = "pgd"  # L247; fast_at: the sign of the gradient into the same Adam (L208-210)
    attack_init: str = "fresh"  # fresh: E[c_f] every step (README's --attack_init random); latest: L257
    warmup_steps: int = 200  # L261 --warmup_iter: unattacked steps first (L91, L143-147)
    forget_target: str = "rl"  # ℓ_u: the harness's unlearning loss in place of ESD's (see the class)
    # max_grad_norm 1.0 (inherited): the harness clips every update; the release does not (L155-163)

    def __post_init__(self):
        super().__post_init__()
        check_forget_target(self.forget_target)
        if self.attack_method not in ATTACK_METHODS:
            raise UsageError(
                f"advunlearn attack_method must be one of {', '.join(ATTACK_METHODS)}, "
                f"got {self.attack_method!r}"
            )
        if self.attack_init not in ATTACK_INITS:
            raise UsageError(
                f"advunlearn attack_init must be one of {', '.join(ATTACK_INITS)}, got {self.attack_init!r}"
            )
        if self.attack_steps < 1:
            raise UsageError(f"advunlearn attack_steps must be ≥ 1, got {self.attack_steps}")


class AdvUnlearn(Method):
    """min_θ ℓ_u(θ, c*) + γ·ℓ_r(θ), γ = ``retain_loss_w``, with c* = argmin_v L_f(θ, v) found afresh each
    step by ``attack_steps`` Adam steps (lr ``attack_lr``) on the vector v that replaces the class
    embedding E[c_f], θ frozen:

        L_f(θ, v) = E‖ε − ε_θ(x_t | c_f ↦ v)‖² on the step's forget images (fresh t, ε each attack step,
        as attack_util.py L175-181 draws them), ε_θ(· | c_f ↦ v) = ``unet_eps_with_row``;
        ℓ_u(θ, c*) = ‖ε_θ(x_t | c_f ↦ c*) − ε_f‖² (``forget_loss``, target ``rl``: ε_θ(x_t | c_m), c_m a
        random retained class; or ``noise``); ℓ_r = the denoising loss on the retain batch.

    The first ``warmup_steps`` steps use ℓ_u(θ, E[c_f]) with no attack (AdvUnlearn.py L143-147). The
    outer optimizer is Adam at ``--lr`` (L62); ``fast_at`` feeds sign(∇_v L_f) to the attack's Adam.

    Transcription (the release erases a text prompt from Stable Diffusion):

    - The attacked "prompt" is the class-embedding row of c_f: the attack searches a vector that makes
      the model draw c_f's images again (our ``inversion`` attack, run inside training). The release's
      ``prefix_k`` (L256: one adversarial token, L254 ``adv_prompt_num`` 1, prepended to the concept's
      tokens, attack_util.py L233-234) has no counterpart when the condition is one vector, so v
      replaces E[c_f]; ``fresh`` starts it at E[c_f] (the clean prompt; the release's random-token
      prefix, L14-17, keeps the concept in the prompt), ``latest`` at the previous step's c*.
    - The release's attack loss is ‖ε_θ(z|c_adv) − ε*(z|c)‖² against the frozen original model on
      z sampled from the model (attack_util.py L183-203); here the denoising loss on real forget
      images, as UnlearnDiffAtk on real images and our ``inversion`` attack.
    - ℓ_u: the harness's unlearning loss, not ESD's ‖ε_θ(z|c*) − [ε*(∅) − (ε*(c) − ε*(∅))]‖²
      (get_loss.py L352), so that the baselines share ℓ_u; ℓ_r: the denoising loss on D_r in place of
      distillation to ε* on COCO prompts (``--retain_train reg``, L349-360).
    - The release trains the text encoder (``text_encoder_full``); here every UNet weight, since the
      attacked row is replaced in ℓ_u and so receives no gradient from it.
    - Several forget classes: one vector per class, each attacked and replaced on its own rows.
    """

    name = "advunlearn"
    Hyper = AdvUnlearnHyper

    def __init__(self, setup, **hp):
        super().__init__(setup, **hp)
        self.classes = as_classes(setup.forget_class)
        self.taken = 0
        self.vectors: dict[int, Tensor] | None = None  # the last c*, for attack_init=latest

    def table(self) -> torch.nn.Embedding:
        return class_table(self.s.unet)

    def replaced_loss(self, b: Noised, vectors: dict[int, Tensor], target: Tensor) -> Tensor:
        """Mean over the batch of ‖ε_θ(x_t | c ↦ v_c) − target‖², each class's rows with its own vector."""
        total = b.x_t.new_zeros(())
        for c, rows in zip(self.classes, class_rows(b.cond, self.classes).values(), strict=True):
            if len(rows) == 0:
                continue
            pred = unet_eps_with_row(self.s.unet, c, vectors[c])(b.x_t[rows], b.t[rows], b.cond[rows])
            total = total + F.mse_loss(pred, target[rows], reduction="sum")
        return total / target.numel()

    def attack(self, forget) -> tuple[dict[int, Tensor], float]:
        """c* and its last attack loss; θ frozen and in eval mode meanwhile (AdvUnlearn.py L92-94)."""
        unet, hp = self.s.unet, self.hp
        table = self.table().weight.detach()
        start = self.vectors if hp.attack_init == "latest" and self.vectors is not None else None
        vectors = {
            c: (table[c] if start is None else start[c]).clone().requires_grad_(True) for c in self.classes
        }
        opt = torch.optim.Adam(list(vectors.values()), lr=hp.attack_lr)
        flags, training = [p.requires_grad for p in unet.parameters()], unet.training
        unet.requires_grad_(False)
        unet.eval()
        try:
            for _ in range(hp.attack_steps):
                b = self.diffuse(forget)
                loss = self.replaced_loss(b, vectors, b.noise)
                # a class with no row in the batch gets a zero gradient, which leaves its vector as it is
                grads = torch.autograd.grad(loss, list(vectors.values()), materialize_grads=True)
                for v, g in zip(vectors.values(), grads, strict=True):
                    v.grad = g.sign() if hp.attack_method == "fast_at" else g
                opt.step()
        finally:
            unet.train(training)
            for p, flag in zip(unet.parameters(), flags, strict=True):
                p.requires_grad_(flag)
        self.vectors = {c: v.detach() for c, v in vectors.items()}
        return self.vectors, loss.item()

    def step(self, retain, forget):
        attacked, stats = self.taken >= self.hp.warmup_steps, {}
        if attacked:
            vectors, stats["attack_loss"] = self.attack(forget)
        else:
            vectors = {c: self.table().weight[c] for c in self.classes}
        br, bf = self.diffuse(retain), self.diffuse(forget)
        target = forget_target(self.eps, bf, self.hp.forget_target, self.s.num_classes, self.s.generator)
        unlearn = self.replaced_loss(bf, vectors, target)
        remain = denoising_loss(self.eps, br)
        self.descend(unlearn + self.hp.retain_loss_w * remain)
        self.taken += 1
        return {
            **stats,
            "forget_loss": unlearn.item(),
            "retain_loss": remain.item(),
            "attacked": float(attacked),
        }

    def state_dict(self):
        vectors = torch.stack([self.vectors[c] for c in self.classes]) if self.vectors else torch.empty(0)
        return {**super().state_dict(), "taken": self.taken, "vectors": vectors}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.taken = int(state["taken"])
        vectors = state["vectors"]
        self.vectors = dict(zip(self.classes, vectors, strict=True)) if len(vectors) else None
