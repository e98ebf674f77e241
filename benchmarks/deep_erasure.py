"""Items deep_erasure_digits, deep_erasure_mnist5k: the frontier of depth of erasure against cost (issue 18).

Stage 1 runs ``constrained-opt demo`` (:func:`~constrained_opt.diffusion.jobs.demo.demo`; the command is
recorded as ``demo_command``) on the data set, forget class 0, seeds 0–2, with every row of
:data:`ROWS` at the demo's digits budget (300 steps × batch 64, Adam lr 1e-4; ``--hp LABEL.KEY=VALUE``
overrides a row's hyperparameter): utility (remaining accuracy, FID, precision, recall) and cost
(unlearning time, peak memory) per row and seed, and the Retrain row of each seed, evaluated with that
seed's own shipped Retrain model where one ships (else seed 0's, noted in the result).

Stage 2 attacks each row's model of each seed and each seed's Retrain model with
:func:`benchmarks.robustness.attack_cached` (attack seed = seed) under :data:`BUDGET`: 100 relearning
steps probed every 2 steps, the other attacks at their default :class:`~.Budget`. Attacks: inversion,
relearning, benign fine-tuning. The embedding mixture is left out: it found nothing on any scrubbed model
(docs/robustness.md: P ≤ 0.04 on every run except Finetune's, which forgot nothing).

Stage 3 measures the cost (:mod:`benchmarks.deep_cost`) at the item's batch size, where machine load
cancels: ``time_ratio`` is the median over :data:`~.deep_cost.COST` rounds (R = 5) of a row's time for S = 3
unlearning steps over plain EraseDiff's time in the same round (every row in turn, one process; min and
max over rounds beside it); ``memory_ratio`` is the peak memory of one step (2 steps after a warm-up, a
fresh process per row) over EraseDiff's. One-off preparation (SalUn's mask, SA's Fisher) is in neither:
its demo time ``prep_s`` per seed is a note beside them. The per-round ratios are stored under ``"cost"``.
The demo's own ``time_s``/``peak_mem_mb`` are not used: its rows run minutes apart under changing load.

Summary per row: mean ± 95% Student-t half-width over seeds of relearning's steps to P ≥ 0.5 (censored at
100 + 2 when never reached) and its AUC (the mean P over the attack), the inversion and benign P, the
utility metrics; the cost ratios (median, min–max over rounds); and the goal verdict against Retrain
(:func:`goal`). All stages resume from ``work/<item>/`` (the cost from ``cost.json``). The item writes
``<item>.json``, its block of docs/robustness.md and the frontier plot ``docs/img/<item>.png``, except
with ``--smoke`` (one seed, two rows, tiny budgets; the cost with R = S = 1) or ``--no-docs``.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from . import deep_cost
from .robustness import DOC, attack_cached, mean_ci95, retrain_files

FORGET_CLASS = 0
SEEDS = 3
# label: (method, hyperparameters). "erasediff" is plain EraseDiff, the cost reference; a row whose label
# is its method's name with no hyperparameters runs as ``--methods``, the others as ``--variant``.
# Methods are resolved when the item runs, so rows may name methods that other branches register.
ROWS: dict[str, tuple[str, dict]] = {
    "erasediff": ("erasediff", {}),
    "erasediff_inversion": ("erasediff", {"robust": "inversion", "inversion_lr": 1.0}),
    "moo_inversion": ("moo", {"robust": "inversion", "inversion_lr": 1.0}),
    "meta_unlearning": ("meta_unlearning", {}),
    "advunlearn": ("advunlearn", {}),
}
ATTACKS = ("inversion", "relearn", "benign")
BUDGET = dict(relearn_steps=100, probe_every=2)  # the rest: Budget's defaults
# The sweep that chose the robust rows' defaults (docs/robustness.md, "How the defaults were chosen"):
# each form at two strengths, weak then strong, on one class and seed; the rule (fixed before any row
# ran) is :func:`choose_defaults`.
SWEEP_ROWS: dict[str, tuple[str, dict]] = {
    "relearn_0.3": ("erasediff", {"robust": "relearn", "relearn_lr": 0.3, "relearn_max_norm": 0.0}),
    "relearn_3": ("erasediff", {"robust": "relearn", "relearn_lr": 3.0, "relearn_max_norm": 0.0}),
    "sharpness_0.3": ("erasediff", {"robust": "sharpness", "sharpness_rho": 0.3}),
    "sharpness_3": ("erasediff", {"robust": "sharpness", "sharpness_rho": 3.0}),
    "inversion_1": ("erasediff", {"robust": "inversion", "inversion_lr": 1.0}),
    "inversion_4": ("erasediff", {"robust": "inversion", "inversion_lr": 4.0}),
    # added after the unclipped relearning rows above wrecked the model: each look-ahead step clipped
    # to norm 1, as the relearning attack clips (Relearn(max_norm=)); the default relearn row
    "relearn_clip_0.3": ("erasediff", {"robust": "relearn", "relearn_lr": 0.3}),
    # added after the clipped row wrecked the model too: sign steps, the relearning attack's first Adam
    # step (Relearn(sign=True)), one attack step long (the attack's Adam lr is 1e-4); the stronger
    # sibling (3e-4) was dropped unfinished once this one had broken remaining accuracy
    "relearn_sign_1e-4": ("erasediff", {"robust": "relearn", "relearn_sign": True, "relearn_lr": 1e-4}),
}
MNIST5K_ROWS = {label: ROWS[label] for label in ("erasediff", "erasediff_inversion")}
CONFIGS = {
    "deep_erasure_digits": dict(data="digits", per_class=200),
    # as comparison_mnist5k; plain EraseDiff and its inversion row only: 2 CPU cores could not also run
    # MOO's row and the two baselines on mnist5k seeds (digits measured them). Seeds 0 and 1: seed 2's
    # runs did not finish in the session that measured them; they resume from the work folder with 3
    "deep_erasure_mnist5k": dict(data="mnist5k", per_class=100, rows=MNIST5K_ROWS, seeds=2),
    "deep_sweep_digits": dict(data="digits", per_class=200, seeds=1, rows=SWEEP_ROWS),
}
SMOKE = dict(seeds=1, steps=2, batch_size=8, per_class=4, sampling_steps=2)
SMOKE_ROWS = {"erasediff": ("erasediff", {}), "erasediff_value": ("erasediff", {"rule": "value"})}
MAX_TIME_RATIO = 3.0  # the goal's cost limit: time per unlearning step ≤ 3 × plain EraseDiff's
# (figure key, column title, format); "↑"/"↓": which way is deeper or better
FIGURES = (
    ("p_forget", "P no attack ↓", "{:.3f}"),
    ("relearn_steps", "Relearn steps to P ≥ 0.5 ↑", "{:.0f}"),
    ("relearn_auc", "Relearn AUC ↓", "{:.3f}"),
    ("inversion_p_forget", "Inversion P ↓", "{:.3f}"),
    ("benign_p_forget", "Benign FT P ↓", "{:.3f}"),
    ("remaining_accuracy", "Remaining acc. ↑", "{:.3f}"),
    ("fid", "FID ↓", "{:.3f}"),
    ("precision", "Precision ↑", "{:.3f}"),
    ("recall", "Recall ↑", "{:.3f}"),
    ("time_ratio", "Step time / EraseDiff", "{:.2f}"),
    ("memory_ratio", "Step peak mem. / EraseDiff", "{:.2f}"),
)
UTILITY = ("p_forget", "remaining_accuracy", "fid", "precision", "recall")
IMG = os.path.join(os.path.dirname(DOC), "img")


def demo_runs(rows: dict[str, tuple[str, dict]]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(``--methods``, ``--variant`` texts) that run ``rows`` beside the demo's own plain EraseDiff."""
    method, hp = rows.get("erasediff", ("erasediff", {}))
    if method != "erasediff" or hp:
        raise SystemExit(
            "deep_erasure: the row 'erasediff' is plain EraseDiff (the cost reference): rename it"
        )
    methods, variants = [], []
    for label, (method, hp) in rows.items():
        if label == "erasediff":
            continue
        if label == method and not hp:
            methods.append(method)
        else:
            pairs = ",".join(f"{k}={v}" for k, v in hp.items())
            variants.append(f"{label}={method}" + (f":{pairs}" if pairs else ""))
    return tuple(methods), tuple(variants)


