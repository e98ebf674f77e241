"""``--resume`` continues only the run it was given, on untrained tiny models."""

import json
import shutil

import pytest

pytest.importorskip("diffusers")

import ddpm_tiny
import torch

from constrained_opt.diffusion.cli import main
from constrained_opt.diffusion.methods.finetune import Finetune
from constrained_opt.diffusion.methods.unlearn import unlearn as unlearn_loop
from constrained_opt.diffusion.runtime.io import load_state, load_tensors, save_state

FAST = ["--quiet", "--per-class", "4", "--sampling-steps", "2"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    return {**ddpm_tiny.write_base(folder), "other": ddpm_tiny.write_base(folder / "other", seed=1)["unet"]}


def unlearn(base, out, extra=""):
    argv = f"unlearn ddpm --method finetune --forget-class 1 --checkpoint {base['unet']} --out {out}"
    argv += " --no-eval --steps 4 --batch-size 4 " + extra
    return main([*argv.split(), "--quiet"])


@pytest.fixture
def interrupted(base, tmp_path, monkeypatch):
    """OUT of an ``unlearn ddpm`` run stopped by Ctrl-C in its third step, checkpointed after its second."""
    monkeypatch.setitem(unlearn_loop.__kwdefaults__, "checkpoint_every", 1)
    step, calls = Finetune.step, []

    def interrupt_third(self, retain, forget):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return step(self, retain, forget)

    monkeypatch.setattr(Finetune, "step", interrupt_third)
    out = tmp_path / "run"
    assert unlearn(base, out) == 130
    monkeypatch.setattr(Finetune, "step", step)
    assert load_state(out / "checkpoint.safetensors")["step"] == 2
    return out


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_resume_refuses_each_changed_option_and_allows_more_steps(base, interrupted, tmp_path, capsys):
    checkpoint = interrupted / "checkpoint.safetensors"
    before = checkpoint.read_bytes()
    changed = "--forget-class 3 --lr 0.001 --hp max_grad_norm=0.5 --seed 1 --batch-size 8 --resume"
    argv = f"unlearn ddpm --method finetune --checkpoint {base['unet']} --out {interrupted} --steps 4"
    assert main([*argv.split(), *changed.split(), "--no-eval", "--quiet"]) == 2
    err = error_line(capsys)
    for item in [
        "--forget-class 1 (now 3)",
        "--batch-size 4 (now 8)",
        "--lr 0.0001 (now 0.001)",
        "--seed 0 (now 1)",
        "--hp max_grad_norm=1.0 (now 0.5)",
    ]:
        assert item in err, err
    assert unlearn({**base, "unet": base["other"]}, interrupted, "--resume") == 2
    assert "--checkpoint: another file (sha256" in error_line(capsys)
    assert unlearn(base, interrupted, "--resume --steps 1") == 2
    assert "--steps 4 (now 1), fewer than the 2 steps already done" in error_line(capsys)
    assert checkpoint.read_bytes() == before and not (interrupted / "model.safetensors").exists()

    # More steps than done: safe, said so, and the result is the uninterrupted 6-step run bit for bit.
    assert unlearn(base, interrupted, "--resume --steps 6") == 0
    assert "--steps changed from 4 to 6; 2 steps are done" in capsys.readouterr().out
    straight = tmp_path / "straight"
    assert unlearn(base, straight, "--steps 6") == 0
    resumed, meta = load_tensors(interrupted / "model.safetensors")
    expected, _ = load_tensors(straight / "model.safetensors")
    assert resumed.keys() == expected.keys() and all(torch.equal(resumed[k], expected[k]) for k in expected)
    record = json.loads(meta["provenance"])
    assert record["steps"] == 6 and record["forget_class"] == 1 and record["lr"] == 1e-4
    assert record["hparams"] == {"max_grad_norm": 1.0}  # every hyperparameter, defaults included
    assert len(json.loads((interrupted / "history.json").read_text())) == 6


def damage(path, edit):
    state = load_state(path)
    edit(state)
    save_state(path, state)


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda p, b: damage(p, lambda s: s["model"].update(conv_in_weight=None)), "cannot resume from"),
        (
            lambda p, b: damage(p, lambda s: s["model"].update({k: torch.zeros(3) for k in s["model"]})),
            "size mismatch",
        ),
        (lambda p, b: damage(p, lambda s: s.pop("samplers")), "KeyError: 'samplers'"),
        (lambda p, b: damage(p, lambda s: s.pop("config")), "records no run configuration"),
        (lambda p, b: shutil.copy(b["unet"], p), "not a constrained_opt state checkpoint"),
        (lambda p, b: p.write_bytes(b"\x00" * 64), "not a readable safetensors file"),
    ],
    ids=["unexpected-key", "wrong-shape", "missing-key", "no-config", "foreign", "garbage"],
)
def test_resume_from_a_damaged_or_foreign_checkpoint_is_one_line(base, interrupted, capsys, make, needle):
    make(interrupted / "checkpoint.safetensors", base)
    assert unlearn(base, interrupted, "--resume") == 2
    assert needle in error_line(capsys)
    assert not (interrupted / "model.safetensors").exists()


