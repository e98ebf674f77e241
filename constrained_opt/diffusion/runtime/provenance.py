"""What a written model records about how it was made, and file digests."""

from __future__ import annotations

import datetime
import hashlib
import os
import platform

import torch


def provenance(**fields) -> dict:
    import diffusers

    return {
        **fields,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs",
    }


def file_digest(path: str) -> str:
    """SHA-256 of the file's bytes (hex)."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def model_digest(unet) -> str:
    """SHA-256 of a model's state (names, shapes, bytes): the key of preparations cached per model."""
    h = hashlib.sha256()
    for name, tensor in sorted(unet.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
