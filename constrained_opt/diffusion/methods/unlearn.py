"""The shared unlearning harness: one retain and one forget batch per step for every method, with
checkpoints, resume and probes."""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..data import BatchSampler, ImageData
from ..evaluation.metrics import PeakMemory
from ..evaluation.multiclass import forget_sampler
from ..runtime.errors import UsageError
from ..runtime.io import load_state, save_state
from ..runtime.resume import check_resume, restoring, run_config
from .base import Setup
from .registry import make_method


@dataclass
class UnlearnResult:
    unet: Any
    history: list[dict[str, float]]
    time_s: float
    prep_s: float
    peak_mem_mb: float
    probes: list[dict[str, float]] = field(default_factory=list)
    prep_cached: bool = False


def unlearn(
    method: str,
    unet,
    retain: ImageData,
    forget: ImageData,
    forget_class: int | tuple[int, ...],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    hparams: dict[str, Any] | None = None,
    checkpoint: str | None = None,
    checkpoint_every: int = 50,
    resume: bool = False,
    progress: bool = True,
    probe: Callable[[Any], dict[str, float]] | None = None,
    probe_every: int = 0,
    inputs: dict[str, Any] | None = None,
    cache: str | None = None,
) -> UnlearnResult:
    """Scrub ``forget_class`` from a copy of ``unet`` with ``method``; the input model is not modified.

    With ``checkpoint``, the model, method state (optimizer, mask, Fisher, ...), samplers, RNG states
    and history are saved there every ``checkpoint_every`` steps; after a Ctrl-C, ``resume=True``
    continues from that file (bit-for-bit the same run as an uninterrupted one). The checkpoint stores
    the run's configuration (these arguments, the resolved hyperparameters and ``inputs``, which
    identify the data and the base model); resuming with any other configuration raises
    :class:`UsageError`, except more ``steps`` (see :mod:`.resume`).

    With ``probe``, ``probe(unet)`` is called after every ``probe_every`` steps and its figures are
    recorded in ``UnlearnResult.probes`` with the step and the unlearning time so far; the probe's own
    time is not counted, and it must not draw from the global RNG (``sampling.sample`` does not).

    With ``cache``, a method may store one-off preparations that depend on the base model only (SA's
    replay samples and Fisher) in that folder and reuse them; ``prep_s`` then reports what computing
    them cost, and ``prep_cached`` is true.
    """
    if probe is not None and probe_every < 1:
        raise UsageError(
            f"probe_every must be a positive number of steps when a probe is given, got {probe_every}"
        )
    from tqdm.auto import tqdm

    unet = copy.deepcopy(unet).train()
    generator = torch.Generator().manual_seed(seed + 2)
    setup = Setup(
        unet, retain.num_classes, forget_class, lr, generator, batch_size, progress=progress, cache=cache
    )
    m = make_method(method, setup, hparams or {})
    config = run_config(
        method, forget_class, steps, batch_size, lr, seed, dataclasses.asdict(m.hp), **(inputs or {})
    )
    samplers = {
        "retain": BatchSampler(retain, batch_size, seed),
        "forget": forget_sampler(forget, forget_class, batch_size, seed + 1),
    }
    start, history, probes, elapsed, prep_s, peak, cached = 0, [], [], 0.0, 0.0, 0.0, False

    def save(step: int) -> None:
        save_state(
            checkpoint,
            {
                "method": method,
                "config": config,
                "step": step,
                "history": history,
                "probes": probes,
                "elapsed": elapsed,
                "prep_s": prep_s,
                "prep_cached": cached,
                "peak_mem_mb": max(peak, meter.peak_mb),
                "model": unet.state_dict(),
                "method_state": m.state_dict(),
                "samplers": {k: s.state_dict() for k, s in samplers.items()},
                "generator": generator.get_state(),
                "torch_rng": torch.get_rng_state(),
            },
        )

    meter = PeakMemory(setup.device)
    with meter:
        if resume and checkpoint and os.path.exists(checkpoint):
            state = load_state(checkpoint)
            with restoring(checkpoint):
                defaults = dataclasses.asdict(type(m.hp)())
                note = check_resume(checkpoint, state.get("config"), config, int(state["step"]), "", defaults)
                if note:
                    print(note, flush=True)
                unet.load_state_dict(state["model"])
                m.load_state_dict(state["method_state"])
                for k, s in samplers.items():
                    s.load_state_dict(state["samplers"][k])
                generator.set_state(state["generator"])
                torch.set_rng_state(state["torch_rng"])
                start, history, elapsed = state["step"], state["history"], state["elapsed"]
                probes = state.get("probes", [])
                prep_s, peak = state["prep_s"], state["peak_mem_mb"]
                cached = state.get("prep_cached", False)
        else:
            t0 = time.perf_counter()
            info = m.prepare(retain, forget) or {}
            prep_s = info.get("prep_s", time.perf_counter() - t0)
            cached = info.get("prep_cached", False)
        for step in tqdm(range(start, steps), initial=start, total=steps, desc=method, disable=not progress):
            t0 = time.perf_counter()
            history.append(m.step(samplers["retain"].next(), samplers["forget"].next()))
            elapsed += time.perf_counter() - t0
            if probe is not None and (step + 1) % probe_every == 0:
                probes.append({"step": step + 1, "time_s": elapsed, **probe(unet)})
            if checkpoint and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
                save(step + 1)
    return UnlearnResult(unet.eval(), history, elapsed, prep_s, max(peak, meter.peak_mb), probes, cached)