def test_demo_resume_reuses_only_rows_of_the_same_run(base, tmp_path, capsys):
    out, cache = tmp_path / "demo", tmp_path / "cache"
    argv = [
        *f"demo --methods none --steps 2 --batch-size 4 --out {out} --cache-dir {cache}".split(),
        *f"--checkpoint {base['unet']} --classifier {base['classifier']}".split(),
        *FAST,
    ]
    assert main(argv) == 0
    metrics = (out / "metrics.json").read_text()
    for extra, needle in [
        ("--forget-class 3", "--forget-class 0 (now 3)"),
        ("--steps 3", "--steps 2 (now 3)"),
        ("--sampling-steps 3", "--sampling-steps 2 (now 3)"),
        ("--hp erasediff.eta=0.5", "--hp erasediff.eta=1.0 (now 0.5)"),
        ("--seed 4", "--seed 0 (now 4)"),
    ]:
        capsys.readouterr()
        assert main([*argv, "--resume", *extra.split()]) == 2, extra
        err = error_line(capsys)
        assert needle in err and "erasediff.json" in err, err
    assert (out / "metrics.json").read_text() == metrics
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 0
    assert "erasediff (seed 0): done in a previous run" in capsys.readouterr().out


def test_reports_show_no_fake_zeros_and_record_every_hyperparameter(base, tmp_path):
    """Issue 10, item 9: the base row has no unlearning time or memory ("–", not 0.0); metrics.json holds
    every hyperparameter each method ran with, defaults included."""
    out = tmp_path / "demo"
    argv = f"demo --methods moo --steps 2 --batch-size 4 --out {out} --cache-dir {tmp_path / 'cache'}"
    argv += f" --checkpoint {base['unet']} --classifier {base['classifier']} --hp erasediff.eta=0.5"
    assert main([*argv.split(), *FAST]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert not {"time_s", "prep_s", "peak_mem_mb"} & metrics["base"].keys()
    assert metrics["erasediff"]["time_s"] > 0
    robust = {"robust": ""}  # no robust form: its settings do not act, so are not recorded (ddpm.md)
    assert metrics["erasediff"]["hparams"] == {
        **robust,
        "max_grad_norm": 1.0,
        "forget_target": "rl",
        "rule": "grad_norm",
        "eta": 0.5,
        "inner_steps": 1,
        "inner_lr": 1e-4,
    }
    assert metrics["moo"]["hparams"] == {
        **robust,
        "max_grad_norm": 1.0,
        "forget_target": "rl",
        "forget_weight": 1.0,
    }
    for name in ("table.md", "report.md"):
        text = (out / name).read_text()
        base_row = next(line for line in text.splitlines() if line.startswith("| Unscrubbed (base)"))
        assert base_row.endswith("| – | – | – |"), base_row
