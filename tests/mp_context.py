"""Child processes for the multi-process tests, never forked from pytest itself.

A fork copies the parent's threads' locks but not the threads: after the pytest process has run torch
ops, its OpenMP pool (and any other library thread) can leave a lock held in the child, which then
hangs. ``forkserver`` children are forked from a separate single-threaded server that has only
imported torch and the libraries below (importing starts no thread), so they start about as fast as a
fork, without that hazard.
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path

# What the children import, imported once by the server (DDP alone imports torch._dynamo, ~4 s); a
# module that is not installed is skipped. The same list on every call: the first call in a session
# starts the server, and later lists are ignored.
PRELOAD = [
    "torch",
    "torch._dynamo",
    "torch.distributed",
    "accelerate",
    "peft",
    "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion",
]


def context() -> multiprocessing.context.BaseContext:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def run_ranks(target, world: int, out: Path, *args, timeout: float = 180) -> None:
    """``target(rank, store, out, *args)`` in ``world`` forkserver children; each must exit 0 in time."""
    ctx = context()
    procs = [ctx.Process(target=target, args=(r, out / "store", str(out), *args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert codes == [0] * world, f"worker exit codes {codes}"


def full_params(model) -> dict:
    """Every parameter of ``model`` whole (an FSDP2 shard gathered with ``full_tensor``), detached."""
    return {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for n, p in model.named_parameters()
    }
