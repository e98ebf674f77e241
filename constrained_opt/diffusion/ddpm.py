"""DDPM class unlearning end to end: the ``train-base``, ``unlearn ddpm``, ``evaluate`` and ``demo`` jobs.

Every job validates all of its inputs (data, class, method, checkpoints, paths) before it writes
anything, so a bad invocation fails with one :class:`UsageError` line and leaves no files behind.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from .baselines import BASELINES, UnlearnResult, method_class, unlearn
from .comparison import MATCHED, Run, aggregate, plan_runs
from .data import ImageData, check_class, load_data, split_forget
from .metrics import (
    METRICS,
    bootstrap_ci95,
    classifier_features,
    metrics_from_scores,
    real_split_floor,
    score_samples,
)
from .models import (
    UNET_PRESETS,
    check_classifier_matches,
    check_unet_matches,
    default_preset,
    load_classifier,
    load_unet,
    save_classifier,
    save_unet,
    shipped,
)
from .multiclass import check_classes, evaluate_classes, is_forgotten, split_forget_classes
from .report import DISPLAY, gap_table, metrics_table, save_cosine_plot, save_sample_grid, write_report
from .resume import check_resume, run_config
from .runtime.device import resolve_device
from .runtime.errors import EvaluationError, UsageError
from .runtime.io import load_state, read_json, save_state, write_json, write_text
from .runtime.paths import cache_dir, check_output_dir
from .sampling import NUM_TRAIN_TIMESTEPS, SAMPLERS, sample
from .train import train_classifier, train_unet

METRIC_KEYS = (
    "p_forget",
    "forget_entropy",
    "remaining_accuracy",
    "fid",
    "precision",
    "recall",
    "time_s",
    "peak_mem_mb",
)


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


def provenance(**fields) -> dict:
    import diffusers

    return {
        **fields,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs",
    }


# ------------------------------------------------------------------------------------------- train-base
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


# ------------------------------------------------------------------------------------------- evaluation
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


def _file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# ------------------------------------------------------------------------------------------- unlearn ddpm
@dataclass
class UnlearnJob:
    """One ``unlearn ddpm`` run (also the unit of work inside ``demo``); several forget classes are
    forgotten together (:mod:`~constrained_opt.diffusion.multiclass`)."""

    method: str
    forget_class: int | tuple[int, ...]
    steps: int = 300
    batch_size: int = 64
    lr: float = 1e-4
    seed: int = 0
    hparams: dict | None = None

    def resolved_hparams(self) -> dict:
        """Every hyperparameter the method runs with: the overrides and the defaults."""
        return asdict(method_class(self.method).Hyper(**(self.hparams or {})))

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
    the run completes."""
    check_steps(job.steps, job.batch_size)
    check_output_dir(out)
    dev = resolve_device(device)
    data = load_data(data_spec, image_size)
    check_classes(job.forget_class, data.num_classes)
    unet, clf, base_provenance = load_checked(data, checkpoint, classifier, dev)
    retain, forget = split_forget_classes(data, job.forget_class)
    state_path = os.path.join(out, "checkpoint.safetensors")
    os.makedirs(out, exist_ok=True)
    inputs = {"data": data_spec, "base": _file_digest(checkpoint)}
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


# ------------------------------------------------------------------------------------------- evaluate
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


# ------------------------------------------------------------------------------------------- demo
DEMO_DATA = ("digits", "mnist5k")  # the embedded data sets the demo runs on


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
    data: str, forget_class: int, base_path: str, cache: str, device: str, progress: bool
) -> str:
    """The Retrain reference for ``forget_class``: the shipped one, else one trained here with the base
    model's own recipe (its provenance: preset, seed, steps, batch size, lr) on D without the class,
    cached in ``cache``. Training takes as long as the base model's did (tqdm shows progress)."""
    path = shipped(data, "retrain", forget_class)
    if path:
        return path
    _, recipe = load_unet(base_path)
    folder = os.path.join(cache, f"{data}-retrain-c{forget_class}-{_file_digest(base_path)[:12]}")
    path = os.path.join(folder, "unet.safetensors")
    if not os.path.isfile(path):
        print(
            f"training the Retrain reference (no class {forget_class}, the base recipe) into {folder}",
            flush=True,
        )
        train_base(
            data,
            folder,
            what="unet",
            exclude_class=forget_class,
            unet_steps=recipe.get("steps", 3000),
            batch_size=recipe.get("batch_size", 128),
            lr=recipe.get("lr", 1e-3),
            preset=recipe.get("preset"),
            seed=recipe.get("seed", 0),
            device=device,
            progress=progress,
        )
    return path