def check_rows(rows: dict[str, tuple[str, dict]]) -> None:
    """Every row's method is registered here (resolved at run time, not at import)."""
    from constrained_opt.diffusion.methods.registry import METHODS

    unknown = {label: method for label, (method, _) in rows.items() if method not in METHODS}
    if unknown:
        listed = ", ".join(f"{label} ({method})" for label, method in unknown.items())
        raise SystemExit(
            f"deep_erasure: rows {listed} use methods not registered in this checkout: drop them from "
            "ROWS or merge the branches that add them"
        )


def run(
    device: torch.device,
    smoke: bool,
    config: str = "deep_erasure_digits",
    work: str = "runs/benchmarks",
    hp: tuple[str, ...] = (),
) -> dict:
    from constrained_opt.diffusion.attacks.common import Budget
    from constrained_opt.diffusion.data import load_data
    from constrained_opt.diffusion.evaluation.generated import EvalSettings
    from constrained_opt.diffusion.jobs.comparison import plan_runs
    from constrained_opt.diffusion.jobs.demo import demo
    from constrained_opt.diffusion.jobs.demo_seed import seed_dir
    from constrained_opt.diffusion.models import load_classifier, shared_retrain_note, shipped
    from constrained_opt.diffusion.runtime.io import read_json

    from .comparison import _commit, command
    from .robustness import SMOKE_BUDGET

    rows = {"erasediff": ("erasediff", {}), **(SMOKE_ROWS if smoke else CONFIGS[config].get("rows", ROWS))}
    check_rows(rows)
    methods, variants = demo_runs(rows)
    cfg = dict(
        {"seeds": SEEDS, **CONFIGS[config]},
        methods=methods,
        variants=variants,
        published_budgets=False,
        budgets=(),
        hp=tuple(hp),
        bootstrap=0,
    )
    if smoke:
        cfg = {**cfg, "data": "digits", **SMOKE}
    out = os.path.join(work, config + ("_smoke" if smoke else ""))
    seeds = list(range(cfg["seeds"]))
    demo(
        data=cfg["data"],
        seeds=cfg["seeds"],
        out=out,
        methods=methods,
        variants=variants,
        steps=cfg.get("steps", 300),
        batch_size=cfg.get("batch_size", 64),
        lr=1e-4,
        hp=cfg["hp"],
        es=EvalSettings(per_class=cfg["per_class"], num_steps=cfg.get("sampling_steps", 50), seed=0),
        device=str(device),
        resume=True,
        progress=False,
    )
    data = load_data(cfg["data"])
    classifier = load_classifier(shipped(cfg["data"], "classifier"))[0].to(device)
    retrain = retrain_files(cfg["data"], FORGET_CLASS, seeds)
    budget_kw = SMOKE_BUDGET if smoke else BUDGET
    metrics, attacked = {}, {}
    for s in seeds:
        folder = seed_dir(out, s, len(seeds))
        metrics[s] = read_json(os.path.join(folder, "metrics.json"))
        models = {label: os.path.join(folder, "models", f"{label}.safetensors") for label in rows}
        if s in retrain:
            models = {"retrain": retrain[s], **models}
        for label, path in models.items():
            attacked.setdefault(label, {})[s] = attack_cached(
                label,
                s,
                path,
                Budget(**budget_kw, seed=s),
                os.path.join(out, "attacks"),
                classifier,
                data,
                FORGET_CLASS,
                ATTACKS,
                legacy=False,
            )
    runs = plan_runs(methods, variants=variants, hp=cfg["hp"])
    cost = deep_cost.measure(
        cfg["data"],
        {run.label: (run.method, run.hparams) for run in runs},
        FORGET_CLASS,
        cfg.get("batch_size", 64),
        device,
        **(deep_cost.SMOKE_COST if smoke else deep_cost.COST),
        cache=os.path.join(out, "cost.json"),
        run_steps=cfg.get("steps", 300),
    )
    cost = {
        **cost,
        "prep_s": {label: {str(s): metrics[s].get(label, {}).get("prep_s") for s in seeds} for label in rows},
    }
    per_seed = per_seed_figures(metrics, attacked, Budget(**budget_kw))
    summary = cost_figures(summarise(per_seed), cost)
    return {
        "config": config,
        "data": cfg["data"],
        "forget_class": FORGET_CLASS,
        "seeds": seeds,
        "rows": {label: [method, hp_] for label, (method, hp_) in rows.items()},
        "hp": list(cfg["hp"]),
        "code_commit": _commit(),
        "demo_command": command(config + ("_smoke" if smoke else ""), dict(cfg, seed=0), work),
        "work": out,
        "unlearning": {"steps": cfg.get("steps", 300), "batch_size": cfg.get("batch_size", 64), "lr": 1e-4},
        "attacks": list(ATTACKS),
        "attack_budget": {**dataclasses.asdict(Budget(**budget_kw)), "seed": "= unlearning seed"},
        "retrain_files": {str(s): os.path.basename(p) for s, p in retrain.items()},
        "retrain_note": shared_retrain_note(retrain),
        "per_seed": per_seed,
        "cost": cost,
        "summary": summary,
        "goal": goal(summary),
    }


