"""Deprecated: moved to :mod:`constrained_opt.diffusion.runtime.errors`."""

import warnings

from .runtime.errors import EvaluationError, UsageError

__all__ = ["EvaluationError", "UsageError"]

warnings.warn(
    "constrained_opt.diffusion.errors is deprecated; import constrained_opt.diffusion.runtime.errors",
    DeprecationWarning,
    stacklevel=2,
)
