"""CLI errors are one line on stderr, exit status 2, never a traceback; ``--help`` shows every default."""

import argparse
import os
import subprocess
import sys

import pytest

pytest.importorskip("diffusers")

import ddpm_tiny

from constrained_opt.diffusion.cli import build_parser, main

FAST = ["--quiet", "--per-class", "4", "--sampling-steps", "2"]


def run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse errors
        return e.code


def assert_one_line_error(capsys, code, *needles):
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


@pytest.mark.parametrize(
    ("command", "option", "value"),
    [
        ("demo", "--lr", "-1"),
        ("demo", "--lr", "nan"),
        ("demo", "--batch-size", "0"),
        ("demo", "--steps", "0"),
        ("demo", "--per-class", "3"),
        ("demo", "--sampling-steps", "0"),
        ("demo", "--guidance", "nan"),
        ("demo", "--seed", "-1"),
        ("demo", "--forget-class", "-1"),
        ("unlearn ddpm --method erasediff --forget-class 0", "--lr", "inf"),
        ("unlearn ddpm --method erasediff --forget-class 0", "--batch-size", "0"),
        ("unlearn ddpm --method erasediff --forget-class 0", "--steps", "-5"),
        ("unlearn ddpm --method erasediff --forget-class 0", "--sampling-steps", "1001"),
        ("unlearn ddpm --method erasediff --forget-class 0", "--per-class", "0"),
        ("unlearn ddpm --method erasediff --forget-class 0", "--guidance", "-inf"),
        ("evaluate --model a=b --forget-class 0", "--guidance", "nan"),
        ("evaluate --model a=b --forget-class 0", "--image-size", "0"),
        ("train-base", "--lr", "0"),
        ("train-base", "--classifier-steps", "zero"),
        ("unlearn sd --model m --concept nudity", "--lr", "nan"),
        ("unlearn sd --model m --concept nudity", "--eta", "inf"),
        ("unlearn sd --model m --concept nudity", "--max-grad-norm", "0"),
        ("unlearn sd --model m --concept nudity", "--keep", "1.5"),
        ("unlearn sd --model m --concept nudity", "--inner-steps", "-1"),
        ("unlearn sd --model m --concept nudity", "--num-forget", "0"),
        ("unlearn sd --model m --concept nudity", "--gen-guidance", "nan"),
        ("sd generate --model m --prompts nudity", "--steps", "0"),
        ("sd generate --model m --prompts nudity", "--guidance", "nan"),
        ("sd nudenet --images x", "--threshold", "2"),
        ("sd fid --images x --reference y --inception-weights w", "--batch-size", "0"),
    ],
)
def test_bad_numbers_fail_while_parsing(tmp_path, capsys, command, option, value):
    out = tmp_path / "never"
    code = run([*command.split(), "--out", str(out), f"{option}={value}"])
    assert_one_line_error(capsys, code, f"argument {option}: expected", value)
    assert not out.exists()


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        ("unlearn ddpm --method erasediff --forget-class 0 --hp eta=inf", "eta must be a finite number"),
        ("unlearn ddpm --method erasediff --forget-class 0 --hp inner_lr=nan", "inner_lr must be a finite"),
        (
            "unlearn ddpm --method erasediff --forget-class 0 --hp max_grad_norm=0",
            "max_grad_norm must be > 0",
        ),
        ("unlearn ddpm --method salun --forget-class 0 --hp alpha=-1", "alpha must be a finite number ≥ 0"),
        ("demo --hp erasediff.eta=inf", "eta must be a finite number"),
        ("demo --hp moo.max_grad_norm=0", "max_grad_norm must be > 0"),
    ],
)
def test_bad_hyperparameters_fail_before_anything_runs(tmp_path, capsys, argv, needle):
    out = tmp_path / "never"
    code = run([*argv.split(), "--out", str(out), "--quiet"])
    assert_one_line_error(capsys, code, needle)
    assert not out.exists()


def test_a_diverging_run_is_one_line_that_suggests_the_fix(tmp_path, capsys):
    """``--hp inner_lr=1e12`` makes the inner descent overflow: a ClosureError, not a traceback."""
    base = ddpm_tiny.write_base(tmp_path)
    argv = (
        f"unlearn ddpm --method erasediff --forget-class 1 --checkpoint {base['unet']} --classifier "
        f"{base['classifier']} --steps 2 --batch-size 4 --hp inner_lr=1e12 --out {tmp_path / 'run'}"
    )
    code = run([*argv.split(), *FAST])
    assert_one_line_error(capsys, code, "non-finite", "inner_lr", "Lower --lr")


