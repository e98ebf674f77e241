"""Combination rules: pure functions from gradient geometry to δ's coefficients.

Every rule maps a :class:`Geometry` (the Gram of the constraint gradients and the retain gradient, and
the constraint values g) to a :class:`Combination` ``(c_r, c_f, a_t)``; the update is
δ = c_r ∇L_r + Σ_i c_f,i ∇g_i. Rules never see the gradient vectors, so they cost nothing at any model
size and never force a host sync. With one constraint every field is a 0-dim tensor (the formulas of
the two-objective case, unchanged); with m constraints ``gg`` is [m, m], ``gr``, ``g``, ``c_f`` and
``a_t`` are [m].

The KKT rules (``grad_norm``, ``value``, ``barrier`` and plain callables) pick targets a_i and take
c_r = 1, c_f = λ, the solution of min ½‖∇L_r − δ‖² s.t. ∇g_i·δ ≥ a_i (Theorem 3.1 for m = 1; the dual
QP of :func:`~constrained_opt.functional.dual_qp` for m > 1). ``cosine`` and ``scalarized`` set λ
directly, per constraint. ``pcgrad``, ``mgda`` and ``upgrad`` aggregate all m + 1 gradients as
objectives.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from . import functional as F
from .errors import SettingError
from .functional import Gram, safe_cosine


class Geometry:
    """What a rule may look at: the :class:`~constrained_opt.functional.Gram` of the constraint gradients
    and the retain gradient, and the constraint values ``g`` = g(θ_t) ([m]); fp32 or fp64 tensors.

    ``gg`` = ‖∇g‖² ([m, m] for m constraints), ``rr`` = ‖∇L_r‖² and ``gr`` = ∇g·∇L_r ([m]) are the Gram's
    own views, so a rule that needs the whole matrix reads ``geometry.gram.matrix()`` without a copy.
    ``Geometry(gg, rr, gr, g)`` assembles the Gram from its blocks; :meth:`of` takes a Gram as it is.
    """

    __slots__ = ("g", "gram")

    def __init__(self, gg: Tensor, rr: Tensor, gr: Tensor, g: Tensor) -> None:
        self.gram, self.g = Gram(gg, rr, gr), g

    @classmethod
    def of(cls, gram: Gram, g: Tensor) -> Geometry:
        geometry = cls.__new__(cls)
        geometry.gram, geometry.g = gram, g
        return geometry

    @property
    def gg(self) -> Tensor:
        return self.gram.gg

    @property
    def rr(self) -> Tensor:
        return self.gram.rr

    @property
    def gr(self) -> Tensor:
        return self.gram.gr

    @property
    def m(self) -> int:
        return self.gram.m

    def constraint_sq_norms(self) -> Tensor:
        """‖∇g_i‖² (0-dim for one constraint)."""
        return self.gram.constraint_sq_norms()


class Combination(NamedTuple):
    """δ = retain_coef·∇L_r + Σ_i constraint_coef_i·∇g_i; ``a_t`` the KKT targets, NaN for non-KKT rules;
    ``shortfall`` how far δ falls short of each target (0 unless the targets are jointly infeasible)."""

    retain_coef: Tensor
    constraint_coef: Tensor
    a_t: Tensor
    shortfall: Tensor | None = None


@dataclass(frozen=True)
class Rule:
    """A named combination rule with its per-group hyperparameters and their defaults.

    ``fn(geometry, **hyperparameters) -> Combination``; with m constraints a hyperparameter may be a
    [m] tensor (one value per constraint). ``unit_retain`` promises c_r = 1, so the optimizer applies δ
    with in-place axpys only. ``uses_g``: the rule reads the constraint values g (``value``,
    ``barrier``, user callables), so the inner loops that measure g change the update. ``objectives``:
    the rule aggregates any number of objectives symmetrically (``pcgrad``, ``mgda``, ``upgrad``), so it
    also serves ``step([f_1, ..., f_m])`` without a constraint.
    """

    name: str
    fn: Callable[..., Combination]
    hyperparameters: Mapping[str, float]
    unit_retain: bool
    uses_g: bool = True
    objectives: bool = False

    def __call__(self, geometry: Geometry, **hyperparameters: float | Tensor) -> Combination:
        return self.fn(geometry, **hyperparameters)


def _nan(like: Tensor) -> Tensor:
    return torch.full_like(like, math.nan)


def kkt_from_target(geometry: Geometry, a_t: Tensor | float) -> Combination:
    """c_r = 1, c_f = λ(a_t): the solution of min ½‖∇L_r − δ‖² s.t. ∇g_i·δ ≥ a_i."""
    a_t = torch.as_tensor(a_t, dtype=geometry.gg.dtype, device=geometry.gg.device)
    if geometry.m > 1:
        a_t = a_t.expand(geometry.gr.shape)
    lam, shortfall = F.kkt_solve(a_t, geometry.gram)
    return Combination(torch.ones_like(geometry.rr), lam, a_t, shortfall)


def grad_norm(geometry: Geometry, *, eta: float | Tensor) -> Combination:
    """a_i = η_i‖∇g_i‖², so for one constraint λ = max(0, η − ∇g·∇L_r / ‖∇g‖²). The paper's default;
    independent of K."""
    return kkt_from_target(geometry, eta * geometry.constraint_sq_norms())


def value(geometry: Geometry, *, eta: float | Tensor) -> Combination:
    """BOME's value rule: a_i = η_i·g_i(θ_t). With K = 0, g = 0 and only conflict is removed."""
    return kkt_from_target(geometry, eta * geometry.g)


