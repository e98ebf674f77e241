"""Item 6 (multi_constraint): the cost of m constraints, m = 1, 2, 4, 8.

Step overhead: ``opt.step(retain, [c_1, ..., c_m])`` against its floor, the same closure passes run
with plain autograd plus one plain Adam step (as item 1): m forward+backward passes of the
constraint closures (each on its own fixed forget batch) and one of the retain closure; with K = 1
under the ``value`` rule (which reads g, so every constraint runs its own inner step) each constraint
adds a forward at φ¹. Under ``grad_norm`` the inner loops are skipped (δ does not depend on g).

Gram cost per row: ``functional.gram_rows`` on an (m + 1, n) buffer at the paper's n = 35.7M,
against a copy of the same buffer (the bandwidth yardstick), and per row; plus the m×m dual QP
(``functional.kkt_solve``), which never touches n.
"""

from __future__ import annotations

import statistics

import torch
from torch.nn import functional as F

from .common import interleaved_times

SIZES = {"digits": 64, "tiny": 4}  # preset: batch per closure
CONFIGS = (("grad_norm", 0), ("value", 1))


def problem(m: int, device: torch.device, preset: str, seed: int = 0):
    """A digits UNet, a retain closure and m forget closures on their own fixed batches."""
    from constrained_opt.diffusion.models import build_unet

    torch.manual_seed(seed)
    unet = build_unet(preset, (1, 8, 8), num_classes=10).to(device)
    batch = SIZES[preset]

    def closure(label: int):
        x, eps = torch.randn(batch, 1, 8, 8, device=device), torch.randn(batch, 1, 8, 8, device=device)
        t = torch.randint(0, 1000, (batch,), device=device)
        c = torch.full((batch,), label, device=device)
        return lambda: F.mse_loss(unet(x, t, class_labels=c).sample, eps)

    return unet, closure(9), [closure(i) for i in range(m)]


def overhead(m: int, rule: str, inner_steps: int, device: torch.device, rounds: int, preset: str) -> dict:
    from constrained_opt import ValueFunctionBilevelOptimizer

    unet, retain, constraints = problem(m, device, preset)
    opt = ValueFunctionBilevelOptimizer(
        unet.parameters(), torch.optim.Adam, lr=1e-4, inner_steps=inner_steps, inner_lr=1e-4, rule=rule
    )

    def closures():
        for c in constraints:
            c().backward()
            if inner_steps:
                with torch.no_grad():
                    c()
        retain().backward()

    def floor():
        closures()
        opt.base_optimizer.step()
        unet.zero_grad(set_to_none=True)

    times = interleaved_times(
        {"opt_step": lambda: opt.step(retain, constraints), "floor": floor}, rounds, device
    )
    medians = {k: statistics.median(v) for k, v in times.items()}
    fastest = {k: min(v) for k, v in times.items()}
    return {
        "m": m,
        "rule": rule,
        "K": inner_steps,
        "seconds": medians,
        "min_seconds": fastest,
        "ratio": medians["opt_step"] / medians["floor"],
        "ratio_of_minima": fastest["opt_step"] / fastest["floor"],
    }


def gram_cost(m: int, n: int, device: torch.device, rounds: int) -> dict:
    from constrained_opt import functional as Fn

    rows = torch.randn(m + 1, n, device=device)
    copy = torch.empty_like(rows)
    gram = Fn.gram_rows(rows)
    a = torch.rand(m, device=device)
    solve = (
        (lambda: Fn.kkt_solve(a[0], Fn.gram_from_matrix(gram))) if m == 1 else (lambda: Fn.kkt_solve(a, gram))
    )
    times = interleaved_times(
        {"gram": lambda: Fn.gram_rows(rows), "copy": lambda: copy.copy_(rows), "dual_qp": solve},
        rounds,
        device,
    )
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {
        "m": m,
        "n": n,
        "seconds": medians,
        "min_seconds": {k: min(v) for k, v in times.items()},
        "gram_over_copy": medians["gram"] / medians["copy"],
        "gram_seconds_per_row": medians["gram"] / (m + 1),
    }


def run(device: torch.device, smoke: bool) -> dict:
    ms = [1, 2] if smoke else [1, 2, 4, 8]
    rounds = 2 if smoke else 10
    n = 100_000 if smoke else 35_700_000
    preset = "tiny" if smoke else "digits"
    steps = []
    for rule, k in CONFIGS:
        for m in ms:
            row = overhead(m, rule, k, device, rounds, preset)
            print(
                f"multi_constraint  {rule:9s} K={k} m={m}  step/floor = {row['ratio']:.3f} "
                f"(fastest {row['ratio_of_minima']:.3f})"
            )
            steps.append(row)
    grams = []
    for m in ms:
        row = gram_cost(m, n, device, rounds)
        print(
            f"multi_constraint  gram m={m} n={n:,}: {row['gram_over_copy']:.2f}x a copy, "
            f"{row['gram_seconds_per_row'] * 1e3:.1f} ms per row, "
            f"dual QP {row['seconds']['dual_qp'] * 1e3:.2f} ms"
        )
        grams.append(row)
    return {"model": preset, "batch": SIZES[preset], "rounds": rounds, "steps": steps, "gram": grams}
