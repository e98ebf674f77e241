"""Deprecated alias of ``constrained_opt.diffusion.errors``, kept for one release.

Moved to ``constrained_opt.diffusion.runtime.errors``.
"""

import warnings

from constrained_opt.diffusion.runtime.errors import EvaluationError, UsageError  # noqa: F401

warnings.warn(
    "constrained_opt.diffusion.errors is deprecated; import from constrained_opt.diffusion.runtime.errors",
    DeprecationWarning,
    stacklevel=2,
)