def _eval_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class DemoContext:
    """What every seed of a demo shares: data, models, settings, folders."""

    data: ImageData
    data_name: str
    forget_class: int
    unet: object
    classifier: object
    classifier_path: str
    classifier_digest: str  # SHA-256 of the classifier file: part of every row's configuration
    references: dict[str, str]  # "base"/"retrain" → checkpoint path
    runs: list[Run]
    lr: float
    es: EvalSettings
    bootstrap: int
    cache: str
    resume: bool
    progress: bool
    inputs: dict  # identify the data and base model in each run's configuration (see .resume)
    attacks: bool = False  # also attack every model (demo --attacks)


def evaluate_reference(ctx: DemoContext, name: str, es: EvalSettings) -> dict:
    """Metrics (and bootstrap half-widths) of the base or Retrain model, cached across runs by the
    checkpoint and classifier digests, the settings and the class."""
    path = ctx.references[name]
    key = _eval_key(
        "no-fake-zeros",
        _file_digest(path),
        ctx.classifier_digest,
        asdict(es),
        ctx.forget_class,
        ctx.bootstrap,
    )
    cached = os.path.join(ctx.cache, f"{name}-eval-{key}.safetensors")
    if os.path.isfile(cached):
        print(f"{name} model: evaluation cached in {cached}", flush=True)
        return load_state(cached)
    unet = (
        ctx.unet
        if name == "base"
        else load_checked(ctx.data, path, None, next(ctx.unet.parameters()).device)[0]
    )
    metrics, images, labels, ci = evaluate_model(unet, ctx, es, name)
    # no time or memory: the reference models have no unlearning stage
    entry = {"metrics": {**metrics, **({"ci95": ci} if ci else {})}, "images": images, "labels": labels}
    save_state(cached, entry)
    return entry


def evaluate_model(unet, ctx: DemoContext, es: EvalSettings, desc: str) -> tuple[dict, Tensor, Tensor, dict]:
    """(metrics, samples, labels, bootstrap half-widths or {}) for one model; a model whose samples or
    features are not finite gets ``{"failed": reason}`` as its metrics instead of stopping the demo."""
    images, labels = generate(unet, ctx.data.num_classes, es, f"eval {desc}", ctx.progress)
    real = ctx.data.images[ctx.data.labels != ctx.forget_class]
    try:
        scores = score_samples(ctx.classifier, images, labels, real, ctx.forget_class)
    except EvaluationError as e:
        print(f"{desc}: evaluation failed: {e}", flush=True)
        return {"failed": str(e)}, images, labels, {}
    ci = bootstrap_ci95(scores, ctx.bootstrap, es.seed) if ctx.bootstrap else {}
    return metrics_from_scores(scores), images, labels, ci


def run_job(ctx: DemoContext, run: Run, seed: int, hparams: dict) -> tuple[UnlearnJob, dict]:
    """The job of ``run`` on ``seed`` and its configuration as ``--resume`` checks it (the run's
    settings, the data, base model and classifier digests, the evaluation settings)."""
    job = UnlearnJob(run.method, ctx.forget_class, run.steps, run.batch_size, ctx.lr, seed, hparams)
    evaluation = asdict(dataclasses.replace(ctx.es, seed=seed))
    config = {**job.config(**ctx.inputs), "classifier": ctx.classifier_digest}
    return job, {**config, "evaluation": evaluation}


def seed_dir(out: str, seed: int, n_seeds: int) -> str:
    """Where a seed's models, samples and state go: ``out`` itself for one seed, else ``out/seed<s>``."""
    return out if n_seeds == 1 else os.path.join(out, f"seed{seed}")


def check_done_rows(ctx: DemoContext, seeds: range, out: str) -> None:
    """Before anything runs: every finished row that ``--resume`` would reuse was made with this
    configuration (a MATCHED row, whose weight comes from EraseDiff's run, is checked when reused)."""
    for seed in seeds:
        state_dir = os.path.join(seed_dir(out, seed, len(seeds)), "state")
        for run in ctx.runs:
            done = os.path.join(state_dir, f"{run.label}.json")
            if run.label != MATCHED and os.path.isfile(done):
                stored = read_json(done).get("config")
                check_resume(
                    done, stored, run_job(ctx, run, seed, dict(run.hparams))[1], hp_prefix=f"{run.label}."
                )