def per_seed_figures(metrics: dict[int, dict], attacked: dict[str, dict[int, dict]], budget) -> dict:
    """{label: {seed: figures}}: the demo's utility metrics and the attack figures
    (:func:`benchmarks.robustness.flatten`)."""
    from .robustness import flatten

    out: dict[str, dict[str, dict]] = {}
    for label, per in attacked.items():
        for s, record in per.items():
            m = metrics[s].get(label, {})
            figures = {k: m[k] for k in UTILITY if k in m and "failed" not in m}
            attack = flatten(record["results"], budget)
            figures |= {k: attack[k] for k in ("relearn_steps", "relearn_auc") if k in attack}
            figures |= {k: attack[k] for k in ("inversion_p_forget", "benign_p_forget") if k in attack}
            out.setdefault(label, {})[str(s)] = figures
    return out


def cost_figures(summary: dict[str, dict], cost: dict) -> dict[str, dict]:
    """``summary`` with each measured row's ``time_ratio`` (:func:`~.deep_cost.spread` of its per-round
    ratios) and ``memory_ratio`` (one measurement) from :func:`~.deep_cost.measure`'s ``cost``."""
    out = {label: dict(figures) for label, figures in summary.items()}
    for label, ratios in cost["time_ratio"].items():
        figures = out.setdefault(label, {})
        figures["time_ratio"] = deep_cost.spread(ratios)
        if cost["memory_ratio"].get(label) is not None:
            figures["memory_ratio"] = deep_cost.spread([cost["memory_ratio"][label]])
    return out


