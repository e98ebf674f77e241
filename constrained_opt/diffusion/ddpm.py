"""DDPM class unlearning end to end: the ``train-base``, ``unlearn ddpm``, ``evaluate`` and ``demo`` jobs.

Every job validates all of its inputs (data, class, method, checkpoints, paths) before it writes
anything, so a bad invocation fails with one :class:`UsageError` line and leaves no files behind.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from .baselines import BASELINES, METHODS, UnlearnResult, method_class, parse_hparams, unlearn
from .data import ImageData, check_class, load_data, split_forget
from .errors import EvaluationError, UsageError
from .io import load_state, read_json, save_state, write_json, write_text
from .models import (
    SHIPPED_CLASSIFIER,
    SHIPPED_UNET,
    UNET_PRESETS,
    check_classifier_matches,
    check_unet_matches,
    default_preset,
    load_classifier,
    load_unet,
    save_classifier,
    save_unet,
)
from .multiclass import check_classes, evaluate_classes, is_forgotten, split_forget_classes
from .report import DISPLAY, metrics_table, save_cosine_plot, save_sample_grid, write_report
from .resume import check_resume, run_config
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


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; an explicit CUDA request without CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda requested but CUDA is not available")
    return device


def check_output_dir(path: str) -> None:
    """The output directory may exist (as a directory) or be creatable; never a file."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"output path exists and is not a directory: {path}")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise UsageError(f"cannot create output directory {path}")


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
    device: str = "auto",
    progress: bool = True,
) -> dict[str, str]:
    """Train the base DDPM and/or the evaluation classifier; writes ``unet.safetensors``,
    ``classifier.safetensors`` and ``provenance.json`` into ``out``. Returns the written paths."""
    check_steps(min(unet_steps, classifier_steps), batch_size)
    check_output_dir(out)
    dev = resolve_device(device)
    data = load_data(data_spec, image_size)
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
        unet = train_unet(
            data,
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


def cache_dir(override: str | None = None) -> str:
    return override or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "constrained_opt"
    )


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
        )


