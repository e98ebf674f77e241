"""Item robustness: does the erased class stay erased? Every method's scrubbed model under attack.

The digits DDPM forgets class 0 with each method at the demo's budget (300 steps, batch 64, Adam lr
1e-4, the methods' default hyperparameters), once per seed; then every model — the base model, the
Retrain reference (trained without class 0, when shipped: seed s's own Retrain model where one ships,
else seed 0's), and each scrubbed one — goes through the four attacks of
:mod:`constrained_opt.diffusion.attacks` at their default :class:`~.Budget`, with the attack seed equal
to the unlearning seed (base: one attack; Retrain: one per seed). Figures are means over seeds with 95%
Student-t half-widths; the base model's and Retrain's spreads over seeds are the noise floor
(``retrain_files`` records each seed's Retrain file). Per (model, seed) results and the scrubbed
models are kept in ``work`` so an interrupted run resumes (:func:`attack_cached`). ``models``
replaces the unlearning stage by demo output folders (``models/*.safetensors``, or
``seed<s>/models/*.safetensors`` for several seeds), e.g. the evaluation's final runs; the result's
``unlearning`` then holds each model's steps, batch size and lr, read from its file.

Each item writes ``<item>.json`` and regenerates the table between its own markers of
``docs/robustness.md`` (``robustness``, ``robustness_published``), except with ``--smoke`` or ``--no-docs``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import statistics

import torch

FORGET_CLASS = 0
SEEDS = (0, 1, 2)
# label: (method, hyperparameters); labels match the demo's models/<label>.safetensors.
RUNS = {
    "erasediff": ("erasediff", {}),
    "erasediff_value": ("erasediff", {"rule": "value"}),
    "moo": ("moo", {}),
    "salun": ("salun", {}),
    "sa": ("sa", {}),
    "neggrad": ("neggrad", {}),
    "finetune": ("finetune", {}),
}
DISPLAY = {
    "base": "Unscrubbed (base)",
    "retrain": "Retrain (never saw class 0)",
    "erasediff": "EraseDiff (grad_norm)",
    "erasediff_value": "EraseDiff (value)",
    "moo": "MOO",
    "moo_matched": "MOO (w = EraseDiff's mean λ)",
    "salun": "SalUn",
    "sa": "Selective Amnesia",
    "neggrad": "NegGrad",
    "finetune": "Finetune",
    "meta_unlearning": "Meta-Unlearning",
    "advunlearn": "AdvUnlearn",
}
# (figure key in the flat per-run record, column title)
FIGURES = (
    ("none_p_forget", "no attack"),
    ("inversion_p_forget", "inversion"),
    ("mixture_p_forget", "mixture"),
    ("relearn_p_forget_20", "relearn, P after 20 steps"),
    ("relearn_steps", "relearn, steps to P ≥ 0.5"),
    ("benign_p_forget", "benign fine-tuning"),
)
# Noise floor of a verdict: a gap smaller than this is not called, whatever the intervals (P: about the
# bootstrap half-width of one run's P near 0.05 with 100 samples; steps: the probe spacing).
MIN_GAP = {"p": 0.05, "steps": 5}
# The smoke runs' attack budget: seconds per model.
SMOKE_BUDGET = dict(
    num_images=8,
    steps=3,
    batch_size=8,
    relearn_images=4,
    relearn_steps=4,
    benign_steps=2,
    probe_every=2,
    samples=8,
    sampling_steps=2,
    probe_samples=4,
    probe_sampling_steps=2,
)
DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "robustness.md")
# The published-budget variant (item robustness_published) attacks the comparison item's models.
PUBLISHED_MODELS = os.path.join("runs", "benchmarks", "comparison")


def _t975(df: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def mean_ci95(values: list[float]) -> tuple[float, float | None]:
    """(mean, half-width of the 95% Student-t interval of the mean); no half-width for one value."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None
    return mean, _t975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def flatten(results: dict[str, dict], budget) -> dict[str, float]:
    """The figures of one attacked model: P(y = c_f) under each attack, relearning's P at 5 and 20 steps,
    its steps to P ≥ 0.5 (the budget's step count + probe spacing when never reached) and its AUC, the
    mean P over the attack (:func:`~constrained_opt.diffusion.attacks.common.probe_auc`)."""
    from constrained_opt.diffusion.attacks.common import probe_auc

    out = {
        f"{name}_p_forget": results[name]["p_forget"]
        for name in ("none", "inversion", "mixture", "benign")
        if name in results
    }
    if "relearn" in results:
        r = results["relearn"]
        for step in ("5", "20"):
            if step in r["p_forget_at"]:
                out[f"relearn_p_forget_{step}"] = r["p_forget_at"][step]
        steps = r["steps_to_threshold"]
        out["relearn_steps"] = steps if steps is not None else budget.relearn_steps + budget.probe_every
        # results stored before the AUC was recorded: the same trapezoid over their stored probes
        out["relearn_auc"] = r["auc"] if "auc" in r else probe_auc(r["p_forget_at"], r["steps"])
        out["relearn_p_forget"] = r["p_forget"]
    return out


