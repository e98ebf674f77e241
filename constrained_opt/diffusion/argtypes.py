"""Deprecated: moved to :mod:`constrained_opt.diffusion.cli.args`."""

import warnings

from .cli.args import COUNT, FRACTION, INDEX, NON_NEGATIVE, POSITIVE, PROBABILITY, SEED, float_in, int_in

__all__ = [
    "COUNT",
    "FRACTION",
    "INDEX",
    "NON_NEGATIVE",
    "POSITIVE",
    "PROBABILITY",
    "SEED",
    "float_in",
    "int_in",
]

warnings.warn(
    "constrained_opt.diffusion.argtypes is deprecated; import constrained_opt.diffusion.cli.args",
    DeprecationWarning,
    stacklevel=2,
)
