"""Regenerate docs/benchmarks.md and its plots from the JSON results present in a results folder."""

from __future__ import annotations

import json
import os

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")
COMMAND = "python -m benchmarks"


def _load(results: str, name: str) -> dict | None:
    path = os.path.join(results, f"{name}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _machine(res: dict) -> str:
    m = res["machine"]
    where = m.get("gpu") or f"{m['cpu_count']}-core CPU ({m['cpu']}), {m['torch_threads']} torch threads"
    command = res.get("command", f"{COMMAND} --only {{item}}")
    return f"*{where}; torch {m['torch']}; {m['date']}; `{command}`*"


def _save(fig, name: str) -> str:
    os.makedirs(os.path.join(_docs_dir, "img"), exist_ok=True)
    path = os.path.join(_docs_dir, "img", name)
    tmp = f"{path}.tmp.{os.getpid()}.png"
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)
    return f"img/{name}"


def _step_overhead(res: dict, suffix: str) -> list[str]:
    import matplotlib.pyplot as plt

    rows = res["rows"]
    out = [
        f"## 1. step_overhead{suffix}",
        "",
        _machine(res).format(item="step_overhead"),
        "",
        "Time of `opt.step` over the time of the same closure passes run with plain autograd plus one",
        "plain base (Adam) step, medians of interleaved rounds. Target: ≤ 1.05. Noise only adds time, so",
        "the ratio of the fastest rounds is given as well. What remains above 1 is memory traffic that a",
        "plain step does not have: zeroing both rows, accumulating into them (autograd steals a fresh",
        "gradient when `.grad` is None), the Gram pass, the δ axpy, and for K ≥ 1 θ's copy and restore;",
        "about ten passes over n, visible at the 35.7M model's batch of 4 on CPU.",
        "",
        "| model | params | batch | K | step / (closures + base step) | same, fastest rounds "
        "| step / closures |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fastest = f"{r['ratio_of_minima']:.3f}" if "ratio_of_minima" in r else "–"
        out.append(
            f"| {r['model']} | {r['params'] / 1e6:.2f}M | {r['batch']} | {r['K']} | {r['ratio']:.3f} | "
            f"{fastest} | {r['ratio_vs_closures_only']:.3f} |"
        )
    fig, ax = plt.subplots(figsize=(6, 3))
    labels = [f"{r['model']}\nK={r['K']}" for r in rows]
    ax.bar(labels, [r["ratio"] for r in rows], color="tab:blue")
    ax.axhline(1.05, color="tab:red", ls="--", label="target 1.05")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_ylabel("step / (closures + base step)")
    ax.legend()
    out += ["", f"![step overhead]({_save(fig, f'step_overhead{suffix}.png')})", ""]
    plt.close(fig)
    return out


def _projection(res: dict, suffix: str) -> list[str]:
    import matplotlib.pyplot as plt

    rows = res["rows"]
    out = [
        f"## 2. projection{suffix}",
        "",
        _machine(res).format(item="projection"),
        "",
        "Gram (‖∇g‖², ‖∇L_r‖², ∇g·∇L_r), λ and δ = ∇L_r + λ∇g. `flat` is ours (no gather: `p.grad` are",
        "views of the buffer; three BLAS dots, or on CPU above 8M elements one cache-blocked batched GEMM",
        "that reads the buffer once), `per_param` a Python loop over tensors, `torch_cat` the authors'",
        "flattening with a copy back, `memcpy` a copy of the (2, n) buffer. Targets: flat ≤ 1.5× memcpy;",
        "≥ 5× faster than torch_cat at 35M.",
        "",
        "| n | flat / memcpy | torch_cat / flat | per_param / flat |",
        "|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['n']:,} | {r['flat_over_memcpy']:.2f} | {r['speedup_vs_torch_cat']:.1f}× | "
            f"{r['speedup_vs_per_param']:.1f}× |"
        )
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name in ("flat", "per_param", "torch_cat", "memcpy"):
        ax.loglog([r["n"] for r in rows], [r["seconds"][name] * 1e3 for r in rows], marker="o", label=name)
    ax.set_xlabel("parameters")
    ax.set_ylabel("ms (median)")
    ax.legend()
    out += ["", f"![projection]({_save(fig, f'projection{suffix}.png')})", ""]
    plt.close(fig)
    return out


def _memory(res: dict, suffix: str) -> list[str]:
    out = [
        f"## 3. memory{suffix}",
        "",
        _machine(res).format(item="memory"),
        "",
        "Peak memory of two EraseDiff steps minus that of two plain Adam steps over the same passes, in",
        f"units of the trained parameters' bytes ({res['rows'][0]['method']}). Target: ≤ 2.1.",
        "The optimizer owns one (2, n) gradient buffer and nothing else (θ's snapshot lives in its retain",
        "row during the inner loop); for K ≥ 2 autograd's gradient at φ^k is alive during each further",
        "inner pass. The rows exist from the start of the step while a plain step's `.grad` appear during",
        "backward, so where the activations peak decides how much of the second row shows.",
        "",
        "| model | K | param MB | peak, Adam (MB) | peak, EraseDiff (MB) | extra / param bytes |",
        "|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        out.append(
            f"| {r['model']} | {r['K']} | {r['param_bytes'] / 2**20:.1f} | "
            f"{r['peak_bytes']['adam'] / 2**20:.0f} | {r['peak_bytes']['erasediff'] / 2**20:.0f} | "
            f"{r['extra_in_param_bytes']:.2f} |"
        )
    return [*out, ""]


def _unlearning(res: dict, suffix: str) -> list[str]:
    import matplotlib.pyplot as plt

    from .unlearning import markdown

    out = [f"## 4. unlearning: time to forget{suffix}", "", _machine(res).format(item="unlearning"), ""]
    out += markdown(res, _load(_results_dir, "comparison")).splitlines()
    fig, (ax_p, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.2))
    for name, run in res["runs"].items():
        t = [0.0] + [p["time_s"] for p in run["probes"]]
        ax_p.plot(t, [res["base"]["p_forget"]] + [p["p_forget"] for p in run["probes"]], label=name)
        accs = [res["base"]["remaining_accuracy"]] + [p["remaining_accuracy"] for p in run["probes"]]
        ax_acc.plot(t, accs, label=name)
    ax_p.axhline(res["threshold"], color="gray", ls="--", lw=0.8)
    ax_p.set(xlabel="unlearning time (s)", ylabel="P(y = c_f | x_f)", yscale="log")
    ax_acc.set(xlabel="unlearning time (s)", ylabel="remaining accuracy")
    ax_acc.legend(fontsize=8)
    out += ["", f"![time to forget]({_save(fig, f'time_to_forget{suffix}.png')})"]
    plt.close(fig)
    return [*out, ""]


