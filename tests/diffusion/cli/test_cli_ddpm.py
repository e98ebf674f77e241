"""End-to-end tests of the ``constrained-opt`` CLI on tiny models: train-base, unlearn, evaluate, demo."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("diffusers")

from constrained_opt.diffusion.cli import main

FAST = ["--quiet", "--per-class", "4", "--sampling-steps", "2"]
METRIC_KEYS = set(
    [
        "p_forget",
        "forget_entropy",
        "remaining_accuracy",
        "fid",
        "precision",
        "recall",
        "time_s",
        "peak_mem_mb",
    ]
)


def cli(command: str, *paths) -> int:
    """Run ``constrained-opt`` in-process; ``{}`` placeholders in ``command`` take ``paths``."""
    return main([*command.format(*paths).split(), *FAST])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    assert main(f"train-base --preset tiny --steps 5 --classifier-steps 5 --out {out} --quiet".split()) == 0
    return {
        "unet": str(out / "unet.safetensors"),
        "classifier": str(out / "classifier.safetensors"),
        "dir": out,
    }


def test_train_base_records_provenance(base):
    record = json.loads((base["dir"] / "provenance.json").read_text())
    assert record["unet"]["seed"] == 0 and record["unet"]["steps"] == 5 and record["unet"]["preset"] == "tiny"
    assert 0 <= record["classifier"]["val_accuracy"] <= 1


def test_retrain_says_how_long_it_will_take_then_is_cached(base, tmp_path, capsys, monkeypatch):
    """A class with no shipped Retrain model: the demo says up front that it trains one, for how many
    steps and about how long (steps × one step's measured time), and how to skip it; the second time
    the cached model is used and nothing is trained."""
    from constrained_opt.diffusion.jobs import train_base as jobs

    path = jobs.retrain_checkpoint("digits", 3, base["unet"], str(tmp_path), "cpu", False)
    said = capsys.readouterr().out
    assert "training it first with the base recipe (5 steps × batch 128), about " in said
    assert "s/step measured" in said and "--no-retrain skips the Retrain row" in said
    assert os.path.isfile(path) and os.path.dirname(path) in said

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(jobs, "train_base", no_training)
    assert jobs.retrain_checkpoint("digits", 3, base["unet"], str(tmp_path), "cpu", False) == path
    assert capsys.readouterr().out == ""


def test_unet_step_seconds_leaves_the_global_rng_alone(base):
    import torch

    from constrained_opt.diffusion.data import load_data
    from constrained_opt.diffusion.train import unet_step_seconds

    state = torch.get_rng_state()
    seconds = unet_step_seconds(load_data("digits"), preset="tiny", batch_size=8, steps=2)
    assert seconds > 0 and torch.equal(torch.get_rng_state(), state)


@pytest.mark.slow
def test_demo_writes_the_full_report(base, tmp_path, capsys):
    out = tmp_path / "run"
    demo = "demo --checkpoint {} --classifier {} --steps 2 --batch-size 8 --out {} --cache-dir {}"
    demo += " --hp erasediff.eta=0.5"
    sa_hp = " --hp sa.samples_per_class=2 --hp sa.sampler=ddim --hp sa.fisher_stride=250"
    paths = base["unet"], base["classifier"], out, tmp_path / "cache"
    assert cli(demo + sa_hp, *paths) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == ["base", "retrain", "erasediff", "finetune", "neggrad", "moo", "salun", "sa"]
    assert all(m.keys() >= METRIC_KEYS for name, m in metrics.items() if name not in ("base", "retrain"))
    for reference in ("base", "retrain"):  # no unlearning stage: no time or memory
        assert metrics[reference].keys() >= METRIC_KEYS - {"time_s", "peak_mem_mb"}
        assert "time_s" not in metrics[reference]
    assert all(m["n_seeds"] == 1 and "ci95" not in m for m in metrics.values())
    assert metrics["salun"]["gap_to_retrain"]["p_forget"] == pytest.approx(
        abs(metrics["salun"]["p_forget"] - metrics["retrain"]["p_forget"])
    )
    assert 0 <= metrics["erasediff"]["lambda"]["active_fraction"] <= 1
    report = (out / "report.md").read_text()
    assert "FID (classifier features)" in report and "Selective Amnesia" in report
    assert "Gap to Retrain" in report and "Noise floor, real data" in report
    floor = json.loads((out / "noise_floor.json").read_text())
    assert floor["real_halves"]["fid"]["mean"] > 0
    for png in ["fig2_cosines.png", *(f"samples_{m}.png" for m in list(metrics)[1:])]:
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    # Resume reuses finished methods; the base evaluation comes from the cache.
    capsys.readouterr()
    assert cli(demo + " --resume --methods moo", *paths) == 0  # SA's --hp would be refused: not run
    printed = capsys.readouterr().out
    assert "erasediff (seed 0): done in a previous run" in printed and "evaluation cached" in printed
    assert list(json.loads((out / "metrics.json").read_text())) == ["base", "retrain", "erasediff", "moo"]


@pytest.mark.slow
def test_demo_over_seeds_reports_means_and_intervals(base, tmp_path):
    out = tmp_path / "seeds"
    demo = "demo --checkpoint {} --classifier {} --steps 2 --batch-size 8 --out {} --cache-dir {} --seeds 2"
    demo += " --methods moo_matched --variant ed_k2=erasediff_shared_adam:inner_steps=2 --budget ed_k2=1x8"
    assert cli(demo, base["unet"], base["classifier"], out, tmp_path / "cache") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == ["base", "retrain", "erasediff", "moo_matched", "ed_k2"]
    per_seed = [json.loads((out / f"seed{s}" / "metrics.json").read_text()) for s in (0, 1)]
    for label, row in metrics.items():
        assert row["n_seeds"] == 2 and row["ci95"].keys() >= {"p_forget", "fid"}
        values = [seed[label]["fid"] for seed in per_seed]
        assert row["fid"] == pytest.approx(sum(values) / 2)
        assert row["ci95"]["fid"] == pytest.approx(12.706205 * abs(values[0] - values[1]) / 2)  # t₁ · sd/√2
    assert (out / "seed1" / "models" / "ed_k2.safetensors").exists()
    history = json.loads((out / "seed0" / "state" / "erasediff.json").read_text())["history"]
    matched = json.loads((out / "seed0" / "state" / "moo_matched.json").read_text())["metrics"]
    assert matched["hparams"]["forget_weight"] == pytest.approx(sum(h["lam"] for h in history) / len(history))
    assert metrics["erasediff"]["lambda"]["per_seed_mean"][0] == pytest.approx(
        matched["hparams"]["forget_weight"]
    )
    assert metrics["ed_k2"]["steps"] == 1


def test_unlearn_then_evaluate(base, tmp_path):
    out = tmp_path / "u"
    unlearn = (
        "unlearn ddpm --method salun --forget-class 2 --checkpoint {} --classifier {} --steps 2 --out {}"
    )
    unlearn += " --hp keep=0.3"
    assert cli(unlearn, base["unet"], base["classifier"], out) == 0
    assert {"model.safetensors", "history.json", "metrics.json"} <= set(os.listdir(out))
    assert not (out / "checkpoint.safetensors").exists()
    ev = tmp_path / "ev"
    evaluate = "evaluate --model base={} --model salun={} --classifier {} --forget-class 2 --out {}"
    assert cli(evaluate, base["unet"], out / "model.safetensors", base["classifier"], ev) == 0
    assert set(json.loads((ev / "metrics.json").read_text())) == {"base", "salun"}
    assert (ev / "samples_salun.png").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--forget-class", "10"], "forget class 10 out of range"),
        (["--forget-class", "0", "--data", "mnist"], "unknown dataset"),
        (["--forget-class", "0", "--data", "cifar10:/no/such/dir"], "dataset path not found"),
        (["--forget-class", "0", "--checkpoint", "/no/such/file.safetensors"], "file not found"),
        (["--forget-class", "0", "--checkpoint", "{classifier}"], "not a unet checkpoint"),
        (["--forget-class", "0", "--data", "imagefolder:{imagefolder}"], "does not match the data"),
        (["--forget-class", "0", "--hp", "bogus=1"], "bad hyperparameter"),
    ],
)
def test_bad_inputs_fail_with_one_line_and_write_nothing(base, tmp_path, capsys, extra, message):
    from PIL import Image

    folder = tmp_path / "imgs"
    for cls in ("a", "b"):
        (folder / cls).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(folder / cls / "0.png")
    extra = [e.format(classifier=base["classifier"], imagefolder=folder) for e in extra]
    if "--checkpoint" not in extra:
        extra += ["--checkpoint", base["unet"]]
    extra += ["--classifier", base["classifier"]]
    out = tmp_path / "never"
    code = main([*f"unlearn ddpm --method erasediff --steps 1 --out {out}".split(), *extra, *FAST])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert not out.exists()


def test_train_base_rejects_an_unknown_preset_before_writing(tmp_path, capsys):
    out = tmp_path / "never"
    assert main(f"train-base --preset huge --steps 1 --out {out} --quiet".split()) == 2
    assert "unknown model preset 'huge'" in capsys.readouterr().err and not out.exists()


def test_demo_rejects_unknown_baselines_before_writing(tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["demo", "--methods", "moo,magic", "--out", str(out), "--quiet"]) == 2
    assert "unknown method 'magic'" in capsys.readouterr().err and not out.exists()
    for bad, message in (
        (["--variant", "x=moo:forget_weight=-1"], "forget_weight must be a finite number ≥ 0"),
        (["--budget", "moo=10"], "STEPSxBATCH"),
        (["--budget", "salun=10x8"], "not run"),
        (["--data", "cifar10:/x"], "the demo runs on digits or mnist5k"),
    ):
        assert main(["demo", "--methods", "moo", "--out", str(out), "--quiet", *bad]) == 2
        assert message in capsys.readouterr().err and not out.exists()
    with pytest.raises(SystemExit) as exit_info:  # checked by argparse, as every count option
        main(["demo", "--methods", "moo", "--out", str(out), "--quiet", "--seeds", "0"])
    assert exit_info.value.code == 2 and "--seeds: expected an integer ≥ 1, got 0" in capsys.readouterr().err
    assert not out.exists()


def test_entry_point_process_exit_codes(tmp_path):
    cmd = [sys.executable, "-m", "constrained_opt.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # no busy-machine note on stderr (test_cli_threads.py)
    ok = subprocess.run(
        [*cmd, "unlearn", "ddpm", "--help"], capture_output=True, text=True, check=False, env=env
    )
    assert ok.returncode == 0 and "--forget-target" in ok.stdout
    bad = subprocess.run(
        [*cmd, *f"demo --forget-class 11 --out {tmp_path / 'x'}".split()],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    errors = [line for line in bad.stderr.splitlines() if line.startswith("constrained-opt: error:")]
    assert bad.returncode == 2 and len(errors) == 1 and "out of range" in errors[0], bad.stderr
    assert "Traceback" not in bad.stderr  # one line, whatever else a library may warn about on stderr
    assert not (tmp_path / "x").exists()