def result_record(job: UnlearnJob, result: UnlearnResult) -> dict:
    return {
        "time_s": result.time_s,
        "prep_s": result.prep_s,
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
def base_checkpoints(train: bool, seed: int, cache: str, device: str, progress: bool) -> tuple[str, str]:
    """Shipped digits checkpoints, or (``train``) ones made by ``train_base`` and cached per seed."""
    if not train:
        return SHIPPED_UNET, SHIPPED_CLASSIFIER
    folder = os.path.join(cache, f"digits-base-seed{seed}")
    paths = os.path.join(folder, "unet.safetensors"), os.path.join(folder, "classifier.safetensors")
    if not all(os.path.isfile(p) for p in paths):
        print(f"training the base DDPM and the classifier (seed {seed}) into {folder}", flush=True)
        train_base("digits", folder, seed=seed, device=device, progress=progress)
    return paths


def _eval_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def demo(
    *,
    forget_class: int = 0,
    seed: int = 0,
    out: str = "runs/demo",
    methods: tuple[str, ...] = BASELINES,
    steps: int = 300,
    batch_size: int = 64,
    lr: float = 1e-4,
    forget_target: str = "rl",
    hp: tuple[str, ...] = (),
    es: EvalSettings | None = None,
    device: str = "auto",
    resume: bool = False,
    train: bool = False,
    checkpoint: str | None = None,
    classifier: str | None = None,
    cache: str | None = None,
    attacks: bool = False,
    progress: bool = True,
) -> dict[str, dict]:
    """Forget one digit with EraseDiff and ``methods``; evaluate everything; write the report.

    Layout of ``out``: ``metrics.json``, ``report.md``, ``samples_<method>.png`` (base vs scrubbed),
    ``fig2_cosines.png``, ``models/<method>.safetensors``, and ``state/`` (per-model results that
    ``--resume`` reuses, plus the checkpoint of an interrupted method). ``hp`` holds
    ``"method.key=value"`` overrides of the methods' defaults. ``attacks``: also attack every model
    (:func:`.attacks.demo_attacks`), adding ``attack_*`` keys and an "under attack" table.
    """
    t_start = time.perf_counter()
    es = es or EvalSettings(seed=seed)
    check_steps(steps, batch_size)
    check_output_dir(out)
    dev = resolve_device(device)
    data = load_data("digits")
    check_class(forget_class, data.num_classes)
    unknown = [m for m in methods if m not in BASELINES]
    if unknown:
        raise UsageError(f"unknown baseline(s) {', '.join(unknown)}; expected some of {', '.join(BASELINES)}")
    pairs: dict[str, list[str]] = {m: [] for m in ("erasediff", *methods)}
    for m in ("erasediff", "moo"):
        if m in pairs:
            pairs[m].append(f"forget_target={forget_target}")
    for item in hp:
        method, dot, pair = item.partition(".")
        if not dot or method not in METHODS:
            raise UsageError(f"--hp expects METHOD.KEY=VALUE with a known method, got {item!r}")
        if method in pairs:  # settings of methods not run this time are ignored
            pairs[method].append(pair)
    hparams = {m: parse_hparams(m, p) for m, p in pairs.items()}
    cache = cache_dir(cache)
    if train and (checkpoint or classifier):
        raise UsageError(
            "--train-base trains its own base models; do not also pass --checkpoint/--classifier"
        )
    shipped = base_checkpoints(train, seed, cache, device, progress)
    unet_path, clf_path = checkpoint or shipped[0], classifier or shipped[1]
    unet, clf, _ = load_checked(data, unet_path, clf_path, dev)
    retain, forget = split_forget(data, forget_class)
    state_dir = os.path.join(out, "state")
    os.makedirs(state_dir, exist_ok=True)

    # Base model: evaluated once per (checkpoint, classifier, settings, class) and cached across runs.
    digests = {"base": _file_digest(unet_path), "classifier": _file_digest(clf_path)}
    inputs = {"data": "digits", "base": digests["base"]}
    jobs = {m: UnlearnJob(m, forget_class, steps, batch_size, lr, seed, hp) for m, hp in hparams.items()}
    # A finished row is reused only if it was made with this configuration and evaluation; all are
    # checked before anything runs.
    configs = {
        m: {**job.config(**inputs), "classifier": digests["classifier"], "evaluation": asdict(es)}
        for m, job in jobs.items()
    }
    for m, config in configs.items():
        done = os.path.join(state_dir, f"{m}.json")
        if resume and os.path.isfile(done):
            check_resume(done, read_json(done).get("config"), config, hp_prefix=f"{m}.")
    key = _eval_key("no-fake-zeros", digests["base"], digests["classifier"], asdict(es), forget_class)
    base_cache = os.path.join(cache, f"base-eval-{key}.safetensors")
    if os.path.isfile(base_cache):
        base = load_state(base_cache)
        print(f"base model: evaluation cached in {base_cache}", flush=True)
    else:
        metrics, images, labels = evaluate_unet(unet, clf, data, forget_class, es, "base", progress=progress)
        base = {
            "metrics": metrics,  # no time or memory: the base model has no unlearning stage
            "images": images,
            "labels": labels,
        }
        save_state(base_cache, base)
    results = {"base": base["metrics"]}
    histories = {}
    for method in ("erasediff", *methods):
        done = os.path.join(state_dir, f"{method}.json")
        if resume and os.path.isfile(done):
            record = read_json(done)
            print(f"{method}: done in a previous run, reusing {done}", flush=True)
        else:
            job = jobs[method]
            ckpt = os.path.join(state_dir, f"{method}.checkpoint.safetensors")
            result = job.run(unet, retain, forget, ckpt, resume, progress, inputs)
            save_unet(
                os.path.join(out, "models", f"{method}.safetensors"),
                result.unet,
                provenance(
                    base=unet_path,
                    method=method,
                    forget_class=forget_class,
                    seed=seed,
                    **result_record(job, result),
                ),
            )
            metrics, images, labels = evaluate_unet(
                result.unet, clf, data, forget_class, es, f"eval {method}", progress=progress
            )
            save_sample_grid(
                os.path.join(out, f"samples_{method}.png"),
                {"base": (base["images"], base["labels"]), method: (images, labels)},
                title=f"forget digit {forget_class}: base vs {method}",
            )
            record = {
                "config": configs[method],
                "metrics": {**metrics, **result_record(job, result)},
                "history": result.history,
            }
            write_json(done, record)
            if os.path.exists(ckpt):
                os.remove(ckpt)
        results[method] = record["metrics"]
        histories[method] = record["history"]
        if "failed" not in results[method]:
            print(
                f"{method}: P(y=c_f|x_f) {results[method]['p_forget']:.3f}, remaining acc "
                f"{results[method]['remaining_accuracy']:.3f}, FID {results[method]['fid']:.3f}",
                flush=True,
            )

    if attacks:
        from .attacks import demo_attacks

        scrubbed = {m: os.path.join(out, "models", f"{m}.safetensors") for m in histories}
        models = {"base": unet_path, **{m: p for m, p in scrubbed.items() if "failed" not in results[m]}}
        kw = dict(seed=seed, state_dir=state_dir, resume=resume, progress=progress)
        for name, figures in demo_attacks(models, clf, data, forget_class, **kw).items():
            results[name].update(figures)
    figures = [f"samples_{m}.png" for m in ("erasediff", *methods)]
    if "moo" in histories:
        save_cosine_plot(
            os.path.join(out, "fig2_cosines.png"), {m: histories[m] for m in ("erasediff", "moo")}
        )
        figures.insert(0, "fig2_cosines.png")
    write_json(os.path.join(out, "metrics.json"), results)
    settings = {
        "data": "digits (scikit-learn, 8×8)",
        "forget class": forget_class,
        "seed": seed,
        "steps": steps,
        "batch size": batch_size,
        "lr": lr,
        "forget target": forget_target,
        "base checkpoint": os.path.relpath(unet_path),
        "classifier": os.path.relpath(clf_path),
        "evaluation": asdict(es),
        "device": str(dev),
        "hyperparameters": {m: asdict(METHODS[m].Hyper(**hp)) for m, hp in hparams.items()},
        "wall time (s)": round(time.perf_counter() - t_start, 1),
    }
    write_report(
        os.path.join(out, "report.md"),
        f"Forgetting digit {forget_class} (DDPM on digits)",
        results,
        settings,
        acceptance_notes(results),
        figures,
    )
    write_text(os.path.join(out, "table.md"), metrics_table(results) + under_attack(results))
    return results


def under_attack(results: dict[str, dict]) -> str:
    """The "under attack" block of table.md when the models were attacked (``demo --attacks``)."""
    from .attacks import attack_table

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
