"""The CLI's argument parser: one-line errors, every default in ``--help``, the shared flags."""

from __future__ import annotations

import argparse
import sys


class DefaultsFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to every option whose help does not already state its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        unset = any(default is v for v in (None, False, argparse.SUPPRESS)) or default == []
        if "default" in text.lower() or unset:
            return text
        return f"{text} (default: %(default)s)".strip()


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) and every default shown in ``--help``."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def add_common(p: argparse.ArgumentParser) -> None:
    """``--device`` and ``--quiet``, which every command that loads a model takes."""
    p.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu, cuda, cuda:N")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_command(subparsers, name: str, help: str) -> argparse.ArgumentParser:
    """A subcommand's parser, its help also shown as its description."""
    return subparsers.add_parser(name, help=help, description=help)


def list_choices(subparsers) -> None:
    """Show the registered subcommands as ``{a,b,...}`` in usage lines (argparse would list them too)."""
    subparsers.metavar = "{" + ",".join(subparsers.choices) + "}"
