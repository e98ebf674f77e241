"""Atomic file writes and safetensors storage of nested training state (model, optimizer, RNG).

Every output goes through :func:`atomic_path`: write to a temporary file in the destination directory,
then ``os.replace`` it over the target, so a reader (or a Ctrl-C) never sees a half-written file.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from typing import Any

from torch import Tensor

from .errors import UsageError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success move it over ``path``, else delete it."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def save_tensors(path: str | os.PathLike, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """safetensors file with string metadata, written atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise UsageError(f"file not found: {path}")
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(os.fspath(path)), metadata
    except Exception as e:  # safetensors raises its own error types for foreign or truncated files
        raise UsageError(f"not a readable safetensors file: {path} ({e})") from None


def _split(obj: Any, prefix: str, tensors: dict[str, Tensor]) -> Any:
    """Replace every tensor in a nested dict/list by a ``{"__tensor__": key}`` reference."""
    if isinstance(obj, Tensor):
        tensors[prefix] = obj
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {
            "__dict__": [[k, _split(v, f"{prefix}/{i}", tensors)] for i, (k, v) in enumerate(obj.items())]
        }
    if isinstance(obj, (list, tuple)):
        return [_split(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]
    return obj


def _join(obj: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(obj, dict) and "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if isinstance(obj, dict) and "__dict__" in obj:
        return {k: _join(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    return obj


def save_state(path: str | os.PathLike, state: dict) -> None:
    """Save a nested state (dicts with any keys, lists, tensors, JSON scalars) as one safetensors file.

    Tensors go into the safetensors payload; the structure goes into the ``state`` metadata entry as
    JSON. Dict keys may be ints (optimizer state) and survive the round trip.
    """
    tensors: dict[str, Tensor] = {}
    skeleton = _split(state, "s", tensors)
    save_tensors(path, tensors, {"state": json.dumps(skeleton)})


def load_state(path: str | os.PathLike) -> dict:
    tensors, metadata = load_tensors(path)
    if "state" not in metadata:
        raise UsageError(f"{path} is not a constrained_opt state checkpoint")
    return _join(json.loads(metadata["state"]), tensors)
