"""Child processes for the multi-process tests, never forked from pytest itself.

A fork copies the parent's threads' locks but not the threads: after the pytest process has run torch
ops, its OpenMP pool (and any other library thread) can leave a lock held in the child, which then
hangs. ``forkserver`` children are forked from a separate single-threaded server that has only
imported torch and the libraries below (importing starts no thread), so they start about as fast as a
fork, without that hazard.
"""

from __future__ import annotations

import multiprocessing

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
