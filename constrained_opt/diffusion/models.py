"""Model presets, the evaluation classifier and self-describing safetensors checkpoints.

The denoiser is a diffusers ``UNet2DModel`` with ``num_class_embeds = num_classes + 1``: the last
class index is the *null class* used for classifier-free guidance (trained by label dropout).

A checkpoint is one safetensors file whose metadata holds ``format`` (``unet`` or ``classifier``),
the model ``config`` (JSON) and a ``provenance`` record (seed, steps, data, command). Loading builds
the model from that config and checks it against the data, so a checkpoint for another dataset or
architecture fails with a one-line :class:`UsageError` instead of a stack trace.
"""

from __future__ import annotations

import json
import os
from typing import Any

from torch import Tensor, nn

from .runtime.errors import UsageError
from .runtime.io import load_tensors, save_tensors

ASSETS = os.path.join(os.path.dirname(__file__), "assets")
SHIPPED_UNET = os.path.join(ASSETS, "digits_unet.safetensors")
SHIPPED_CLASSIFIER = os.path.join(ASSETS, "digits_classifier.safetensors")


def shipped(data: str, what: str, forget_class: int | None = None) -> str | None:
    """Path of a checkpoint shipped in ``assets/`` (``what``: unet, classifier, or retrain for a
    forget class), or None when none ships. Names: ``<data>_unet``, ``<data>_classifier``,
    ``<data>_retrain_c<C>`` (``.safetensors``); see assets/README.md for how each was made."""
    name = f"{data}_retrain_c{forget_class}" if what == "retrain" else f"{data}_{what}"
    path = os.path.join(ASSETS, f"{name}.safetensors")
    return path if os.path.isfile(path) else None


def shipped_retrain(data: str, forget_class: int, seed: int = 0) -> str | None:
    """The shipped Retrain reference for ``seed``: ``<data>_retrain_c<C>_s<seed>`` when it ships (seed 0:
    ``<data>_retrain_c<C>``), else the seed-0 file; None when no Retrain file ships for the class."""
    path = os.path.join(ASSETS, f"{data}_retrain_c{forget_class}_s{seed}.safetensors")
    return path if seed and os.path.isfile(path) else shipped(data, "retrain", forget_class)


def shared_retrain_note(files: dict[int, str]) -> str | None:
    """The one-line note when seeds share a Retrain model ({seed: path}): its spread over seeds then
    covers the evaluation and attack seeds only, not the training seed. None when each seed has its own."""
    if len(set(files.values())) == len(files):
        return None
    shared = sorted(s for s in files if list(files.values()).count(files[s]) > 1)
    return (
        f"Retrain: seeds {', '.join(map(str, shared))} share one Retrain model (no per-seed model ships): "
        "its spread over seeds covers the evaluation and attack seeds only, not its training seed."
    )


# UNet2DModel keyword presets; sample_size, channels and num_class_embeds come from the data.
UNET_PRESETS: dict[str, dict[str, Any]] = {
    # ~0.65M parameters, one attention block (the mid block); trains in ~4 min on 2 CPU cores.
    "digits": dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
    ),
    # 28×28 (mnist5k): ~0.69M parameters, three levels 28→14→7 with attention at 7×7. The 16-channel
    # first level keeps a batch-64 training step near 0.6 s on one CPU thread (32 channels: ~3× that).
    "mnist": dict(
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
    ),
    # The paper's (and SA's) CIFAR-10 DDPM: ch 128, ch_mult (1,2,2,2), 2 res blocks, attention at 16×16.
    "cifar10": dict(
        block_out_channels=(128, 256, 256, 256),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        dropout=0.1,
        attention_head_dim=None,
    ),
    # For tests only: a few thousand parameters.
    "tiny": dict(
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=4,
    ),
}


def default_preset(data_name: str) -> str:
    return {"digits": "digits", "mnist5k": "mnist"}.get(data_name, "cifar10")


def build_unet(preset: str, image_shape: tuple[int, int, int], num_classes: int):
    """Class-conditional ``UNet2DModel`` for ``image_shape = (C, H, W)`` with a null class."""
    from diffusers import UNet2DModel

    if preset not in UNET_PRESETS:
        raise UsageError(f"unknown model preset {preset!r}; expected one of {', '.join(UNET_PRESETS)}")
    c, h, w = image_shape
    if h != w:
        raise UsageError(f"square images required, got {h}×{w}")
    return UNet2DModel(
        sample_size=h, in_channels=c, out_channels=c, num_class_embeds=num_classes + 1, **UNET_PRESETS[preset]
    )


