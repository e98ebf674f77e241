"""What every DDPM job checks first: step counts, and that the checkpoints fit the data."""

from __future__ import annotations

import torch

from ..data import ImageData
from ..models import check_classifier_matches, check_unet_matches, load_classifier, load_unet
from ..runtime.errors import UsageError


def check_steps(steps: int, batch_size: int) -> None:
    if steps < 1 or batch_size < 1:
        raise UsageError(f"steps and batch size must be positive, got {steps} and {batch_size}")


def load_checked(data: ImageData, unet_path: str, classifier_path: str | None, device: torch.device):
    """Load the base UNet (and the classifier) and check both match ``data``."""
    unet, provenance = load_unet(unet_path)
    check_unet_matches(unet, data.image_shape, data.num_classes, unet_path)
    classifier = None
    if classifier_path is not None:
        classifier, _ = load_classifier(classifier_path)
        check_classifier_matches(classifier, data.image_shape, data.num_classes, classifier_path)
        classifier = classifier.to(device)
    return unet.to(device).eval(), classifier, provenance