def test_help_shows_every_default():
    """Every option with a default states it in ``--help`` (argparse omits them unless asked)."""
    missing, parsers = [], [("constrained-opt", build_parser())]
    while parsers:
        name, parser = parsers.pop()
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers += [(f"{name} {sub}", p) for sub, p in action.choices.items()]
                continue
            no_default = any(action.default is v for v in (None, False, argparse.SUPPRESS))
            if no_default or action.default == [] or not action.option_strings:
                continue
            text = formatter._expand_help(action)
            if "default" not in text.lower():
                missing.append(f"{name} {action.option_strings[-1]}")
    assert not missing, missing

    demo = build_parser()._subparsers._group_actions[0].choices["demo"]
    helps = {a.dest: demo._get_formatter()._expand_help(a) for a in demo._actions}
    for dest, default in [("seed", "0"), ("batch_size", "64"), ("lr", "0.0001"), ("guidance", "2.0")]:
        assert helps[dest].endswith(f"(default: {default})"), helps[dest]


def test_unlearn_sd_checks_paths_before_importing_diffusers(tmp_path):
    """``unlearn sd --model /nonexistent`` used to import diffusers, transformers and accelerate (seconds,
    ~1 GB) before saying "model not found"; now only torch is loaded when it fails."""
    argv = [
        "unlearn",
        "sd",
        "--model",
        str(tmp_path / "missing"),
        "--concept",
        "nudity",
        "--out",
        str(tmp_path),
    ]
    code = (
        f"import sys; from constrained_opt.cli import main; code = main({argv!r}); "
        "heavy = {m.split('.')[0] for m in sys.modules} & {'diffusers', 'transformers', 'accelerate'}; "
        "print(code, sorted(heavy))"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert done.stdout.strip() == "2 []", done.stdout
    # the error line, whatever else a library may warn about on stderr; no traceback
    assert f"constrained-opt: error: model not found: {tmp_path / 'missing'}" in done.stderr.splitlines()
    assert "Traceback" not in done.stderr


def test_only_the_optimizers_value_errors_become_one_line(tmp_path, capsys, monkeypatch):
    from constrained_opt.diffusion.methods.erasediff import EraseDiff
    from constrained_opt.diffusion.methods.finetune import Finetune

    base = ddpm_tiny.write_base(tmp_path)
    argv = f"unlearn ddpm --forget-class 1 --checkpoint {base['unet']} --no-eval --steps 1 --batch-size 4"
    monkeypatch.setattr(EraseDiff, "optimizer_kwargs", lambda self: {"eta": float("inf")})
    code = run([*argv.split(), "--method", "erasediff", "--out", str(tmp_path / "a"), "--quiet"])
    assert_one_line_error(capsys, code, "the optimizer stopped the run: eta must be a finite number")

    def bug(self, retain, forget):
        raise ValueError("a bug elsewhere")

    monkeypatch.setattr(Finetune, "step", bug)
    with pytest.raises(ValueError, match="a bug elsewhere"):  # not disguised as a user error
        run([*argv.split(), "--method", "finetune", "--out", str(tmp_path / "b"), "--quiet"])


def test_sd_generate_checks_its_inputs_before_loading_a_pipeline(tmp_path, capsys):
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")  # never read: the checks come first
    out = tmp_path / "out"
    for model, extra, needle in [
        (tmp_path / "missing", "", "model not found"),
        (tmp_path / "pipe", "--resolution 12", "--resolution must be a multiple of 8"),
    ]:
        code = run(
            [
                "sd",
                "generate",
                "--model",
                str(model),
                "--prompts",
                "nudity",
                "--out",
                str(out),
                *extra.split(),
            ]
        )
        assert_one_line_error(capsys, code, needle)
    assert not out.exists()


@pytest.mark.parametrize(
    "kwargs", [{"num_steps": 0}, {"num_steps": 1001}, {"guidance": float("nan")}, {"per_class": 3}]
)
def test_eval_settings_refuse_what_the_cli_refuses(kwargs):
    from constrained_opt.diffusion.evaluation.generated import EvalSettings
    from constrained_opt.diffusion.runtime.errors import UsageError

    with pytest.raises(UsageError):
        EvalSettings(**kwargs)


def tiny_unlearn(base, out, extra: str) -> list[str]:
    argv = f"unlearn ddpm --checkpoint {base['unet']} --no-eval --steps 1 --out {out} --quiet {extra}"
    return argv.split()


@pytest.mark.parametrize("command", ["unlearn", "attack"])
def test_a_read_only_out_fails_before_the_job_runs(tmp_path, capsys, command):
    base = ddpm_tiny.write_base(tmp_path)
    out = tmp_path / "read-only"
    out.mkdir()
    out.chmod(0o500)
    try:
        if os.access(out, os.W_OK):  # root (with CAP_DAC_OVERRIDE) writes into read-only folders
            pytest.skip("permissions are not enforced for this user: nothing to refuse")
        if command == "unlearn":
            argv = tiny_unlearn(base, out, "--method finetune --forget-class 1 --batch-size 4")
        else:
            argv = [
                *f"attack ddpm --model {base['unet']} --classifier {base['classifier']}".split(),
                *f"--forget-class 1 --attack inversion --out {out} --quiet".split(),
            ]
        assert_one_line_error(capsys, run(argv), f"output directory {out} is not writable")
        assert list(out.iterdir()) == []
    finally:
        out.chmod(0o700)


def test_check_output_dir_tests_the_folder_itself(tmp_path, monkeypatch):
    """An existing ``--out`` must be writable itself (its parent being writable is not enough). Runs as
    root too: ``os.access`` is made to answer as it does for an ordinary user."""
    from constrained_opt.diffusion.runtime.errors import UsageError
    from constrained_opt.diffusion.runtime.paths import check_output_dir

    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: os.fspath(p) != str(locked) and real_access(p, mode))
    with pytest.raises(UsageError, match="is not writable"):
        check_output_dir(str(locked))
    check_output_dir(str(tmp_path / "new" / "folder"))  # creatable below a writable folder
    with pytest.raises(UsageError, match="cannot create output directory"):
        check_output_dir(str(locked / "run"))


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (
            "--method erasediff --forget-class 0,1,2,3,4,5,6,7,8 --per-class-constraints --batch-size 9",
            "makes 9 constraints, and the optimizer's exact solver takes at most 8",
        ),
        ("--method erasediff --forget-class 0,1,2 --batch-size 2", "pass --batch-size 3 or more"),
        ("--method salun --forget-class 0,1,2 --batch-size 2", "pass --batch-size 3 or more"),
    ],
)
def test_multiclass_settings_fail_before_out_is_created(tmp_path, capsys, extra, needle):
    base = ddpm_tiny.write_base(tmp_path)
    out = tmp_path / "never"
    assert_one_line_error(capsys, run(tiny_unlearn(base, out, extra)), needle)
    assert not out.exists()