def summarise(per_seed: dict[str, dict[str, dict]]) -> dict[str, dict]:
    """{label: {figure: {mean, ci95 (95% Student-t half-width over seeds; None for one seed), values}}}
    (the cost figures come from :func:`cost_figures`)."""
    out = {}
    for label, per in per_seed.items():
        out[label] = {}
        for key, _, _ in FIGURES:
            values = [f[key] for f in per.values() if key in f]
            if values:
                mean, half = mean_ci95(values)
                out[label][key] = {"mean": mean, "ci95": half, "values": values}
    return out


def _centre(figure: dict) -> float:
    """A figure's value: the median over rounds of a cost figure, else the mean over seeds."""
    return figure["median"] if "median" in figure else figure["mean"]


def _interval(figure: dict) -> tuple[float, float]:
    half = figure["ci95"] or 0.0
    return figure["mean"] - half, figure["mean"] + half


# The goal's criteria: (figure, test(row's mean, Retrain's interval low, high), what a failure means)
CRITERIA = (
    ("relearn_steps", lambda m, lo, hi: m >= lo, "relearn steps below Retrain's interval"),
    ("inversion_p_forget", lambda m, lo, hi: m <= hi, "inversion P above Retrain's"),
    ("benign_p_forget", lambda m, lo, hi: m <= hi, "benign P above Retrain's"),
    ("remaining_accuracy", lambda m, lo, hi: lo <= m <= hi, "remaining accuracy outside Retrain's"),
    ("fid", lambda m, lo, hi: lo <= m <= hi, "FID outside Retrain's"),
    ("time_ratio", lambda m, lo, hi: m <= MAX_TIME_RATIO, f"time > {MAX_TIME_RATIO:g}× EraseDiff's"),
)


