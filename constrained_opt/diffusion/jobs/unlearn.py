"""``constrained-opt unlearn ddpm``: scrub one or several classes from a base DDPM."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..data import ImageData, load_data
from ..evaluation.generated import EvalSettings, evaluate_unet
from ..evaluation.multiclass import (
    as_classes,
    check_batch_holds_every_part,
    check_classes,
    check_per_class_constraints,
    split_forget_classes,
)
from ..methods.registry import method_class
from ..methods.unlearn import UnlearnResult, unlearn
from ..models import save_unet
from ..runtime.device import resolve_device
from ..runtime.io import write_json
from ..runtime.paths import check_output_dir
from ..runtime.provenance import file_digest, provenance
from ..runtime.resume import run_config
from .common import check_steps, load_checked


@dataclass
class UnlearnJob:
    """One ``unlearn ddpm`` run (also the unit of work inside ``demo``); several forget classes are
    forgotten together (:mod:`~constrained_opt.diffusion.evaluation.multiclass`)."""

    method: str
    forget_class: int | tuple[int, ...]
    steps: int = 300
    batch_size: int = 64
    lr: float = 1e-4
    seed: int = 0
    hparams: dict | None = None

    def resolved_hparams(self) -> dict:
        """Every hyperparameter the method runs with (the overrides and the defaults) that acts."""
        return method_class(self.method).Hyper(**(self.hparams or {})).recorded()

    def config(self, **inputs) -> dict:
        """The run's configuration as ``--resume`` compares it (see :mod:`.resume`)."""
        return run_config(
            self.method,
            self.forget_class,
            self.steps,
            self.batch_size,
            self.lr,
            self.seed,
            self.resolved_hparams(),
            **inputs,
        )

    def run(
        self,
        unet,
        retain: ImageData,
        forget: ImageData,
        checkpoint: str | None,
        resume: bool,
        progress: bool = True,
        inputs: dict | None = None,
        cache: str | None = None,
    ) -> UnlearnResult:
        return unlearn(
            self.method,
            unet,
            retain,
            forget,
            self.forget_class,
            steps=self.steps,
            batch_size=self.batch_size,
            lr=self.lr,
            seed=self.seed,
            hparams=self.hparams,
            checkpoint=checkpoint,
            resume=resume,
            progress=progress,
            inputs=inputs,
            cache=cache,
        )


def result_record(job: UnlearnJob, result: UnlearnResult) -> dict:
    return {
        "time_s": result.time_s,
        "prep_s": result.prep_s,
        "prep_cached": result.prep_cached,
        "peak_mem_mb": result.peak_mem_mb,
        "steps": job.steps,
        "batch_size": job.batch_size,
        "lr": job.lr,
        "hparams": job.resolved_hparams(),
    }


def unlearn_ddpm(
    data_spec: str,
    checkpoint: str,
    out: str,
    job: UnlearnJob,
    *,
    classifier: str | None = None,
    es: EvalSettings | None = None,
    image_size: int = 32,
    device: str = "auto",
    resume: bool = False,
    progress: bool = True,
) -> dict:
    """Scrub one class; writes ``model.safetensors``, ``history.json`` and (with a classifier)
    ``metrics.json`` into ``out``. The resumable state lives in ``out/checkpoint.safetensors`` until
    the run completes. Every setting is checked before ``out`` is created."""
    check_steps(job.steps, job.batch_size)
    classes = as_classes(job.forget_class)
    check_batch_holds_every_part(job.batch_size, len(classes))
    if job.method == "erasediff_per_class":
        check_per_class_constraints(classes)
    check_output_dir(out)
    dev = resolve_device(device)
    data = load_data(data_spec, image_size)
    check_classes(job.forget_class, data.num_classes)
    unet, clf, base_provenance = load_checked(data, checkpoint, classifier, dev)
    retain, forget = split_forget_classes(data, job.forget_class)
    state_path = os.path.join(out, "checkpoint.safetensors")
    os.makedirs(out, exist_ok=True)
    inputs = {"data": data_spec, "base": file_digest(checkpoint)}
    if data_spec.startswith("imagefolder"):
        inputs["image_size"] = image_size
    result = job.run(unet, retain, forget, state_path, resume, progress, inputs)
    record = result_record(job, result)
    save_unet(
        os.path.join(out, "model.safetensors"),
        result.unet,
        provenance(
            base=checkpoint,
            base_provenance=base_provenance,
            method=job.method,
            forget_class=job.forget_class,
            seed=job.seed,
            **record,
        ),
    )
    write_json(os.path.join(out, "history.json"), result.history)
    if clf is not None:
        metrics, _, _ = evaluate_unet(
            result.unet, clf, data, job.forget_class, es or EvalSettings(), job.method, progress=progress
        )
        record = {**metrics, **record}
        write_json(os.path.join(out, "metrics.json"), {job.method: record})
    if os.path.exists(state_path):
        os.remove(state_path)
    return record
