"""The ``robust_overhead`` benchmark item: a robust step over its hand-written floor, every configuration."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
ROOT = Path(__file__).resolve().parents[2]


def test_robust_overhead_smoke_writes_each_adversary_alone_and_beside_a_plain_row(tmp_path):
    cmd = [sys.executable, "-m", "benchmarks", "--only", "robust_overhead", "--smoke", "--out", str(tmp_path)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=120)
    res = json.loads((tmp_path / "robust_overhead.json").read_text())
    assert res["smoke"] and res["target"] == "ratio <= 1.05"
    configs = {(r["adversary"], r["plain_row"], r["K"]) for r in res["rows"]}
    adversaries = ("relearn_k1", "relearn_k3", "sharpness", "inversion_k3")
    assert configs == {(a, False, 0) for a in adversaries} | {(a, True, 1) for a in adversaries}
    for r in res["rows"]:
        for name in ("ratio", "cpu_ratio"):
            assert math.isfinite(r[name]) and r[f"{name}_q1"] <= r[name] <= r[f"{name}_q3"]
        assert r["rule"] == ("value" if r["K"] else "grad_norm")
        assert set(r["seconds"]) == {"opt_step", "floor"}

    from benchmarks.report import write_docs

    text = Path(write_docs(str(tmp_path), docs_dir=str(tmp_path / "docs"), include_smoke=True)).read_text()
    assert "## 1b. robust_overhead" in text and "| tiny | inversion_k3 | yes | 1 |" in text
