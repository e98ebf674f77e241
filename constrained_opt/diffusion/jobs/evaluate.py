"""``constrained-opt evaluate``: evaluate UNet checkpoints side by side."""

from __future__ import annotations

import os
from dataclasses import asdict

from ..data import check_class, load_data
from ..evaluation.generated import EvalSettings, evaluate_unet
from ..evaluation.report import save_sample_grid, write_report
from ..runtime.device import resolve_device
from ..runtime.errors import UsageError
from ..runtime.io import write_json
from ..runtime.paths import check_output_dir
from .common import load_checked


def evaluate_checkpoints(
    data_spec: str,
    models: dict[str, str],
    classifier: str,
    forget_class: int,
    out: str,
    es: EvalSettings,
    *,
    image_size: int = 32,
    device: str = "auto",
    inception: str | None = None,
    progress: bool = True,
) -> dict[str, dict]:
    """Evaluate named UNet checkpoints side by side; writes ``metrics.json``, ``report.md`` and one sample
    grid per model (beside the first model, which should be the base)."""
    check_output_dir(out)
    dev = resolve_device(device)
    data = load_data(data_spec, image_size)
    check_class(forget_class, data.num_classes)
    if inception and not os.path.isfile(inception):
        raise UsageError(f"Inception weights not found: {inception}")
    loaded = {name: load_checked(data, path, classifier, dev)[:2] for name, path in models.items()}
    results, samples = {}, {}
    for name, (unet, clf) in loaded.items():
        results[name], images, labels = evaluate_unet(
            unet, clf, data, forget_class, es, name, inception, progress
        )
        samples[name] = (images, labels)
    first = next(iter(models))
    figures = []
    for name in models:
        panels = {first: samples[first]} if name == first else {first: samples[first], name: samples[name]}
        figures.append(f"samples_{name}.png")
        save_sample_grid(os.path.join(out, figures[-1]), panels, title=f"forget class {forget_class}")
    write_json(os.path.join(out, "metrics.json"), results)
    write_report(
        os.path.join(out, "report.md"),
        "Evaluation",
        results,
        {"data": data_spec, "forget class": forget_class, **asdict(es), "models": models},
        [],
        figures,
    )
    return results
