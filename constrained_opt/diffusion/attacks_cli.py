"""``constrained-opt attack {ddpm,sd}``: try to bring an erased class or concept back (docs/robustness.md).

:func:`register` adds the command to :mod:`constrained_opt.cli`'s registry (it receives the registry
decorator, so this module never imports the CLI module). The budget flags are generated from the
budget dataclasses, so the CLI, the Python API and the docs share one set of defaults.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable

from .cli.budget import add_budget_flags, budget_from

Runner = Callable[[argparse.Namespace], None]
AddCommon = Callable[[argparse.ArgumentParser], None]

DDPM_HELP = {
    "num_images": "N real images of c_f for inversion and mixture",
    "steps": "optimisation steps of inversion and mixture",
    "batch_size": "batch of inversion, mixture and benign fine-tuning",
    "inversion_lr": "Adam lr of the inverted class embedding",
    "mixture_lr": "Adam lr of the simplex weights",
    "mixture_start": "best: the best of the uniform point and the vertices; uniform: UnlearnDiffAtk's start",
    "relearn_images": "n real images of c_f for relearning (also its batch)",
    "relearn_steps": "m relearning steps",
    "relearn_lr": "Adam lr of relearning and benign fine-tuning",
    "benign_steps": "fine-tuning steps on the retained classes",
    "probe_every": "probe P(y=c_f) every this many relearning steps",
    "benign_probe_every": "probe P(y=c_f) every this many benign fine-tuning steps",
    "samples": "class-c_f images sampled to score each attack",
    "sampling_steps": "DDIM steps of those samples",
    "guidance": "CFG scale w in (1+w)ε(x,e) − wε(x,∅)",
    "probe_samples": "images per relearning probe",
    "probe_sampling_steps": "DDIM steps per relearning probe",
    "seed": "seed of the image subsets, noise draws and sampling",
}


def register(command, add_common: AddCommon) -> None:
    """Register ``attack`` with ``constrained_opt.cli``'s ``command`` decorator; ``add_common`` adds the
    CLI's shared ``--device``/``--quiet`` flags."""
    command("attack", "try to bring an erased class (DDPM) or concept (Stable Diffusion) back")(
        functools.partial(_attack, add_common=add_common)
    )


def _attack(p: argparse.ArgumentParser, add_common: AddCommon) -> Runner:
    from .cli import sd as sd_cli

    sub = p.add_subparsers(dest="attack_target", required=True, metavar="{ddpm,sd}")
    runners = {
        "ddpm": _attack_ddpm(sub.add_parser("ddpm", help="attacks on a class-conditional DDPM"), add_common),
        "sd": sd_cli.build_attack(sub.add_parser("sd", help=sd_cli.ATTACK_HELP)),
    }
    return lambda args: runners[args.attack_target](args)


def _attack_ddpm(p: argparse.ArgumentParser, add_common: AddCommon) -> Runner:
    from .attacks.ddpm import ATTACKS, Budget

    p.description = "concept inversion, embedding mixture, relearning and benign fine-tuning on a DDPM"
    p.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="DIR_OR_SAFETENSORS",
        help="a UNet checkpoint, or a folder of them (e.g. a demo's models/) to attack each; repeatable",
    )
    p.add_argument("--forget-class", type=int, required=True)
    p.add_argument(
        "--attack",
        default="all",
        help=f"all, or a comma-separated subset of {','.join(ATTACKS)} (default all)",
    )
    p.add_argument("--data", default="digits", help="digits | cifar10:PATH | imagefolder:PATH")
    p.add_argument("--classifier", help="evaluation classifier (default for digits: the shipped one)")
    p.add_argument("--image-size", type=int, default=32, help="imagefolder resize (default %(default)s)")
    p.add_argument("--out", default="runs/attack", help="output directory (default %(default)s)")
    p.add_argument(
        "--resume", action="store_true", help="skip the models already attacked in OUT (same budget)"
    )
    add_budget_flags(p, Budget, DDPM_HELP, "attack budget (the same for every model, so results compare)")
    add_common(p)

    def run(args: argparse.Namespace) -> None:
        from .attacks.ddpm import attack_ddpm, parse_attacks
        from .models import SHIPPED_CLASSIFIER
        from .runtime.errors import UsageError

        classifier = args.classifier
        if classifier is None:
            if args.data != "digits":
                raise UsageError(f"--classifier is required for {args.data} (the evaluation classifier)")
            classifier = SHIPPED_CLASSIFIER
        attack_ddpm(
            args.data,
            args.model,
            classifier,
            args.forget_class,
            args.out,
            attacks=parse_attacks(args.attack),
            budget=budget_from(args, Budget),
            image_size=args.image_size,
            device=args.device,
            resume=args.resume,
            progress=not args.quiet,
        )
        print(f"wrote {args.out}/report.md, attack.json, attack_samples.png")

    return run
