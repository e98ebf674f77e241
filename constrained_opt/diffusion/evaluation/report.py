"""Report writing: the metrics table (paper Tables 1 + 4), sample grids and the Fig. 2 cosine plot.

Figures use ``matplotlib.figure.Figure`` directly (Agg canvas, no pyplot state, no display needed) and
every file is written atomically.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..runtime.io import atomic_path, write_text

# (metrics.json key, column title, format)
COLUMNS = (
    ("p_forget", "P(y=c_f|x_f) ↓", "{:.3f}"),
    ("p_forget_set", "P(y∈C_f|x_f) ↓", "{:.3f}"),  # several forget classes: any of them
    ("forget_entropy", "Entropy H(P(y|x_f))", "{:.3f}"),
    ("remaining_accuracy", "Remaining acc. ↑", "{:.3f}"),
    ("fid", "FID (classifier features) ↓", "{:.3f}"),
    ("fid_inception", "FID (Inception) ↓", "{:.2f}"),
    ("precision", "Precision ↑", "{:.3f}"),
    ("recall", "Recall ↑", "{:.3f}"),
    ("time_s", "Time (s)", "{:.1f}"),
    ("prep_s", "Prep. (s)", "{:.1f}"),
    ("peak_mem_mb", "Peak mem. (MiB)", "{:.1f}"),
)
DISPLAY = {
    "base": "Unscrubbed (base)",
    "retrain": "Retrain (no class c_f)",
    "erasediff": "EraseDiff",
    "erasediff_shared_adam": "EraseDiff, inner steps via outer Adam",
    "erasediff_release": "EraseDiff, the authors' released loop",
    "moo_matched": "MOO, w = EraseDiff's mean λ",
    "moo_w0.3": "MOO, w = 0.3",
    "moo_w3": "MOO, w = 3",
    "shared_adam_k1": "EraseDiff, inner step via outer Adam, K = 1",
    "shared_adam_k3": "EraseDiff, inner steps via outer Adam, K = 3",
    "release_k1": "EraseDiff, released loop, K = 1",
    "release_k2": "EraseDiff, released loop, K = 2",
    "release_k4": "EraseDiff, released loop, K = 4",
    "eta_coupled": "EraseDiff, η = 1e-4 (the paper's coupling)",
    "finetune": "Finetune (FT)",
    "neggrad": "NegGrad (NG)",
    "moo": "MOO (scalarised Eq. 3)",
    "salun": "SalUn",
    "sa": "Selective Amnesia (SA)",
    "meta_unlearning": "Meta-Unlearning",
    "advunlearn": "AdvUnlearn",
    "sa_tuned": "SA, λ tuned (sa_tuning's choice)",
    "salun_transferred": "SalUn, α·d transferred (α = 3.072/d)",
    **{f"sa_lam{lam}": f"SA, λ = {lam}" for lam in (10, 1, 0.3, 0.1, 0.03, 0.01)},
}


def _cell(value, fmt: str, half=None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if half is None or (isinstance(half, float) and math.isnan(half)):
        return fmt.format(value)
    return f"{fmt.format(value)} ± {fmt.format(half)}"


def metrics_table(metrics: dict[str, dict]) -> str:
    """Markdown table, one row per model, only the columns some model has; ``mean ± half-width`` where
    the row has a 95% interval (``ci95``). A model whose evaluation failed (``{"failed": reason}``) has
    "–" cells and its reason listed below the table."""
    cols = [c for c in COLUMNS if any(c[0] in m for m in metrics.values())]
    lines = [
        "| Model | " + " | ".join(title for _, title, _ in cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for name, m in metrics.items():
        cells = [_cell(m.get(key), fmt, m.get("ci95", {}).get(key)) for key, _, fmt in cols]
        lines.append(f"| {DISPLAY.get(name, name)} | " + " | ".join(cells) + " |")
    failed = [
        f"- {DISPLAY.get(n, n)}: evaluation failed: {m['failed']}"
        for n, m in metrics.items()
        if "failed" in m
    ]
    return "\n".join(lines) + "\n" + "".join(f"\n{line}" for line in failed) + ("\n" if failed else "")


GAP_COLUMNS = [c for c in COLUMNS if c[0] in ("p_forget", "remaining_accuracy", "fid", "precision", "recall")]


def gap_table(metrics: dict[str, dict]) -> str:
    """|metric − Retrain's| per model and metric (as SalUn's tables report the gap to Retrain), with
    95% half-widths where known; empty when there is no Retrain row."""
    rows = {name: m for name, m in metrics.items() if "gap_to_retrain" in m}
    if not rows:
        return ""
    lines = [
        "| Gap to Retrain | " + " | ".join(title.rstrip(" ↑↓") for _, title, _ in GAP_COLUMNS) + " |",
        "|---|" + "---:|" * len(GAP_COLUMNS),
    ]
    for name, m in rows.items():
        gaps, halves = m["gap_to_retrain"], m.get("gap_ci95", {})
        cells = [_cell(gaps.get(key), fmt, halves.get(key)) for key, _, fmt in GAP_COLUMNS]
        lines.append(f"| {DISPLAY.get(name, name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _grid(images: Tensor, labels: Tensor, per_row: int):
    """(H', W', C) image with one row per class (in label order), ``per_row`` samples each, in [0, 1]."""
    from torchvision.utils import make_grid

    rows = [images[labels == c][:per_row] for c in labels.unique(sorted=True)]
    tiles = torch.cat([torch.cat([r, -torch.ones(per_row - len(r), *r.shape[1:])]) for r in rows])
    grid = make_grid((tiles + 1) / 2, nrow=per_row, padding=1, pad_value=1.0)
    return grid.permute(1, 2, 0).clamp(0, 1).numpy()


def save_sample_grid(
    path: str, panels: dict[str, tuple[Tensor, Tensor]], per_row: int = 8, title: str = ""
) -> None:
    """PNG with one panel per model (e.g. base vs scrubbed), one row per class in each panel."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.2 * len(panels), 4.0), dpi=150)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, (images, labels)) in zip(axes, panels.items(), strict=True):
        grid = _grid(images, labels, per_row)
        ax.imshow(
            grid.squeeze(-1) if grid.shape[-1] == 1 else grid,
            cmap="gray",
            vmin=0,
            vmax=1,
            interpolation="nearest",
        )
        ax.set_title(DISPLAY.get(name, name), fontsize=9)
        n_rows = len(labels.unique())
        row_h = grid.shape[0] / n_rows
        ax.set_yticks(
            [row_h * (i + 0.5) for i in range(n_rows)], [str(int(c)) for c in labels.unique(sorted=True)]
        )
        ax.set_xticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def save_cosine_plot(path: str, histories: dict[str, list[dict[str, float]]]) -> None:
    """The paper's Fig. 2: cos(δ, ∇L_r) (top) and cos(δ, ∇g) (bottom) per step, one line per method."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 5.0), dpi=150)
    top, bottom = fig.subplots(2, 1, sharex=True)
    for ax, key, label in (
        (top, "cos_update_retain", "cos(δ, ∇L_r)"),
        (bottom, "cos_update_forget", "cos(δ, ∇g)"),
    ):
        for name, history in histories.items():
            ax.plot([h[key] for h in history], label=DISPLAY.get(name, name), linewidth=0.8)
        ax.axhline(0.0, color="black", linewidth=0.5)
        ax.set_ylabel(label)
        ax.set_ylim(-1.05, 1.05)
    top.legend(loc="lower right", fontsize=8)
    bottom.set_xlabel("unlearning step")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def render_report(
    title: str, metrics: dict[str, dict[str, float]], settings: dict, notes: list[str], figures: list[str]
) -> str:
    """report.md text: settings, the side-by-side table, notes and links to the figures."""
    lines = [f"# {title}", "", "## Settings", ""]
    lines += [f"- {k}: `{v}`" for k, v in settings.items()]
    lines += ["", "## Results", "", metrics_table(metrics)]
    gaps = gap_table(metrics)
    if gaps:
        lines += ["", gaps]
    lines += [f"- {n}" for n in notes]
    lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figures]
    return "\n".join(lines) + "\n"


def write_report(path: str, *args, **kwargs) -> None:
    write_text(path, render_report(*args, **kwargs))
