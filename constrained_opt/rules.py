"""Two-objective combination rules: pure functions from gradient geometry to δ's coefficients.

Every rule maps a :class:`Geometry` (the three inner products and the constraint value g) to a
:class:`Combination` ``(c_r, c_f, a_t)``; the update is δ = c_r ∇L_r + c_f ∇g. Rules never see the
gradient vectors, so they cost nothing at any model size and never force a host sync.

The KKT rules (``grad_norm``, ``value``, ``barrier`` and plain callables) pick a target a_t and take
c_r = 1, c_f = λ = max(0, (a_t − ∇g·∇L_r)/‖∇g‖²) (Theorem 3.1). The others set the coefficients directly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from .functional import Gram, kkt_multiplier, safe_cosine


class Geometry(NamedTuple):
    """What a rule may look at: ‖∇g‖², ‖∇L_r‖², ∇g·∇L_r (fp32 or fp64 scalars) and g(θ_t)."""

    gg: Tensor
    rr: Tensor
    gr: Tensor
    g: Tensor

    @property
    def gram(self) -> Gram:
        return Gram(self.gg, self.rr, self.gr)


class Combination(NamedTuple):
    """δ = retain_coef·∇L_r + constraint_coef·∇g; ``a_t`` is the KKT target, NaN for non-KKT rules."""

    retain_coef: Tensor
    constraint_coef: Tensor
    a_t: Tensor


@dataclass(frozen=True)
class Rule:
    """A named combination rule with its per-group hyperparameters and their defaults.

    ``fn(geometry, **hyperparameters) -> Combination``. ``unit_retain`` promises c_r = 1, so the
    optimizer applies δ with a single in-place axpy.
    """

    name: str
    fn: Callable[..., Combination]
    hyperparameters: Mapping[str, float]
    unit_retain: bool

    def __call__(self, geometry: Geometry, **hyperparameters: float) -> Combination:
        return self.fn(geometry, **hyperparameters)


def _nan(like: Tensor) -> Tensor:
    return torch.full_like(like, math.nan)


def kkt_from_target(geometry: Geometry, a_t: Tensor | float) -> Combination:
    """c_r = 1, c_f = λ(a_t): the solution of min ½‖∇L_r − δ‖² s.t. ∇g·δ ≥ a_t."""
    a_t = torch.as_tensor(a_t, dtype=geometry.gg.dtype, device=geometry.gg.device)
    lam = kkt_multiplier(a_t, geometry.gram)
    return Combination(torch.ones_like(lam), lam, a_t)


def grad_norm(geometry: Geometry, *, eta: float) -> Combination:
    """a_t = η‖∇g‖², so λ = max(0, η − ∇g·∇L_r / ‖∇g‖²). The paper's default; independent of K."""
    return kkt_from_target(geometry, eta * geometry.gg)


def value(geometry: Geometry, *, eta: float) -> Combination:
    """BOME's value rule: a_t = η·g(θ_t). With K = 0, g = 0 and only conflict is removed."""
    return kkt_from_target(geometry, eta * geometry.g)


def barrier(geometry: Geometry, *, alpha: float, beta: float) -> Combination:
    """Dynamic-barrier gradient descent (Gong & Liu 2021): a_t = min(α·g(θ_t), β‖∇g‖²)."""
    return kkt_from_target(geometry, torch.minimum(alpha * geometry.g, beta * geometry.gg))


def cosine(geometry: Geometry, *, eta: float) -> Combination:
    """The authors' released variant: λ = max(0, η − cos(∇L_r, ∇g)), δ = ∇L_r + λ∇g."""
    lam = torch.clamp_min(eta - safe_cosine(geometry.gr, geometry.gg, geometry.rr), 0.0)
    return Combination(torch.ones_like(lam), lam, _nan(lam))


