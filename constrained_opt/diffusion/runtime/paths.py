"""Where a job writes: its output directory and the shared cache."""

from __future__ import annotations

import os

from .errors import UsageError


def check_output_dir(path: str) -> None:
    """The output directory may exist (a directory this user can write into) or be creatable (its
    nearest existing ancestor is a writable directory); never a file. Checked before a job loads or
    writes anything, so a read-only ``--out`` fails at once instead of after the whole run."""
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise UsageError(f"output path exists and is not a directory: {path}")
        if not os.access(path, os.W_OK | os.X_OK):
            raise UsageError(
                f"output directory {path} is not writable: choose another --out or fix its permissions"
            )
        return
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"cannot create output directory {path}: {parent} is not a writable directory")


def cache_dir(override: str | None = None) -> str:
    return override or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "constrained_opt"
    )