def bootstrap_halves(results: dict[str, dict]) -> dict[str, float]:
    """Half-widths of the 95% bootstrap intervals over samples of each attack's P (for a single run)."""
    return {
        f"{name}_p_forget": (r["p_forget_ci"][1] - r["p_forget_ci"][0]) / 2 for name, r in results.items()
    }


def find_models(folders: list[str]) -> dict[tuple[str, int], str]:
    """{(label, seed): path} from demo output folders (``models/`` or ``seed<s>/models/``)."""
    found = {}
    for folder in folders:
        layouts = [(0, os.path.join(folder, "models"))]
        for name in sorted(os.listdir(folder)):
            if m := re.fullmatch(r"seed(\d+)", name):
                layouts.append((int(m.group(1)), os.path.join(folder, name, "models")))
        for seed, models in layouts:
            if os.path.isdir(models):
                for f in sorted(os.listdir(models)):
                    if f.endswith(".safetensors"):
                        found[(f.removesuffix(".safetensors"), seed)] = os.path.join(models, f)
    if not found:
        raise SystemExit(f"no models/*.safetensors under {', '.join(folders)}")
    return found


def model_budgets(paths: dict[tuple[str, int], str]) -> dict[str, dict]:
    """{label: {steps, batch_size, lr}} of the models' unlearning runs, read from each file's provenance
    (as the demo writes it); a label whose seeds differ gets {"per_seed": {seed: {...}}}."""
    from safetensors import safe_open

    found: dict[str, dict[str, dict]] = {}
    for (label, seed), path in sorted(paths.items()):
        with safe_open(path, "pt") as f:
            prov = json.loads((f.metadata() or {}).get("provenance", "{}"))
        found.setdefault(label, {})[str(seed)] = {k: prov.get(k) for k in ("steps", "batch_size", "lr")}
    return {
        label: next(iter(per.values())) if len({str(v) for v in per.values()}) == 1 else {"per_seed": per}
        for label, per in found.items()
    }