def _sa_fisher(res: dict, suffix: str) -> list[str]:
    from .sa_fisher import markdown

    return [
        f"## 9. sa_fisher: the scale of SA's released Fisher{suffix}",
        "",
        _machine(res),
        "",
        markdown(res),
        "",
    ]


COMPARISON_TITLES = {
    "comparison": "6. comparison: digits, 3 seeds, published budgets",
    "ablation": "7. ablation: EraseDiff's inner loop through the outer Adam, and the literal η coupling",
    "comparison_mnist5k": "8. comparison on mnist5k: one seed, bootstrap intervals",
}


def _comparison(res: dict, suffix: str) -> list[str]:
    from .comparison import markdown

    title = COMPARISON_TITLES[res["config"]]
    return [
        f"## {title}{suffix}",
        "",
        _machine(res).format(item=res["config"]),
        "",
        *markdown(res).splitlines(),
        "",
    ]


def _sa_budget(res: dict, suffix: str) -> list[str]:
    from .sa_budget import markdown

    out = [
        f"## 4b. Selective Amnesia at its published budget{suffix}",
        "",
        _machine(res).format(item="sa_budget"),
    ]
    return [*out, "", *markdown(res).splitlines(), ""]


SECTIONS = {
    "step_overhead": _step_overhead,
    "projection": _projection,
    "memory": _memory,
    "unlearning": _unlearning,
    "sa_budget": _sa_budget,
    "comparison": _comparison,
    "ablation": _comparison,
    "comparison_mnist5k": _comparison,
    "sa_fisher": _sa_fisher,
}


_docs_dir = DOCS
_results_dir = ""


def write_results_tables(results: str, docs_dir: str = DOCS, include_smoke: bool = False) -> str | None:
    """Replace each ``<!-- BEGIN item -->`` … ``<!-- END item -->`` block of ``docs_dir/results.md`` by
    the comparison item's section from ``results/item.json`` (blocks without a result stay)."""
    path = os.path.join(docs_dir, "results.md")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        text = f.read()
    for item in COMPARISON_TITLES:
        res = _load(results, item)
        begin, end = f"<!-- BEGIN {item} -->", f"<!-- END {item} -->"
        if res is None or (res.get("smoke") and not include_smoke) or begin not in text:
            continue
        from .comparison import markdown

        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        block = "\n".join(["", _machine(res).format(item=item), "", markdown(res), ""])
        text = head + begin + block + end + tail
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def write_docs(results: str, docs_dir: str = DOCS, include_smoke: bool = False) -> str:
    """Write ``docs_dir/benchmarks.md`` (and ``docs_dir/img/*.png``) from ``results/*.json``, and the
    comparison tables of ``docs_dir/results.md``."""
    global _docs_dir, _results_dir
    _docs_dir, _results_dir = docs_dir, results
    write_results_tables(results, docs_dir, include_smoke)
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python -m benchmarks` from `benchmarks/results/*.json`; every figure below was",
        "measured in the run that wrote its JSON file (machine, date and command under each heading).",
        "Ratios, not absolute times, are quoted: the machines are noisy. CI runs only `--smoke`.",
        "",
    ]
    for item, section in SECTIONS.items():
        found = False
        for suffix in ("", "_cuda"):
            res = _load(results, item + suffix)
            if res is not None and (include_smoke or not res.get("smoke")):
                lines += section(res, suffix)
                found = True
        if not found:
            lines += [f"## {item}", "", f"Not measured yet: run `{COMMAND} --only {item}`.", ""]
    if not any(_load(results, item + "_cuda") for item in SECTIONS):
        lines += [
            "## 5. GPU",
            "",
            "Not measured yet: no CUDA results in this folder. On a CUDA machine, `bash benchmarks/gpu.sh`",
            "runs items 1–3 there (under 8 minutes) and adds `*_cuda.json` sections to this page.",
            "",
        ]
    os.makedirs(docs_dir, exist_ok=True)
    path = os.path.join(docs_dir, "benchmarks.md")
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write("\n".join(lines))
    os.replace(tmp, path)
    return path