def goal(summary: dict[str, dict]) -> dict[str, dict]:
    """Issue 18's goal per row against Retrain's 95% intervals (a single seed: its value): relearning
    steps not below Retrain's interval, inversion and benign P not above it, remaining accuracy and FID
    inside it, time per unlearning step ≤ :data:`MAX_TIME_RATIO` × EraseDiff's (median over rounds).
    {label: {"as_deep_as_retrain": bool, "fails": [criterion, ...], "missing": [figure, ...]}}; no verdict
    without a Retrain row."""
    reference = summary.get("retrain")
    if reference is None:
        return {}
    out = {}
    for label, figures in summary.items():
        if label == "retrain":
            continue
        fails, missing = [], []
        for key, test, text in CRITERIA:
            bounds = _interval(reference[key]) if key in reference else None
            if key not in figures or (bounds is None and key != "time_ratio"):
                missing.append(key)
            elif not test(_centre(figures[key]), *(bounds or (None, None))):
                fails.append(text)
        out[label] = {"as_deep_as_retrain": not fails and not missing, "fails": fails, "missing": missing}
    return out


def _cell(figure: dict | None, fmt: str) -> str:
    if figure is None:
        return "–"
    if "median" in figure:
        return f"{fmt.format(figure['median'])} ({fmt.format(figure['min'])}–{fmt.format(figure['max'])})"
    half = "" if figure["ci95"] is None else " ± " + fmt.format(figure["ci95"])
    return fmt.format(figure["mean"]) + half


SWEEP_ACCURACY, SWEEP_FID_FACTOR = 0.98, 1.5  # the sweep rule's utility condition


def choose_defaults(result: dict) -> dict[str, dict]:
    """The sweep rule, per robust form (rows grouped by their ``robust`` setting, in ``rows`` order = weak
    to strong): the weakest row whose relearning steps reach Retrain's, with remaining accuracy ≥ 0.98
    and FID ≤ 1.5 × plain EraseDiff's; else the row with the most relearning steps among those meeting
    that utility condition; else the weakest row. {form: {"row", "why"}}."""
    summary, rows = result["summary"], result["rows"]
    if "retrain" not in summary or "erasediff" not in summary:
        return {}
    target = summary["retrain"]["relearn_steps"]["mean"]
    fid_cap = SWEEP_FID_FACTOR * summary["erasediff"]["fid"]["mean"]
    by_form: dict[str, list[str]] = {}
    for label, (_, hp) in rows.items():
        if hp.get("robust") and label in summary:
            by_form.setdefault(hp["robust"], []).append(label)
    out = {}
    for form, labels in by_form.items():
        used = ("relearn_steps", "remaining_accuracy", "fid")
        mean = {k: {f: summary[k][f]["mean"] for f in used} for k in labels}
        useful = [
            k for k in labels if mean[k]["remaining_accuracy"] >= SWEEP_ACCURACY and mean[k]["fid"] <= fid_cap
        ]
        deep = [k for k in useful if mean[k]["relearn_steps"] >= target]
        if deep:
            out[form] = {
                "row": deep[0],
                "why": f"weakest whose relearning steps reach Retrain's ({target:g})",
            }
        elif useful:
            best = max(useful, key=lambda k: mean[k]["relearn_steps"])
            out[form] = {"row": best, "why": "none reaches Retrain's steps; most steps among the useful ones"}
        else:
            out[form] = {"row": labels[0], "why": "none meets the utility condition; the weakest"}
    return out


