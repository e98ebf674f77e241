"""Finetune: the retain loss L_r only."""

from __future__ import annotations

from ..losses import denoising_loss
from .base import Method


class Finetune(Method):
    """Fine-tune on D_r only: min L_r."""

    name = "finetune"

    def step(self, retain, forget):
        loss = denoising_loss(self.eps, self.diffuse(retain))
        self.descend(loss)
        return {"retain_loss": loss.item()}
