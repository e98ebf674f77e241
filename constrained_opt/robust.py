"""Robust constraints: a constraint whose gradient row is taken at a point an adversary picks.

A constraint with loss L_c contributes the row ∇L_c(θ). Wrapped in one of these declarations it
contributes the gradient of L_c at the adversary's point instead (docs/algorithm.md, "8. Robust
constraints"); L_a is the attacker's loss (a closure, like every loss here):

* :class:`Relearn` (the relearning look-ahead, Meta-Unlearning): θ′ = θ_k with θ_0 = θ and
  θ_{j+1} = θ_j − β∇L_a(θ_j); the row is ∇L_c(θ′) (first order), or with ``second_order=True`` the exact
  ∇_θ[L_c(θ′(θ))] = (I − βH_a(θ_0))⋯(I − βH_a(θ_{k−1}))∇L_c(θ′).
* :class:`Sharpness` (the weight-space worst case, SAM): θ′ = θ + ρ·∇L_a(θ)/‖∇L_a(θ)‖; the row is
  ∇L_c(θ′). L_a defaults to L_c.
* :class:`Inversion` (the input-space worst case): k steepest-ascent steps of length α on L_a over a
  tensor x that the closures read (a class or prompt embedding), x_{j+1} = Π_ε(x_j + α·u_j) with u_j the
  unit ascent direction in the chosen norm and Π_ε the projection onto ‖x − x_0‖ ≤ ε (none when ε is
  None); the row is ∇_θ L_c(θ, x_k), the gradient of max_x L_c by Danskin's theorem. L_a defaults to L_c.

A declaration is a closure (calling it returns L_c at the current point), so it goes wherever a
constraint closure goes: ``opt.step(retain, {"forget": f, "relearn": Relearn(f, attack=a, lr=1e-3)})``.
Each robust constraint is one row of the flat buffer, with its own hyperparameters (λ, η, ...); the
attacker's gradients are written into that row before it receives ∇L_c, so the adversary needs no
memory beyond the row (and, for :class:`Inversion`, one copy of x).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .errors import SettingError
from .problem import Closure


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SettingError(f"{name} must be an int >= 1, got {value!r}")


def _finite_nonneg(name: str, value: object, positive: bool = False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        raise SettingError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")


def _callable(name: str, value: object) -> None:
    if not callable(value):
        raise TypeError(f"{name} must be a callable returning the scalar loss, got {type(value).__name__}")


class Robust:
    """A constraint closure with an adversary; subclasses say where the adversary moves."""

    closure: Closure
    attack: Closure | None

    @property
    def attacker(self) -> Closure:
        """The closure the adversary differentiates: ``attack``, or the constraint's own."""
        return self.attack if self.attack is not None else self.closure

    @property
    def moves_weights(self) -> bool:
        """Whether the adversary's point is a point in weight space (θ is displaced)."""
        return True

    def __call__(self) -> Tensor:
        """L_c at the current point (the adversary does not run)."""
        return self.closure()