def run_seed(ctx: DemoContext, seed: int, out: str) -> tuple[dict[str, dict], dict[str, list]]:
    """Every model of one seed (unlearning seed = evaluation seed = ``seed``), written into ``out``
    (``models/``, ``samples_<label>.png``, ``state/``, ``metrics.json``). Returns (records, histories)."""
    es = dataclasses.replace(ctx.es, seed=seed)
    state_dir = os.path.join(out, "state")
    os.makedirs(state_dir, exist_ok=True)
    refs = {name: evaluate_reference(ctx, name, es) for name in ctx.references}
    results = {name: ref["metrics"] for name, ref in refs.items()}
    histories: dict[str, list] = {}
    retain, forget = split_forget(ctx.data, ctx.forget_class)
    for run in ctx.runs:
        done = os.path.join(state_dir, f"{run.label}.json")
        hparams = dict(run.hparams)
        if run.label == MATCHED:
            hparams["forget_weight"] = statistics.fmean(h["lam"] for h in histories["erasediff"])
        job, config = run_job(ctx, run, seed, hparams)
        if ctx.resume and os.path.isfile(done):
            record = read_json(done)
            check_resume(done, record.get("config"), config, hp_prefix=f"{run.label}.")
            print(f"{run.label} (seed {seed}): done in a previous run, reusing {done}", flush=True)
        else:
            ckpt = os.path.join(state_dir, f"{run.label}.checkpoint.safetensors")
            result = job.run(ctx.unet, retain, forget, ckpt, ctx.resume, ctx.progress, ctx.inputs, ctx.cache)
            save_unet(
                os.path.join(out, "models", f"{run.label}.safetensors"),
                result.unet,
                provenance(
                    base=ctx.references["base"],
                    method=run.method,
                    label=run.label,
                    forget_class=ctx.forget_class,
                    seed=seed,
                    **result_record(job, result),
                ),
            )
            metrics, images, labels, ci = evaluate_model(result.unet, ctx, es, run.label)
            save_sample_grid(
                os.path.join(out, f"samples_{run.label}.png"),
                {"base": (refs["base"]["images"], refs["base"]["labels"]), run.label: (images, labels)},
                title=f"forget class {ctx.forget_class}: base vs {run.label} (seed {seed})",
            )
            record = {
                "config": config,
                "metrics": {**metrics, **({"ci95": ci} if ci else {}), **result_record(job, result)},
                "history": result.history,
            }
            write_json(done, record)
            if os.path.exists(ckpt):
                os.remove(ckpt)
        results[run.label] = record["metrics"]
        histories[run.label] = record["history"]
        m = results[run.label]
        if "failed" not in m:
            print(
                f"{run.label} (seed {seed}): P(y=c_f|x_f) {m['p_forget']:.3f}, remaining acc "
                f"{m['remaining_accuracy']:.3f}, FID {m['fid']:.3f}",
                flush=True,
            )
    if ctx.attacks:
        from .attacks.ddpm import demo_attacks

        models = {
            **ctx.references,
            **{r.label: os.path.join(out, "models", f"{r.label}.safetensors") for r in ctx.runs},
        }
        models = {name: path for name, path in models.items() if "failed" not in results[name]}
        attacked = demo_attacks(
            models,
            ctx.classifier,
            ctx.data,
            ctx.forget_class,
            seed=seed,
            state_dir=state_dir,
            resume=ctx.resume,
            progress=ctx.progress,
        )
        for name, figures in attacked.items():
            results[name] = {**results[name], **figures}
    if "retrain" in refs:
        save_sample_grid(
            os.path.join(out, "samples_retrain.png"),
            {name: (refs[name]["images"], refs[name]["labels"]) for name in ("base", "retrain")},
            title=f"forget class {ctx.forget_class}: base vs Retrain (seed {seed})",
        )
    if "erasediff" in histories and "moo" in histories:
        save_cosine_plot(
            os.path.join(out, "fig2_cosines.png"), {m: histories[m] for m in ("erasediff", "moo")}
        )
    write_json(os.path.join(out, "metrics.json"), results)
    return results, histories