def barrier(geometry: Geometry, *, alpha: float | Tensor, beta: float | Tensor) -> Combination:
    """Dynamic-barrier gradient descent (Gong & Liu 2021): a_i = min(α_i·g_i(θ_t), β_i‖∇g_i‖²)."""
    return kkt_from_target(geometry, torch.minimum(alpha * geometry.g, beta * geometry.constraint_sq_norms()))


def cosine(geometry: Geometry, *, eta: float | Tensor) -> Combination:
    """The authors' released variant: λ_i = max(0, η_i − cos(∇L_r, ∇g_i)), δ = ∇L_r + Σλ_i∇g_i."""
    lam = torch.clamp_min(eta - safe_cosine(geometry.gr, geometry.constraint_sq_norms(), geometry.rr), 0.0)
    return Combination(torch.ones_like(geometry.rr), lam, _nan(lam))


def scalarized(geometry: Geometry, *, forget_weight: float | Tensor) -> Combination:
    """The paper's Eq. 3 ('MOO'): δ = ∇L_r + Σ w_i·∇L_f,i with fixed weights w."""
    lam = torch.as_tensor(forget_weight, dtype=geometry.gg.dtype, device=geometry.gg.device)
    lam = lam.expand(geometry.gr.shape).clone()
    return Combination(torch.ones_like(geometry.rr), lam, _nan(lam))


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    positive = den > 0
    return torch.where(positive, num / torch.where(positive, den, torch.ones_like(den)), 0.0)


def _split(geometry: Geometry, weights: Tensor) -> Combination:
    """Weights of the full Gram's rows (constraints first, retain last) as a Combination."""
    constraint = weights[:-1].reshape(geometry.gr.shape)  # 0-dim for one constraint row
    return Combination(weights[-1], constraint, _nan(constraint))


def pcgrad(geometry: Geometry) -> Combination:
    """PCGrad (Yu et al. 2020). Each gradient g_i is projected, in turn, off every other gradient g_j it
    conflicts with (g_i^PC·g_j < 0: g_i^PC ← g_i^PC − (g_i^PC·g_j/‖g_j‖²) g_j), and δ = Σ_i g_i^PC.

    Two objectives: c_r = 1 − min(0, gr)/‖∇L_r‖², c_f = 1 − min(0, gr)/‖∇g‖². More: the paper (and
    torchjd) visit the other gradients in a random order; here the order is fixed, ascending row index
    (constraints first, retain last), so a step is deterministic. Done on the Gram: the weights of
    g_i^PC over the rows are updated, never the vectors.
    """
    if geometry.m == 1:
        conflict = torch.clamp_max(geometry.gr, 0.0)
        c_r = 1 - _safe_div(conflict, geometry.rr)
        c_f = 1 - _safe_div(conflict, geometry.gg)
        return Combination(c_r, c_f, _nan(c_r))
    g = geometry.gram.matrix()
    k = g.shape[0]
    weights = torch.eye(k, dtype=g.dtype, device=g.device)  # row i: the weights of g_i^PC
    for j in range(k):
        inner = weights @ g[:, j]
        conflict = (inner < 0) & (torch.arange(k, device=g.device) != j)
        weights[:, j] -= torch.where(conflict, _safe_div(inner, g[j, j]), 0.0)
    return _split(geometry, weights.sum(0))


