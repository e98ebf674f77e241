"""Noise schedules and class-conditional sampling with classifier-free guidance.

Both schedulers use the paper's linear β schedule, β_1 = 1e-4 … β_T = 0.02 with T = 1000, and
ε-prediction. Guidance follows the authors: ε̂ = (1 + w)·ε(x_t, c) − w·ε(x_t, ∅), w = 2 by default.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .models import null_class
from .runtime.errors import UsageError

NUM_TRAIN_TIMESTEPS = 1000
SAMPLERS = ("ddim", "ddpm")


def make_scheduler(kind: str = "ddpm"):
    """``DDPMScheduler`` (training, ancestral sampling) or ``DDIMScheduler`` (η = 0), linear schedule."""
    from diffusers import DDIMScheduler, DDPMScheduler

    if kind not in SAMPLERS:
        raise UsageError(f"unknown sampler {kind!r}; expected one of {', '.join(SAMPLERS)}")
    cls = DDIMScheduler if kind == "ddim" else DDPMScheduler
    return cls(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_schedule="linear", beta_start=1e-4, beta_end=0.02
    )


@torch.no_grad()
def sample(
    unet,
    labels: Tensor,
    *,
    sampler: str = "ddim",
    num_steps: int = 50,
    guidance: float = 2.0,
    seed: int = 0,
    batch_size: int = 500,
    progress: bool = True,
    desc: str = "sampling",
) -> Tensor:
    """Draw one image per label, in [-1, 1], on the CPU.

    The initial noise x_T (and DDPM's per-step noise) comes from a CPU generator seeded with ``seed``,
    so two models sampled with the same seed and labels start from the same x_T (paired comparison).
    ``num_steps`` applies to DDIM; DDPM always runs all T steps.
    """
    from tqdm.auto import tqdm

    scheduler = make_scheduler(sampler)
    scheduler.set_timesteps(num_steps if sampler == "ddim" else NUM_TRAIN_TIMESTEPS)
    device = next(unet.parameters()).device
    c, h, w = unet.config.in_channels, unet.config.sample_size, unet.config.sample_size
    generator = torch.Generator().manual_seed(seed)
    x_init = torch.randn((len(labels), c, h, w), generator=generator)
    null = null_class(unet)
    # DDIM: recompute ε from the clipped x̂_0, so the step stays consistent when guidance pushes x̂_0
    # out of [−1, 1] (otherwise the unclipped ε drives x_t off the data manifold).
    step_kwargs = {"use_clipped_model_output": True} if sampler == "ddim" else {}
    chunks = range(0, len(labels), batch_size)
    was_training = unet.training
    unet.eval()
    out = []
    with tqdm(
        total=len(chunks) * len(scheduler.timesteps), desc=desc, disable=not progress, leave=False
    ) as bar:
        for start in chunks:
            x = x_init[start : start + batch_size].to(device)
            cond = labels[start : start + batch_size].to(device)
            classes = torch.cat([cond, torch.full_like(cond, null)]) if guidance else cond
            for t in scheduler.timesteps:
                inp = torch.cat([x, x]) if guidance else x
                eps = unet(inp, t.to(device), class_labels=classes).sample
                if guidance:
                    eps_c, eps_u = eps.chunk(2)
                    eps = (1 + guidance) * eps_c - guidance * eps_u
                x = scheduler.step(eps, t, x, generator=generator, **step_kwargs).prev_sample
                bar.update()
            out.append(x.clamp(-1, 1).cpu())
    unet.train(was_training)
    return torch.cat(out)
