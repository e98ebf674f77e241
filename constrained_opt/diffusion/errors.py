"""Deprecated alias of ``constrained_opt.diffusion.errors``, kept for one release. Moved to:

- ``constrained_opt.diffusion.runtime.errors``
"""

import warnings

from constrained_opt.diffusion.runtime.errors import EvaluationError, UsageError  # noqa: F401

MOVED_TO = ("constrained_opt.diffusion.runtime.errors",)

warnings.warn(
    f"{__name__} is deprecated; import from " + ", ".join(MOVED_TO),
    DeprecationWarning,
    stacklevel=2,
)
