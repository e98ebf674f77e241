"""EraseDiff: the bilevel update of :class:`~constrained_opt.ValueFunctionBilevelOptimizer` (one pooled
constraint, or one per forget class), and the variant whose inner steps share the outer Adam."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..evaluation.multiclass import as_classes, class_rows
from ..losses import denoising_loss, forget_loss, forget_target
from ..runtime.errors import UsageError
from .base import Method, check_forget_target
from .robust_rows import RobustHyper, RobustRows

KKT_RULES = ("grad_norm", "value", "cosine")  # the rules whose only hyperparameter is η


@dataclass
class BilevelHyper(RobustHyper):
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

    def __init__(self, setup, **hp):
        super().__init__(setup, **hp)
        self.rows = RobustRows(self.s.unet, self.hp, self.s.forget_class)

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
        """The step's scalar figures; with robust rows also each row's (:func:`per_row`)."""
        out = {k: v for k, v in stats.as_dict().items() if isinstance(v, float)}
        return {**out, **per_row(stats)} if self.rows.forms else out

    def constraints(self, bf, target):
        """One constraint on the whole (pooled) forget batch, or with ``robust`` its robust rows
        (:class:`~.robust_rows.RobustRows`)."""
        return self.rows.constraints(self.eps, bf, target)


def per_row(stats) -> dict[str, float]:
    """Each constraint row's λ and loss (``lam_<name>``, ``forget_loss_<name>``; a robust row's loss at its
    adversary's point), and for a row with an adversary its attacker's loss at the last point it visited
    (``attack_loss_<name>``)."""
    out = {}
    rows = zip(stats.constraint_names, stats.lams, stats.forget_losses, stats.attack_losses, strict=True)
    for name, lam, loss, attack in rows:
        out[f"lam_{name}"], out[f"forget_loss_{name}"] = lam, loss
        if attack:
            out[f"attack_loss_{name}"] = attack[-1]
    return out


class EraseDiffPerClass(EraseDiff):
    """EraseDiff with one constraint per forget class (``--per-class-constraints``): each class's rows of
    the stratified forget batch form their own closure, ``{"class_<c>": L_f(θ; rows of c)}``."""

    name = "erasediff_per_class"

    def __init__(self, setup, **hp):
        super().__init__(setup, **hp)
        if self.rows.forms:
            raise UsageError(
                "robust rows are for erasediff's pooled constraint (and moo); erasediff_per_class "
                "(--per-class-constraints) has none: drop robust= or the per-class constraints"
            )

    def constraints(self, bf, target):
        def closure(rows):
            part = type(bf)(*(field[rows] for field in bf))
            return lambda: forget_loss(self.eps, part, target[rows])

        return {
            name: closure(rows) for name, rows in class_rows(bf.cond, as_classes(self.s.forget_class)).items()
        }

    def record(self, stats):
        """The pooled figures, plus each class's λ and forget loss (``lam_class_<c>``, ...)."""
        return {**super().record(stats), **per_row(stats)}


class EraseDiffSharedAdam(Method):
    """EraseDiff with an approximation of the authors' inner loop: φ^{k+1} = clipped Adam step on L_f
    from φ^k on this step's forget batch, taken by the *outer* Adam, then θ restored and
    δ = ∇L_r + λ∇g (``grad_norm`` rule) stepped by that same Adam. The inner steps leave forget-loss
    gradients in Adam's moments and advance its step count, so K changes the update here, unlike in
    :class:`EraseDiff` (docs/algorithm.md). The loop as released is
    :class:`~.erasediff_release.EraseDiffRelease`.
    """

    name = "erasediff_shared_adam"
    Hyper = BilevelHyper

    def __init__(self, setup, **hp):
        super().__init__(setup, **hp)
        if self.hp.rule != "grad_norm":
            raise UsageError("erasediff_shared_adam implements the grad_norm rule only")
        if self.hp.robust:
            raise UsageError("erasediff_shared_adam has no robust rows; use erasediff or moo with robust=")

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