def mgda(geometry: Geometry) -> Combination:
    """MGDA (Désidéri 2012): the minimum-norm point of the convex hull of the gradients.

    Two objectives (Sener & Koltun's closed form): δ = γ∇L_r + (1−γ)∇g with
    γ = clip((‖∇g‖² − gr)/‖∇g − ∇L_r‖², 0, 1). More: the min-norm point y of conv{g_j} is x/‖x‖² for the
    solution x of min ½‖x‖² s.t. g_j·x ≥ 1 (its KKT conditions are g_j·y ≥ ‖y‖², equality where the
    weight is positive), a projection solved exactly by the same dual QP as the constraints. When 0 lies
    in the hull (those targets are infeasible) δ = 0, with the weights of a zero gradient or of the
    Farkas certificate the dual solver returns.
    """
    if geometry.m == 1:
        diff_sq = geometry.gg + geometry.rr - 2 * geometry.gr
        gamma = torch.where(diff_sq > 0, _safe_div(geometry.gg - geometry.gr, diff_sq), 0.5)
        gamma = torch.clamp(gamma, 0.0, 1.0)
        return Combination(gamma, 1 - gamma, _nan(gamma))
    g = geometry.gram.matrix()
    lam, shortfall = F.dual_qp(g, torch.zeros_like(g[0]), torch.ones_like(g[0]))
    sq = g.diagonal()
    zero = sq <= 0
    certificate = torch.where(zero, torch.zeros_like(sq), _safe_div(shortfall, sq))
    first_zero = (torch.cumsum(zero.to(torch.int64), 0) == 1) & zero
    certificate = torch.where(zero.any(), first_zero.to(g.dtype), certificate)
    weights = torch.where((shortfall > 0).any(), certificate, lam)
    return _split(geometry, _safe_div(weights, weights.sum()))


def upgrad(geometry: Geometry) -> Combination:
    """UPGrad (Quinton & Rey 2024, torchjd's default aggregator): each gradient scaled by 1/k is projected
    onto the dual cone {x : g_j·x ≥ 0 ∀j} of all k gradients, and δ is the sum of the projections.

    The projection of Jᵀu is Jᵀ(u + λ) with λ the dual solution of min ½‖x − Jᵀu‖² s.t. Jx ≥ 0, so the
    weights are 1/k + Σ_i λ^(i), with the k problems solved exactly as one batch. (torchjd solves the
    same QPs with quadprog on the trace-normalised Gram plus 1e-4·I.)
    """
    g = geometry.gram.matrix()
    k = g.shape[0]
    u = torch.eye(k, dtype=g.dtype, device=g.device) / k
    lam, _ = F.dual_qp(g, u @ g, torch.zeros_like(u))
    return _split(geometry, (u + lam).sum(0))


RULES: dict[str, Rule] = {
    "grad_norm": Rule("grad_norm", grad_norm, {"eta": 1.0}, unit_retain=True, uses_g=False),
    "value": Rule("value", value, {"eta": 1.0}, unit_retain=True),
    "barrier": Rule("barrier", barrier, {"alpha": 1.0, "beta": 1.0}, unit_retain=True),
    "cosine": Rule("cosine", cosine, {"eta": 1.0}, unit_retain=True, uses_g=False),
    "scalarized": Rule("scalarized", scalarized, {"forget_weight": 0.1}, unit_retain=True, uses_g=False),
    "pcgrad": Rule("pcgrad", pcgrad, {}, unit_retain=False, uses_g=False, objectives=True),
    "mgda": Rule("mgda", mgda, {}, unit_retain=False, uses_g=False, objectives=True),
    "upgrad": Rule("upgrad", upgrad, {}, unit_retain=False, uses_g=False, objectives=True),
}
HYPERPARAMETERS = frozenset(name for rule in RULES.values() for name in rule.hyperparameters)


def target(fn: Callable[[Geometry], Tensor | float]) -> Rule:
    """Wrap a user function ``fn(geometry) -> a_t`` (a scalar, or [m] for m constraints) as a KKT rule."""
    return Rule(getattr(fn, "__name__", "target"), lambda geo: kkt_from_target(geo, fn(geo)), {}, True)


def multiplier(fn: Callable[[Geometry], Tensor | float]) -> Rule:
    """Wrap a user function ``fn(geometry) -> λ``: δ = ∇L_r + Σλ_i∇g_i, λ used as returned (a scalar
    applies to every constraint)."""

    def combine(geo: Geometry) -> Combination:
        lam = torch.as_tensor(fn(geo), dtype=geo.gg.dtype, device=geo.gg.device)
        lam = lam.expand(geo.gr.shape)
        return Combination(torch.ones_like(geo.rr), lam, _nan(lam))

    return Rule(getattr(fn, "__name__", "multiplier"), combine, {}, True)


def resolve(rule: str | Rule | Callable[[Geometry], Tensor | float]) -> Rule:
    """A rule name, a :class:`Rule`, or a plain callable returning a_t (see :func:`target`)."""
    if isinstance(rule, Rule):
        return rule
    if isinstance(rule, str):
        try:
            return RULES[rule]
        except KeyError:
            raise SettingError(
                f"unknown rule {rule!r}; choose one of {sorted(RULES)}, or pass a callable "
                "geometry -> a_t (or constrained_opt.rules.multiplier(fn) for geometry -> λ)"
            ) from None
    if callable(rule):
        return target(rule)
    raise TypeError(f"rule must be a name, a Rule or a callable, got {type(rule).__name__}")