def null_class(unet) -> int:
    """Index of the unconditional (null) class embedding."""
    return unet.config.num_class_embeds - 1


class Classifier(nn.Module):
    """Small CNN P_ψ(y|x) on [-1, 1] images; ``features`` is the penultimate layer (used for FID/PR).

    Stages of two 3×3 conv + GroupNorm + SiLU, halving the resolution between stages until 4×4, then
    global average pooling to ``width · 2^(stages−1)`` features and a linear head.
    """

    def __init__(self, in_channels: int, image_size: int, num_classes: int, width: int = 32):
        super().__init__()
        self.config = dict(
            in_channels=in_channels, image_size=image_size, num_classes=num_classes, width=width
        )
        layers: list[nn.Module] = []
        c_in, c_out, size = in_channels, width, image_size
        while True:
            for _ in range(2):
                layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.SiLU()]
                c_in = c_out
            if size <= 4:
                break
            layers.append(nn.AvgPool2d(2))
            size //= 2
            c_out *= 2
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.num_features = c_in
        self.head = nn.Linear(c_in, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def _save(path: str, module: nn.Module, fmt: str, config: dict, provenance: dict) -> None:
    meta = {"format": fmt, "config": json.dumps(config), "provenance": json.dumps(provenance)}
    save_tensors(path, module.state_dict(), meta)


def save_unet(path: str, unet, provenance: dict) -> None:
    _save(path, unet, "unet", dict(unet.config), provenance)


def save_classifier(path: str, classifier: Classifier, provenance: dict) -> None:
    _save(path, classifier, "classifier", classifier.config, provenance)


def _load(path: str, fmt: str) -> tuple[dict[str, Tensor], dict, dict]:
    tensors, meta = load_tensors(path)
    if meta.get("format") != fmt:
        raise UsageError(f"{path} is not a {fmt} checkpoint (format: {meta.get('format', 'unknown')})")
    return tensors, json.loads(meta["config"]), json.loads(meta.get("provenance", "{}"))


def _load_weights(module: nn.Module, tensors: dict[str, Tensor], path: str) -> None:
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise UsageError(f"checkpoint {path} does not match its model configuration: {first}") from None


def load_unet(path: str) -> tuple[Any, dict]:
    """(UNet2DModel, provenance) from a checkpoint written by :func:`save_unet`."""
    from diffusers import UNet2DModel

    tensors, config, provenance = _load(path, "unet")
    try:
        unet = UNet2DModel.from_config(config)
    except (TypeError, ValueError) as e:
        raise UsageError(f"checkpoint {path} has an invalid model configuration: {e}") from None
    _load_weights(unet, tensors, path)
    return unet, provenance


def load_classifier(path: str) -> tuple[Classifier, dict]:
    tensors, config, provenance = _load(path, "classifier")
    classifier = Classifier(**config)
    _load_weights(classifier, tensors, path)
    return classifier.eval(), provenance


def check_unet_matches(unet, image_shape: tuple[int, int, int], num_classes: int, path: str) -> None:
    """The UNet must take ``image_shape`` and embed ``num_classes`` + 1 (null) classes."""
    cfg = unet.config
    got = (cfg.in_channels, cfg.sample_size, cfg.sample_size, cfg.num_class_embeds)
    want = (*image_shape, num_classes + 1)
    if tuple(got) != want:
        raise UsageError(
            f"checkpoint {path} does not match the data: model (C,H,W,classes+null)={got}, data needs {want}"
        )


def check_classifier_matches(
    classifier: Classifier, image_shape: tuple[int, int, int], num_classes: int, path: str
) -> None:
    cfg = classifier.config
    got = (cfg["in_channels"], cfg["image_size"], cfg["image_size"], cfg["num_classes"])
    if got != (*image_shape, num_classes):
        raise UsageError(
            f"classifier {path} does not match the data: (C,H,W,classes)={got}, data has "
            f"{(*image_shape, num_classes)}"
        )
