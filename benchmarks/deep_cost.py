"""The deep_erasure items' cost stage: each row's per-step time and peak memory relative to plain
EraseDiff's, measured so that a change of machine load between rows cancels.

Time (:func:`round_robin`): one process builds every row (its method on its own deep copy of the shipped
base UNet, prepared once), takes one warm-up step per row, then ``rounds`` rounds; in each round every
row in turn takes ``per_round`` steps ``step(retain_batch, forget_batch)`` on fixed batches drawn once
(retain: classes ≠ the forget class; forget: the forget class). Row r's figure in round k is
ρ_{r,k} = t_{r,k} / t_{erasediff,k}: the rows of one round run back to back, so a load that changes
between rounds scales both times alike and cancels. Reported: median_k ρ_{r,k} and min_k, max_k.

A method whose first ``warmup_steps`` steps differ (AdvUnlearn's unattacked warm-up) is timed in both
phases and weighted by the run's ``run_steps`` (:func:`step_times`).

Memory (:func:`peak_step_mb`): each row in a fresh subprocess (``python -m benchmarks.deep_cost``,
``OMP_NUM_THREADS=1``, every glibc block ≥ 128 KiB its own mapping as in :mod:`benchmarks.memory`):
build, prepare, one warm-up step, then :class:`~constrained_opt.diffusion.evaluation.metrics.PeakMemory`
around 2 steps, i.e. on CPU the peak RSS above the post-warm-up footprint (on CUDA its meter's
``max_memory_allocated``, which also counts the tensors held before); the ratio is to EraseDiff's peak.

One-off preparation (SalUn's mask, SA's Fisher) is in neither figure; deep_erasure reports the demo's
measured ``prep_s`` beside them. :func:`measure` caches its result in a JSON file keyed by the rows and
settings, so rerunning an item does not measure again.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

REFERENCE = "erasediff"
COST = dict(rounds=5, per_round=3)
SMOKE_COST = dict(rounds=1, per_round=1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def round_robin(
    steps: dict[str, Callable[[], object]],
    rounds: int,
    per_round: int,
    reference: str = REFERENCE,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """{label: [ρ_{label,k} for each round k]}: after one warm-up call of every ``steps[label]``, each
    round times ``per_round`` calls of every row in turn and divides by ``reference``'s time that round."""
    if reference not in steps or min(rounds, per_round) < 1:
        raise ValueError(f"round_robin needs a {reference!r} row and rounds, per_round ≥ 1")
    for step in steps.values():
        step()
    ratios: dict[str, list[float]] = {label: [] for label in steps}
    for _ in range(rounds):
        times = {}
        for label, step in steps.items():
            t0 = clock()
            for _ in range(per_round):
                step()
            times[label] = clock() - t0
        for label, t in times.items():
            ratios[label].append(t / times[reference])
    return ratios