def attack_cached(
    label: str,
    seed: int,
    path: str,
    budget,
    work: str,
    classifier,
    data,
    forget_class: int = FORGET_CLASS,
    attacks: tuple[str, ...] | None = None,
    *,
    make=None,
    legacy: bool = True,
) -> dict:
    """The attack record {results, budget, attacks, model, model_sha256} of the checkpoint ``path`` as
    model ``label`` of ``seed``, kept in ``work/<label>-seed<seed>.json`` and reused when its budget,
    attacks and checkpoint (SHA-256) match. A record written before the checkpoint was recorded is
    reused when ``legacy`` (the caller knows the file is the one attacked then). ``make(path)`` writes a
    missing checkpoint first (the models unlearned here)."""
    from constrained_opt.diffusion.attacks.ddpm import ATTACKS, attack_unet
    from constrained_opt.diffusion.models import load_unet
    from constrained_opt.diffusion.runtime.io import read_json, write_json
    from constrained_opt.diffusion.runtime.provenance import file_digest

    attacks = tuple(attacks or ATTACKS)
    done = os.path.join(work, f"{label}-seed{seed}.json")
    key = {"budget": dataclasses.asdict(budget), "attacks": list(attacks)}
    if os.path.isfile(done) and os.path.isfile(path):
        stored = read_json(done)
        same = stored["budget"] == key["budget"] and stored.get("attacks", list(ATTACKS)) == key["attacks"]
        sha = stored.get("model_sha256")
        if same and (sha == file_digest(path) if sha else legacy):
            return stored
    if not os.path.isfile(path):
        make(path)
    device = next(classifier.parameters()).device
    unet = load_unet(path)[0].to(device).eval()
    results, _ = attack_unet(unet, classifier, data, forget_class, attacks, budget=budget, progress=False)
    record = {"results": results, **key, "model": os.path.basename(path), "model_sha256": file_digest(path)}
    write_json(done, record)
    line = ", ".join(f"{k} {v:.3f}" for k, v in flatten(results, budget).items())
    print(f"{os.path.basename(work)}  {label} seed {seed}: {line}", flush=True)
    return record


def retrain_files(data: str, forget_class: int, seeds) -> dict[int, str]:
    """{seed: the shipped Retrain checkpoint of that seed} (:func:`shipped_retrain`: the seed's own file,
    else seed 0's; empty when none ships); prints the note when seeds share one."""
    from constrained_opt.diffusion.models import shared_retrain_note, shipped_retrain

    files = {s: path for s in seeds if (path := shipped_retrain(data, forget_class, s))}
    if note := shared_retrain_note(files):
        print(note, flush=True)
    return files


def run(
    device: torch.device,
    smoke: bool,
    work: str = "runs/benchmarks/robustness",
    models: list[str] | None = None,
) -> dict:
    from constrained_opt.diffusion.attacks.common import Budget
    from constrained_opt.diffusion.data import load_data, split_forget
    from constrained_opt.diffusion.methods.unlearn import unlearn
    from constrained_opt.diffusion.models import (
        SHIPPED_CLASSIFIER,
        SHIPPED_UNET,
        load_classifier,
        load_unet,
        save_unet,
        shared_retrain_note,
        shipped_retrain,
    )

    data = load_data("digits")
    retain, forget = split_forget(data, FORGET_CLASS)
    classifier = load_classifier(SHIPPED_CLASSIFIER)[0].to(device)
    seeds = (0,) if smoke else SEEDS
    runs = {"erasediff": RUNS["erasediff"], "moo": RUNS["moo"]} if smoke else RUNS
    steps = 2 if smoke else 300
    budget_kw = SMOKE_BUDGET if smoke else {}
    work = os.path.join(work, "smoke") if smoke else work
    paths: dict[tuple[str, int], str] = {}
    paths[("base", seeds[0])] = SHIPPED_UNET  # forgets nothing: one attack shows each reaches P ≥ 0.8
    retrain = retrain_files("digits", FORGET_CLASS, seeds)
    paths.update({("retrain", s): path for s, path in retrain.items()})  # attack seed s on seed s's model
    if models:
        paths.update({k: v for k, v in find_models(models).items() if k[1] in seeds})
    base = None

    def unlearned(label: str, seed: int):
        def make(path: str) -> None:
            nonlocal base
            if base is None:
                base = load_unet(SHIPPED_UNET)[0].to(device).eval()
            method, hp = runs[label]
            result = unlearn(
                method,
                base,
                retain,
                forget,
                FORGET_CLASS,
                steps=steps,
                batch_size=64,
                lr=1e-4,
                seed=seed,
                hparams=hp,
                progress=False,
            )
            save_unet(
                path, result.unet.cpu(), {"method": method, "hparams": hp, "seed": seed, "steps": steps}
            )

        return make

    records: dict[str, dict[int, dict]] = {}
    labels = ["base", "retrain", *runs] if not models else sorted({k[0] for k in paths}, key=_order)
    for label in labels:
        for seed in seeds:
            if (label, seed) not in paths and (models or label not in runs):
                continue  # base beyond the first seed, Retrain when none is shipped
            path = paths.get((label, seed)) or os.path.join(work, "models", f"{label}-seed{seed}.safetensors")
            # before per-seed Retrain models, every seed's Retrain record attacked seed 0's model
            legacy = label != "retrain" or path == shipped_retrain("digits", FORGET_CLASS, 0)
            records.setdefault(label, {})[seed] = attack_cached(
                label,
                seed,
                path,
                Budget(**budget_kw, seed=seed),
                work,
                classifier,
                data,
                make=None if (label, seed) in paths else unlearned(label, seed),
                legacy=legacy,
            )
    summary = {
        label: summarise([r["results"] for r in per.values()], budget_kw) for label, per in records.items()
    }
    return {
        "forget_class": FORGET_CLASS,
        "seeds": list(seeds),
        "unlearning": (
            model_budgets({k: v for k, v in find_models(models).items() if k[1] in seeds})
            if models
            else {"steps": steps, "batch_size": 64, "lr": 1e-4, "runs": {k: list(v) for k, v in runs.items()}}
        ),
        "models_from": models or "unlearned here",
        "retrain_files": {str(s): os.path.basename(p) for s, p in retrain.items()},
        "retrain_note": shared_retrain_note(retrain),
        "budget": {**Budget(**budget_kw).__dict__, "seed": "= unlearning seed"},
        "summary": summary,
        "per_seed": {
            label: {str(s): flatten(r["results"], Budget(**budget_kw)) for s, r in per.items()}
            for label, per in records.items()
        },
        "verdicts": verdicts(summary),
        "pair_verdicts": pair_verdicts(summary),
        "attack_time_s": attack_times([r["results"] for per in records.values() for r in per.values()]),
    }


