"""``constrained-opt evaluate``."""

from __future__ import annotations

import argparse

from .args import COUNT, INDEX, SEED
from .options import add_eval, eval_settings, shipped_default
from .parser import add_command, add_common

HELP = "evaluate UNet checkpoints side by side (P(y=c_f|x_f), accuracy, FID, precision/recall)"


def register(subparsers) -> None:
    p = add_command(subparsers, "evaluate", HELP)
    p.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="NAME=PATH",
        help="a checkpoint to evaluate (repeatable; the first is the reference, e.g. base=...)",
    )
    p.add_argument("--forget-class", type=INDEX, required=True, help="the forgotten class index")
    p.add_argument("--data", default="digits", help="digits | mnist5k | cifar10:PATH | imagefolder:PATH")
    p.add_argument("--classifier", help="evaluation classifier (default for digits: the shipped one)")
    p.add_argument("--inception-weights", help="torch-fidelity Inception-v3 weights: adds Inception FID")
    p.add_argument("--image-size", type=COUNT, default=32, help="imagefolder resize")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the initial noise x_T")
    p.add_argument("--out", default="runs/evaluate", help="output directory")
    add_eval(p)
    add_common(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from ..evaluation.report import metrics_table
    from ..jobs.evaluate import evaluate_checkpoints
    from ..runtime.errors import UsageError

    models = {}
    for spec in args.model:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--model expects NAME=PATH, got {spec!r}")
        models[name] = path
    classifier = shipped_default(args, "classifier", "classifier", "the evaluation classifier")
    results = evaluate_checkpoints(
        args.data,
        models,
        classifier,
        args.forget_class,
        args.out,
        eval_settings(args, args.seed),
        image_size=args.image_size,
        device=args.device,
        inception=args.inception_weights,
        progress=not args.quiet,
    )
    print(metrics_table(results))
    print(f"wrote {args.out}/report.md, metrics.json")
