"""One seed of the demo: every model unlearned, evaluated (and attacked) on that seed."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import statistics
from dataclasses import asdict, dataclass

from torch import Tensor

from ..attacks import ddpm as ddpm_attacks
from ..data import ImageData, split_forget
from ..evaluation.generated import EvalSettings, generate
from ..evaluation.metrics import bootstrap_ci95, metrics_from_scores, score_samples
from ..evaluation.report import save_cosine_plot, save_sample_grid
from ..methods.registry import method_class
from ..models import save_unet
from ..runtime.errors import EvaluationError
from ..runtime.io import load_state, read_json, save_state, write_json
from ..runtime.provenance import file_digest, provenance
from ..runtime.resume import check_resume
from .common import load_checked
from .comparison import MATCHED, Run
from .unlearn import UnlearnJob, result_record


def eval_key(*parts) -> str:
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
    references: dict[str, str]  # "base" → checkpoint path
    runs: list[Run]
    lr: float
    es: EvalSettings
    bootstrap: int
    cache: str
    resume: bool
    progress: bool
    inputs: dict  # identify the data and base model in each run's configuration (see .resume)
    attacks: bool = False  # also attack every model (demo --attacks)
    retrain: dict[int, str] = dataclasses.field(default_factory=dict)  # seed → Retrain checkpoint path

    def references_at(self, seed: int) -> dict[str, str]:
        """The reference models of ``seed``: base, and that seed's Retrain model when there is one."""
        return {**self.references, **({"retrain": self.retrain[seed]} if seed in self.retrain else {})}


def evaluate_reference(ctx: DemoContext, name: str, path: str, es: EvalSettings) -> dict:
    """Metrics (and bootstrap half-widths) of the base or Retrain model at ``path``, cached across runs
    by the checkpoint and classifier digests, the settings and the class."""
    key = eval_key(
        "no-fake-zeros",
        file_digest(path),
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


def hp_defaults(run: Run) -> dict:
    """The default hyperparameters of ``run``'s method (for :func:`~..runtime.resume.check_resume`)."""
    return asdict(method_class(run.method).Hyper())


def check_done_rows(ctx: DemoContext, seeds: range, out: str) -> None:
    """Before anything runs: every finished row that ``--resume`` would reuse was made with this
    configuration (a MATCHED row, whose weight comes from EraseDiff's run, is checked when reused)."""
    for seed in seeds:
        state_dir = os.path.join(seed_dir(out, seed, len(seeds)), "state")
        for run in ctx.runs:
            done = os.path.join(state_dir, f"{run.label}.json")
            if run.label != MATCHED and os.path.isfile(done):
                stored = read_json(done).get("config")
                config = run_job(ctx, run, seed, dict(run.hparams))[1]
                check_resume(done, stored, config, hp_prefix=f"{run.label}.", hp_defaults=hp_defaults(run))


def run_seed(ctx: DemoContext, seed: int, out: str) -> tuple[dict[str, dict], dict[str, list]]:
    """Every model of one seed (unlearning seed = evaluation seed = ``seed``), written into ``out``
    (``models/``, ``samples_<label>.png``, ``state/``, ``metrics.json``). Returns (records, histories)."""
    es = dataclasses.replace(ctx.es, seed=seed)
    state_dir = os.path.join(out, "state")
    os.makedirs(state_dir, exist_ok=True)
    references = ctx.references_at(seed)
    refs = {name: evaluate_reference(ctx, name, path, es) for name, path in references.items()}
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
            check_resume(
                done, record.get("config"), config, hp_prefix=f"{run.label}.", hp_defaults=hp_defaults(run)
            )
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
        models = {
            **references,
            **{r.label: os.path.join(out, "models", f"{r.label}.safetensors") for r in ctx.runs},
        }
        models = {name: path for name, path in models.items() if "failed" not in results[name]}
        attacked = ddpm_attacks.demo_attacks(
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
