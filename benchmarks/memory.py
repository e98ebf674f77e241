"""Item 3: peak memory of an EraseDiff step minus that of a plain base-optimizer step.

Each configuration runs in a fresh subprocess (``python -m benchmarks.memory MODE ...``), so the
peak belongs to that configuration alone: peak RSS on CPU (``VmHWM`` of /proc/self/status;
``ru_maxrss`` is inherited from the parent across fork and exec), ``torch.cuda.max_memory_allocated``
on GPU. Two steps are taken so the base optimizer's state exists in both. The difference is reported
in units of the trained parameters' bytes. The design bound is 1 for K ≤ 1 (the second gradient row,
which also holds the θ snapshot during the inner loop) and 2 for K ≥ 2 (plus autograd's gradient at
φ^{k-1} while the inner loop runs).

On CPU, glibc serves freed blocks again from its heap instead of returning them to the kernel, and
moves its mmap threshold up as blocks are freed, so peak RSS would count allocator slack that depends
on the order of allocations. The workers run with a fixed ``MALLOC_MMAP_THRESHOLD_``: every block of
128 KiB or more is its own mapping, unmapped when freed, and peak RSS follows peak live bytes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

BATCH = {"tiny": 2, "digits": 64, "cifar10": 2}


def worker(mode: str, preset: str, inner_steps: int, device_name: str) -> dict:
    from constrained_opt import ValueFunctionBilevelOptimizer

    from .common import denoiser_problem, peak_rss

    device = torch.device(device_name)
    unet, retain, forget = denoiser_problem(preset, BATCH[preset], device)
    if mode == "erasediff":
        opt = ValueFunctionBilevelOptimizer(
            unet.parameters(), torch.optim.Adam, lr=1e-4, inner_steps=inner_steps, inner_lr=1e-4
        )
        step = lambda: opt.step(retain, forget)  # noqa: E731
    else:
        adam = torch.optim.Adam(unet.parameters(), lr=1e-4)

        def step():
            adam.zero_grad(set_to_none=True)
            forget().backward()  # the same passes as EraseDiff with K = 1: activations peak alike
            adam.zero_grad(set_to_none=True)
            retain().backward()
            adam.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(2):
        step()
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss()
    param_bytes = sum(p.numel() * p.element_size() for p in unet.parameters())
    return {"peak_bytes": peak, "param_bytes": param_bytes}


def measure(preset: str, inner_steps: int, device: torch.device) -> dict:
    peaks = {}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    for mode in ("adam", "erasediff"):
        cmd = [sys.executable, "-m", "benchmarks.memory", mode, preset, str(inner_steps), str(device)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
        peaks[mode] = json.loads(out.strip().splitlines()[-1])
    param_bytes = peaks["adam"]["param_bytes"]
    extra = (peaks["erasediff"]["peak_bytes"] - peaks["adam"]["peak_bytes"]) / param_bytes
    return {
        "model": preset,
        "K": inner_steps,
        "param_bytes": param_bytes,
        "peak_bytes": {m: p["peak_bytes"] for m, p in peaks.items()},
        "extra_in_param_bytes": extra,
        "method": "cuda max_memory_allocated"
        if device.type == "cuda"
        else "peak RSS of a fresh process, glibc mmap threshold fixed",
    }


def run(device: torch.device, smoke: bool) -> dict:
    configs = [("tiny", 1)] if smoke else [("cifar10", 0), ("cifar10", 1), ("cifar10", 2)]
    rows = []
    for preset, k in configs:
        row = measure(preset, k, device)
        print(f"memory  {preset:8s} K={k}  extra = {row['extra_in_param_bytes']:.2f} x param bytes")
        rows.append(row)
    return {"target": "extra <= 2.1 x param bytes (design: 1 for K <= 1, 2 for K >= 2)", "rows": rows}


if __name__ == "__main__":
    mode, preset, k, dev = sys.argv[1:5]
    print(json.dumps(worker(mode, preset, int(k), dev)))
