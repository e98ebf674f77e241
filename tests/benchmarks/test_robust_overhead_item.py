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
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=600)
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
    assert "## 1b. robust_overhead" in text and "| inversion_k3 | yes | 1 |" in text


@pytest.mark.parametrize("adversary", ["relearn_k3", "sharpness", "inversion_k3"])
def test_the_floor_computes_the_rows_of_the_step_and_puts_theta_and_the_input_back(adversary, monkeypatch):
    """The floor is the same computation: its constraint rows are the optimizer's (taken from the flat
    buffer before the projection), beside a plain row and with K = 1, and θ and x are put back."""
    import torch

    from benchmarks.robust_overhead import Problem, floor_step
    from constrained_opt import ValueFunctionBilevelOptimizer
    from constrained_opt.optimizer import ValueFunctionBilevelOptimizer as Optimizer

    seen = []
    project = Optimizer._project

    def capture(self, state, plan):
        seen.append(state.layout.buckets[0].rows.clone())
        return project(self, state, plan)

    monkeypatch.setattr(Optimizer, "_project", capture)
    pb = Problem("tiny", torch.device("cpu"))
    opt = ValueFunctionBilevelOptimizer(pb.params, torch.optim.SGD, lr=0.0, inner_steps=1, rule="value")
    theta, x = [p.detach().clone() for p in pb.params], pb.vector.clone()
    opt.step(pb.retain, [pb.forget, pb.declaration(adversary)])
    rows = floor_step(pb, adversary, True, 1, lambda: None)()
    assert all(torch.equal(p, t) for p, t in zip(pb.params, theta, strict=True)) and torch.equal(pb.vector, x)
    for got, want in zip(rows, seen[0][:2], strict=True):
        torch.testing.assert_close(torch.cat([g.reshape(-1) for g in got]), want, rtol=1e-5, atol=1e-7)
