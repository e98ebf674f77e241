"""``constrained-opt unlearn {ddpm,sd}``: target ``ddpm`` is here, ``sd`` comes from :mod:`.sd`."""

from __future__ import annotations

import argparse

from ..evaluation.multiclass import class_list
from ..losses import robust_forms_error
from ..methods.registry import METHODS
from . import sd
from .args import COUNT, POSITIVE, SEED
from .options import add_eval, eval_settings, shipped_default
from .parser import add_command, add_common, list_choices

ROBUST_METHODS = ("erasediff", "moo")


def robust_forms(text: str) -> str:
    """``relearn,sharpness`` → ``relearn+sharpness`` (the ``robust`` hyperparameter), checked."""
    forms = tuple(text.split(","))
    if error := robust_forms_error(forms, ","):
        raise argparse.ArgumentTypeError(error)
    return "+".join(forms)


def register(subparsers) -> None:
    p = add_command(subparsers, "unlearn", "scrub a class or concept from a trained diffusion model")
    targets = p.add_subparsers(dest="target", required=True)
    register_ddpm(targets)
    sd.register_unlearn(targets)
    list_choices(targets)


def register_ddpm(targets) -> None:
    p = add_command(targets, "ddpm", "class unlearning of a class-conditional DDPM (UNet2DModel)")
    p.add_argument("--method", required=True, choices=tuple(METHODS))
    p.add_argument(
        "--forget-class",
        type=class_list,
        required=True,
        help="class index to forget, or several separated by commas (e.g. 0,3): the union is forgotten",
    )
    p.add_argument(
        "--per-class-constraints",
        action="store_true",
        help="erasediff with several forget classes: one constraint per class instead of one pooled",
    )
    p.add_argument(
        "--robust",
        type=robust_forms,
        metavar="FORMS",
        help="erasediff/moo: robust forget rows beside the plain one, among relearn, sharpness, inversion "
        "(comma-separated; the same as --hp robust=relearn+sharpness; docs/ddpm.md)",
    )
    p.add_argument("--data", default="digits", help="digits | mnist5k | cifar10:PATH | imagefolder:PATH")
    p.add_argument("--checkpoint", help="base UNet checkpoint (default for digits: the shipped one)")
    p.add_argument(
        "--classifier", help="evaluation classifier; when given (or digits), metrics.json is written"
    )
    p.add_argument("--no-eval", action="store_true", help="skip evaluation")
    p.add_argument("--steps", type=COUNT, default=300, help="unlearning steps")
    p.add_argument(
        "--batch-size", type=COUNT, help="default 64 (digits, mnist5k), 128 otherwise (the paper's)"
    )
    p.add_argument("--lr", type=POSITIVE, default=1e-4, help="Adam learning rate")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the batches, the method and the sampling")
    p.add_argument("--forget-target", choices=("rl", "noise"), help="EraseDiff/MOO ε_f (default rl)")
    p.add_argument(
        "--hp",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="method hyperparameter, e.g. eta=0.5, inner_steps=2, alpha=0.01 (repeatable)",
    )
    p.add_argument("--image-size", type=COUNT, default=32, help="imagefolder resize (default %(default)s)")
    p.add_argument("--out", help="output directory (default runs/unlearn-<method>-c<class>)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.safetensors")
    add_eval(p)
    add_common(p)
    p.set_defaults(run=run_ddpm)


def run_ddpm(args: argparse.Namespace) -> None:
    from ..jobs.unlearn import UnlearnJob, unlearn_ddpm
    from ..methods.registry import parse_hparams
    from ..runtime.errors import UsageError

    classes = args.forget_class
    forget_class = classes[0] if len(classes) == 1 else classes
    method = args.method
    if args.per_class_constraints:
        if args.method != "erasediff" or len(classes) < 2:
            raise UsageError(
                "--per-class-constraints needs --method erasediff and at least two forget classes "
                f"(got --method {args.method} --forget-class {','.join(map(str, classes))})"
            )
        method = "erasediff_per_class"
    if args.robust and (args.method not in ROBUST_METHODS or args.per_class_constraints):
        raise UsageError(
            f"--robust needs --method {' or '.join(ROBUST_METHODS)} without --per-class-constraints "
            f"(got --method {args.method}{' --per-class-constraints' if args.per_class_constraints else ''})"
        )
    pairs = [
        *args.hp,
        *([f"forget_target={args.forget_target}"] if args.forget_target else []),
        *([f"robust={args.robust}"] if args.robust else []),
    ]
    hparams = parse_hparams(args.method, pairs)
    checkpoint = shipped_default(args, "checkpoint", "unet", "the base model")
    classifier = (
        None
        if args.no_eval or (args.classifier is None and args.data not in ("digits", "mnist5k"))
        else (shipped_default(args, "classifier", "classifier", "the evaluation classifier"))
    )
    batch_size = args.batch_size or (64 if args.data in ("digits", "mnist5k") else 128)
    out = args.out or f"runs/unlearn-{method}-c{'-'.join(map(str, classes))}"
    job = UnlearnJob(method, forget_class, args.steps, batch_size, args.lr, args.seed, hparams)
    record = unlearn_ddpm(
        args.data,
        checkpoint,
        out,
        job,
        classifier=classifier,
        es=eval_settings(args, args.seed),
        image_size=args.image_size,
        device=args.device,
        resume=args.resume,
        progress=not args.quiet,
    )
    print(", ".join(f"{k}={v:.4g}" for k, v in record.items() if isinstance(v, float)))
    print(f"wrote {out}/model.safetensors")
