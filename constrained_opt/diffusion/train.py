"""Seeded training of the base class-conditional DDPM and of the evaluation classifier.

The shipped digits checkpoints in ``assets/`` were made by these functions through
``constrained-opt train-base`` (see ``assets/README.md`` for the exact command, seed and steps).
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from .data import BatchSampler, ImageData
from .losses import denoising_loss, diffuse, unet_eps
from .models import Classifier, build_unet, null_class
from .sampling import make_scheduler


def train_unet(
    data: ImageData,
    *,
    preset: str,
    steps: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    label_dropout: float = 0.1,
    ema_decay: float = 0.999,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    step_times: list[float] | None = None,
):
    """min_θ E‖ε − ε_θ(x_t | c̃)‖², where c̃ = ∅ (null class) with probability ``label_dropout``.

    Adam with gradient-norm clipping at 1 and an exponential moving average of the weights
    (diffusers ``EMAModel``); returns the EMA model in eval mode. ``step_times``, if given, receives
    each step's wall time in seconds.
    """
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    unet = build_unet(preset, data.image_shape, data.num_classes).to(device).train()
    ema = EMAModel(unet.parameters(), decay=ema_decay)
    optimizer = torch.optim.Adam(unet.parameters(), lr=lr)
    scheduler = make_scheduler("ddpm")
    sampler = BatchSampler(data, batch_size, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    eps, null = unet_eps(unet), null_class(unet)
    for _ in tqdm(range(steps), desc="train UNet", disable=not progress):
        t0 = time.perf_counter()
        x0, c = sampler.next()
        drop = torch.rand(len(c), generator=generator) < label_dropout
        c = torch.where(drop, torch.full_like(c, null), c)
        loss = denoising_loss(eps, diffuse(scheduler, x0.to(device), c.to(device), generator))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        ema.step(unet.parameters())
        if step_times is not None:
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize(device)
            step_times.append(time.perf_counter() - t0)
    ema.copy_to(unet.parameters())
    return unet.eval()


def unet_step_seconds(
    data: ImageData, *, preset: str, batch_size: int, device: str | torch.device = "cpu", steps: int = 3
) -> float:
    """The wall time of one :func:`train_unet` step with this preset and batch size, here and now: the
    median of ``steps`` steps of a throwaway model after one warm-up step (the global RNG is restored).
    Steps × this is the estimate printed before a long training run."""
    times: list[float] = []
    with torch.random.fork_rng(devices=[]):
        train_unet(
            data,
            preset=preset,
            steps=steps + 1,
            batch_size=batch_size,
            device=device,
            progress=False,
            step_times=times,
        )
    return statistics.median(times[1:])


def shift_augment(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Random translation by up to ``max_shift`` pixels (pad with −1, i.e. black, then crop)."""
    _, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, len(x)), generator=generator)
    out = torch.empty_like(x)
    for sy in range(2 * max_shift + 1):
        for sx in range(2 * max_shift + 1):
            m = (dy == sy) & (dx == sx)
            out[m] = padded[m, :, sy : sy + h, sx : sx + w]
    return out


def train_classifier(
    data: ImageData,
    *,
    steps: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    val_fraction: float = 0.2,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> tuple[Classifier, float]:
    """Cross-entropy training of the evaluation CNN with ±1 px shifts; returns (model, held-out accuracy)."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + 1)
    perm = torch.randperm(len(data), generator=generator)
    n_val = int(val_fraction * len(data))
    val, train = data.subset(perm[:n_val]), data.subset(perm[n_val:])
    c, h, _ = data.image_shape
    model = Classifier(c, h, data.num_classes).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    sampler = BatchSampler(train, batch_size, seed)
    for _ in tqdm(range(steps), desc="train classifier", disable=not progress):
        x, y = sampler.next()
        loss = F.cross_entropy(model(shift_augment(x, 1, generator).to(device)), y.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        val_acc = (model(val.images.to(device)).argmax(-1).cpu() == val.labels).float().mean().item()
    return model, val_acc
