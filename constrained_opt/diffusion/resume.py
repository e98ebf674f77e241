"""Deprecated alias of ``constrained_opt.diffusion.resume``, kept for one release.

Moved to ``constrained_opt.diffusion.runtime.resume``.
"""

import warnings

from constrained_opt.diffusion.runtime.resume import (  # noqa: F401
    DIGESTS,
    FLAGS,
    check_resume,
    restoring,
    run_config,
)

warnings.warn(
    "constrained_opt.diffusion.resume is deprecated; import from constrained_opt.diffusion.runtime.resume",
    DeprecationWarning,
    stacklevel=2,
)