def attack_times(runs: list[dict[str, dict]]) -> dict[str, dict[str, float]]:
    """Wall time of each attack over all runs (median, min, max): the machine may be shared."""
    out = {}
    for name in ("inversion", "mixture", "relearn", "benign"):
        times = sorted(r[name]["time_s"] for r in runs if name in r)
        if times:
            out[name] = {"median": statistics.median(times), "min": times[0], "max": times[-1]}
    return out


def _order(label: str) -> tuple[int, str]:
    known = list(DISPLAY)
    return (known.index(label) if label in known else len(known), label)


def summarise(runs: list[dict[str, dict]], budget_kw: dict) -> dict[str, dict]:
    """Each figure over the runs (seeds): mean and 95% Student-t half-width; for a single run, the
    bootstrap half-width over samples where there is one (``interval`` says which)."""
    from constrained_opt.diffusion.attacks.common import Budget

    budget = Budget(**budget_kw)
    figures = [flatten(r, budget) for r in runs]
    out = {}
    for key in dict.fromkeys(k for f in figures for k in f):
        values = [f[key] for f in figures if key in f]
        mean, half = mean_ci95(values)
        interval = "seeds"
        if half is None and key in (boot := bootstrap_halves(runs[0])):
            half, interval = boot[key], "bootstrap"
        out[key] = {"mean": mean, "ci95": half, "interval": half and interval, "values": values}
    return out


# (model, reference) pairs that tie on the plain P
PAIRS = (("moo", "erasediff"), ("moo_matched", "erasediff"), ("erasediff_value", "erasediff"))


def pair_verdicts(summary: dict[str, dict]) -> dict[str, dict[str, str]]:
    """The same verdicts between methods that tie without attack (:data:`PAIRS`): "a vs b"."""
    return {
        f"{a} vs {b}": verdicts({a: summary[a], b: summary[b]}, ref=b)[a]
        for a, b in PAIRS
        if a in summary and b in summary
    }


