"""Where jobs write: the output directory check and the cache root."""

from __future__ import annotations

import os

from .errors import UsageError


def check_output_dir(path: str) -> None:
    """The output directory may exist (as a directory) or be creatable; never a file."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"output path exists and is not a directory: {path}")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise UsageError(f"cannot create output directory {path}")


def cache_dir(override: str | None = None) -> str:
    return override or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "constrained_opt"
    )
