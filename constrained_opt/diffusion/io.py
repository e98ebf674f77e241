"""Deprecated alias of ``constrained_opt.diffusion.io``, kept for one release.

Moved to ``constrained_opt.diffusion.runtime.io``.
"""

import warnings

from constrained_opt.diffusion.runtime.io import (  # noqa: F401
    atomic_path,
    load_state,
    load_tensors,
    read_json,
    save_state,
    save_tensors,
    write_json,
    write_text,
)

warnings.warn(
    "constrained_opt.diffusion.io is deprecated; import from constrained_opt.diffusion.runtime.io",
    DeprecationWarning,
    stacklevel=2,
)
