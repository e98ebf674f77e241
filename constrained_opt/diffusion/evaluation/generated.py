"""Evaluating a UNet by sampling it: :class:`EvalSettings` and the metrics of one model's samples."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..data import ImageData
from ..runtime.errors import EvaluationError, UsageError
from ..sampling import NUM_TRAIN_TIMESTEPS, SAMPLERS, sample
from .multiclass import evaluate_classes, is_forgotten


@dataclass(frozen=True)
class EvalSettings:
    """How models are sampled for evaluation: ``per_class`` images per class, same x_T for every model."""

    per_class: int = 100
    sampler: str = "ddim"
    num_steps: int = 50
    guidance: float = 2.0
    seed: int = 0

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise UsageError(f"unknown sampler {self.sampler!r}; expected one of {', '.join(SAMPLERS)}")
        if self.per_class < 4:
            raise UsageError("need at least 4 evaluation samples per class (k = 3 precision/recall)")
        if not 1 <= self.num_steps <= NUM_TRAIN_TIMESTEPS:
            raise UsageError(f"sampling steps must be in [1, {NUM_TRAIN_TIMESTEPS}], got {self.num_steps}")
        if not (math.isfinite(self.guidance) and self.guidance >= 0):
            raise UsageError(f"guidance must be a finite number ≥ 0, got {self.guidance}")


def generate(
    unet, num_classes: int, es: EvalSettings, desc: str, progress: bool = True
) -> tuple[Tensor, Tensor]:
    labels = torch.arange(num_classes).repeat_interleave(es.per_class)
    images = sample(
        unet,
        labels,
        sampler=es.sampler,
        num_steps=es.num_steps,
        guidance=es.guidance,
        seed=es.seed,
        desc=desc,
        progress=progress,
    )
    return images, labels


def evaluate_unet(
    unet,
    classifier,
    data: ImageData,
    forget_class: int | tuple[int, ...],
    es: EvalSettings,
    desc: str,
    inception: str | None = None,
    progress: bool = True,
) -> tuple[dict, Tensor, Tensor]:
    """(metrics, samples, labels) for one model; FID/PR against the real images of the remaining classes.

    A model whose samples or features are not finite gets ``{"failed": reason}`` as its metrics (a
    failed row in the report) instead of stopping the job.
    """
    images, labels = generate(unet, data.num_classes, es, desc, progress)
    real = data.images[~is_forgotten(data.labels, forget_class)]
    try:
        metrics = evaluate_classes(classifier, images, labels, real, forget_class, inception)
    except EvaluationError as e:
        print(f"{desc}: evaluation failed: {e}", flush=True)
        metrics = {"failed": str(e)}
    return metrics, images, labels
