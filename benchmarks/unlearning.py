"""Item 4: the DDPM demo's table for every method, with the wall time of each unlearning stage.

Runs ``constrained_opt.diffusion.ddpm.demo`` on digits (forget class 0) for all methods, then
EraseDiff variants in the same harness: K = 0 under ``grad_norm`` (the same update at lower cost),
and the ``value`` rule at K = 1 and K = 3 (where K changes the update).
"""

from __future__ import annotations

import os
import tempfile

import torch

VARIANTS = {
    "grad_norm, K=0": ("erasediff.inner_steps=0",),
    "value, K=1": ("erasediff.rule=value", "erasediff.inner_steps=1"),
    "value, K=3": ("erasediff.rule=value", "erasediff.inner_steps=3"),
}
COLUMNS = ("p_forget", "remaining_accuracy", "fid", "precision", "recall", "time_s", "peak_mem_mb")


def _row(name: str, m: dict) -> str:
    cells = (f"{m[c]:.1f}" if c in ("time_s", "peak_mem_mb") else f"{m[c]:.3f}" for c in COLUMNS)
    return f"| {name} | " + " | ".join(cells) + " |"


def run(device: torch.device, smoke: bool) -> dict:
    from constrained_opt.diffusion.ddpm import BASELINES, demo

    steps = 4 if smoke else 300
    common = dict(forget_class=0, seed=0, steps=steps, device=str(device), progress=False)
    if smoke:
        from constrained_opt.diffusion.ddpm import EvalSettings

        common["es"] = EvalSettings(seed=0, per_class=4, num_steps=2)
    with tempfile.TemporaryDirectory() as tmp:
        methods = ("moo",) if smoke else BASELINES
        table = demo(out=os.path.join(tmp, "all"), methods=methods, **common)
        variants = {
            name: demo(out=os.path.join(tmp, f"v{i}"), methods=(), hp=hp, **common)["erasediff"]
            for i, (name, hp) in enumerate(VARIANTS.items())
        }
    header = "| model | " + " | ".join(COLUMNS) + " |\n|---" + "|---" * len(COLUMNS) + "|"
    lines = [
        f"Digits DDPM, forget class 0, {steps} steps per method, batch 64, same harness and step count.",
        "",
        header,
        *(_row(name, m) for name, m in table.items()),
        "",
        "EraseDiff variants (default: grad_norm, K = 1):",
        "",
        header,
        _row("erasediff (grad_norm, K=1)", table["erasediff"]),
        *(_row(f"erasediff ({name})", m) for name, m in variants.items()),
    ]
    time_ratio = {m: table["erasediff"]["time_s"] / table[m]["time_s"] for m in ("salun", "sa") if m in table}
    return {
        "table": table,
        "variants": variants,
        "time_ratio_erasediff_over": time_ratio,
        "markdown": "\n".join(lines),
    }
