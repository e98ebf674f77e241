"""TEMPORARY ADAPTER (drop at merge: the SD side's own ``cli/sd.py`` replaces this file).

Adapts the registry-style :func:`constrained_opt.diffusion.sd.cli.register` and the SD part of the old
``attacks_cli`` to the ``register(subparsers)`` interface of this package: :func:`register` adds the
top-level ``sd`` command, :func:`register_unlearn` the ``unlearn sd`` target, :func:`register_attack`
the ``attack sd`` target.
"""

from __future__ import annotations

import argparse

from .budgets import add_budget_flags, budget_from
from .parser import add_command, add_common


def _sd_builders() -> tuple[dict, dict]:
    """The builders that ``sd.cli.register`` hands to its ``command`` and ``unlearn_target`` decorators."""
    from ..sd import cli as sd_cli

    commands, targets = {}, {}

    def collect(into: dict):
        def decorator_for(name: str, help: str):
            def keep(builder):
                into[name] = (help, builder)
                return builder

            return keep

        return decorator_for

    sd_cli.register(collect(commands), collect(targets), add_common)
    return commands, targets


def register(subparsers) -> None:
    help_text, builder = _sd_builders()[0]["sd"]
    p = add_command(subparsers, "sd", help_text)
    p.set_defaults(run=builder(p))


def register_unlearn(targets) -> None:
    help_text, builder = _sd_builders()[1]["sd"]
    p = add_command(targets, "sd", help_text)
    p.set_defaults(run=builder(p))


def register_attack(targets) -> None:
    from ..sd.attacks import SD_HELP, SDBudget, add_sd_arguments

    p = targets.add_parser("sd", help="attacks on a Stable Diffusion pipeline")
    p.description = (
        "textual inversion (CCE), an UnlearnDiffAtk-style k-token prompt prefix, and relearning on a "
        "Stable Diffusion pipeline"
    )
    add_sd_arguments(p)
    add_budget_flags(p, SDBudget, SD_HELP, "attack budget (defaults: the published attacks' GPU budgets)")
    add_common(p)

    def run(args: argparse.Namespace) -> None:
        from ..sd.attacks import run_from_args

        run_from_args(args, budget_from(args, SDBudget))

    p.set_defaults(run=run)
