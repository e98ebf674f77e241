"""Untrained tiny digits models written as CLI checkpoints in milliseconds (no training run)."""

from __future__ import annotations

import os

import torch


def write_base(directory, seed: int = 0, nan: bool = False) -> dict[str, str]:
    """``unet.safetensors`` (the ``tiny`` preset for 8×8 digits; ``nan``: every weight NaN) and
    ``classifier.safetensors`` in ``directory``; returns their paths."""
    from constrained_opt.diffusion.models import Classifier, build_unet, save_classifier, save_unet

    torch.manual_seed(seed)
    unet = build_unet("tiny", (1, 8, 8), 10)
    if nan:
        with torch.no_grad():
            for p in unet.parameters():
                p.fill_(float("nan"))
    paths = {"unet": os.path.join(directory, "unet.safetensors")}
    save_unet(paths["unet"], unet, {"note": "untrained test model"})
    paths["classifier"] = os.path.join(directory, "classifier.safetensors")
    save_classifier(paths["classifier"], Classifier(1, 8, 10, width=8), {"note": "untrained test model"})
    return paths
