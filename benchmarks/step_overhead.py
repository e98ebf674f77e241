"""Item 1: the time of ``opt.step`` over the time of its closures' own forward and backward work.

Both sides run the same passes on the same batches: K forward+backward passes of the forget closure
(at least one), one forward of it at φ^K when K ≥ 1, one forward+backward of the retain closure.
The denominator adds one plain base-optimizer step (the numerator contains one), so the ratio is
what EraseDiff's orchestration and projection cost on top of work any training loop would do.

``against``: the optimizer of another git revision is timed in the same rounds (``opt_step_at_REV``),
and ``ratio_against`` is new over old (a refactor must stay within noise of 1).
"""

from __future__ import annotations

import statistics
from types import ModuleType

import torch

from constrained_opt import ValueFunctionBilevelOptimizer

from .common import denoiser_problem, interleaved_times
from .revision import core_at

BATCH = {"tiny": 4, "digits": 64, "cifar10": 4}


def measure(
    preset: str, inner_steps: int, device: torch.device, rounds: int, against: ModuleType | None = None
) -> dict:
    unet, retain, forget = denoiser_problem(preset, BATCH[preset], device)
    settings = {"lr": 1e-4, "inner_steps": inner_steps, "inner_lr": 1e-4}
    opt = ValueFunctionBilevelOptimizer(unet.parameters(), torch.optim.Adam, **settings)

    def closures():
        for _ in range(max(inner_steps, 1)):
            forget().backward()
        if inner_steps > 0:
            with torch.no_grad():
                forget()
        retain().backward()

    def closures_only():
        closures()
        unet.zero_grad(set_to_none=True)

    def closures_and_base_step():
        closures()
        opt.base_optimizer.step()
        unet.zero_grad(set_to_none=True)

    fns = {
        "opt_step": lambda: opt.step(retain, forget),
        "closures": closures_only,
        "closures_plus_base_step": closures_and_base_step,
    }
    if against is not None:
        old = against.ValueFunctionBilevelOptimizer(unet.parameters(), torch.optim.Adam, **settings)
        fns[f"opt_step_at_{against.revision}"] = lambda: old.step(retain, forget)
    times = interleaved_times(fns, rounds, device)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    fastest = {name: min(ts) for name, ts in times.items()}
    compared = {}
    if against is not None:
        old_name = f"opt_step_at_{against.revision}"
        compared = {
            "against": against.revision,
            "ratio_against": medians["opt_step"] / medians[old_name],
            "ratio_against_of_minima": fastest["opt_step"] / fastest[old_name],
            "ratio_at_revision": medians[old_name] / medians["closures_plus_base_step"],
        }
    return {
        "model": preset,
        "params": sum(p.numel() for p in unet.parameters()),
        "batch": BATCH[preset],
        "K": inner_steps,
        "seconds": medians,
        "ratio": medians["opt_step"] / medians["closures_plus_base_step"],
        "ratio_vs_closures_only": medians["opt_step"] / medians["closures"],
        "min_seconds": fastest,
        "ratio_of_minima": fastest["opt_step"] / fastest["closures_plus_base_step"],
        **compared,
    }


def run(
    device: torch.device,
    smoke: bool,
    rounds: int | None = None,
    cifar_ks: list[int] | None = None,
    against: str | None = None,
) -> dict:
    """``rounds`` overrides the repetitions; ``cifar_ks`` restricts K for the 35.7M model (CPU time);
    ``against`` a git revision whose optimizer is timed in the same rounds."""
    baseline = core_at(against) if against else None
    presets = ["tiny"] if smoke else ["digits", "cifar10"]
    ks = [0, 1] if smoke else [0, 1, 2, 5]
    rows = []
    for preset in presets:
        n_rounds = rounds or (3 if smoke else (15 if preset == "digits" else 5))
        for k in cifar_ks if (preset == "cifar10" and cifar_ks) else ks:
            row = measure(preset, k, device, n_rounds, baseline)
            print(
                f"step_overhead  {preset:8s} K={k}  step/(closures+base) = {row['ratio']:.3f} "
                f"(minima {row['ratio_of_minima']:.3f})  step/closures = {row['ratio_vs_closures_only']:.3f}"
                + (f"  new/old = {row['ratio_against']:.3f}" if baseline else "")
            )
            rows.append(row)
    return {"target": "ratio <= 1.05", "rows": rows}
