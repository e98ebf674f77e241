"""``constrained-opt train-base``: the base DDPM and the evaluation classifier, and the base and
Retrain checkpoints the demo starts from (shipped, or trained here and cached)."""

from __future__ import annotations

import os

from ..data import check_class, load_data, split_forget
from ..models import (
    UNET_PRESETS,
    default_preset,
    load_unet,
    save_classifier,
    save_unet,
    shipped,
    shipped_retrain,
)
from ..runtime.device import resolve_device
from ..runtime.errors import UsageError
from ..runtime.io import write_json
from ..runtime.paths import check_output_dir
from ..runtime.provenance import file_digest, provenance
from ..train import train_classifier, train_unet, unet_step_seconds
from .common import check_steps


def train_base(
    data_spec: str,
    out: str,
    *,
    what: str = "both",
    unet_steps: int = 3000,
    classifier_steps: int = 1500,
    batch_size: int = 128,
    lr: float = 1e-3,
    preset: str | None = None,
    seed: int = 0,
    image_size: int = 32,
    exclude_class: int | None = None,
    device: str = "auto",
    progress: bool = True,
) -> dict[str, str]:
    """Train the base DDPM and/or the evaluation classifier; writes ``unet.safetensors``,
    ``classifier.safetensors`` and ``provenance.json`` into ``out``. Returns the written paths.

    ``exclude_class = c`` trains the UNet on D \\ D_c with the same seeded recipe: the *Retrain*
    reference of unlearning (the model that never saw class c). The evaluation classifier must see
    every class, so it cannot be combined with ``what`` = classifier/both.
    """
    check_steps(min(unet_steps, classifier_steps), batch_size)
    if exclude_class is not None and what != "unet":
        raise UsageError(
            "--exclude-class trains a Retrain UNet only (the evaluation classifier must see every class); "
            "use --what unet"
        )
    check_output_dir(out)
    dev = resolve_device(device)
    data = load_data(data_spec, image_size)
    if exclude_class is not None:
        check_class(exclude_class, data.num_classes)
    preset = preset or default_preset(data.name)
    if preset not in UNET_PRESETS:
        raise UsageError(f"unknown model preset {preset!r}; expected one of {', '.join(UNET_PRESETS)}")
    written, record = {}, {}
    if what in ("classifier", "both"):
        classifier, val_acc = train_classifier(
            data, steps=classifier_steps, batch_size=batch_size, seed=seed, device=dev, progress=progress
        )
        record["classifier"] = provenance(
            data=data_spec,
            seed=seed,
            steps=classifier_steps,
            batch_size=batch_size,
            lr=1e-3,
            val_accuracy=round(val_acc, 4),
        )
        written["classifier"] = os.path.join(out, "classifier.safetensors")
        save_classifier(written["classifier"], classifier.cpu(), record["classifier"])
    if what in ("unet", "both"):
        unet_data = data if exclude_class is None else split_forget(data, exclude_class)[0]
        unet = train_unet(
            unet_data,
            preset=preset,
            steps=unet_steps,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            device=dev,
            progress=progress,
        )
        record["unet"] = provenance(
            data=data_spec,
            preset=preset,
            seed=seed,
            steps=unet_steps,
            batch_size=batch_size,
            lr=lr,
            label_dropout=0.1,
            ema_decay=0.999,
            parameters=sum(p.numel() for p in unet.parameters()),
            **({} if exclude_class is None else {"exclude_class": exclude_class, "images": len(unet_data)}),
        )
        written["unet"] = os.path.join(out, "unet.safetensors")
        save_unet(written["unet"], unet.cpu(), record["unet"])
    write_json(os.path.join(out, "provenance.json"), record)
    return written


def base_checkpoints(
    data: str, train: bool, seed: int, cache: str, device: str, progress: bool
) -> tuple[str, str]:
    """Shipped checkpoints for ``data``, or (``train``) ones made by ``train_base``, cached per seed."""
    if not train:
        unet, clf = shipped(data, "unet"), shipped(data, "classifier")
        if unet is None or clf is None:
            raise UsageError(f"no shipped base checkpoints for {data}: pass --checkpoint and --classifier")
        return unet, clf
    folder = os.path.join(cache, f"{data}-base-seed{seed}")
    paths = os.path.join(folder, "unet.safetensors"), os.path.join(folder, "classifier.safetensors")
    if not all(os.path.isfile(p) for p in paths):
        print(f"training the base DDPM and the classifier (seed {seed}) into {folder}", flush=True)
        train_base(data, folder, seed=seed, device=device, progress=progress)
    return paths


def retrain_checkpoint(
    data: str, forget_class: int, base_path: str, cache: str, device: str, progress: bool, seed: int = 0
) -> str:
    """The Retrain reference for ``forget_class`` and ``seed``: the shipped one
    (:func:`~..models.shipped_retrain`: the seed's own file, else seed 0's), else one trained here with
    the base model's own recipe (its provenance: preset, seed, steps, batch size, lr) on D without the class,
    cached in ``cache`` under the data, the class and the base checkpoint's digest (which fixes the
    recipe), so it is trained once. Before training it says so, with the expected time: the recipe's
    steps × one step's wall time measured here (:func:`~..train.unet_step_seconds`)."""
    path = shipped_retrain(data, forget_class, seed)
    if path:
        return path
    _, recipe = load_unet(base_path)
    folder = os.path.join(cache, f"{data}-retrain-c{forget_class}-{file_digest(base_path)[:12]}")
    path = os.path.join(folder, "unet.safetensors")
    if not os.path.isfile(path):
        steps, batch_size = recipe.get("steps", 3000), recipe.get("batch_size", 128)
        image_data = load_data(data)
        preset = recipe.get("preset") or default_preset(image_data.name)
        retain = split_forget(image_data, forget_class)[0]
        per_step = unet_step_seconds(
            retain, preset=preset, batch_size=batch_size, device=resolve_device(device)
        )
        print(
            f"no Retrain reference for class {forget_class} is shipped or cached: training it first with "
            f"the base recipe ({steps} steps × batch {batch_size}), about {duration(steps * per_step)} "
            f"here ({per_step:.2f} s/step measured), once: it is cached in {folder}. "
            "--no-retrain skips the Retrain row, --retrain PATH uses your own",
            flush=True,
        )
        train_base(
            data,
            folder,
            what="unet",
            exclude_class=forget_class,
            unet_steps=steps,
            batch_size=batch_size,
            lr=recipe.get("lr", 1e-3),
            preset=recipe.get("preset"),
            seed=recipe.get("seed", 0),
            device=device,
            progress=progress,
        )
    return path


def duration(seconds: float) -> str:
    """``42 s``, ``31 min``, ``2.5 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
