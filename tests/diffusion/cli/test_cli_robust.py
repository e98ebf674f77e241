"""``unlearn ddpm --robust FORMS`` and ``demo --robust FORMS``: parsing, refusals, the rows recorded."""

import json

import pytest

pytest.importorskip("diffusers")

import ddpm_tiny

from constrained_opt.diffusion.cli import build_parser, main


def run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse errors
        return e.code


def one_line_error(capsys, code, *needles):
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def unlearn(base, out, *extra):
    argv = (
        f"unlearn ddpm --forget-class 1 --checkpoint {base['unet']} --no-eval --steps 2 --batch-size 4 "
        f"--quiet --out {out}"
    )
    return run([*argv.split(), *extra])


def test_robust_runs_one_row_per_form_and_records_each(tmp_path):
    base = ddpm_tiny.write_base(tmp_path)
    out = tmp_path / "run"
    extra = ["--method", "erasediff", "--robust", "relearn,inversion", "--hp", "relearn_lr=0.01"]
    assert unlearn(base, out, *extra) == 0
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 2
    for step in history:
        for row in ("forget", "relearn", "inversion"):
            assert {f"lam_{row}", f"forget_loss_{row}"} <= step.keys()
        assert {"attack_loss_relearn", "attack_loss_inversion"} <= step.keys()


def test_robust_flag_is_the_hp_sugar():
    parser = build_parser()
    args = parser.parse_args(
        ["unlearn", "ddpm", "--method", "moo", "--forget-class", "0", "--robust", "sharpness,relearn"]
    )
    assert args.robust == "sharpness+relearn"


@pytest.mark.parametrize("forms", ["ssam", "relearn,relearn", "relearn,", "relearn+sharpness"])
def test_bad_forms_are_one_line(tmp_path, capsys, forms):
    base = ddpm_tiny.write_base(tmp_path)
    code = unlearn(base, tmp_path / "run", "--method", "erasediff", "--robust", forms)
    one_line_error(capsys, code, "--robust", "relearn, sharpness, inversion")
    assert not (tmp_path / "demo").exists()
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "method, extra", [("finetune", []), ("erasediff", ["--per-class-constraints", "--forget-class", "1,3"])]
)
def test_robust_needs_erasediff_or_moo(tmp_path, capsys, method, extra):
    base = ddpm_tiny.write_base(tmp_path)
    code = unlearn(base, tmp_path / "run", "--method", method, "--robust", "relearn", *extra)
    one_line_error(capsys, code, "--robust needs --method erasediff or moo")
    assert not (tmp_path / "run").exists()


def test_bad_robust_hp_and_bool_are_one_line(tmp_path, capsys):
    base = ddpm_tiny.write_base(tmp_path)
    code = unlearn(base, tmp_path / "a", "--method", "moo", "--hp", "robust=relearn", "--hp", "keep_plain=no")
    one_line_error(capsys, code, "keep_plain", "true, false, 1 or 0")
    code = unlearn(base, tmp_path / "b", "--method", "moo", "--hp", "robust=inversion+x")
    one_line_error(capsys, code, "relearn, sharpness, inversion")


def test_demo_robust_flag_is_a_comma_list():
    from constrained_opt.diffusion.cli.demo import options_from

    options = options_from(build_parser().parse_args(["demo", "--robust", "relearn,sharpness"]))
    assert options.robust == ("relearn", "sharpness")


def test_demo_refuses_an_unknown_form_in_one_line(tmp_path, capsys):
    code = run(["demo", "--robust", "ssam", "--out", str(tmp_path / "demo"), "--quiet"])
    one_line_error(capsys, code, "--robust", "relearn, sharpness, inversion")
    assert not (tmp_path / "demo").exists()
