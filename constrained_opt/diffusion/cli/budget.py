"""Command-line flags generated from a budget dataclass (the attacks' :class:`Budget`/:class:`SDBudget`), so
the CLI, the Python API and the docs share one set of defaults."""

from __future__ import annotations

import argparse
import dataclasses

from .args import COUNT, NON_NEGATIVE, POSITIVE, SEED

# Range checks while parsing (argtypes): counts ≥ 1, seeds, finite rates > 0, guidance and decay ≥ 0.
NON_NEGATIVE_FIELDS = ("guidance", "prefix_weight_decay")


def flag_type(name: str, default):
    if name == "seed":
        return SEED
    if isinstance(default, int):
        return COUNT
    if isinstance(default, float):
        return NON_NEGATIVE if name in NON_NEGATIVE_FIELDS else POSITIVE
    return str


def add_budget_flags(p: argparse.ArgumentParser, budget_cls, helps: dict[str, str], title: str) -> None:
    """One ``--field-name`` flag per budget field, typed, range-checked and defaulted from the dataclass."""
    g = p.add_argument_group(title)
    for f in dataclasses.fields(budget_cls):
        flag = "--" + f.name.replace("_", "-")
        kind = flag_type(f.name, f.default)
        extra = {"choices": f.metadata["choices"]} if "choices" in f.metadata else {}
        g.add_argument(
            flag,
            dest=f.name,
            type=kind,
            default=f.default,
            help=f"{helps[f.name]} (default %(default)s)",
            **extra,
        )


def budget_from(args: argparse.Namespace, budget_cls):
    return budget_cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(budget_cls)})
