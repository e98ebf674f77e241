"""Self-generated training sets: the latents x_0 of images the model itself generates for a prompt list.

Sample i uses prompt ``prompts[i % len(prompts)]`` and initial noise x_T from a CPU generator seeded
``seed + i``, so every sample is determined on its own and generation resumes where it stopped. Each
sample is one safetensors file ``{i:06d}.safetensors`` (written atomically) in a folder named by a hash
of everything that determines it: a fingerprint of the weights, the prompts, resolution, sampling steps,
guidance and seed. A larger ``count`` later reuses the files already there.

Latents are stored as the pipeline returns them with ``output_type="latent"`` (already multiplied by
the VAE's scaling factor), which is exactly the x_0 the UNet is trained on: training never runs the
VAE. (Decoding to pixels and re-encoding, as an image dataset would, gives the same x_0 up to the VAE's
reconstruction error.)
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass

import torch

from ..data import ImageData
from ..runtime.io import load_tensors, save_tensors, write_json


def fingerprint(pipe) -> str:
    """sha256 over the component configs and a float64 checksum of every weight tensor (UNet, VAE and the
    text encoder(s): SDXL's second one too)."""
    from .model import text_encoders

    h = hashlib.sha256()
    for name in ("unet", "vae", *text_encoders(pipe)):
        module = getattr(pipe, name)
        config = module.config.to_dict() if hasattr(module.config, "to_dict") else dict(module.config)
        h.update(json.dumps(config, sort_keys=True, default=str).encode())
        with torch.no_grad():
            sums = torch.stack([t.double().sum() for t in module.state_dict().values()])
        h.update(sums.cpu().numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class SetSpec:
    """Everything that determines a generated set; its hash names the cache folder."""

    weights: str  # :func:`fingerprint` of the pipeline
    prompts: tuple[str, ...]
    resolution: int
    steps: int
    guidance: float
    seed: int
    precision: str = "no"  # autocast dtype of the sampling run ("no", "bf16", "fp16")

    def directory(self, root: str) -> str:
        key = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]
        return os.path.join(root, key)


def sample_path(directory: str, i: int) -> str:
    return os.path.join(directory, f"{i:06d}.safetensors")


@torch.no_grad()
def generate_set(
    pipe,
    spec: SetSpec,
    count: int,
    directory: str,
    *,
    batch_size: int = 4,
    progress: bool = True,
    desc: str = "generating",
    shard: tuple[int, int] = (0, 1),
) -> int:
    """Generate the missing samples 0..count−1 of a set into ``directory``; returns how many were made.

    ``shard = (rank, world)``: this process makes only the samples with i ≡ rank (mod world). The caller
    enters the autocast context that ``spec.precision`` names.
    """
    from tqdm.auto import tqdm

    rank, world = shard
    missing = [i for i in range(rank, count, world) if not os.path.exists(sample_path(directory, i))]
    if not missing:
        return 0
    os.makedirs(directory, exist_ok=True)
    if rank == 0:
        write_json(os.path.join(directory, "set.json"), asdict(spec))
    prompts = spec.prompts
    pipe.set_progress_bar_config(disable=True)
    for start in tqdm(range(0, len(missing), batch_size), desc=desc, disable=not progress):
        idx = missing[start : start + batch_size]
        latents = pipe(
            prompt=[prompts[i % len(prompts)] for i in idx],
            height=spec.resolution,
            width=spec.resolution,
            num_inference_steps=spec.steps,
            guidance_scale=spec.guidance,
            generator=[torch.Generator().manual_seed(spec.seed + i) for i in idx],
            output_type="latent",
        ).images
        for i, z in zip(idx, latents, strict=True):
            meta = {"prompt": prompts[i % len(prompts)], "seed": str(spec.seed + i)}
            save_tensors(sample_path(directory, i), {"latent": z.float()}, meta)
    return len(missing)


def load_set(directory: str, count: int, labels: list[int], name: str) -> ImageData:
    """Samples 0..count−1 as an ImageData of latents; sample i gets label ``labels[i % len(labels)]``."""
    latents = torch.stack([load_tensors(sample_path(directory, i))[0]["latent"] for i in range(count)])
    targets = torch.tensor([labels[i % len(labels)] for i in range(count)])
    return ImageData(latents, targets, max(labels) + 1, name)
