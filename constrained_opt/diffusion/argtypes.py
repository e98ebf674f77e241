"""Deprecated alias of ``constrained_opt.diffusion.argtypes``, kept for one release. Moved to:

- ``constrained_opt.diffusion.cli.args``
"""

import warnings

from constrained_opt.diffusion.cli.args import (  # noqa: F401
    COUNT,
    FRACTION,
    INDEX,
    NON_NEGATIVE,
    POSITIVE,
    PROBABILITY,
    SEED,
    float_in,
    int_in,
)

MOVED_TO = ("constrained_opt.diffusion.cli.args",)

warnings.warn(
    f"{__name__} is deprecated; import from " + ", ".join(MOVED_TO),
    DeprecationWarning,
    stacklevel=2,
)
