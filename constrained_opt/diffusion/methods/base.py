"""What every unlearning method shares: :class:`Setup` (the model and the run), :class:`Hyper` (its
hyperparameters) and :class:`Method` (``prepare``, ``step``, ``state_dict``)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..data import ImageData
from ..losses import FORGET_TARGETS, diffuse, unet_eps
from ..runtime.errors import UsageError
from ..sampling import make_scheduler


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

    def recorded(self) -> dict[str, Any]:
        """The hyperparameters a run records (and ``--resume`` compares): every field that acts."""
        return dataclasses.asdict(self)


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
