"""Item 10 (ddpm_multiclass): forgetting digits 0 and 3 in one run, pooled vs one constraint per class.

``constrained-opt unlearn ddpm --method erasediff --forget-class 0,3`` (one pooled constraint on the
union) against the same with ``--per-class-constraints`` (one constraint per class), on the shipped
digits DDPM at the demo's settings (300 steps, batch 64, Adam 1e-4, η = 1, K = 1; forget batches
stratified, so both see the same images). Each variant runs for several seeds; each model is
evaluated as the demo does (100 samples per class, DDIM 50, guidance 2, the evaluation seed = the
run's seed, so base and scrubbed models start from the same x_T). Reported per run: P(y = c | x_c)
for each forgotten class, the accuracy on every other digit, FID (classifier features); and 95%
bootstrap intervals over the evaluation samples, beside the spread over seeds.
"""

from __future__ import annotations

import statistics

import torch

CLASSES = (0, 3)
VARIANTS = {"pooled": "erasediff", "per-class": "erasediff_per_class"}
BOOTSTRAP = 2000


def bootstrap_interval(hits: torch.Tensor, generator: torch.Generator) -> tuple[float, float]:
    """95% percentile interval of the mean of ``hits`` over resamples of its entries."""
    idx = torch.randint(0, len(hits), (BOOTSTRAP, len(hits)), generator=generator)
    means = hits.double()[idx].mean(1)
    return means.quantile(0.025).item(), means.quantile(0.975).item()


def describe(metrics: dict, images, labels, classifier) -> dict:
    """The run's metrics, per-digit accuracy and bootstrap intervals of the forget/keep figures."""
    from constrained_opt.diffusion.evaluation.metrics import classifier_probs

    probs = classifier_probs(classifier, images)
    g = torch.Generator().manual_seed(0)
    keep = ~torch.isin(labels, torch.tensor(CLASSES))
    correct = probs.argmax(-1) == labels
    out = {
        **metrics,
        "accuracy_per_digit": {int(c): correct[labels == c].double().mean().item() for c in range(10)},
    }
    out["ci"] = {f"p_forget_c{c}": bootstrap_interval(probs[labels == c, c], g) for c in CLASSES}
    out["ci"]["remaining_accuracy"] = bootstrap_interval(correct[keep], g)
    return out


def run(device: torch.device, smoke: bool) -> dict:
    from constrained_opt.diffusion.data import load_data
    from constrained_opt.diffusion.evaluation.generated import EvalSettings, evaluate_unet
    from constrained_opt.diffusion.evaluation.multiclass import split_forget_classes
    from constrained_opt.diffusion.jobs.common import load_checked
    from constrained_opt.diffusion.methods.unlearn import unlearn
    from constrained_opt.diffusion.models import SHIPPED_CLASSIFIER, SHIPPED_UNET

    seeds = [0] if smoke else [0, 1, 2]
    steps = 2 if smoke else 300
    data = load_data("digits")
    unet, classifier, _ = load_checked(data, SHIPPED_UNET, SHIPPED_CLASSIFIER, device)
    retain, forget = split_forget_classes(data, CLASSES)
    runs: dict[str, list[dict]] = {"base": [], **{v: [] for v in VARIANTS}}
    for seed in seeds:
        es = EvalSettings(per_class=4 if smoke else 100, num_steps=2 if smoke else 50, seed=seed)

        def evaluate(model, name, es=es):
            return describe(
                *evaluate_unet(model, classifier, data, CLASSES, es, name, progress=False), classifier
            )

        runs["base"].append({"seed": seed, **evaluate(unet, "base")})
        for variant, method in VARIANTS.items():
            result = unlearn(
                method,
                unet,
                retain,
                forget,
                CLASSES,
                steps=steps,
                batch_size=64,
                lr=1e-4,
                seed=seed,
                progress=False,
            )
            lams = {
                key: statistics.mean(h[key] for h in result.history)
                for key in result.history[0]
                if key.startswith("lam")
            }
            runs[variant].append(
                {"seed": seed, "time_s": result.time_s, "mean_lams": lams, **evaluate(result.unet, variant)}
            )
            row = runs[variant][-1]
            print(
                f"ddpm_multiclass  {variant:9s} seed {seed}: P(0|x_0) {row['p_forget_c0']:.3f}, "
                f"P(3|x_3) {row['p_forget_c3']:.3f}, remaining acc {row['remaining_accuracy']:.3f}, "
                f"FID {row['fid']:.3f}"
            )
    summary = {}
    for name, rows in runs.items():
        keys = ("p_forget_c0", "p_forget_c3", "remaining_accuracy", "fid")
        summary[name] = {
            k: {
                "mean": statistics.mean(r[k] for r in rows),
                "sd": statistics.stdev(r[k] for r in rows) if len(rows) > 1 else 0.0,
            }
            for k in keys
        }
        summary[name]["accuracy_per_digit"] = {
            c: statistics.mean(r["accuracy_per_digit"][c] for r in rows)
            for c in range(10)
            if c not in CLASSES
        }
    return {
        "classes": list(CLASSES),
        "steps": steps,
        "seeds": seeds,
        "commands": [
            f"constrained-opt unlearn ddpm --method erasediff --forget-class 0,3 --seed S{flag}"
            for flag in ("", " --per-class-constraints")
        ],
        "runs": runs,
        "summary": summary,
    }


def markdown(res: dict) -> str:
    """The side-by-side table (mean ± sd over seeds, and each seed's 95% bootstrap interval)."""
    classes = res["classes"]
    lines = [
        f"Digits DDPM, forget {' and '.join(map(str, classes))} together, {res['steps']} steps, seeds "
        f"{', '.join(map(str, res['seeds']))}. Mean ± sd over seeds; brackets: each seed's 95% bootstrap "
        "interval over the evaluation samples.",
        "",
        "| model | " + " | ".join(f"P(y={c} given x_{c})" for c in classes) + " | remaining accuracy | FID |",
        "|---|" + "---|" * (len(classes) + 2),
    ]
    for name, rows in res["runs"].items():
        s = res["summary"][name]
        cells = []
        for key in [*(f"p_forget_c{c}" for c in classes), "remaining_accuracy"]:
            intervals = " ".join(f"[{r['ci'][key][0]:.3f}, {r['ci'][key][1]:.3f}]" for r in rows)
            cells.append(f"{s[key]['mean']:.3f} ± {s[key]['sd']:.3f} {intervals}")
        cells.append(f"{s['fid']['mean']:.3f} ± {s['fid']['sd']:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    others = [c for c in range(10) if c not in classes]
    lines += [
        "",
        "Accuracy on each remaining digit (mean over seeds):",
        "",
        "| model | " + " | ".join(str(c) for c in others) + " |",
        "|---|" + "---|" * len(others),
    ]
    for name in res["runs"]:
        acc = res["summary"][name]["accuracy_per_digit"]
        lines.append(
            f"| {name} | "
            + " | ".join(f"{acc[str(c)] if str(c) in acc else acc[c]:.2f}" for c in others)
            + " |"
        )
    lams = res["runs"]["per-class"][0]["mean_lams"]
    if lams:
        lines += [
            "",
            "Mean λ per class over the run (per-class, first seed): "
            + ", ".join(f"{k.removeprefix('lam_')} {v:.3f}" for k, v in lams.items() if k != "lam")
            + ".",
        ]
    lines += ["", "Commands (one run each; S = seed): " + "; ".join(f"`{c}`" for c in res["commands"]) + "."]
    return "\n".join(lines)
