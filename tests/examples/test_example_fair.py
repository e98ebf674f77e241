"""Smoke test of examples/fair_classification.py with tiny settings."""

import runpy
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "fair_classification.py"


def test_fair_classification_runs_and_compares_on_equal_forward_budgets(monkeypatch, capsys):
    argv = [str(SCRIPT), "--steps", "6", "--splits", "1", "--print-every", "3", "--weights", "0", "10"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(SCRIPT), run_name="__main__")
    out = capsys.readouterr().out
    assert out.count("  step ") == 2 and "λ" in out and "cos(δ,∇g)" in out
    rows = {
        line.split("|")[0].rsplit(maxsplit=3)[0].strip(): line.split("|")[0].split()[-3:]
        for line in out.splitlines()
        if line.count("|") == 2 and "method" not in line
    }
    assert set(rows) == {"constrained", "BCE + 0·Δ²", "BCE + 10·Δ²"}
    fwd = {name: int(cols[0]) for name, cols in rows.items()}
    assert fwd["constrained"] == 3 * 6  # K = 1: three forward passes per step, counted by hooks
    assert all(f == fwd["constrained"] for f in fwd.values())  # the same forward budget for all
