"""The SD modules' old import paths warn once and still give the same objects; the SD command modules
register their parsers with plain argparse subparsers."""

import argparse
import importlib
import sys

import pytest

from constrained_opt.diffusion.attacks import sd as attacks_sd
from constrained_opt.diffusion.cli import sd as cli_sd
from constrained_opt.diffusion.jobs import sd_attack, sd_unlearn
from constrained_opt.diffusion.sd import job, methods, params

SHIMS = {
    "constrained_opt.diffusion.sd.attacks": {
        "SDBudget": attacks_sd.SDBudget,
        "textual_inversion": attacks_sd.textual_inversion,
        "prompt_prefix": attacks_sd.prompt_prefix,
        "relearn": attacks_sd.relearn,
        "concept_latents": attacks_sd.concept_latents,
        "SDAttackJob": sd_attack.SDAttackJob,
        "run_attacks": sd_attack.run_attacks,
        "add_sd_arguments": cli_sd.add_attack_arguments,
        "run_from_args": cli_sd.run_attack,
    },
    "constrained_opt.diffusion.sd.train": {
        "SDJob": job.SDJob,
        "METHODS": job.METHODS,
        "EraseDiffSD": methods.EraseDiffSD,
        "ESD": methods.ESD,
        "SalUnSD": methods.SalUnSD,
        "unlearn_sd": sd_unlearn.unlearn_sd,
        "trains": params.trains,
        "PARAM_SETS": params.PARAM_SETS,
    },
    "constrained_opt.diffusion.sd.cli": {
        "register": cli_sd.register,
        "register_unlearn": cli_sd.register_unlearn,
        "register_attack": cli_sd.register_attack,
    },
}


@pytest.mark.parametrize("name", sorted(SHIMS))
def test_old_sd_module_warns_and_reexports(name, monkeypatch):
    monkeypatch.delitem(sys.modules, name, raising=False)
    with pytest.warns(DeprecationWarning, match=name.replace(".", r"\.")):
        shim = importlib.import_module(name)
    for attr, obj in SHIMS[name].items():
        assert getattr(shim, attr) is obj
    assert set(shim.__all__) <= set(dir(shim))


def test_sd_commands_register_with_subparsers():
    parser = argparse.ArgumentParser(prog="constrained-opt")
    commands = parser.add_subparsers(dest="command", required=True)
    cli_sd.register(commands)
    unlearn = commands.add_parser("unlearn").add_subparsers(dest="target", required=True)
    cli_sd.register_unlearn(unlearn)
    attack = commands.add_parser("attack").add_subparsers(dest="attack_target", required=True)
    cli_sd.register_attack(attack)

    args = parser.parse_args(["sd", "nudenet", "--images", "x"])
    assert callable(args.run) and args.sd_command == "nudenet" and args.device == "auto"
    args = parser.parse_args(["unlearn", "sd", "--model", "m", "--concept", "nudity", "--out", "o"])
    assert callable(args.run) and args.method == "erasediff" and args.train_params == "noxattn"
    args = parser.parse_args(
        ["attack", "sd", "--model", "m", "--concept", "nudity", "--images", "i", "--out", "o"]
    )
    assert callable(args.run) and args.num_images == attacks_sd.SDBudget().num_images and not args.quiet
