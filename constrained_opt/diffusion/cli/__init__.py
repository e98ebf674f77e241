"""``constrained-opt``: ``demo``, ``train-base``, ``unlearn {ddpm,sd}``, ``evaluate``, ``sd ...`` and
``attack {ddpm,sd}``.

Each command module has ``register(subparsers)``: it adds its parser, its flags and the function that
runs the parsed namespace (``set_defaults(run=...)``). Heavy imports happen inside the runners.

User errors print one line on stderr and exit with status 2, never a traceback: argparse errors (every
numeric option is range-checked while parsing, see :mod:`.args`),
:class:`~constrained_opt.diffusion.runtime.errors.UsageError`, and the optimizer refusing a step (a
diverging run) or a setting (:class:`~constrained_opt.errors.OptimizerError`). Ctrl-C exits with 130
and says how to resume. ``--help`` shows every default.
"""

from __future__ import annotations

import argparse
import sys

from ...errors import OptimizerError, SettingError
from ..runtime.errors import UsageError
from . import attack, demo, evaluate, sd, train_base, unlearn
from .parser import Parser, list_choices

COMMANDS = (demo, train_base, unlearn, evaluate, sd, attack)  # in the order --help lists them


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="constrained-opt", description="EraseDiff unlearning for diffusion models (docs/ddpm.md)"
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in COMMANDS:
        command.register(sub)
    list_choices(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. Called with ``argv=None`` (the ``constrained-opt`` process itself), it also
    picks torch's thread count from the CPUs that are free (:mod:`constrained_opt.threads`)."""
    args = build_parser().parse_args(argv)
    if argv is None:
        from ...threads import configure_threads

        note = configure_threads()
        if note:
            print(f"constrained-opt: {note}", file=sys.stderr)
    try:
        args.run(args)
    except UsageError as e:
        print(f"constrained-opt: error: {e}", file=sys.stderr)
        return 2
    except OptimizerError as e:
        reason = " ".join(str(e).split())
        message = f"the optimizer stopped the run: {reason}{_fix(e, args)}"
        print(f"constrained-opt: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("constrained-opt: interrupted; run the same command with --resume to continue", file=sys.stderr)
        return 130
    return 0


def _fix(error: OptimizerError, args: argparse.Namespace) -> str:
    """What to change after the optimizer refused a step: the step sizes, named as this command takes
    them. A refused setting (:class:`~constrained_opt.errors.SettingError`) names its own fix."""
    if isinstance(error, SettingError):
        return ""
    if getattr(args, "target", None) == "sd":
        sizes = "--inner-lr, --eta"
    elif args.command == "demo":
        sizes = "--hp erasediff.inner_lr=..., erasediff.eta=..."
    else:
        sizes = "--hp inner_lr=..., eta=..."
    return f". Lower --lr or the method's step sizes ({sizes}) and run it again without --resume"
