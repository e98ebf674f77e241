"""``constrained-opt demo``: its flags are derived from :class:`~..jobs.demo_options.DemoOptions`."""

from __future__ import annotations

import argparse
import dataclasses

from ..jobs.demo_options import DemoOptions
from .args import COUNT, INDEX, POSITIVE, SEED
from .options import add_eval, eval_settings
from .parser import add_command, add_common

HELP = "forget one digit with EraseDiff and the baselines on scikit-learn's digits; write a report"
KINDS = {"index": INDEX, "seed": SEED, "count": COUNT, "positive": POSITIVE, "int": int}
SHARED = ("es", "device", "progress")  # set by the evaluation and common flags


def register(subparsers) -> None:
    p = add_command(subparsers, "demo", HELP)
    for f in dataclasses.fields(DemoOptions):
        if f.name not in SHARED:
            add_option(p, f)
    add_eval(p)
    add_common(p)
    p.set_defaults(run=run)


def add_option(p: argparse.ArgumentParser, f: dataclasses.Field) -> None:
    """The flag of one DemoOptions field (see :mod:`~..jobs.demo_options` for the metadata)."""
    m = f.metadata
    kwargs: dict = {"dest": f.name, "help": m["help"]}
    renamed = m["flag"] != "--" + f.name.replace("_", "-")
    if renamed and not (m.get("repeatable") or "choices" in m or f.default is False):
        kwargs["metavar"] = m["flag"].removeprefix("--").replace("-", "_").upper()  # as argparse names it
    if m.get("repeatable"):
        kwargs.update(action="append", default=list(f.default), metavar=m["metavar"])
    elif m.get("comma_list"):
        kwargs["default"] = ",".join(f.default)
    elif f.default is False:
        kwargs["action"] = "store_true"
    elif "negation" in m:  # the flag gives a value; the default is the negation's opposite
        kwargs["default"] = None
    else:
        kwargs["default"] = f.default
    if "kind" in m:
        kwargs["type"] = KINDS[m["kind"]]
    if "choices" in m:
        kwargs["choices"] = m["choices"]
    p.add_argument(m["flag"], **kwargs)
    if "negation" in m:
        flag, text = m["negation"]
        p.add_argument(flag, dest=f"no_{f.name}", action="store_true", help=text)


def option_value(args: argparse.Namespace, f: dataclasses.Field):
    """The value of one DemoOptions field from the parsed flags."""
    value = getattr(args, f.name)
    if f.metadata.get("repeatable"):
        return tuple(value)
    if f.metadata.get("comma_list"):
        return () if value.strip() in ("", "none") else tuple(item.strip() for item in value.split(","))
    if "negation" in f.metadata:
        return False if getattr(args, f"no_{f.name}") else (value or f.default)
    return value


def options_from(args: argparse.Namespace) -> DemoOptions:
    shared = {"es": eval_settings(args, args.seed), "device": args.device, "progress": not args.quiet}
    flags = {f.name: option_value(args, f) for f in dataclasses.fields(DemoOptions) if f.name not in SHARED}
    return DemoOptions(**flags, **shared)


def run(args: argparse.Namespace) -> None:
    from ..evaluation.report import gap_table, metrics_table
    from ..jobs.demo import demo

    results = demo(options_from(args))
    print(metrics_table(results))
    print(gap_table(results))
    print(
        f"wrote {args.out}/report.md, metrics.json, table.md, noise_floor.json, samples_*.png"
        + (", fig2_cosines.png" if "moo" in results else "")
    )