def demo(
    *,
    data: str = "digits",
    forget_class: int = 0,
    seed: int = 0,
    seeds: int = 1,
    out: str = "runs/demo",
    methods: tuple[str, ...] = BASELINES,
    variants: tuple[str, ...] = (),
    steps: int = 300,
    batch_size: int = 64,
    published_budgets: bool = False,
    budgets: tuple[str, ...] = (),
    lr: float = 1e-4,
    forget_target: str = "rl",
    hp: tuple[str, ...] = (),
    es: EvalSettings | None = None,
    bootstrap: int = 0,
    retrain: bool | str = True,
    device: str = "auto",
    resume: bool = False,
    train: bool = False,
    checkpoint: str | None = None,
    classifier: str | None = None,
    cache: str | None = None,
    attacks: bool = False,
    progress: bool = True,
) -> dict[str, dict]:
    """Forget one class with EraseDiff and ``methods`` over ``seeds`` seeds; evaluate; write the report.

    Models: the base model, the Retrain reference (``retrain``: True = shipped or trained here with the
    base recipe; a path; False = none), and one model per run of :func:`~.comparison.plan_runs`. Seed s
    (``seed`` … ``seed + seeds − 1``) is both the unlearning and the evaluation seed.

    Layout of ``out`` with one seed: ``metrics.json``, ``table.md``, ``report.md``, ``noise_floor.json``,
    ``samples_<label>.png``, ``fig2_cosines.png``, ``models/<label>.safetensors`` and ``state/``
    (per-model results that ``resume`` reuses, and the checkpoint of an interrupted run). With several
    seeds each seed gets that layout in ``out/seed<s>/`` and the top-level ``metrics.json`` holds, per
    label, the means under the usual keys plus ``ci95`` (95% Student-t half-widths over seeds),
    ``gap_to_retrain`` and, for EraseDiff-like runs, the distribution of λ. ``bootstrap`` > 0 adds
    bootstrap half-widths over the evaluation samples (used as ``ci95`` when there is one seed).
    ``attacks``: also attack every model of every seed (:func:`.attacks.ddpm.demo_attacks`: base, Retrain and
    each run whose evaluation did not fail), adding ``attack_*`` keys and an "under attack" table.
    """
    t_start = time.perf_counter()
    es = es or EvalSettings(seed=seed)
    check_steps(steps, batch_size)
    if seeds < 1 or bootstrap < 0:
        raise UsageError(f"--seeds must be ≥ 1 and --bootstrap ≥ 0, got {seeds} and {bootstrap}")
    if data not in DEMO_DATA:
        raise UsageError(f"the demo runs on {' or '.join(DEMO_DATA)}, got {data!r}")
    check_output_dir(out)
    dev = resolve_device(device)
    image_data = load_data(data)
    check_class(forget_class, image_data.num_classes)
    runs = plan_runs(
        methods,
        variants=variants,
        hp=hp,
        forget_target=forget_target,
        steps=steps,
        batch_size=batch_size,
        published=published_budgets,
        budgets=budgets,
    )
    cache = cache_dir(cache)
    if train and (checkpoint or classifier):
        raise UsageError(
            "--train-base trains its own base models; do not also pass --checkpoint/--classifier"
        )
    if checkpoint and classifier:
        unet_path, clf_path = checkpoint, classifier
    else:
        defaults = base_checkpoints(data, train, seed, cache, device, progress)
        unet_path, clf_path = checkpoint or defaults[0], classifier or defaults[1]
    unet, clf, _ = load_checked(image_data, unet_path, clf_path, dev)
    ctx = DemoContext(
        image_data,
        data,
        forget_class,
        unet,
        clf,
        clf_path,
        _file_digest(clf_path),
        {"base": unet_path},
        runs,
        lr,
        es,
        bootstrap,
        cache,
        resume,
        progress,
        {"data": data, "base": _file_digest(unet_path)},
        attacks,
    )
    if resume:  # before the Retrain reference, which may take as long as the base model to train
        check_done_rows(ctx, range(seed, seed + seeds), out)
    if retrain:
        ctx.references["retrain"] = (
            retrain
            if isinstance(retrain, str)
            else retrain_checkpoint(data, forget_class, unet_path, cache, device, progress)
        )
        load_checked(image_data, ctx.references["retrain"], None, dev)
    references = ctx.references

    per_seed, histories = [], {}
    for s in range(seed, seed + seeds):
        results, hist = run_seed(ctx, s, seed_dir(out, s, seeds))
        per_seed.append(results)
        for label, h in hist.items():
            histories.setdefault(label, []).append(h)
    summary = aggregate(per_seed, histories)
    real = image_data.images[image_data.labels != forget_class]
    floor = {
        "real_halves": real_split_floor(classifier_features(clf)(real)),
        "n_real": len(real),
        "evaluation": asdict(es),
        "base_over_seeds": summary["base"].get("ci95", {}),
        "n_seeds": seeds,
    }
    write_json(os.path.join(out, "noise_floor.json"), floor)
    write_json(os.path.join(out, "metrics.json"), summary)
    settings = {
        "data": data,
        "forget class": forget_class,
        "seeds": list(range(seed, seed + seeds)),
        "lr": lr,
        "runs": {r.label: f"{r.method} {r.steps}×{r.batch_size} {r.hparams}" for r in runs},
        "base checkpoint": os.path.relpath(unet_path),
        "classifier": os.path.relpath(clf_path),
        "retrain checkpoint": os.path.relpath(references["retrain"]) if "retrain" in references else None,
        "evaluation": {**asdict(es), "seed": "= unlearning seed", "bootstrap rounds": bootstrap},
        "device": str(dev),
        "wall time (s)": round(time.perf_counter() - t_start, 1),
    }
    figures = [f"samples_{name}.png" for name in ("retrain", *(r.label for r in runs)) if name in summary]
    if seeds > 1:
        figures = [f"seed{seed}/{f}" for f in figures]
    if "moo" in summary:
        figures.insert(0, "fig2_cosines.png" if seeds == 1 else f"seed{seed}/fig2_cosines.png")
    write_report(
        os.path.join(out, "report.md"),
        f"Forgetting class {forget_class} (DDPM on {data})",
        summary,
        settings,
        [*noise_floor_notes(floor), *acceptance_notes(summary)],
        figures,
    )
    tables = metrics_table(summary) + "\n" + gap_table(summary) + under_attack(summary)
    write_text(os.path.join(out, "table.md"), tables)
    return summary