@dataclass(eq=False)
class Relearn(Robust):
    """The relearning look-ahead: the row is ∇L_c at θ′, θ after ``steps`` gradient steps of size ``lr``
    (β) on ``attack`` (the attacker's fine-tuning loss, e.g. the plain training loss on the forget data).

    ``max_norm`` c clips each step as a fine-tuning attacker clips its gradient:
    θ_{j+1} = θ_j − β·min(1, c/‖∇L_a(θ_j)‖)·∇L_a(θ_j), so no step moves θ further than βc (``None``: no
    clip). Without it a fixed β moves θ′ further the larger ∇L_a grows, i.e. the more the forget data
    has been forgotten.

    ``sign=True`` steps along the sign instead: θ_{j+1} = θ_j − β·sign(∇L_a(θ_j)), steepest descent in
    ℓ∞, which is the first step of Adam from a fresh state (m̂/√v̂ = g/|g|): every weight moves by β, as
    a fine-tuning attacker's Adam moves it by its learning rate, however large or unevenly spread ∇L_a
    is. β is then an Adam learning rate times the steps it stands for (e.g. 10 × 1e-4).

    First order (default), as Meta-Unlearning's ``src/esd_meta.py``: θ′ is a constant, the row is
    ∇L_c(θ′); cost k + 1 forward+backward passes. ``second_order=True``: the exact gradient of
    θ ↦ L_c(θ′(θ)), backpropagated through the k steps with Hessian-vector products of L_a; it replays
    the trajectory from θ (k(k−1)/2 more passes, k double backward passes, autograd's own gradient
    tensors), for small models, one process, without a GradScaler.
    """

    closure: Closure
    attack: Closure
    steps: int = 1
    lr: float = 1e-4
    second_order: bool = False
    max_norm: float | None = None
    sign: bool = False

    def __post_init__(self) -> None:
        _callable("Relearn's closure", self.closure)
        _callable("Relearn's attack", self.attack)
        _positive_int("Relearn(steps=)", self.steps)
        _finite_nonneg("Relearn(lr=)", self.lr)
        for name in ("second_order", "sign"):
            if not isinstance(getattr(self, name), bool):
                raise SettingError(f"Relearn({name}=) must be a bool, got {getattr(self, name)!r}")
        if self.sign and (self.second_order or self.max_norm is not None):
            raise SettingError(
                "Relearn(sign=True) moves every weight by exactly lr: it has no length to clip "
                "(max_norm=) and no derivative to carry back (second_order=True); drop those settings"
            )
        if self.max_norm is not None:
            _finite_nonneg("Relearn(max_norm=)", self.max_norm, positive=True)
            if self.second_order:
                raise SettingError(
                    "Relearn(max_norm=) clips the steps, which second_order=True does not differentiate "
                    "through: use one or the other"
                )


@dataclass(eq=False)
class Sharpness(Robust):
    """The weight-space worst case (SAM): the row is ∇L_c(θ + ρ·u), u = ∇L_a(θ)/‖∇L_a(θ)‖ (u = 0 when
    ∇L_a(θ) = 0), ‖·‖ over all trained parameters. ``attack`` defaults to the constraint's closure.
    Cost: two forward+backward passes."""

    closure: Closure
    rho: float = 0.05
    attack: Closure | None = None

    def __post_init__(self) -> None:
        _callable("Sharpness's closure", self.closure)
        if self.attack is not None:
            _callable("Sharpness's attack", self.attack)
        _finite_nonneg("Sharpness(rho=)", self.rho)


@dataclass(eq=False)
class Inversion(Robust):
    """The input-space worst case: ``steps`` steepest-ascent steps of length ``lr`` (α) on ``attack``
    (default: the constraint's closure) over ``input``, a leaf tensor the closures read (not a trained
    parameter), kept within ``‖x − x_0‖ ≤ eps`` (``None``: unconstrained); ``norm`` is 2 (steps along
    g/‖g‖₂, as PGD-L2) or ``math.inf`` (steps along sign(g), as PGD-L∞). The row is ∇_θ L_c at the last
    point (Danskin); ``input`` is put back afterwards, bit for bit. Cost: k forward+backward passes to the
    input and one forward+backward pass to θ.
    """

    closure: Closure
    input: Tensor
    steps: int = 1
    lr: float = 1e-2
    eps: float | None = None
    norm: float = 2
    attack: Closure | None = None
    _saved: Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        _callable("Inversion's closure", self.closure)
        if self.attack is not None:
            _callable("Inversion's attack", self.attack)
        if not isinstance(self.input, Tensor) or not self.input.is_floating_point() or not self.input.is_leaf:
            raise SettingError(
                "Inversion(input=) must be a floating-point leaf tensor that the closures read (e.g. a "
                "class or prompt embedding); pass the tensor itself, not a value computed from it"
            )
        _positive_int("Inversion(steps=)", self.steps)
        _finite_nonneg("Inversion(lr=)", self.lr)
        if self.eps is not None:
            _finite_nonneg("Inversion(eps=)", self.eps, positive=True)
        if self.norm not in (2, math.inf):
            raise SettingError(f"Inversion(norm=) must be 2 or math.inf, got {self.norm!r}")

    @property
    def moves_weights(self) -> bool:
        return False

    def saved_input(self) -> Tensor:
        """The buffer x_0 is copied into: allocated on first use, reused while x keeps its shape."""
        x = self.input
        s = self._saved
        if s is None or s.shape != x.shape or s.dtype != x.dtype or s.device != x.device:
            self._saved = s = torch.empty_like(x, memory_format=torch.contiguous_format)
        return s
