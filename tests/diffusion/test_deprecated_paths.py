"""The module paths that moved in the layered layout keep working for one release, with a warning."""

import importlib
import sys

import pytest

SHIMS = {
    "constrained_opt.diffusion.errors": {"UsageError": "runtime.errors", "EvaluationError": "runtime.errors"},
    "constrained_opt.diffusion.io": {"atomic_path": "runtime.io", "save_state": "runtime.io"},
    "constrained_opt.diffusion.resume": {"check_resume": "runtime.resume", "run_config": "runtime.resume"},
    "constrained_opt.diffusion.metrics": {
        "PeakMemory": "evaluation.metrics",
        "mean_ci95": "evaluation.metrics",
    },
    "constrained_opt.diffusion.report": {
        "metrics_table": "evaluation.report",
        "DISPLAY": "evaluation.report",
    },
    "constrained_opt.diffusion.multiclass": {"class_list": "evaluation.multiclass"},
    "constrained_opt.diffusion.comparison": {
        "aggregate": "evaluation.statistics",
        "plan_runs": "jobs.comparison",
    },
    "constrained_opt.diffusion.baselines": {
        "METHODS": "methods.registry",
        "unlearn": "methods.unlearn",
        "EraseDiff": "methods.erasediff",
        "SelectiveAmnesia": "methods.sa",
        "model_digest": "runtime.provenance",
    },
    "constrained_opt.diffusion.ddpm": {
        "demo": "jobs.demo",
        "EvalSettings": "evaluation.generated",
        "resolve_device": "runtime.device",
        "check_output_dir": "runtime.paths",
        "unlearn_ddpm": "jobs.unlearn",
    },
    "constrained_opt.diffusion.argtypes": {"COUNT": "cli.args", "int_in": "cli.args"},
    "constrained_opt.diffusion.attacks_cli": {"add_budget_flags": "cli.budgets", "DDPM_HELP": "cli.attack"},
}


@pytest.mark.parametrize("old", sorted(SHIMS))
def test_an_old_module_path_warns_and_reexports(old):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=old.replace(".", r"\.")):
        module = importlib.import_module(old)
    for name, new in SHIMS[old].items():
        assert getattr(module, name) is getattr(
            importlib.import_module(f"constrained_opt.diffusion.{new}"), name
        )


@pytest.mark.parametrize(
    ("name", "new"),
    [
        ("Budget", "attacks.common"),
        ("attack_unet", "attacks.ddpm"),
        ("attack_table", "attacks.report"),
        ("attack_ddpm", "jobs.attack"),
    ],
)
def test_the_flat_attack_names_warn_and_resolve(name, new):
    from constrained_opt.diffusion import attacks

    with pytest.warns(DeprecationWarning, match=name):
        value = getattr(attacks, name)
    assert value is getattr(importlib.import_module(f"constrained_opt.diffusion.{new}"), name)
    with pytest.raises(AttributeError):
        attacks.no_such_name  # noqa: B018


def test_the_console_script_module_warns_for_build_parser():
    import constrained_opt.cli as script
    from constrained_opt.diffusion import cli

    with pytest.warns(DeprecationWarning, match="build_parser"):
        assert script.build_parser is cli.build_parser


def test_the_console_script_main_runs_the_cli(capsys):
    import constrained_opt.cli as script

    with pytest.raises(SystemExit) as stop:
        script.main(["train-base", "--steps", "0"])
    assert stop.value.code == 2
    assert "constrained-opt train-base: error: argument --steps" in capsys.readouterr().err
