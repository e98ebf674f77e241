"""MOO: Eq. 3 scalarised, δ = ∇L_r + w∇L_f (EraseDiff with ``rule="scalarized"`` and K = 0)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import check_forget_target
from .erasediff import EraseDiff
from .robust_rows import RobustHyper


@dataclass
class MooHyper(RobustHyper):
    forget_target: str = "rl"
    forget_weight: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        check_forget_target(self.forget_target)


class Moo(EraseDiff):
    """Eq. 3: min L_r + w·L_f, the same closures as EraseDiff through ``rule="scalarized"``, K = 0; with
    robust rows, δ = ∇L_r + w·Σ_i ∇L_f,i over the rows (each row weighted by ``forget_weight``)."""

    name = "moo"
    Hyper = MooHyper

    def optimizer_kwargs(self):
        return dict(rule="scalarized", forget_weight=self.hp.forget_weight, inner_steps=0)