def scalarized(geometry: Geometry, *, forget_weight: float) -> Combination:
    """The paper's Eq. 3 ('MOO'): δ = ∇L_r + w·∇L_f with a fixed weight w."""
    lam = torch.full_like(geometry.gg, forget_weight)
    return Combination(torch.ones_like(lam), lam, _nan(lam))


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    positive = den > 0
    return torch.where(positive, num / torch.where(positive, den, torch.ones_like(den)), 0.0)


def pcgrad(geometry: Geometry) -> Combination:
    """PCGrad (Yu et al. 2020) for two objectives: on conflict (∇g·∇L_r < 0) each gradient is
    projected onto the normal plane of the other, and δ is their sum:
    c_r = 1 − min(0, gr)/‖∇L_r‖²,  c_f = 1 − min(0, gr)/‖∇g‖².
    """
    conflict = torch.clamp_max(geometry.gr, 0.0)
    c_r = 1 - _safe_div(conflict, geometry.rr)
    c_f = 1 - _safe_div(conflict, geometry.gg)
    return Combination(c_r, c_f, _nan(c_r))


def mgda(geometry: Geometry) -> Combination:
    """Two-objective MGDA (Désidéri 2012; Sener & Koltun 2018 closed form): the minimum-norm point
    of the segment [∇g, ∇L_r]: δ = γ∇L_r + (1−γ)∇g with γ = clip((‖∇g‖² − gr)/‖∇g − ∇L_r‖², 0, 1).
    """
    diff_sq = geometry.gg + geometry.rr - 2 * geometry.gr
    gamma = torch.where(diff_sq > 0, _safe_div(geometry.gg - geometry.gr, diff_sq), 0.5)
    gamma = torch.clamp(gamma, 0.0, 1.0)
    return Combination(gamma, 1 - gamma, _nan(gamma))


RULES: dict[str, Rule] = {
    "grad_norm": Rule("grad_norm", grad_norm, {"eta": 1.0}, unit_retain=True),
    "value": Rule("value", value, {"eta": 1.0}, unit_retain=True),
    "barrier": Rule("barrier", barrier, {"alpha": 1.0, "beta": 1.0}, unit_retain=True),
    "cosine": Rule("cosine", cosine, {"eta": 1.0}, unit_retain=True),
    "scalarized": Rule("scalarized", scalarized, {"forget_weight": 0.1}, unit_retain=True),
    "pcgrad": Rule("pcgrad", pcgrad, {}, unit_retain=False),
    "mgda": Rule("mgda", mgda, {}, unit_retain=False),
}
HYPERPARAMETERS = frozenset(name for rule in RULES.values() for name in rule.hyperparameters)


def target(fn: Callable[[Geometry], Tensor | float]) -> Rule:
    """Wrap a user function ``fn(geometry) -> a_t`` as a KKT rule."""
    return Rule(getattr(fn, "__name__", "target"), lambda geo: kkt_from_target(geo, fn(geo)), {}, True)


def multiplier(fn: Callable[[Geometry], Tensor | float]) -> Rule:
    """Wrap a user function ``fn(geometry) -> λ``: δ = ∇L_r + λ∇g, λ used as returned."""

    def combine(geo: Geometry) -> Combination:
        lam = torch.as_tensor(fn(geo), dtype=geo.gg.dtype, device=geo.gg.device)
        return Combination(torch.ones_like(lam), lam, _nan(lam))

    return Rule(getattr(fn, "__name__", "multiplier"), combine, {}, True)


def resolve(rule: str | Rule | Callable[[Geometry], Tensor | float]) -> Rule:
    """A rule name, a :class:`Rule`, or a plain callable returning a_t (see :func:`target`)."""
    if isinstance(rule, Rule):
        return rule
    if isinstance(rule, str):
        try:
            return RULES[rule]
        except KeyError:
            raise ValueError(
                f"unknown rule {rule!r}; choose one of {sorted(RULES)}, or pass a callable "
                "geometry -> a_t (or constrained_opt.rules.multiplier(fn) for geometry -> λ)"
            ) from None
    if callable(rule):
        return target(rule)
    raise TypeError(f"rule must be a name, a Rule or a callable, got {type(rule).__name__}")
