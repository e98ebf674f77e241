"""Deprecated alias of ``constrained_opt.diffusion.io``, kept for one release. Moved to:

- ``constrained_opt.diffusion.runtime.io``
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

MOVED_TO = ("constrained_opt.diffusion.runtime.io",)

warnings.warn(
    f"{__name__} is deprecated; import from " + ", ".join(MOVED_TO),
    DeprecationWarning,
    stacklevel=2,
)
