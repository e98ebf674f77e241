"""The ``constrained-opt sd`` jobs: generate images for a prompt set, and score image folders (NudeNet
counts, unlearning accuracy, CLIP score, Inception FID) with :mod:`constrained_opt.diffusion.sd.evaluate`."""

from __future__ import annotations

import os

from ..runtime.errors import UsageError


def generate(
    model: str,
    prompts: str,
    out: str,
    *,
    unet: str | None = None,
    lora: str | None = None,
    config: str | None = None,
    original_config: str | None = None,
    offline: bool = False,
    per_prompt: int = 1,
    steps: int = 50,
    guidance: float = 7.5,
    seed: int = 0,
    resolution: int | None = None,
    limit: int | None = None,
    batch_size: int = 4,
    dtype: str = "fp32",
    device: str = "auto",
    progress: bool = True,
) -> tuple[int, str]:
    """``per_prompt`` images for every row of ``prompts`` (an I2P-format CSV or a shipped set) into
    ``out/images`` and ``out/manifest.csv``; every input is checked before the model loads. Returns the
    number of images and the manifest's path."""
    import torch

    from ..runtime.device import resolve_device
    from ..runtime.paths import check_output_dir
    from ..sd.evaluate import BUILTIN_PROMPTS, builtin_prompt_rows, generate_images, read_prompt_csv
    from ..sd.loading import check_model_arg, load_pipeline
    from ..sd.lora import check_lora_path, load_lora

    check_model_arg(model, config, original_config, offline)
    if resolution is not None and resolution % 8:
        raise UsageError(f"--resolution must be a multiple of 8 (the VAE downsamples by 8), got {resolution}")
    if unet and not os.path.isfile(os.path.join(unet, "config.json")):
        raise UsageError(f"{unet} is not a diffusers UNet folder (no config.json)")
    if lora:
        check_lora_path(lora)
    if prompts in BUILTIN_PROMPTS:
        rows = builtin_prompt_rows(prompts, seed=seed, guidance=guidance)[:limit]
    else:
        rows = read_prompt_csv(prompts, seed=seed, guidance=guidance, limit=limit)
    check_output_dir(out)
    dev = resolve_device(device)
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    pipe = load_pipeline(
        model, config=config, original_config=original_config, offline=offline, dtype=torch_dtype
    )
    if unet:
        from diffusers import UNet2DConditionModel

        pipe.unet = UNet2DConditionModel.from_pretrained(unet, dtype=torch_dtype)
    if lora:
        load_lora(pipe, lora)
    manifest = generate_images(
        pipe.to(dev),
        rows,
        out,
        per_prompt=per_prompt,
        steps=steps,
        resolution=resolution,
        batch_size=batch_size,
        progress=progress,
    )
    return len(rows) * per_prompt, manifest


def nudenet(images: str, threshold: float = 0.6, progress: bool = True) -> dict:
    """NudeNet's exposed-part counts over the images of a folder (:func:`~..sd.evaluate.nudenet_counts`)."""
    from ..sd.evaluate import list_images, nudenet_counts

    return nudenet_counts(list_images(images), threshold, progress=progress)


def ua(
    images: str,
    forget_class: str,
    classifier: str,
    arch: str = "resnet50",
    batch_size: int = 32,
    device: str = "auto",
    progress: bool = True,
) -> tuple[str, dict]:
    """Unlearning accuracy of a folder of images of ``forget_class`` under a torchvision ImageNet
    classifier; returns the canonical class name and the result."""
    from ..runtime.device import resolve_device
    from ..sd.evaluate import list_images, load_imagenet_classifier, unlearning_accuracy
    from ..sd.prompts import canonical_class

    forget_class = canonical_class(forget_class)
    entries = list_images(images)
    model, transforms = load_imagenet_classifier(classifier, arch)
    model = model.to(resolve_device(device))
    return forget_class, unlearning_accuracy(entries, model, transforms, forget_class, batch_size, progress)


def clip(images: str, clip_path: str, batch_size: int = 32, progress: bool = True) -> dict:
    """CLIP score of a ``sd generate`` folder against the prompts of its manifest."""
    from ..sd.evaluate import clip_score, list_images

    entries = list_images(images)
    return {"clip_score": clip_score(entries, clip_path, batch_size, progress), "images": len(entries)}


def fid(
    images: str, reference: str, inception_weights: str, batch_size: int = 50, progress: bool = True
) -> dict:
    """Inception FID between a folder of generated images and a folder of reference images."""
    from ..sd.evaluate import fid_folders, inception_fid_metric, list_images

    fake, real = list_images(images), list_images(reference)
    value = fid_folders(
        real, fake, inception_fid_metric(inception_weights), batch_size=batch_size, progress=progress
    )
    return {"fid": value, "generated": len(fake), "reference": len(real)}
