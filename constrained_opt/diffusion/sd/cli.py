"""Deprecated: the SD commands moved to :mod:`constrained_opt.diffusion.cli.sd` (``register`` now takes
the subparsers, as every command module of :mod:`constrained_opt.diffusion.cli` does)."""

import warnings

from ..cli.sd import (
    ATTACK_HELP,
    COMMAND_HELP,
    UNLEARN_HELP,
    add_attack_arguments,
    build_attack,
    build_sd,
    build_unlearn,
    register,
    register_attack,
    register_unlearn,
    run_attack,
)

__all__ = [
    "ATTACK_HELP",
    "COMMAND_HELP",
    "UNLEARN_HELP",
    "add_attack_arguments",
    "build_attack",
    "build_sd",
    "build_unlearn",
    "register",
    "register_attack",
    "register_unlearn",
    "run_attack",
]

warnings.warn(
    "constrained_opt.diffusion.sd.cli is deprecated; import constrained_opt.diffusion.cli.sd",
    DeprecationWarning,
    stacklevel=2,
)
