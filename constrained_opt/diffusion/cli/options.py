"""Flags that several DDPM commands share: evaluation sampling, and the shipped checkpoints."""

from __future__ import annotations

import argparse

from ..evaluation.generated import EvalSettings
from ..models import shipped
from ..runtime.errors import UsageError
from .args import NON_NEGATIVE, int_in


def add_eval(p: argparse.ArgumentParser, per_class: int = 100) -> None:
    g = p.add_argument_group("evaluation sampling")
    g.add_argument(
        "--per-class",
        type=int_in(4, name="count"),
        default=per_class,
        help="generated images per class, at least 4 for k = 3 precision/recall (default %(default)s)",
    )
    g.add_argument("--sampler", default="ddim", help="ddim (default) or ddpm (all 1000 steps)")
    g.add_argument(
        "--sampling-steps",
        type=int_in(1, 1000, name="count"),
        default=50,
        help="DDIM steps (default %(default)s)",
    )
    g.add_argument("--guidance", type=NON_NEGATIVE, default=2.0, help="CFG scale w in (1+w)ε(x,c) − wε(x,∅)")


def eval_settings(args: argparse.Namespace, seed: int = 0) -> EvalSettings:
    return EvalSettings(args.per_class, args.sampler, args.sampling_steps, args.guidance, seed)


def shipped_default(args: argparse.Namespace, attr: str, what: str, description: str) -> str:
    """``args.<attr>``, or the checkpoint shipped for ``args.data`` (digits, mnist5k)."""
    value = getattr(args, attr)
    if value is None:
        value = shipped(args.data, what)
        if value is None:
            raise UsageError(f"--{attr.replace('_', '-')} is required for {args.data} ({description})")
    return value
