"""What a step reports: :class:`StepStats`, and the one host sync that reads it.

Every quantity the host needs (losses, norms, multipliers, cosines, the range flags of the Gram) is
computed on the device and declared in :data:`HOST_FIELDS`; :func:`read` packs them into one vector
in that order, reads it with one sync and splits it back by name. :func:`build_stats` validates what
was read (closures first, then the rule's output) and makes the stats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import functional as F
from .gradients import LossValues
from .problem import StepState
from .projection import Solution
from .validation import check_measured, check_update


@dataclass(frozen=True)
class StepStats:
    """What one step measured. Gradient quantities are over all trainable parameters.

    The scalar fields describe the constraint(s) as one: for a single constraint they are its values;
    for m > 1 they are the pooled values of Σ_i g_i (losses, g, λ and a_t summed, ∇g = Σ_i ∇g_i), and
    the per-constraint values are in the tuples ``lams``, ``g_values``, ``forget_losses``,
    ``inner_forget_losses``, ``a_ts``, ``forget_grad_norms``, ``grad_dots``, ``cos_update_forgets`` and
    ``shortfalls``, in the order of ``constraint_names``.

    ``a_t`` is NaN for rules that set λ directly (cosine, scalarized, pcgrad, mgda, upgrad). ``lam`` is
    the coefficient of ∇g in δ before clipping (for ``projection="per_group"``, the ‖∇g_G‖²-weighted mean
    of ``group_lams``). ``shortfalls`` are (a_i − ∇g_i·δ)₊ of the least-violation direction when the
    targets cannot all be met (``infeasible``), else 0. Losses are averages over the data-parallel ranks
    when distributed.

    ``objective_losses``, ``weights`` and ``cos_update_objectives`` view every row at once (constraints
    first, retain last; for ``step([f_1, ..., f_m])`` the objectives): the loss at θ, the coefficient
    of its gradient in δ (after clipping) and cos(δ, its gradient). A multi-objective step without a
    constraint leaves the constraint fields empty or NaN.

    ``attack_losses`` holds, per constraint, the losses of its adversary's attacker at each of its
    points (θ_0..θ_{k−1} for ``Relearn``, θ for ``Sharpness``, x_0..x_{k−1} for ``Inversion``; empty for a
    plain constraint); the constraint's own fields (``forget_losses``, ...) are at the adversary's point.

    ``skipped`` is True when a GradScaler found an inf/NaN in a scaled gradient: θ and the base
    optimizer were left untouched and the scale was backed off. ``grad_scale`` is the loss scale the
    step used (1.0 without a scaler).
    """

    retain_loss: float
    forget_loss: float
    inner_forget_loss: float
    g_value: float
    lam: float
    a_t: float
    grad_dot: float
    retain_grad_norm: float
    forget_grad_norm: float
    update_norm: float
    cos_update_retain: float
    cos_update_forget: float
    clip_scale: float
    inner_losses: tuple[float, ...]
    group_lams: tuple[float, ...]
    skipped: bool = False
    grad_scale: float = 1.0
    constraint_names: tuple[str, ...] = ()
    attack_losses: tuple[tuple[float, ...], ...] = ()
    lams: tuple[float, ...] = ()
    g_values: tuple[float, ...] = ()
    forget_losses: tuple[float, ...] = ()
    inner_forget_losses: tuple[float, ...] = ()
    a_ts: tuple[float, ...] = ()
    forget_grad_norms: tuple[float, ...] = ()
    grad_dots: tuple[float, ...] = ()
    cos_update_forgets: tuple[float, ...] = ()
    shortfalls: tuple[float, ...] = ()
    infeasible: bool = False
    objective_losses: tuple[float, ...] = ()
    weights: tuple[float, ...] = ()
    cos_update_objectives: tuple[float, ...] = field(default=())

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# The host vector, in order: the fields of :func:`device_summary`.
HOST_FIELDS = (
    "losses",  # every loss, in measuring order (LossValues.losses)
    "overflow",  # overflow flags: the inner loops', then the attackers'
    "attack_losses",  # the attackers' losses, in measuring order (LossValues.attack)
    "at_theta",  # the losses at θ: constraints, then retain
    "g",  # [m] constraint values
    "lam",  # [m] λ: the coefficient of ∇g_i in δ before clipping (pooled over blocks)
    "a_t",  # [m] targets, summed over blocks
    "shortfall",  # [m] (a_i − ∇g_i·δ)₊, summed over blocks
    "group_lams",  # [blocks] each block's Σ_i λ_i
    "constraint_sq_norms",  # [m] ‖∇g_i‖²
    "grad_dots",  # [m] ∇g_i·∇L_r
    "retain_sq_norm",  # ‖∇L_r‖²
    "pooled_sq_norm",  # ‖Σ_i ∇g_i‖²
    "cos_update_forgets",  # [m] cos(δ, ∇g_i)
    "cos_update_forget",  # cos(δ, Σ_i ∇g_i)
    "cos_update_objectives",  # [rows] cos(δ, each row)
    "coefficients",  # [blocks·m + blocks] c_f of every block, then c_r of every block
    "clip_scale",
    "update_norm",  # ‖δ‖ after clipping (fp64, cannot overflow)
    "grad_scale",
    "gram_in_range",  # [blocks] 1 where the Gram's fp32 entries can be trusted
)


def device_summary(solution: Solution, values: LossValues) -> dict[str, Tensor]:
    """Every field of :data:`HOST_FIELDS` as a device tensor; sync-free."""
    s = solution
    lams = torch.stack([c.constraint_coef for c in s.combos])  # [B] or [B, m]
    total_sq = s.total.constraint_sq_norms()
    if len(s.combos) == 1:
        lam = lams[0]
    else:  # the ‖∇g_G‖²-weighted mean of the blocks' λ
        sq = torch.stack([gram.constraint_sq_norms() for gram in s.grams])
        positive = total_sq > 0
        lam = torch.where(positive, (lams * sq).sum(0) / torch.where(positive, total_sq, 1.0), lams.mean(0))
    dot_f = s.products.dot_constraint
    sq_norm = s.products.sq_norm
    pooled_gg = s.total.gg.sum()
    row_sq = torch.cat([total_sq.reshape(-1), s.total.rr.reshape(1)])
    dot_rows = torch.cat([dot_f.reshape(-1), s.products.dot_retain.reshape(1)])
    summary = {
        "losses": values.losses,
        "overflow": values.overflow,
        "attack_losses": values.attack,
        "at_theta": values.at_theta,
        "g": values.g,
        "lam": lam,
        "a_t": torch.stack([c.a_t for c in s.combos]).sum(0),
        "shortfall": torch.stack([c.shortfall for c in s.combos]).sum(0),
        "group_lams": lams.sum(-1) if lams.dim() == 2 else lams,
        "constraint_sq_norms": total_sq,
        "grad_dots": s.total.gr,
        "retain_sq_norm": s.total.rr,
        "pooled_sq_norm": pooled_gg,
        "cos_update_forgets": F.safe_cosine(dot_f, sq_norm, total_sq),
        "cos_update_forget": F.safe_cosine(dot_f.sum(), sq_norm, pooled_gg),
        "cos_update_objectives": F.safe_cosine(dot_rows, sq_norm, row_sq),
        "coefficients": torch.cat(
            [
                torch.stack([c.constraint_coef.reshape(-1) for c in s.combos]).reshape(-1),
                torch.stack([c.retain_coef for c in s.combos]),
            ]
        ),
        "clip_scale": s.scale,
        "update_norm": s.norm,
        "grad_scale": values.grad_scale,
        "gram_in_range": torch.stack([F.gram_in_range(gram) for gram in s.grams]),
    }
    assert tuple(summary) == HOST_FIELDS
    return summary


def read(solution: Solution, values: LossValues) -> dict[str, list[float]]:
    """The step's one device→host sync: every field of :data:`HOST_FIELDS`, as lists of floats."""
    summary = device_summary(solution, values)
    flat = [t.reshape(-1).double() for t in summary.values()]
    host = torch.cat(flat).tolist()
    out, start = {}, 0
    for name, t in zip(HOST_FIELDS, flat, strict=True):
        out[name] = host[start : start + t.numel()]
        start += t.numel()
    return out