def markdown(result: dict, image: str | None = None) -> str:
    """The item's table (mean ± 95% half-width over seeds; cost: median (min–max) over rounds), the
    one-off preparation times, the goal verdicts and the frontier plot."""
    lines = [
        "| Row | " + " | ".join(title for _, title, _ in FIGURES) + " |",
        "|---|" + "---:|" * len(FIGURES),
    ]
    for label, figures in result["summary"].items():
        cells = [_cell(figures.get(key), fmt) for key, _, fmt in FIGURES]
        method, hp = result["rows"].get(label, ("retrain", {}))
        name = "Retrain" if label == "retrain" else f"{label} ({method}{' ' + str(hp) if hp else ''})"
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    per_seed_prep = result.get("cost", {}).get("prep_s", {})
    prep = {
        label: sum(t) / len(t)
        for label, per in per_seed_prep.items()
        if (t := [v or 0 for v in per.values()])
    }
    prep = {label: t for label, t in prep.items() if t >= 0.05}  # methods that prepare (SalUn, SA)
    if prep:
        times = ", ".join(f"{label} {t:.1f} s" for label, t in prep.items())
        lines.append(f"- One-off preparation (demo, mean over seeds; not in the time ratio): {times}.")
    one_seed = len(result.get("seeds", ())) == 1
    if one_seed:
        lines.append("- One seed: no goal verdict (it compares with Retrain's interval over seeds).")
    for label, verdict in () if one_seed else result["goal"].items():
        why = verdict["fails"] + [f"no {k}" for k in verdict["missing"]]
        yes = "yes" if verdict["as_deep_as_retrain"] else f"no ({'; '.join(why)})"
        lines.append(f"- {label}: as deep as Retrain: {yes}.")
    if not result["goal"] and not one_seed:
        lines.append("- No Retrain model ships for this data set and class: no goal verdict.")
    if result.get("config", "").startswith("deep_sweep"):
        for form, choice in choose_defaults(result).items():
            lines.append(f"- Default for `{form}` by the sweep rule: `{choice['row']}` ({choice['why']}).")
    files = ", ".join(f"seed {s}: `{f}`" for s, f in result["retrain_files"].items())
    lines.append(
        f"- Retrain models: {files}." + (f" {result['retrain_note']}" if result["retrain_note"] else "")
    )
    if image:
        lines += ["", f"![{result['config']} frontier]({image})"]
    return "\n".join(lines) + "\n"


def frontier_plot(result: dict, path: str) -> None:
    """PNG: x = time per unlearning step / EraseDiff's (median, min–max over rounds), y = relearning steps
    to P ≥ 0.5 (mean ± 95% half-width over seeds), one marker per row; Retrain's interval as a horizontal
    band. Written atomically."""
    from matplotlib.figure import Figure

    from constrained_opt.diffusion.runtime.io import atomic_path

    summary = result["summary"]
    fig = Figure(figsize=(6, 4), dpi=120)
    ax = fig.subplots()
    if "retrain" in summary and "relearn_steps" in summary["retrain"]:
        lo, hi = _interval(summary["retrain"]["relearn_steps"])
        ax.axhspan(lo, max(hi, lo + 0.5), color="tab:green", alpha=0.2, label="Retrain (95% interval)")
    for label, figures in summary.items():
        if label == "retrain" or "time_ratio" not in figures or "relearn_steps" not in figures:
            continue
        x, y = figures["time_ratio"], figures["relearn_steps"]
        xc = _centre(x)
        xerr = [[xc - x["min"]], [x["max"] - xc]] if "median" in x else x["ci95"] or 0
        ax.errorbar(xc, y["mean"], xerr=xerr, yerr=y["ci95"] or 0, fmt="o", capsize=3, label=label)
    b = result["attack_budget"]
    ceiling = b["relearn_steps"] + b["probe_every"]
    ax.axhline(ceiling, color="gray", ls=":", lw=0.8, label=f"never reached in {b['relearn_steps']} steps")
    ax.axvline(MAX_TIME_RATIO, color="gray", ls="--", lw=0.8, label=f"{MAX_TIME_RATIO:g}× EraseDiff's time")
    ax.set_xlabel("time per unlearning step / plain EraseDiff's")
    ax.set_ylabel("relearning steps to P(y=c_f) ≥ 0.5")
    ax.set_title(f"{result['data']}: depth against cost (forget class {result['forget_class']})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def update_doc(result: dict, command: str, item: str, path: str = DOC) -> None:
    """Write the frontier plot ``docs/img/<item>.png`` and replace the text between ``item``'s markers in
    docs/robustness.md with the table, the verdicts and the plot."""
    from constrained_opt.diffusion.runtime.io import write_text

    begin, end = f"<!-- {item}:begin -->", f"<!-- {item}:end -->"
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if begin not in text or end not in text:
        raise SystemExit(f"{path} has no {begin} … {end} block: add the markers where the table goes")
    frontier_plot(result, os.path.join(os.path.dirname(path), "img", f"{item}.png"))
    head, _, rest = text.partition(begin)
    _, _, tail = rest.partition(end)
    source = (
        f"*Generated from `benchmarks/results/{item}.json`, written by `{command}`; its demo stage: "
        f"`{result['demo_command']}`.*"
    )
    block = f"{begin}\n{source}\n\n{markdown(result, f'img/{item}.png')}{end}"
    write_text(path, head + block + tail)