def test_eight_per_class_constraints_still_run(tmp_path):
    base = ddpm_tiny.write_base(tmp_path)
    extra = "--method erasediff --forget-class 0,1,2,3,4,5,6,7 --per-class-constraints --batch-size 8"
    assert run(tiny_unlearn(base, tmp_path / "run", extra)) == 0


def test_demo_refuses_an_hp_for_a_method_it_does_not_run(tmp_path, capsys):
    out = tmp_path / "never"
    code = run(["demo", "--methods", "moo", "--hp", "sa.lam=1", "--out", str(out), "--quiet"])
    assert_one_line_error(capsys, code, "--hp sa.lam=1 sets 'sa', which is not run", "erasediff, moo")
    assert not out.exists()


def test_the_step_size_advice_names_the_commands_own_flags():
    """A refused step suggests the step sizes as the command takes them (``unlearn sd`` has no --hp);
    a refused setting names its own fix, so it gets no advice about --lr."""
    from constrained_opt.diffusion.cli import _fix
    from constrained_opt.errors import ClosureError, SettingError

    sd = argparse.Namespace(command="unlearn", target="sd")
    ddpm = argparse.Namespace(command="unlearn", target="ddpm")
    demo = argparse.Namespace(command="demo")
    assert "(--inner-lr, --eta)" in _fix(ClosureError("x"), sd) and "--hp" not in _fix(ClosureError("x"), sd)
    assert "(--hp inner_lr=..., eta=...)" in _fix(ClosureError("x"), ddpm)
    assert "--hp erasediff.inner_lr=" in _fix(ClosureError("x"), demo)
    assert _fix(SettingError("x"), sd) == _fix(SettingError("x"), ddpm) == ""
