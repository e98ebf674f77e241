"""How attack results are reported: the flat ``attack_*`` keys, the "under attack" table, the sample grid
and one line per model."""

from __future__ import annotations

import torch
from torch import Tensor

from ..runtime.io import atomic_path


def summary(results: dict[str, dict]) -> dict[str, float | int | None]:
    """The flat ``attack_<name>_<figure>`` keys that the demo's metrics.json and tables carry."""
    out: dict[str, float | int | None] = {}
    for name, r in results.items():
        if name == "none":
            continue
        out[f"attack_{name}_p_forget"] = r["p_forget"]
        out[f"attack_{name}_entropy"] = r["entropy"]
        if "steps_to_threshold" in r:
            out[f"attack_{name}_steps"] = r["steps_to_threshold"]
        if name == "relearn" and "auc" in r:
            out["attack_relearn_auc"] = r["auc"]
    return out


ATTACK_COLUMNS = (
    ("attack_inversion_p_forget", "Inversion P ↓"),
    ("attack_mixture_p_forget", "Mixture P ↓"),
    ("attack_relearn_p_forget", "Relearn P (end) ↓"),
    ("attack_relearn_steps", "Relearn steps to P ≥ 0.5 ↑"),
    ("attack_relearn_auc", "Relearn mean P (AUC) ↓"),
    ("attack_benign_p_forget", "Benign FT P (end) ↓"),
)


def _cell(row: dict, key: str) -> str:
    if key not in row:
        return "–"
    value = row[key]
    if value is None:  # a step count that never reached the threshold within the budget
        return "> budget"
    return str(value) if isinstance(value, int) else f"{value:.3f}"


def attack_table(rows: dict[str, dict], display: dict[str, str] | None = None) -> str:
    """Markdown "under attack" table: one row per model, the ``attack_*`` columns any row has."""
    cols = [c for c in ATTACK_COLUMNS if any(c[0] in r for r in rows.values())]
    if not cols:
        return ""
    lines = [
        "| Model | P(y=c_f) no attack | " + " | ".join(t for _, t in cols) + " |",
        "|---|---:|" + "---:|" * len(cols),
    ]
    for name, r in rows.items():
        cells = [_cell(r, "p_forget"), *(_cell(r, key) for key, _ in cols)]
        lines.append(f"| {(display or {}).get(name, name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def save_attack_grid(path: str, samples: dict[str, Tensor], title: str, per_row: int = 10) -> None:
    """PNG with one row of class-c_f samples per attack (``none`` first), labelled."""
    from matplotlib.figure import Figure
    from torchvision.utils import make_grid

    rows = []
    for images in samples.values():
        row = images[:per_row]
        rows.append(torch.cat([row, -torch.ones(per_row - len(row), *row.shape[1:])]))
    grid = make_grid((torch.cat(rows) + 1) / 2, nrow=per_row, padding=1, pad_value=1.0)
    grid = grid.permute(1, 2, 0).clamp(0, 1).numpy()
    fig = Figure(figsize=(0.45 * per_row + 1.2, 0.45 * len(rows) + 0.6), dpi=150)
    ax = fig.subplots()
    ax.imshow(
        grid[..., 0] if grid.shape[-1] == 1 or (grid[..., 0] == grid[..., 1]).all() else grid,
        cmap="gray",
        vmin=0,
        vmax=1,
        interpolation="nearest",
    )
    row_h = grid.shape[0] / len(rows)
    ax.set_yticks([row_h * (i + 0.5) for i in range(len(rows))], list(samples), fontsize=7)
    ax.set_xticks([])
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def report_line(name: str, results: dict[str, dict]) -> str:
    """One human-readable line per model: P(y = c_f) with no attack and under each attack."""
    parts = [f"none {results['none']['p_forget']:.3f}"]
    for attack, r in results.items():
        if attack == "none":
            continue
        text = f"{attack} {r['p_forget']:.3f}"
        if "steps_to_threshold" in r:
            s = r["steps_to_threshold"]
            text += f" (P ≥ 0.5 at step {s})" if s is not None else f" (P < 0.5 for {r['steps']} steps)"
        parts.append(text)
    return f"{name}: P(y=c_f) " + ", ".join(parts)
