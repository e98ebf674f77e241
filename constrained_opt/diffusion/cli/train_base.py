"""``constrained-opt train-base``."""

from __future__ import annotations

import argparse

from .args import COUNT, INDEX, POSITIVE, SEED
from .parser import add_command, add_common

HELP = "train the base class-conditional DDPM and/or the evaluation classifier (seeded)"


def register(subparsers) -> None:
    p = add_command(subparsers, "train-base", HELP)
    p.add_argument("--data", default="digits", help="digits | mnist5k | cifar10:PATH | imagefolder:PATH")
    p.add_argument(
        "--what", choices=("unet", "classifier", "both"), help="default both (unet with --exclude-class)"
    )
    p.add_argument(
        "--exclude-class",
        type=INDEX,
        help="train the UNet without this class (the Retrain reference), same seeded recipe",
    )
    p.add_argument("--steps", type=COUNT, default=3000, help="UNet training steps (default %(default)s)")
    p.add_argument("--classifier-steps", type=COUNT, default=1500, help="classifier training steps")
    p.add_argument("--batch-size", type=COUNT, default=128, help="training batch size")
    p.add_argument("--lr", type=POSITIVE, default=1e-3, help="UNet Adam learning rate (default %(default)s)")
    p.add_argument(
        "--preset", help="UNet preset: digits, mnist, cifar10 (the paper's), tiny (default: by dataset)"
    )
    p.add_argument("--image-size", type=COUNT, default=32, help="imagefolder resize (default %(default)s)")
    p.add_argument("--seed", type=SEED, default=0, help="seed of initialisation and batches")
    p.add_argument("--out", help="output directory (default runs/base-<dataset>)")
    add_common(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from ..jobs.train_base import train_base

    kind = args.data.partition(":")[0]
    out = args.out or (
        f"runs/base-{kind}" if args.exclude_class is None else f"runs/retrain-{kind}-c{args.exclude_class}"
    )
    written = train_base(
        args.data,
        out,
        what=args.what or ("both" if args.exclude_class is None else "unet"),
        exclude_class=args.exclude_class,
        unet_steps=args.steps,
        classifier_steps=args.classifier_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        preset=args.preset,
        seed=args.seed,
        image_size=args.image_size,
        device=args.device,
        progress=not args.quiet,
    )
    for path in written.values():
        print(f"wrote {path}")