def build_stats(
    state: StepState, host: dict[str, list[float]], rule_name: str, max_norm: float | None, acc: torch.dtype
) -> StepStats:
    """Validate the host values of the step ``state`` (closures, then the rule's output:
    :mod:`.validation`) and make the stats; ``acc`` is the Gram's accumulation dtype."""
    task, counts, scaled = state.task, [len(x) for x in state.losses], state.scaling is not None
    per_constraint, i = [], 0
    for n in counts:
        per_constraint.append(host["losses"][i : i + n])
        i += n
    retain_loss = host["losses"][-1] if task.constrained else math.nan
    flags = [f > 0 for f in host["overflow"]]
    attack_counts = [len(x) for x in state.attack_losses]
    attack_flags = flags[len(flags) - sum(attack_counts) :] if scaled else []
    flags = flags[: len(flags) - len(attack_flags)]
    per = len(flags) // len(counts)
    per_flags = [flags[j * per : (j + 1) * per] for j in range(len(counts))]
    attacks, i = [], 0
    for n in attack_counts:
        losses = host["attack_losses"][i : i + n]
        attacks.append(list(zip(losses, attack_flags[i : i + n] if scaled else [False] * n, strict=True)))
        i += n
    gg_rows, (rr,) = host["constraint_sq_norms"], host["retain_sq_norm"]
    (scale,), (norm,) = host["clip_scale"], host["update_norm"]
    skipped = check_measured(task, per_constraint, per_flags, retain_loss, [*gg_rows, rr], scaled, attacks)
    coefficients = host["coefficients"]
    if not skipped:
        check_update(rule_name, coefficients, scale, norm, acc, max_norm)
    blocks, m = len(host["group_lams"]), len(gg_rows)
    weights = (
        [c * scale for c in [*coefficients[:m], coefficients[m]]] if blocks == 1 else [math.nan] * task.rows
    )
    if not task.constrained:
        return StepStats(
            retain_loss=math.nan,
            forget_loss=math.nan,
            inner_forget_loss=math.nan,
            g_value=math.nan,
            lam=math.nan,
            a_t=math.nan,
            grad_dot=math.nan,
            retain_grad_norm=math.nan,
            forget_grad_norm=math.nan,
            update_norm=norm,
            cos_update_retain=math.nan,
            cos_update_forget=math.nan,
            clip_scale=scale,
            inner_losses=(),
            group_lams=(),
            skipped=skipped,
            grad_scale=host["grad_scale"][0],
            objective_losses=tuple(host["at_theta"]),
            weights=tuple(weights),
            cos_update_objectives=tuple(host["cos_update_objectives"]),
        )
    (pooled_gg,) = host["pooled_sq_norm"]
    return StepStats(
        retain_loss=retain_loss,
        forget_loss=sum(host["at_theta"][:m]),
        inner_forget_loss=sum(x[-1] for x in per_constraint),
        g_value=sum(host["g"]),
        lam=sum(host["lam"]),
        a_t=sum(host["a_t"]),
        grad_dot=sum(host["grad_dots"]),
        retain_grad_norm=math.sqrt(rr),
        forget_grad_norm=math.sqrt(pooled_gg) if pooled_gg >= 0 else math.nan,
        update_norm=norm,
        cos_update_retain=host["cos_update_objectives"][-1],
        cos_update_forget=host["cos_update_forget"][0],
        clip_scale=scale,
        inner_losses=tuple(_inner_sums(per_constraint)),
        group_lams=tuple(host["group_lams"]),
        skipped=skipped,
        grad_scale=host["grad_scale"][0],
        constraint_names=task.names,
        attack_losses=tuple(tuple(loss for loss, _ in a) for a in attacks),
        lams=tuple(host["lam"]),
        g_values=tuple(host["g"]),
        forget_losses=tuple(x[0] for x in per_constraint),
        inner_forget_losses=tuple(x[-1] for x in per_constraint),
        a_ts=tuple(host["a_t"]),
        forget_grad_norms=tuple(math.sqrt(max(v, 0.0)) for v in gg_rows),
        grad_dots=tuple(host["grad_dots"]),
        cos_update_forgets=tuple(host["cos_update_forgets"]),
        shortfalls=tuple(host["shortfall"]),
        infeasible=any(v > 0 for v in host["shortfall"]),
        objective_losses=tuple(host["at_theta"]),
        weights=tuple(weights),
        cos_update_objectives=tuple(host["cos_update_objectives"]),
    )


def _inner_sums(per_constraint: list[list[float]]) -> list[float]:
    """L_f(φ^0 … φ^K), summed over the constraints when there are several."""
    if len(per_constraint) == 1:
        return list(per_constraint[0])
    length = min(len(x) for x in per_constraint)
    return [sum(x[k] for x in per_constraint) for k in range(length)]
