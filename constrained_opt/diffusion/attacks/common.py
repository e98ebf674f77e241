"""Pieces shared by the DDPM and the Stable Diffusion attacks: an embedding table with attack rows
appended, the projection onto the probability simplex and the loss summary of an attack run."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn


class AppendedEmbedding(nn.Module):
    """An ``nn.Embedding`` with rows appended: index ``first + i`` reads ``extra()[i]``, others the table.

    ``extra`` is called on every forward pass, so the rows may be a function of attack variables
    (e = wᵀE for the mixture). The original table is kept as a submodule and read, never copied or
    written. ``first`` defaults to the table size; a tokenizer whose length is below its embedding
    table's (padded vocabularies) assigns new tokens lower ids, which are redirected all the same.
    """

    def __init__(self, table: nn.Embedding, extra: Callable[[], Tensor], first: int | None = None):
        super().__init__()
        self.table, self.extra = table, extra
        self.first = table.num_embeddings if first is None else first

    def forward(self, ids: Tensor) -> Tensor:
        rows = self.extra().to(self.table.weight)
        is_new = (ids >= self.first).unsqueeze(-1)
        base = self.table(ids.clamp(max=self.table.num_embeddings - 1))
        return torch.where(is_new, rows[(ids - self.first).clamp(0, len(rows) - 1)], base)


def project_simplex(v: Tensor) -> Tensor:
    """Euclidean projection of each row of ``v`` onto the probability simplex {w ≥ 0, Σw = 1}.

    The sort-based algorithm (Held et al. 1974; Duchi et al. 2008): with u sorted descending and
    ρ = max{j : u_j − (Σ_{i≤j} u_i − 1)/j > 0}, w = max(v − τ, 0) for τ = (Σ_{i≤ρ} u_i − 1)/ρ.
    Hand-written: no library in our dependencies has it, and UnlearnDiffAtk's bisection is slower.
    """
    u = v.sort(dim=-1, descending=True).values
    css = u.cumsum(-1) - 1
    j = torch.arange(1, v.shape[-1] + 1, device=v.device, dtype=v.dtype)
    rho = ((u - css / j) > 0).sum(-1, keepdim=True)
    tau = css.gather(-1, rho - 1) / rho.to(v.dtype)
    return (v - tau).clamp_min(0)


def loss_record(losses: list[float], t0: float) -> dict[str, Any]:
    """Mean loss over the first and the last tenth of the steps (single-batch losses are noisy)."""
    window = max(1, len(losses) // 10)
    return {
        "steps": len(losses),
        "loss_first": sum(losses[:window]) / window,
        "loss_last": sum(losses[-window:]) / window,
        "time_s": time.perf_counter() - t0,
    }