def verdicts(summary: dict[str, dict], ref: str = "retrain") -> dict[str, dict[str, str]]:
    """Per method and attack, against Retrain: ``shallow`` when the attacked P's 95% interval lies above
    Retrain's and the means differ by at least the noise floor :data:`MIN_GAP` (for the relearning step
    count: fewer steps), ``deeper`` when below (more steps), else ``not distinguishable``."""
    reference = summary.get(ref)
    if reference is None:
        return {}
    out = {}
    for label, figures in summary.items():
        if label in ("base", ref):
            continue
        out[label] = {}
        for key, _ in FIGURES[1:]:
            if key not in figures or key not in reference:
                continue
            a, b = figures[key], reference[key]
            lo_a, hi_a = a["mean"] - _half(a), a["mean"] + _half(a)
            lo_b, hi_b = b["mean"] - _half(b), b["mean"] + _half(b)
            gap = MIN_GAP["steps" if key == "relearn_steps" else "p"]
            higher = lo_a > hi_b and a["mean"] - b["mean"] >= gap
            lower = hi_a < lo_b and b["mean"] - a["mean"] >= gap
            if key == "relearn_steps":
                higher, lower = lower, higher  # fewer steps to relearn = shallower
            out[label][key] = "shallow" if higher else "deeper" if lower else "not distinguishable"
    return out


def _half(figure: dict) -> float:
    return figure["ci95"] or 0.0


def markdown(result: dict) -> str:
    """The table of docs/robustness.md: mean ± 95% half-width over seeds, one row per model."""
    lines = [
        "| Model | " + " | ".join(title for _, title in FIGURES) + " |",
        "|---|" + "---:|" * len(FIGURES),
    ]
    for label, figures in result["summary"].items():
        cells = []
        for key, _ in FIGURES:
            f = figures.get(key)
            if f is None:
                cells.append("–")
                continue
            fmt = "{:.0f}" if key == "relearn_steps" else "{:.3f}"
            half = "" if f["ci95"] is None else " ± " + fmt.format(f["ci95"])
            cells.append(fmt.format(f["mean"]) + half + (" (b)" if f.get("interval") == "bootstrap" else ""))
        lines.append(f"| {DISPLAY.get(label, label)} | " + " | ".join(cells) + " |")
    lines.append("")
    base = result["summary"].get("base", {})
    for key in ("inversion_p_forget", "mixture_p_forget"):
        if key in base:
            p = base[key]["mean"]
            lines.append(
                f"- Effective where it should be: {dict(FIGURES)[key]} on the unscrubbed model reaches "
                f"P = {p:.3f} ({'≥' if p >= 0.8 else '<'} 0.8: {'met' if p >= 0.8 else 'NOT met'})."
            )
    for label, per in result["verdicts"].items():
        text = ", ".join(f"{dict(FIGURES)[k]}: {v}" for k, v in per.items())
        lines.append(f"- {DISPLAY.get(label, label)} against Retrain: {text}.")
    for pair, per in result.get("pair_verdicts", {}).items():
        a, b = pair.split(" vs ")
        text = ", ".join(f"{dict(FIGURES)[k]}: {v}" for k, v in per.items())
        lines.append(f"- {DISPLAY.get(a, a)} against {DISPLAY.get(b, b)}: {text}.")
    return "\n".join(lines) + "\n"


def update_doc(result: dict, command: str, item: str = "robustness", path: str = DOC) -> None:
    """Replace the text between ``item``'s markers in ``path`` with the table and its provenance."""
    from constrained_opt.diffusion.runtime.io import write_text

    begin, end = f"<!-- {item}:begin -->", f"<!-- {item}:end -->"
    with open(path, encoding="utf-8") as f:
        text = f.read()
    head, _, rest = text.partition(begin)
    _, _, tail = rest.partition(end)
    source = f"*Generated from `benchmarks/results/{item}.json`, written by `{command}`.*"
    block = f"{begin}\n{source}\n\n{markdown(result)}{end}"
    write_text(path, head + block + tail)
