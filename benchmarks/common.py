"""Shared helpers: interleaved timing, the denoising problems the benchmarks run on, result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime

import torch
from torch.nn import functional as F

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_times(fns: dict[str, Callable[[], object]], rounds: int, device: torch.device) -> dict:
    """Wall times of each function over ``rounds``, measured round-robin so that machine noise hits
    all alike (after one warm-up call each: allocations, lazy init, autotuning)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def interleaved_medians(fns: dict[str, Callable[[], object]], rounds: int, device: torch.device) -> dict:
    """Median wall time of each function (see :func:`interleaved_times`)."""
    return {name: statistics.median(ts) for name, ts in interleaved_times(fns, rounds, device).items()}


def denoiser_problem(preset: str, batch: int, device: torch.device, seed: int = 0):
    """A class-conditional UNet2DModel with fixed random batches, and its retain/forget closures.

    The closures are the EraseDiff losses in their simplest form: ε-prediction MSE on the retain batch,
    and MSE to a fixed "other class" target on the forget batch. Batches are fixed so every pass costs
    the same.
    """
    from constrained_opt.diffusion.models import build_unet

    torch.manual_seed(seed)
    size, channels = (8, 1) if preset in ("digits", "tiny") else (32, 3)
    unet = build_unet(preset, (channels, size, size), num_classes=10).to(device)
    x_r, x_f = (torch.randn(batch, channels, size, size, device=device) for _ in range(2))
    t = torch.randint(0, 1000, (batch,), device=device)
    c_r, c_f = (
        torch.randint(1, 10, (batch,), device=device),
        torch.zeros(batch, dtype=torch.long, device=device),
    )
    noise, target = torch.randn_like(x_r), torch.randn_like(x_f)

    def retain():
        return F.mse_loss(unet(x_r, t, class_labels=c_r).sample, noise)

    def forget():
        return F.mse_loss(unet(x_f, t, class_labels=c_f).sample, target)

    return unet, retain, forget


def peak_rss() -> int:
    """Peak resident memory of this process (VmHWM), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status: the CPU memory benchmark needs Linux")


def peak_bytes(device: torch.device) -> int:
    """Peak memory of this process so far: CUDA max allocated, or peak RSS (VmHWM) on CPU (see item 3)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return peak_rss()


def peak_of_steps(step: Callable[[], object], device: torch.device, count: int = 2) -> dict:
    """Run ``step`` ``count`` times (so optimizer state exists) and return this process's peak memory."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(count):
        step()
    return {"peak_bytes": peak_bytes(device)}


def peak_method(device: torch.device) -> str:
    if device.type == "cuda":
        return "cuda max_memory_allocated"
    return "peak RSS (VmHWM) of a fresh process per mode, glibc mmap threshold fixed"


def run_worker(module: str, *args: object) -> dict:
    """``python -m benchmarks.<module> ARGS`` in a fresh process with glibc's mmap threshold fixed (so
    peak RSS tracks live bytes, see item 3); returns the JSON of its last line."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    cmd = [sys.executable, "-m", f"benchmarks.{module}", *map(str, args)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def machine() -> dict:
    info = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # Runnable processes averaged over the last 1, 5 and 15 minutes when the result was written:
        # above the core count, other work shared the machine and absolute times are inflated.
        "load_average": list(os.getloadavg()),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def write_result(name: str, payload: dict, out_dir: str = RESULTS) -> str:
    """Atomically write ``out_dir/name.json``."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"machine": machine(), **payload}, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
