"""Item 7 (torchjd): m-objective aggregation with UPGrad, torchjd 0.18 against ours, on one model.

The model is the 0.65M digits UNet; objective i is the denoising loss on its own fixed batch (every
parameter serves every objective). Modes, all ending in one Adam step:

- ``ours``: ``ValueFunctionBilevelOptimizer(rule="upgrad").step([f_1, ..., f_m])``: one
  forward+backward per objective into a row of the flat (m, n) buffer, the m×m Gram, UPGrad's weights
  from m small dual QPs solved exactly, δ = Σ w_i ∇f_i written into ``.grad``;
- ``torchjd``: ``torchjd.autojac.backward([f_1, ..., f_m])`` (the m graphs built first, the Jacobian
  rows computed in parallel) then ``jac_to_grad(params, UPGrad())``, its documented pattern;
- ``torchjd_gramian``: the same with ``jac_to_grad(..., optimize_gramian_computation=True)``, which its
  docs recommend when memory matters;
- ``autograd``: the floor, one backward per objective accumulating the plain sum Σ∇f_i into ``.grad``.

``mtl_backward`` differs from ``backward`` only for task-specific parameters (heads whose gradients
need no aggregation); with no such parameters it is the same computation, so it is not timed apart.
Times: medians and fastest of interleaved rounds in one process; peak memory: a fresh process per
mode (as item 3). One step of ``ours`` and of ``torchjd`` from the same θ with SGD(lr = 1) checks that
the aggregations agree: torchjd solves UPGrad's QPs with quadprog on a regularised, normalised Gram,
ours exactly, so they agree to about its regularisation.
"""

from __future__ import annotations

import json
import statistics
import sys

import torch
from torch.nn import functional as F

from .common import interleaved_times, peak_method, peak_of_steps, run_worker

MODES = ("ours", "torchjd", "torchjd_gramian", "autograd")
BATCH = 16


def problem(m: int, device: torch.device, preset: str = "digits", seed: int = 0):
    """A digits UNet and m closures, each the denoising loss on its own fixed batch."""
    from constrained_opt.diffusion.models import build_unet

    torch.manual_seed(seed)
    unet = build_unet(preset, (1, 8, 8), num_classes=10).to(device)
    closures = []
    for i in range(m):
        x, noise = torch.randn(BATCH, 1, 8, 8, device=device), torch.randn(BATCH, 1, 8, 8, device=device)
        t = torch.randint(0, 1000, (BATCH,), device=device)
        c = torch.full((BATCH,), i % 10, device=device)

        def closure(x=x, noise=noise, t=t, c=c):
            return F.mse_loss(unet(x, t, class_labels=c).sample, noise)

        closures.append(closure)
    return unet, closures


def make_step(mode: str, unet, closures, base=torch.optim.Adam, lr: float = 1e-4):
    params = list(unet.parameters())
    if mode == "ours":
        from constrained_opt import ValueFunctionBilevelOptimizer

        opt = ValueFunctionBilevelOptimizer(params, base, lr=lr, rule="upgrad")
        return lambda: opt.step(list(closures))
    optimizer = base(params, lr=lr)
    if mode == "autograd":

        def step():
            for f in closures:
                f().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step
    from torchjd.aggregation import UPGrad
    from torchjd.autojac import backward, jac_to_grad

    aggregator, gramian = UPGrad(), mode == "torchjd_gramian"

    def step():
        backward([f() for f in closures])
        jac_to_grad(params, aggregator, optimize_gramian_computation=gramian)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def update_difference(m: int, device: torch.device) -> float:
    """‖Δθ_ours − Δθ_torchjd‖ / ‖Δθ_torchjd‖ after one SGD(lr = 1) step from the same θ."""
    deltas = []
    for mode in ("ours", "torchjd"):
        unet, closures = problem(m, device)
        theta = torch.cat([p.detach().flatten().clone() for p in unet.parameters()])
        make_step(mode, unet, closures, torch.optim.SGD, 1.0)()
        deltas.append(torch.cat([p.detach().flatten() for p in unet.parameters()]) - theta)
    return float((deltas[0] - deltas[1]).norm() / deltas[1].norm())


def worker(mode: str, m: int, device_name: str) -> dict:
    """Peak memory of two steps of ``mode`` in this (fresh) process."""
    device = torch.device(device_name)
    return peak_of_steps(make_step(mode, *problem(m, device)), device)


def run(device: torch.device, smoke: bool) -> dict:
    import warnings

    import torchjd

    # torchjd's batched Jacobian has no vmap rule for CPU attention's backward and warns once per call;
    # the slow fallback it takes is part of what is measured.
    warnings.filterwarnings("ignore", message=".*performance drop.*")

    ms = [3] if smoke else [2, 4, 8]
    rounds = 1 if smoke else 10
    rows = []
    for m in ms:
        unet, closures = problem(m, device)
        times = interleaved_times({mode: make_step(mode, unet, closures) for mode in MODES}, rounds, device)
        medians = {k: statistics.median(v) for k, v in times.items()}
        fastest = {k: min(v) for k, v in times.items()}
        # Smoke: no memory workers (each imports diffusers afresh).
        peaks = {} if smoke else {mode: run_worker("torchjd_compare", mode, m, device) for mode in MODES}
        row = {
            "m": m,
            "params": sum(p.numel() for p in unet.parameters()),
            "seconds": medians,
            "min_seconds": fastest,
            "time_over_ours": {k: medians[k] / medians["ours"] for k in MODES},
            "fastest_over_ours": {k: fastest[k] / fastest["ours"] for k in MODES},
            "peak_bytes": {k: v["peak_bytes"] for k, v in peaks.items()},
            "param_bytes": sum(p.numel() * 4 for p in unet.parameters()),
            "update_difference": update_difference(m, device),
        }
        peak_ratio = peaks["torchjd"]["peak_bytes"] / peaks["ours"]["peak_bytes"] if peaks else float("nan")
        print(
            f"torchjd  m={m}  torchjd/ours time {row['time_over_ours']['torchjd']:.2f}x "
            f"(fastest {row['fastest_over_ours']['torchjd']:.2f}x), ours/autograd "
            f"{medians['ours'] / medians['autograd']:.2f}x, peak torchjd/ours {peak_ratio:.2f}, "
            f"update difference {row['update_difference']:.1e}"
        )
        rows.append(row)
    return {
        "torchjd": torchjd.__version__ if hasattr(torchjd, "__version__") else "0.18",
        "batch_per_objective": BATCH,
        "rounds": rounds,
        "memory_method": peak_method(device),
        "rows": rows,
    }


if __name__ == "__main__":
    mode, m, dev = sys.argv[1:4]
    print(json.dumps(worker(mode, int(m), dev)))
