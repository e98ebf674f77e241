"""A model that samples NaN fails its own row, not the process."""

import json

import pytest

pytest.importorskip("diffusers")

import ddpm_tiny
import torch

from constrained_opt.diffusion.cli import main
from constrained_opt.diffusion.methods.neggrad import NegGrad

FAST = ["--quiet", "--per-class", "4", "--sampling-steps", "2"]


def test_evaluate_reports_a_nan_model_as_failed_and_finishes_the_others(tmp_path, capsys):
    good = ddpm_tiny.write_base(tmp_path / "good")
    broken = ddpm_tiny.write_base(tmp_path / "nan", nan=True)["unet"]
    out = tmp_path / "ev"
    models = f"--model base={good['unet']} --model broken={broken} --model again={good['unet']}"
    argv = f"evaluate {models} --classifier {good['classifier']} --forget-class 1 --out {out}"
    assert main([*argv.split(), *FAST]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == ["base", "broken", "again"]
    assert metrics["broken"] == {"failed": "40 of 40 generated images are not finite (NaN or inf)"}
    assert metrics["again"] == metrics["base"]
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics["base"].values())
    printed = capsys.readouterr().out
    assert "broken: evaluation failed: 40 of 40 generated images are not finite" in printed
    report = (out / "report.md").read_text()
    assert "- broken: evaluation failed: 40 of 40" in report
    assert all((out / f"samples_{name}.png").exists() for name in metrics)


def test_demo_finishes_when_one_method_yields_a_nan_model(tmp_path, monkeypatch):
    base = ddpm_tiny.write_base(tmp_path / "base")

    def poison(self, retain, forget):
        with torch.no_grad():
            for p in self.s.unet.parameters():
                p.fill_(float("inf"))
        return {}

    monkeypatch.setattr(NegGrad, "step", poison)
    out = tmp_path / "demo"
    argv = f"demo --methods neggrad,finetune --steps 1 --batch-size 4 --out {out} --cache-dir {tmp_path}/c"
    argv += f" --checkpoint {base['unet']} --classifier {base['classifier']}"
    assert main([*argv.split(), *FAST]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["neggrad"]) >= {"failed", "time_s", "hparams"}
    assert "not finite" in metrics["neggrad"]["failed"]
    assert "fid" in metrics["finetune"] and "fid" in metrics["erasediff"]
    table = (out / "table.md").read_text()
    assert "NegGrad (NG): evaluation failed" in table
    assert "Acceptance: EraseDiff" in (out / "report.md").read_text()
