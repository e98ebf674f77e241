"""``constrained-opt demo``: forget a class with EraseDiff and the baselines over seeds; evaluate; report."""

from __future__ import annotations

import os
import time
from dataclasses import asdict

from ..attacks.report import attack_table
from ..data import check_class, load_data
from ..evaluation.generated import EvalSettings
from ..evaluation.metrics import METRICS, classifier_features, real_split_floor
from ..evaluation.report import DISPLAY, gap_table, metrics_table, write_report
from ..evaluation.statistics import aggregate
from ..models import shared_retrain_note
from ..runtime.device import resolve_device
from ..runtime.errors import UsageError
from ..runtime.io import write_json, write_text
from ..runtime.paths import cache_dir, check_output_dir
from ..runtime.provenance import file_digest
from .common import check_steps, load_checked
from .comparison import plan_runs
from .demo_options import DemoOptions
from .demo_seed import DemoContext, check_done_rows, run_seed, seed_dir
from .train_base import base_checkpoints, retrain_checkpoint

DEMO_DATA = ("digits", "mnist5k")  # the embedded data sets the demo runs on


def demo(options: DemoOptions | None = None, /, **fields) -> dict[str, dict]:
    """Forget one class with EraseDiff and ``methods`` over ``seeds`` seeds; evaluate; write the report.

    The options are one :class:`~.demo_options.DemoOptions`, or its fields as keywords.

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
    ``attacks``: also attack every model of every seed (:func:`..attacks.ddpm.demo_attacks`: base, Retrain and
    each run whose evaluation did not fail), adding ``attack_*`` keys and an "under attack" table.
    """
    o = options if options is not None else DemoOptions(**fields)
    t_start = time.perf_counter()
    es = o.es or EvalSettings(seed=o.seed)
    check_steps(o.steps, o.batch_size)
    if o.seeds < 1 or o.bootstrap < 0:
        raise UsageError(f"--seeds must be ≥ 1 and --bootstrap ≥ 0, got {o.seeds} and {o.bootstrap}")
    if o.data not in DEMO_DATA:
        raise UsageError(f"the demo runs on {' or '.join(DEMO_DATA)}, got {o.data!r}")
    check_output_dir(o.out)
    dev = resolve_device(o.device)
    image_data = load_data(o.data)
    check_class(o.forget_class, image_data.num_classes)
    runs = plan_runs(
        o.methods,
        variants=o.variants,
        hp=o.hp,
        forget_target=o.forget_target,
        steps=o.steps,
        batch_size=o.batch_size,
        published=o.published_budgets,
        budgets=o.budgets,
        robust=o.robust,
    )
    cache = cache_dir(o.cache)
    if o.train and (o.checkpoint or o.classifier):
        raise UsageError(
            "--train-base trains its own base models; do not also pass --checkpoint/--classifier"
        )
    if o.checkpoint and o.classifier:
        unet_path, clf_path = o.checkpoint, o.classifier
    else:
        defaults = base_checkpoints(o.data, o.train, o.seed, cache, o.device, o.progress)
        unet_path, clf_path = o.checkpoint or defaults[0], o.classifier or defaults[1]
    unet, clf, _ = load_checked(image_data, unet_path, clf_path, dev)
    ctx = DemoContext(
        image_data,
        o.data,
        o.forget_class,
        unet,
        clf,
        clf_path,
        file_digest(clf_path),
        {"base": unet_path},
        runs,
        o.lr,
        es,
        o.bootstrap,
        cache,
        o.resume,
        o.progress,
        {"data": o.data, "base": file_digest(unet_path)},
        o.attacks,
    )
    if o.resume:  # before the Retrain reference, which may take as long as the base model to train
        check_done_rows(ctx, range(o.seed, o.seed + o.seeds), o.out)
    if o.retrain:  # each seed's own Retrain model where one ships (shipped_retrain), else seed 0's
        ctx.retrain = {
            s: o.retrain
            if isinstance(o.retrain, str)
            else retrain_checkpoint(o.data, o.forget_class, unet_path, cache, o.device, o.progress, seed=s)
            for s in range(o.seed, o.seed + o.seeds)
        }
        for path in dict.fromkeys(ctx.retrain.values()):
            load_checked(image_data, path, None, dev)
        if note := shared_retrain_note(ctx.retrain):
            print(note, flush=True)

    per_seed, histories = [], {}
    for s in range(o.seed, o.seed + o.seeds):
        results, hist = run_seed(ctx, s, seed_dir(o.out, s, o.seeds))
        per_seed.append(results)
        for label, h in hist.items():
            histories.setdefault(label, []).append(h)
    summary = aggregate(per_seed, histories)
    real = image_data.images[image_data.labels != o.forget_class]
    floor = {
        "real_halves": real_split_floor(classifier_features(clf)(real)),
        "n_real": len(real),
        "evaluation": asdict(es),
        "base_over_seeds": summary["base"].get("ci95", {}),
        "n_seeds": o.seeds,
    }
    write_json(os.path.join(o.out, "noise_floor.json"), floor)
    write_json(os.path.join(o.out, "metrics.json"), summary)
    settings = {
        "data": o.data,
        "forget class": o.forget_class,
        "seeds": list(range(o.seed, o.seed + o.seeds)),
        "lr": o.lr,
        "runs": {r.label: f"{r.method} {r.steps}×{r.batch_size} {r.hparams}" for r in runs},
        "base checkpoint": os.path.relpath(unet_path),
        "classifier": os.path.relpath(clf_path),
        "retrain checkpoint": {s: os.path.relpath(p) for s, p in ctx.retrain.items()} or None,
        "evaluation": {**asdict(es), "seed": "= unlearning seed", "bootstrap rounds": o.bootstrap},
        "device": str(dev),
        "wall time (s)": round(time.perf_counter() - t_start, 1),
    }
    figures = [f"samples_{name}.png" for name in ("retrain", *(r.label for r in runs)) if name in summary]
    if o.seeds > 1:
        figures = [f"seed{o.seed}/{f}" for f in figures]
    if "moo" in summary:
        figures.insert(0, "fig2_cosines.png" if o.seeds == 1 else f"seed{o.seed}/fig2_cosines.png")
    write_report(
        os.path.join(o.out, "report.md"),
        f"Forgetting class {o.forget_class} (DDPM on {o.data})",
        summary,
        settings,
        [
            *noise_floor_notes(floor),
            *filter(None, [shared_retrain_note(ctx.retrain)]),
            *acceptance_notes(summary),
        ],
        figures,
    )
    tables = metrics_table(summary) + "\n" + gap_table(summary) + under_attack(summary)
    write_text(os.path.join(o.out, "table.md"), tables)
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
