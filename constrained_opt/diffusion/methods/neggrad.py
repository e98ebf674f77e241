"""NegGrad: gradient ascent on the forget batch's denoising loss."""

from __future__ import annotations

from ..losses import denoising_loss
from .base import Method


class NegGrad(Method):
    """Gradient ascent on the denoising loss of D_f: min −L_denoise(D_f)."""

    name = "neggrad"

    def step(self, retain, forget):
        loss = denoising_loss(self.eps, self.diffuse(forget))
        self.descend(-loss)
        return {"forget_loss": loss.item()}
