"""Retrain per seed: each seed's own shipped Retrain model where one ships, else seed 0's (with a note),
in the demo, in benchmarks/robustness.py and in its attack cache. Stand-in files: tiny UNets."""

import json
import os
import shutil

import pytest
import torch

pytest.importorskip("diffusers")

from constrained_opt.diffusion import models
from constrained_opt.diffusion.models import build_unet, save_unet, shared_retrain_note, shipped_retrain


def tiny_unet(seed: int):
    torch.manual_seed(seed)
    return build_unet("tiny", (1, 8, 8), 10).eval()


@pytest.fixture
def assets(tmp_path, monkeypatch):
    """An assets folder with stand-ins for digits' seed-0 and seed-1 Retrain models (none for seed 2)."""
    folder = tmp_path / "assets"
    for name, seed in (("digits_retrain_c0", 0), ("digits_retrain_c0_s1", 1)):
        save_unet(str(folder / f"{name}.safetensors"), tiny_unet(seed), {"seed": seed})
    for name in ("digits_unet", "digits_classifier"):  # the demo's shipped base models, untouched
        shutil.copy(os.path.join(models.ASSETS, f"{name}.safetensors"), folder)
    monkeypatch.setattr(models, "ASSETS", str(folder))
    return folder


def test_each_seed_gets_its_own_retrain_file_else_seed_zeros(assets):
    seed0, seed1 = (
        str(assets / "digits_retrain_c0.safetensors"),
        str(assets / "digits_retrain_c0_s1.safetensors"),
    )
    assert [shipped_retrain("digits", 0, s) for s in (0, 1, 2)] == [seed0, seed1, seed0]
    assert shipped_retrain("digits", 3, 1) is None  # no Retrain file for class 3
    assert shared_retrain_note({0: seed0, 1: seed1}) is None
    note = shared_retrain_note({0: seed0, 1: seed1, 2: seed0})
    assert note.startswith("Retrain: seeds 0, 2 share one Retrain model") and "attack seeds only" in note


def fake_results(p: float) -> dict:
    ci = [p - 0.01, p + 0.01]
    return {
        "none": {"p_forget": p, "p_forget_ci": ci},
        "relearn": {
            "p_forget": p,
            "p_forget_ci": ci,
            "p_forget_at": {"0": p, "4": p},
            "steps": 4,
            "auc": p,
            "time_s": 1.0,
            "steps_to_threshold": None,
        },
    }


def test_robustness_attacks_each_seeds_retrain_model_with_that_seed(assets, tmp_path, monkeypatch, capsys):
    import benchmarks.robustness as robustness

    calls = []

    def fake_attack(label, seed, path, budget, work, classifier, data, **kw):
        calls.append((label, seed, os.path.basename(path), budget.seed))
        return {"results": fake_results(0.1 * seed)}

    monkeypatch.setattr(robustness, "attack_cached", fake_attack)
    demo = tmp_path / "demo" / "models"
    save_unet(str(demo / "erasediff.safetensors"), tiny_unet(3), {"steps": 1})
    result = robustness.run(torch.device("cpu"), False, str(tmp_path / "work"), [str(tmp_path / "demo")])
    retrain = [c for c in calls if c[0] == "retrain"]
    assert retrain == [
        ("retrain", 0, "digits_retrain_c0.safetensors", 0),
        ("retrain", 1, "digits_retrain_c0_s1.safetensors", 1),
        ("retrain", 2, "digits_retrain_c0.safetensors", 2),
    ]
    assert result["retrain_files"] == {
        "0": "digits_retrain_c0.safetensors",
        "1": "digits_retrain_c0_s1.safetensors",
        "2": "digits_retrain_c0.safetensors",
    }
    assert "seeds 0, 2 share one Retrain model" in result["retrain_note"]
    assert "seeds 0, 2 share one Retrain model" in capsys.readouterr().out
    assert result["per_seed"]["retrain"]["1"]["relearn_auc"] == pytest.approx(0.1)


def test_attack_cache_is_keyed_by_the_checkpoint(assets, tmp_path, monkeypatch):
    """A stored record is reused for the same file, budget and attacks; a record from before checkpoints
    were recorded only where the caller vouches for it (``legacy``)."""
    import benchmarks.robustness as robustness
    from constrained_opt.diffusion.attacks import ddpm
    from constrained_opt.diffusion.attacks.common import Budget

    attacked = []

    def fake_attack_unet(unet, classifier, data, forget_class, attacks, budget, progress):
        attacked.append(attacks)
        return fake_results(0.2), {}

    monkeypatch.setattr(ddpm, "attack_unet", fake_attack_unet)
    classifier = torch.nn.Linear(1, 1)
    budget, work = Budget(**robustness.SMOKE_BUDGET, seed=1), str(tmp_path / "work")
    seed1 = str(assets / "digits_retrain_c0_s1.safetensors")

    def attack(path, **kw):
        return robustness.attack_cached("retrain", 1, path, budget, work, classifier, None, **kw)

    record = attack(seed1, attacks=("relearn",))
    assert record["model"] == "digits_retrain_c0_s1.safetensors" and record["attacks"] == ["relearn"]
    assert attack(seed1, attacks=("relearn",)) == record and len(attacked) == 1  # reused
    attack(str(assets / "digits_retrain_c0.safetensors"), attacks=("relearn",))  # another file: attacked
    attack(str(assets / "digits_retrain_c0.safetensors"), attacks=("relearn", "benign"))  # other attacks
    assert attacked == [("relearn",), ("relearn",), ("relearn", "benign")]
    done = tmp_path / "work" / "retrain-seed1.json"
    legacy = json.loads(done.read_text())
    del legacy["model_sha256"], legacy["model"], legacy["attacks"]  # as robustness.py wrote it before
    done.write_text(json.dumps(legacy))
    attack(seed1, legacy=False)
    assert len(attacked) == 4  # seed 0's old record is not seed 1's model
    done.write_text(json.dumps(legacy))
    assert attack(seed1, legacy=True)["results"] == legacy["results"] and len(attacked) == 4


def test_demo_evaluates_each_seed_with_its_own_retrain_model(assets, tmp_path, monkeypatch, capsys):
    from constrained_opt.diffusion.jobs import demo_seed
    from constrained_opt.diffusion.jobs.demo import demo

    seen = []
    evaluate = demo_seed.evaluate_reference

    def spy(ctx, name, path, es):
        seen.append((name, os.path.basename(path), es.seed))
        return evaluate(ctx, name, path, es)

    monkeypatch.setattr(demo_seed, "evaluate_reference", spy)
    from constrained_opt.diffusion.evaluation.generated import EvalSettings

    out = tmp_path / "demo"
    demo(
        data="digits",
        seeds=3,
        methods=(),
        steps=1,
        batch_size=8,
        es=EvalSettings(per_class=4, num_steps=1),
        out=str(out),
        cache=str(tmp_path / "cache"),
        device="cpu",
        progress=False,
    )
    assert [s for s in seen if s[0] == "retrain"] == [
        ("retrain", "digits_retrain_c0.safetensors", 0),
        ("retrain", "digits_retrain_c0_s1.safetensors", 1),
        ("retrain", "digits_retrain_c0.safetensors", 2),
    ]
    assert "seeds 0, 2 share one Retrain model" in capsys.readouterr().out
    report = (out / "report.md").read_text()
    assert "digits_retrain_c0_s1.safetensors" in report and "seeds 0, 2 share one Retrain model" in report
