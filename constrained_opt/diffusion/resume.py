"""Deprecated alias of ``constrained_opt.diffusion.resume``, kept for one release. Moved to:

- ``constrained_opt.diffusion.runtime.resume``
"""

import warnings

from constrained_opt.diffusion.runtime.resume import DIGESTS, FLAGS, check_resume, restoring, run_config  # noqa: F401

MOVED_TO = ("constrained_opt.diffusion.runtime.resume",)

warnings.warn(
    f"{__name__} is deprecated; import from " + ", ".join(MOVED_TO),
    DeprecationWarning,
    stacklevel=2,
)
