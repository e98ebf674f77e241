"""Robust forget rows for the DDPM methods (EraseDiff, MOO): the core's :mod:`constrained_opt.robust`
declarations built from a method's hyperparameters and the step's forget batch (docs/ddpm.md,
"Robust rows").

With L_c = L_f(θ) = E‖ε_f − ε_θ(x_t | c_f)‖² (the method's forget loss, Eq. 2) and
L_train(θ, e) = E‖ε − ε_θ(x_t | c_f; E[c_f] = e)‖² (the plain DDPM loss on the forget batch, true ε and
label):

* ``relearn``: :class:`~constrained_opt.Relearn`, L_a = L_train: the row is ∇L_c(θ′), θ′ = θ after
  ``relearn_steps`` SGD steps of size ``relearn_lr`` relearning the forget batch, each gradient clipped
  to norm ``relearn_max_norm`` (1, as the relearning attack clips; 0: no clip), or (``relearn_sign``)
  sign steps θ ← θ − β·sign(∇L_train), the relearning attack's first Adam step (no clip then);
* ``sharpness``: :class:`~constrained_opt.Sharpness` of radius ``sharpness_rho``, L_a = L_c
  (``sharpness_attack="constraint"``, SAM) or L_a = −L_train (``"relearn"``: θ′ = θ − ρ·∇L_train/‖∇L_train‖);
* ``inversion``: :class:`~constrained_opt.Inversion` over the forget class's embedding e (a copy of
  E[c_f] taken at each step), L_a = −L_train(θ, e): the embedding that draws c_f best within
  ‖e − E[c_f]‖₂ ≤ ``inversion_eps`` (0: unconstrained); the row is ∇_θ L_c(θ, e*).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..losses import (
    Noised,
    class_table,
    denoising_loss,
    forget_loss,
    robust_forms_error,
    unet_eps_with_row,
)
from ..runtime.errors import UsageError
from .base import Hyper

SHARPNESS_ATTACKS = ("constraint", "relearn")
FORM_SETTINGS = {
    "relearn": ("relearn_steps", "relearn_lr", "relearn_max_norm", "relearn_sign"),
    "sharpness": ("sharpness_rho", "sharpness_attack"),
    "inversion": ("inversion_steps", "inversion_lr", "inversion_eps"),
}


def parse_forms(text: str) -> tuple[str, ...]:
    """``"relearn+inversion"`` → ``("relearn", "inversion")``, ``""`` → none; unknown or repeated forms
    raise."""
    forms = tuple(text.split("+")) if text else ()
    if error := robust_forms_error(forms, "+"):
        raise UsageError(f"robust={text!r}: {error}; empty for none")
    return forms


@dataclass
class RobustHyper(Hyper):
    """The robust rows' hyperparameters (shared by EraseDiff and MOO); ``robust=""`` means none. The
    defaults of ``sharpness_rho`` and ``inversion_lr`` are those the sweep of docs/robustness.md chose
    (item ``deep_sweep_digits``)."""

    robust: str = ""
    keep_plain: bool = True
    relearn_steps: int = 1
    relearn_lr: float = 0.3
    relearn_max_norm: float = 1.0
    relearn_sign: bool = False
    sharpness_rho: float = 0.3
    sharpness_attack: str = "constraint"
    inversion_steps: int = 3
    inversion_lr: float = 1.0
    inversion_eps: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        forms = parse_forms(self.robust)
        for name in ("keep_plain", "relearn_sign"):
            if not isinstance(getattr(self, name), bool):
                raise UsageError(f"hyperparameter {name} must be true or false, got {getattr(self, name)!r}")
        if not self.keep_plain and not forms:
            raise UsageError("keep_plain=false drops the plain forget row; it needs robust=FORMS")
        if self.sharpness_attack not in SHARPNESS_ATTACKS:
            raise UsageError(
                f"sharpness_attack={self.sharpness_attack!r}: expected one of {', '.join(SHARPNESS_ATTACKS)}"
            )
        for name in ("relearn_steps", "inversion_steps"):
            if getattr(self, name) < 1:
                raise UsageError(f"hyperparameter {name} must be an int ≥ 1, got {getattr(self, name)}")

    @property
    def robust_forms(self) -> tuple[str, ...]:
        return parse_forms(self.robust)

    def recorded(self) -> dict[str, Any]:
        """Every field but the settings of forms not in ``robust`` (and ``keep_plain`` without forms,
        ``relearn_max_norm`` with ``relearn_sign``), which do not act: changing their defaults leaves a
        run's record, and its ``--resume``, as it was."""
        forms = self.robust_forms
        unused = [k for form, keys in FORM_SETTINGS.items() if form not in forms for k in keys]
        unused += [] if forms else ["keep_plain"]
        unused += ["relearn_max_norm"] if self.relearn_sign else []
        return {k: v for k, v in super().recorded().items() if k not in unused}


class RobustRows:
    """Builds a step's constraints: the plain closure alone (``robust=""``, as before), or
    ``{"forget": plain, "<form>": declaration, ...}`` (``keep_plain=False``: the robust rows only).

    Holds the inversion's embedding e, a leaf tensor outside the UNet (the class table is never
    written); it is reset to E[c_f] before each step, so no step starts from another's e*.
    """

    def __init__(self, unet, hp: RobustHyper, forget_class: int | tuple[int, ...]):
        self.unet, self.hp, self.forms = unet, hp, hp.robust_forms
        self.embedding: torch.Tensor | None = None
        if "inversion" in self.forms:
            if not isinstance(forget_class, int):
                raise UsageError(
                    "robust=inversion attacks one class embedding: it needs a single forget class, got "
                    f"{forget_class}; use relearn or sharpness for several classes"
                )
            self.label = forget_class
            self.embedding = class_table(unet).weight[forget_class].detach().clone()

    def constraints(self, eps, bf: Noised, target: torch.Tensor) -> Any:
        """The step's constraint closure(s) for forget batch ``bf`` and substitute noise ``target``."""
        from constrained_opt import Relearn, Sharpness

        def plain() -> torch.Tensor:
            return forget_loss(eps, bf, target)

        def relearning() -> torch.Tensor:
            return denoising_loss(eps, bf)

        if not self.forms:
            return plain
        hp = self.hp
        rows: dict[str, Any] = {"forget": plain} if hp.keep_plain else {}
        for form in self.forms:
            if form == "relearn":
                rows[form] = Relearn(
                    plain,
                    attack=relearning,
                    steps=hp.relearn_steps,
                    lr=hp.relearn_lr,
                    max_norm=None if hp.relearn_sign else hp.relearn_max_norm or None,
                    sign=hp.relearn_sign,
                )
            elif form == "sharpness":
                attack = (lambda: -relearning()) if hp.sharpness_attack == "relearn" else None
                rows[form] = Sharpness(plain, rho=hp.sharpness_rho, attack=attack)
            else:
                rows[form] = self.inversion(bf, target)
        return rows

    def inversion(self, bf: Noised, target: torch.Tensor):
        """The Inversion row over e, reset to E[c_f]: L_a = −L_train(θ, e), L_c = L_f(θ, e)."""
        from constrained_opt import Inversion

        x, hp = self.embedding, self.hp
        with torch.no_grad():
            x.copy_(self.unet.class_embedding.weight[self.label])
        eps_x = unet_eps_with_row(self.unet, self.label, x)
        return Inversion(
            lambda: forget_loss(eps_x, bf, target),
            input=x,
            steps=hp.inversion_steps,
            lr=hp.inversion_lr,
            eps=hp.inversion_eps or None,
            norm=2,
            attack=lambda: -denoising_loss(eps_x, bf),
        )