def noise_floor_notes(floor: dict) -> list[str]:
    """The noise floors as sentences: the metrics between two halves of the real data, and the base
    model's 95% half-widths (over the evaluation seeds; with one seed, the bootstrap's)."""
    halves = floor["real_halves"]
    figures = ", ".join(
        f"{k} {halves[k]['mean']:.3f} (sd {halves[k]['sd']:.3f})" for k in ("fid", "precision", "recall")
    )
    notes = [
        f"Noise floor, real data: between two random disjoint halves of the {floor['n_real']} real "
        f"remaining-class images (10 splits): {figures}."
    ]
    if floor["base_over_seeds"]:
        spread = ", ".join(f"{k} ±{v:.3f}" for k, v in floor["base_over_seeds"].items() if k in METRICS)
        if floor.get("n_seeds", 2) > 1:
            notes.append(f"Noise floor, evaluation seeds: the base model's 95% half-widths: {spread}.")
        else:  # one seed: the half-widths are the bootstrap's over the evaluation samples
            notes.append(f"Noise floor, sampling: the base model's 95% bootstrap half-widths: {spread}.")
    return notes


def under_attack(results: dict[str, dict]) -> str:
    """The "under attack" block of table.md when the models were attacked (``demo --attacks``)."""
    from .attacks.ddpm import attack_table

    table = attack_table(results, DISPLAY)
    return (
        f"\n### Under attack (P(y=c_f) of class-c_f samples; docs/robustness.md)\n\n{table}" if table else ""
    )


def acceptance_notes(results: dict[str, dict]) -> list[str]:
    """The issue's acceptance checks on the base and EraseDiff rows, stated as measured.

    Utility checks are one-sided: EraseDiff may not lose more than 3 accuracy points or raise FID by
    more than 20% (an improvement passes).
    """
    base, ed = results["base"], results["erasediff"]
    failed = [name for name in ("base", "erasediff") if "failed" in results[name]]
    if failed:
        return [f"Acceptance: not checked, the evaluation of {' and '.join(failed)} failed."]
    acc_drop = base["remaining_accuracy"] - ed["remaining_accuracy"]
    fid_ratio = ed["fid"] / base["fid"]
    checks = [
        (f"base P(y=c_f|x_f) = {base['p_forget']:.3f} ≥ 0.9", base["p_forget"] >= 0.9),
        (f"EraseDiff P(y=c_f|x_f) = {ed['p_forget']:.3f} ≤ 0.1", ed["p_forget"] <= 0.1),
        (
            f"remaining accuracy {base['remaining_accuracy']:.3f} → {ed['remaining_accuracy']:.3f}, "
            f"drop {100 * acc_drop:.1f} ≤ 3 points",
            acc_drop <= 0.03,
        ),
        (
            f"FID (classifier features) {base['fid']:.3f} → {ed['fid']:.3f}, ratio {fid_ratio:.2f} ≤ 1.2",
            fid_ratio <= 1.2,
        ),
    ]
    return [
        "FID is computed on the evaluation classifier's penultimate features, not Inception: "
        "it is comparable only within this table.",
        "Time: the unlearning loop only; Prep.: one-off mask/Fisher/replay work; Peak mem.: extra "
        "memory of both stages (CUDA max allocated, or peak RSS increase on CPU).",
        *(f"Acceptance: {text}: {'met' if ok else 'NOT met'}." for text, ok in checks),
    ]
