"""``constrained-opt attack ddpm``: attack one or several DDPM checkpoints and write the report."""

from __future__ import annotations

import dataclasses
import os

from ..attacks.common import Budget
from ..attacks.ddpm import ATTACKS, cached_attack
from ..attacks.report import attack_table, report_line, save_attack_grid, summary
from ..data import check_class, load_data, split_forget
from ..models import check_classifier_matches, check_unet_matches, load_classifier, load_unet
from ..runtime.device import resolve_device
from ..runtime.errors import UsageError
from ..runtime.io import write_json, write_text
from ..runtime.paths import check_output_dir


def list_models(specs: list[str]) -> dict[str, str]:
    """``--model`` arguments (files or folders of ``*.safetensors``) → {name (file stem): path}."""
    models: dict[str, str] = {}
    for spec in specs:
        if os.path.isdir(spec):
            files = sorted(f for f in os.listdir(spec) if f.endswith(".safetensors"))
            if not files:
                raise UsageError(f"no .safetensors models in {spec}")
            paths = [os.path.join(spec, f) for f in files]
        elif os.path.isfile(spec):
            paths = [spec]
        else:
            raise UsageError(f"model not found: {spec}")
        for path in paths:
            name = os.path.splitext(os.path.basename(path))[0]
            if name in models:
                raise UsageError(f"two models are named {name!r} ({models[name]}, {path}); rename one")
            models[name] = path
    return models


def attack_ddpm(
    data_spec: str,
    models: list[str],
    classifier_path: str,
    forget_class: int,
    out: str,
    *,
    attacks: tuple[str, ...] = ATTACKS,
    budget: Budget | None = None,
    image_size: int = 32,
    device: str = "auto",
    resume: bool = False,
    progress: bool = True,
) -> dict[str, dict[str, dict]]:
    """``constrained-opt attack ddpm``: attack each model; returns {model: {attack: record}}.

    One model: ``out/attack.json`` ({attack: record}), ``out/attack_samples.png``, ``out/report.md``.
    Several (``models`` holds folders or several files): the same two files in ``out/<model>/`` for each,
    plus ``out/attacks.json`` ({model: {attack: record}}) and ``out/report.md`` with one row per model.
    ``out/state/<model>.json`` keeps each model's results; ``resume`` skips the models already attacked
    with the same checkpoint, attacks and budget. Every input is loaded and checked before anything is
    written.
    """
    budget = budget or Budget()
    check_output_dir(out)
    dev = resolve_device(device)
    data = load_data(data_spec, image_size)
    check_class(forget_class, data.num_classes)
    paths = list_models(models)
    unets = {}
    for name, path in paths.items():
        unet, _ = load_unet(path)
        check_unet_matches(unet, data.image_shape, data.num_classes, path)
        unets[name] = unet.to(dev).eval()
    classifier, _ = load_classifier(classifier_path)
    check_classifier_matches(classifier, data.image_shape, data.num_classes, classifier_path)
    classifier = classifier.to(dev)
    split_forget(data, forget_class)
    for n in (
        budget.num_images if {"inversion", "mixture"} & set(attacks) else 0,
        budget.relearn_images if "relearn" in attacks else 0,
    ):
        if n > int((data.labels == forget_class).sum()):
            raise UsageError(f"attack budget asks for {n} images of class {forget_class}, the data has fewer")

    single = len(unets) == 1
    everything, lines = {}, []
    for name, unet in unets.items():
        folder = out if single else os.path.join(out, name)
        state = os.path.join(out, "state", f"{name}.json")
        results, samples = cached_attack(
            paths[name],
            classifier,
            data,
            forget_class,
            attacks,
            budget,
            state,
            resume=resume,
            unet=unet,
            progress=progress,
        )
        if samples is not None:  # else reused: its files are there from the previous run
            write_json(os.path.join(folder, "attack.json"), results)
            save_attack_grid(
                os.path.join(folder, "attack_samples.png"),
                samples,
                f"{name}: samples for class {forget_class} under each attack (seed {budget.seed})",
            )
        everything[name] = results
        lines.append(report_line(name, results))
        print(lines[-1], flush=True)
    if not single:
        write_json(os.path.join(out, "attacks.json"), everything)
    rows = {name: {"p_forget": r["none"]["p_forget"], **summary(r)} for name, r in everything.items()}
    settings = {
        "data": data_spec,
        "forget class": forget_class,
        "models": paths,
        **dataclasses.asdict(budget),
    }
    text = ["# Attacks on the erased class", "", "## Settings", ""]
    text += [f"- {k}: `{v}`" for k, v in settings.items()]
    text += ["", "## P(y = c_f) under attack", "", attack_table(rows), *(f"- {line}" for line in lines)]
    write_text(os.path.join(out, "report.md"), "\n".join(text) + "\n")
    return everything
