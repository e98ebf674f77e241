"""The projection stage of a step: the Gram of the rows, the rule, the clip, and δ written in place.

For each projection block (all parameters, or one param group under ``projection="per_group"``) the
Gram G of the rows [∇g_1, ..., ∇g_m, ∇L_r] is one pass over the buffer; the rule maps it (and g) to
δ = c_r∇L_r + Σ_i c_f,i∇g_i; clipping scales every coefficient by s = min(1, max_norm/‖δ‖), with
‖δ‖² = Σ_blocks cᵀGc read off the Gram; δ is then formed in the retain row with axpys. Everything
here is sync-free; the Gram keeps one form, the matrix, from the pass to the rule and the clip.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import functional as F
from . import rules as R
from ._flat import CONSTRAINT_ROW, Bucket, FlatLayout
from .amp import LossScaling
from .distributed import sum_over_shards


class ProjectionPlan:
    """The projection blocks of a layout, built once per layout: ``blocks[b] = (group index for the
    hyperparameters, [(bucket, the bucket's rows restricted to the block's columns)])``."""

    def __init__(self, layout: FlatLayout, projection: str) -> None:
        self.layout = layout
        if projection == "global":
            self.blocks: list[tuple[int, list[tuple[Bucket, Tensor]]]] = [
                (0, [(b, b.rows) for b in layout.buckets])
            ]
        else:
            per_group: dict[int, list[tuple[Bucket, Tensor]]] = {}
            for b in layout.buckets:
                for gs in b.groups:
                    per_group.setdefault(gs.group, []).append((b, b.rows[:, gs.start : gs.end]))
            self.blocks = sorted(per_group.items())
        first = self.blocks[0][1][0][0]
        self.device = first.rows.device
        wide = any(F.accumulation_dtype(b.dtype) == torch.float64 for b in layout.buckets)
        self.dtype = torch.float64 if wide else torch.float32  # the Gram's accumulation dtype

    def grams(self, dtype: torch.dtype | None = None) -> list[Tensor]:
        """One (m+1)×(m+1) Gram per block on ``self.device``, accumulated in ``dtype`` (default:
        ``self.dtype``); partial Grams of sharded buckets are all-reduced over their shard groups."""
        acc = dtype or self.dtype
        partials = [[F.gram_rows(rows, acc) for _, rows in parts] for _, parts in self.blocks]
        if self.layout.sharded:
            sum_over_shards(partials, [[b.shard_groups for b, _ in parts] for _, parts in self.blocks])
        return [_summed(g.to(self.device) for g in partial) for partial in partials]


class Solution(NamedTuple):
    """The rule's output on every block, clipped: δ_b = c_r,b r_b + Σ_i c_f,b,i f_b,i."""

    grams: list[F.Gram]
    combos: list[R.Combination]
    products: F.DirectionProducts  # δ·r, δ·f_i, ‖δ‖² before clipping, summed over the blocks
    total: F.Gram  # the Gram summed over the blocks
    scale: Tensor  # the clip scale s
    norm: Tensor  # ‖δ‖ after clipping, computed without overflow (fp64)
    coefficients: list[tuple[Tensor, Tensor, bool]]  # per block (c_r, c_f, c_r is exactly 1)


def solve(
    plan: ProjectionPlan,
    g: Tensor,
    unscale: Tensor,
    hyper: list[dict[str, Any]],
    rule: R.Rule,
    max_norm: float | None,
    scaling: LossScaling | None,
    dtype: torch.dtype | None = None,
) -> Solution:
    """The rule on each block's Gram (rows multiplied back by ``unscale``), one clip over all blocks,
    and δ's coefficients; sync-free. ``dtype=torch.float64`` forms the Grams in fp64."""
    device, acc = plan.device, dtype or plan.dtype
    grams, combos = [], []
    for (group_index, _), matrix in zip(plan.blocks, plan.grams(dtype), strict=True):
        gram = F.Gram.of(matrix * torch.outer(unscale, unscale))
        values = {
            k: v if isinstance(v, float | int) else v.to(dtype=acc, device=device)
            for k, v in hyper[group_index].items()
        }
        combo = rule(R.Geometry.of(gram, g), **values)
        retain_coef, constraint_coef, a_t = (torch.as_tensor(c, dtype=acc, device=device) for c in combo[:3])
        constraint_coef = constraint_coef.expand(gram.gr.shape)
        shortfall = combo.shortfall if combo.shortfall is not None else torch.zeros_like(constraint_coef)
        grams.append(gram)
        combos.append(
            R.Combination(retain_coef, constraint_coef, a_t.expand(gram.gr.shape), shortfall.to(acc))
        )
    products = _summed(
        F.direction_products(gram, c.retain_coef, c.constraint_coef)
        for gram, c in zip(grams, combos, strict=True)
    )
    scale, norm = clip(grams, combos, max_norm)
    single_axpy = rule.unit_retain and max_norm is None and scaling is None
    constraint_unscale = unscale[0] if unscale.numel() == 2 else unscale[:-1]
    coefficients = [
        (c.retain_coef * scale * unscale[-1], c.constraint_coef * scale * constraint_unscale, single_axpy)
        for c in combos
    ]
    return Solution(grams, combos, products, _summed(grams), scale, norm, coefficients)


def _summed(items: Any) -> Any:
    items = list(items)
    return sum(items[1:], items[0])


def clip(grams: list[F.Gram], combos: list[R.Combination], max_norm: float | None) -> tuple[Tensor, Tensor]:
    """The clip scale s = min(1, max_norm/‖δ‖) and ‖δ‖ after clipping, from one fp64 ‖δ‖.

    ‖δ‖² = Σ_b c_bᵀG_b c_b, computed with each block's coefficients divided by their largest magnitude,
    ‖δ_b‖ = s_b·√(ĉᵀGĉ), which cannot overflow for finite fp32 inputs: a huge λ is still clipped, and
    an update whose square overflows is reported, not applied.
    """
    sq = torch.zeros((), dtype=torch.float64, device=grams[0].rr.device)
    for gram, combo in zip(grams, combos, strict=True):
        c = torch.cat([combo.constraint_coef.reshape(-1), combo.retain_coef.reshape(1)]).double()
        s = c.abs().amax()
        s = torch.where(s > 0, s, torch.ones_like(s))
        c_hat = c / s
        sq = sq + (s * s) * torch.clamp_min(c_hat @ gram.matrix().double() @ c_hat, 0.0)
    norm = torch.sqrt(sq)
    acc = grams[0].rr.dtype
    if max_norm is None:
        return torch.ones((), dtype=acc, device=norm.device), norm
    scale = torch.clamp_max(max_norm / torch.clamp_min(norm, torch.finfo(torch.float64).tiny), 1.0)
    return scale.to(acc), norm * scale


def apply(plan: ProjectionPlan, coefficients: list[tuple[Tensor, Tensor, bool]]) -> None:
    """δ = c_r·r + Σ_i c_f,i·f_i into the retain row of each block, in place."""
    retain = plan.layout.retain_row
    for (_, parts), (c_r, c_f, single_axpy) in zip(plan.blocks, coefficients, strict=True):
        for _, rows in parts:
            target = rows[retain]
            if not single_axpy:
                target.mul_(c_r.to(rows.device))
            if c_f.dim() == 0:
                target.addcmul_(rows[CONSTRAINT_ROW], c_f.to(rows.device))
            elif rows.dtype == c_f.dtype:
                target.addmv_(rows[:retain].T, c_f.to(rows.device))  # one pass over the constraint rows
            else:
                for i in range(retain):
                    target.addcmul_(rows[i], c_f[i].to(rows.device))
