"""Item 2: the projection (Gram, λ, δ) on our flat buffers against the alternatives.

* ``flat``: the optimizer's path — ``functional.gram_rows`` of the (2, n) buffer for ‖∇g‖², ‖∇L_r‖²,
  ∇g·∇L_r (one cache-blocked pass over large CPU buffers), the grad_norm rule, one in-place
  ``addcmul_``. No gather: ``p.grad`` already are views of the buffer.
* ``per_param``: a Python loop over parameters (three dots and an axpy per tensor).
* ``torch_cat``: the authors' code — ``torch.cat`` the per-parameter gradients each step, project on
  the flat copies, copy δ back into each ``p.grad``.
* ``memcpy``: copying the (2, n) buffer, the memory-bandwidth yardstick.
"""

from __future__ import annotations

import itertools
import math

import torch

from constrained_opt import functional as F
from constrained_opt import rules

from .common import interleaved_medians


def parameter_sizes(n: int, count: int = 300, seed: int = 0) -> list[int]:
    """``count`` tensor sizes, log-uniform like a network's (biases to large kernels), summing to n."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.exp(torch.empty(count).uniform_(math.log(16), math.log(max(n / 10, 32)), generator=g))
    sizes = [max(1, int(s)) for s in raw * (n / raw.sum())]
    sizes[-1] += n - sum(sizes)
    return sizes


def _lam(gg, rr, gr):
    return rules.grad_norm(rules.Geometry(gg, rr, gr, torch.zeros_like(gg)), eta=1.0).constraint_coef


def measure(n: int, device: torch.device, rounds: int) -> dict:
    sizes = parameter_sizes(n)
    rows = torch.randn(2, n, device=device)
    offsets = [0, *torch.tensor(sizes).cumsum(0).tolist()]
    f_list = [rows[0, a:b].clone() for a, b in itertools.pairwise(offsets)]
    r_list = [rows[1, a:b].clone() for a, b in itertools.pairwise(offsets)]
    copy_dst = torch.empty_like(rows)

    def flat():
        m = F.gram_rows(rows)
        rows[1].addcmul_(rows[0], _lam(m[0, 0], m[1, 1], m[0, 1]))

    def per_param():
        gg = sum(torch.dot(f, f) for f in f_list)
        rr = sum(torch.dot(r, r) for r in r_list)
        gr = sum(torch.dot(f, r) for f, r in zip(f_list, r_list, strict=True))
        lam = _lam(gg, rr, gr)
        for f, r in zip(f_list, r_list, strict=True):
            r.addcmul_(f, lam)

    def torch_cat():
        f = torch.cat([t.reshape(-1) for t in f_list])
        r = torch.cat([t.reshape(-1) for t in r_list])
        lam = _lam(f @ f, r @ r, f @ r)
        delta = r + lam * f
        for dst, src in zip(r_list, torch.split(delta, sizes), strict=True):
            dst.copy_(src)

    def memcpy():
        copy_dst.copy_(rows)

    t = interleaved_medians(
        {"flat": flat, "per_param": per_param, "torch_cat": torch_cat, "memcpy": memcpy}, rounds, device
    )
    return {
        "n": n,
        "tensors": len(sizes),
        "seconds": t,
        "flat_over_memcpy": t["flat"] / t["memcpy"],
        "speedup_vs_torch_cat": t["torch_cat"] / t["flat"],
        "speedup_vs_per_param": t["per_param"] / t["flat"],
    }


def run(device: torch.device, smoke: bool) -> dict:
    ns = [10_000] if smoke else [1_000_000, 4_000_000, 16_000_000, 35_700_000, 100_000_000]
    out = []
    for n in ns:
        row = measure(n, device, rounds=3 if smoke else (10 if n <= 16_000_000 else 5))
        print(
            f"projection  n={n:>11,}  flat/memcpy = {row['flat_over_memcpy']:.2f}  "
            f"torch_cat/flat = {row['speedup_vs_torch_cat']:.1f}x  "
            f"per_param/flat = {row['speedup_vs_per_param']:.1f}x"
        )
        out.append(row)
    return {"target": "flat <= 1.5x memcpy; >= 5x faster than torch_cat at 35M", "rows": out}
