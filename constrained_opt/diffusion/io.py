"""Deprecated: moved to :mod:`constrained_opt.diffusion.runtime.io`."""

import warnings

from .runtime.io import (
    atomic_path,
    load_state,
    load_tensors,
    read_json,
    save_state,
    save_tensors,
    write_json,
    write_text,
)

__all__ = [
    "atomic_path",
    "load_state",
    "load_tensors",
    "read_json",
    "save_state",
    "save_tensors",
    "write_json",
    "write_text",
]

warnings.warn(
    "constrained_opt.diffusion.io is deprecated; import constrained_opt.diffusion.runtime.io",
    DeprecationWarning,
    stacklevel=2,
)