def spread(values: list[float]) -> dict:
    """{median, min, max, values}: a cost figure over rounds."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def _problem(data_name: str, forget_class: int, batch_size: int, device: torch.device):
    """(base UNet, retain data, forget data, fixed retain batch, fixed forget batch)."""
    from constrained_opt.diffusion.data import BatchSampler, load_data, split_forget
    from constrained_opt.diffusion.evaluation.multiclass import forget_sampler
    from constrained_opt.diffusion.jobs.common import load_checked
    from constrained_opt.diffusion.models import shipped

    data = load_data(data_name)
    unet = load_checked(data, shipped(data_name, "unet"), None, device)[0]
    retain, forget = split_forget(data, forget_class)
    batches = (
        BatchSampler(retain, batch_size, 0).next(),
        forget_sampler(forget, forget_class, batch_size, 1).next(),
    )
    return unet, retain, forget, batches


def _method(unet, retain, forget, forget_class: int, batch_size: int, method: str, hparams: dict):
    """``method`` on its own copy of ``unet``, prepared (mask, Fisher) as the demo prepares it."""
    from constrained_opt.diffusion.methods.base import Setup
    from constrained_opt.diffusion.methods.registry import make_method
    from constrained_opt.diffusion.runtime.paths import cache_dir

    setup = Setup(
        copy.deepcopy(unet).train(),
        retain.num_classes,
        forget_class,
        1e-4,
        torch.Generator().manual_seed(2),
        batch_size,
        progress=False,
        cache=cache_dir(),
    )
    m = make_method(method, setup, hparams)
    m.prepare(retain, forget)
    return m


def step_times(
    data_name: str,
    rows: dict[str, tuple[str, dict]],
    forget_class: int,
    batch_size: int,
    device,
    run_steps: int = 300,
    **rr,
) -> dict[str, list[float]]:
    """:func:`round_robin` over ``rows`` ({label: (method, hparams)}) built in this process.

    A method whose first ``hp.warmup_steps`` steps differ from the rest (AdvUnlearn's unattacked warm-up)
    is timed in both phases, a second copy starting past the warm-up (``taken``), and its ratio per round
    is the run's mean over ``run_steps`` steps: (w·ρ_warm-up + (run_steps − w)·ρ_after) / run_steps."""
    unet, retain, forget, (rb, fb) = _problem(data_name, forget_class, batch_size, torch.device(device))
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else lambda: None
    steps, phased = {}, {}
    for label, (method, hp) in rows.items():
        m = _method(unet, retain, forget, forget_class, batch_size, method, hp)
        steps[label] = lambda m=m: (m.step(rb, fb), sync())
        warmup = min(getattr(m.hp, "warmup_steps", 0), run_steps)
        if warmup and hasattr(m, "taken"):
            after = _method(unet, retain, forget, forget_class, batch_size, method, hp)
            after.taken = warmup
            steps[f"{label}@after_warmup"] = lambda m=after: (m.step(rb, fb), sync())
            phased[label] = warmup
    ratios = round_robin(steps, **rr)
    for label, warmup in phased.items():
        after = ratios.pop(f"{label}@after_warmup")
        ratios[label] = [
            (warmup * w + (run_steps - warmup) * a) / run_steps
            for w, a in zip(ratios[label], after, strict=True)
        ]
    return ratios


def peak_step_mb(
    data_name: str, forget_class: int, batch_size: int, device: str, method: str, hp: dict
) -> float:
    """Peak memory (MiB) of 2 steps of ``method`` after a warm-up step, above the footprint before them
    (run it in a fresh process: :func:`memory_mb`); for a method with a warm-up phase, the larger of
    that and the same measured past the warm-up."""
    from constrained_opt.diffusion.evaluation.metrics import PeakMemory

    unet, retain, forget, (rb, fb) = _problem(data_name, forget_class, batch_size, torch.device(device))
    m = _method(unet, retain, forget, forget_class, batch_size, method, hp)
    m.step(rb, fb)
    with PeakMemory(device) as meter:
        for _ in range(2):
            m.step(rb, fb)
    if getattr(m.hp, "warmup_steps", 0) and hasattr(m, "taken"):  # the phase after the warm-up too
        m.taken = max(m.taken, m.hp.warmup_steps)
        m.step(rb, fb)
        with PeakMemory(device) as after:
            for _ in range(2):
                m.step(rb, fb)
        return max(meter.peak_mb, after.peak_mb)
    return meter.peak_mb


def memory_mb(
    data_name: str, forget_class: int, batch_size: int, device: str, method: str, hp: dict
) -> float:
    """:func:`peak_step_mb` in a fresh subprocess."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MALLOC_MMAP_THRESHOLD_": str(128 * 1024),
        "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p),
    }
    args = [data_name, str(forget_class), str(batch_size), str(device), method, json.dumps(hp)]
    cmd = [sys.executable, "-m", "benchmarks.deep_cost", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(f"memory worker {' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def measure(
    data_name: str,
    rows: dict[str, tuple[str, dict]],
    forget_class: int,
    batch_size: int,
    device,
    rounds: int,
    per_round: int,
    cache: str,
    run_steps: int = 300,
) -> dict:
    """{settings..., "time_ratio": {label: [ρ per round]}, "memory_mb": {label: MiB},
    "memory_ratio": {label: MiB / EraseDiff's MiB}}, reused from ``cache`` (JSON) when it holds the same
    rows and settings, else measured and written there."""
    from constrained_opt.diffusion.models import shipped
    from constrained_opt.diffusion.runtime.io import read_json, write_json
    from constrained_opt.diffusion.runtime.provenance import file_digest

    key = json.loads(
        json.dumps(
            {
                "data": data_name,
                "base": file_digest(shipped(data_name, "unet")),
                "forget_class": forget_class,
                "batch_size": batch_size,
                "device": str(device),
                "rounds": rounds,
                "per_round": per_round,
                "run_steps": run_steps,
                "rows": {label: [method, hp] for label, (method, hp) in rows.items()},
            }
        )
    )
    if os.path.isfile(cache) and read_json(cache).get("key") == key:
        return read_json(cache)
    times = step_times(
        data_name, rows, forget_class, batch_size, device, run_steps, rounds=rounds, per_round=per_round
    )
    mem = {
        label: memory_mb(data_name, forget_class, batch_size, str(device), *row)
        for label, row in rows.items()
    }
    result = {
        "key": key,
        "method": (
            f"time: {rounds} rounds × {per_round} steps of every row in turn in one process, ratio to "
            f"{REFERENCE}'s time in the same round; memory: peak of 2 steps after a warm-up step, above "
            "the footprint before them, one fresh process per row"
        ),
        "time_ratio": times,
        "memory_mb": mem,
        "memory_ratio": {
            label: (v / mem[REFERENCE] if mem[REFERENCE] > 0 else None) for label, v in mem.items()
        },
    }
    write_json(cache, result)
    return result


if __name__ == "__main__":
    data_name, forget_class, batch_size, device, method, hp = sys.argv[1:]
    mb = peak_step_mb(data_name, int(forget_class), int(batch_size), device, method, json.loads(hp))
    print(json.dumps({"peak_mb": mb}))
