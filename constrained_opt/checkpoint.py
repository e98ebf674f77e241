"""Atomic, pickle-free checkpoints: model, optimizer (with its base optimizer) and RNG states.

One checkpoint is one safetensors file. Tensors (the model's state dict, optimizer moments, the torch
RNG states) are stored as safetensors tensors; everything else (hyperparameters, step counters, the
GradScaler state, numpy's and Python's RNG states, ``extra``) is JSON in the file's metadata, with
tensors referenced by name. Nothing is pickled, so loading never executes code. The metadata also
holds a SHA-256 of the payload (every tensor's name, dtype, shape and bytes, and the JSON structure),
so a file corrupted after it was written is refused instead of loaded. Version-1 files (written before
the checksum existed) still load, with a warning that they cannot be verified.

A save writes a temporary file next to the target, fsyncs it, and renames it over the target with
``os.replace`` (atomic on POSIX and Windows), then fsyncs the directory. A save that fails or is
killed midway leaves the previous checkpoint as it was; a kill can leave a ``.<name>.*.tmp`` file
behind, which is never read and may be deleted.

Resuming restores θ, the optimizer state and the global RNGs (torch CPU and CUDA, numpy's legacy
global generator, Python's ``random``), so closures that sample batches from them continue on the
identical trajectory. Generators you own (``torch.Generator``, ``numpy.random.Generator``) belong in
``extra``: ``gen.get_state()`` is a tensor and ``np_gen.bit_generator.state`` is a dict.

Loading is all or nothing: the file, its checksum, its structure, the model's keys and shapes, the
optimizer's class, groups and per-parameter shapes, and the RNG states (applied to scratch
generators first) are all checked before anything is modified; if loading the optimizer or the model
still fails, both are put back as they were.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import random
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._flat import local_tensor

FORMAT = "constrained_opt.checkpoint"
_EXTRA_STATE = "_extra_state"  # torch.nn.Module's state-dict key for get_extra_state()
VERSION = 2  # 2: SHA-256 of the payload, per-parameter optimizer shapes, non-tensor model state

__all__ = ["load_checkpoint", "save_checkpoint"]


def save_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    extra: Any = None,
) -> None:
    """Write model, optimizer and RNG states to ``path`` atomically.

    ``extra`` may hold JSON-like values (None, bool, int, float, str, lists, tuples, dicts) and
    tensors, e.g. ``{"step": t, "sampler": gen.get_state()}``; it is returned by
    :func:`load_checkpoint`. Non-tensor entries of the model's state dict (a module's
    ``get_extra_state()``) are stored the same way. Under data parallelism call it on one rank only,
    with the unwrapped model (``ddp.module`` / ``accelerator.unwrap_model(model)``).
    """
    safetensors_torch = _safetensors()
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot save a checkpoint to {path}: directory {path.parent} does not exist")
    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    model_state = model.state_dict()
    model_tensors = [key for key, value in model_state.items() if isinstance(value, torch.Tensor)]
    for key in model_tensors:
        tensors[f"model/{key}"] = _storable(model_state[key], f"model state {key!r}", seen)
    encoder = _Encoder(tensors, seen)
    model_extra = {k: v for k, v in model_state.items() if not isinstance(v, torch.Tensor)}
    structure = {
        "model": model_tensors,
        "model_extra": encoder.encode(model_extra, "model extra state"),
        "optimizer": None
        if optimizer is None
        else {
            "class": _optimizer_name(optimizer),
            "state": encoder.encode(optimizer.state_dict(), "optimizer.state_dict()"),
            "param_shapes": _param_shapes(optimizer),
        },
        "rng": encoder.encode(_rng_state(), "rng"),
        "extra": encoder.encode(extra, "extra"),
    }
    metadata = {"format": FORMAT, "version": str(VERSION), "structure": json.dumps(structure)}
    metadata["sha256"] = _digest(metadata, tensors)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        safetensors_torch.save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_directory(path.parent)


def load_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    restore_rng: bool = True,
) -> Any:
    """Restore a checkpoint of :func:`save_checkpoint` into ``model`` (and ``optimizer``) and the
    global RNGs; returns its ``extra``.

    All or nothing: a missing, unreadable, corrupted (checksum) or malformed file, a model whose
    state keys or shapes differ, an optimizer of another kind, grouping or parameter shapes, or an
    invalid RNG state raises with the problem named before anything is modified. If loading the
    optimizer or the model still fails (e.g. a module's ``set_extra_state`` raises), both are
    restored and the RNGs are left alone.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {path}; check the path (save_checkpoint writes a single file), or start "
            "from scratch"
        )
    metadata, tensors = _read(path)
    try:
        structure = json.loads(metadata["structure"])
        model_state = {key: tensors[f"model/{key}"] for key in structure["model"]}
        model_state.update(_decode(structure.get("model_extra") or {"__dict__": []}, tensors))
        saved_optimizer = structure["optimizer"]
        rng = _decode(structure["rng"], tensors)
        extra = _decode(structure["extra"], tensors)
        optimizer_state = None
        if optimizer is not None and saved_optimizer is not None:
            optimizer_state = _decode(saved_optimizer["state"], tensors)
            saved_class, saved_shapes = saved_optimizer["class"], saved_optimizer.get("param_shapes")
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise ValueError(
            f"checkpoint {path} has malformed metadata ({type(exc).__name__}: {exc}); it was not written "
            "by save_checkpoint or was edited afterwards"
        ) from None
    _check_model(path, model, model_state)
    if optimizer is not None:
        if saved_optimizer is None:
            raise ValueError(
                f"checkpoint {path} holds no optimizer state; pass optimizer=None to load the model only"
            )
        if saved_class != _optimizer_name(optimizer):
            raise ValueError(
                f"checkpoint {path} holds the state of {saved_class}, but the optimizer is "
                f"{_optimizer_name(optimizer)}; build the same optimizer as the saved run before loading"
            )
        _check_optimizer(path, optimizer, optimizer_state, saved_shapes)
    if restore_rng:
        _check_rng_state(path, rng)
    _load_or_restore(path, model, model_state, optimizer, optimizer_state)
    if restore_rng:
        _set_rng_state(rng)
    return extra


def _load_or_restore(
    path: Path,
    model: torch.nn.Module,
    model_state: dict[str, Any],
    optimizer: torch.optim.Optimizer | None,
    optimizer_state: dict[str, Any] | None,
) -> None:
    """Load both states; if either load raises, put both back as they were.

    The optimizer's previous state dict only references its tensors (loading replaces them rather than
    writing into them), so keeping it costs no memory. The model is loaded in place, so it is copied
    first, but only when it has modules with ``get_extra_state``: their ``set_extra_state`` is user
    code that the checks above cannot foresee. Otherwise the checked keys and shapes cannot fail.
    """
    previous_optimizer = optimizer.state_dict() if optimizer_state is not None else None
    extra_state = _extra_state_modules(model)
    previous_model = None
    if extra_state:
        previous_model = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
        previous_model.update({key: copy.deepcopy(m.get_extra_state()) for key, m in extra_state.items()})
    try:
        if optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
        model.load_state_dict(model_state)
    except Exception as exc:
        if previous_model is not None:
            _put_back(model, previous_model, extra_state)
        if previous_optimizer is not None:
            optimizer.load_state_dict(previous_optimizer)
        raise ValueError(
            f"checkpoint {path} could not be loaded ({type(exc).__name__}: {exc}); the model and the "
            "optimizer were left as they were"
        ) from exc


def _extra_state_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """State-dict key → module, for the modules that override ``get_extra_state``."""
    return {
        f"{name}.{_EXTRA_STATE}" if name else _EXTRA_STATE: module
        for name, module in model.named_modules()
        if type(module).get_extra_state is not torch.nn.Module.get_extra_state
    }


def _put_back(model: torch.nn.Module, previous: dict[str, Any], extra_state: dict[str, Any]) -> None:
    """Copy the saved tensors back in place and hand each module its own extra state again."""
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if isinstance(value, torch.Tensor):
                value.copy_(previous[key])
    for key, module in extra_state.items():
        with contextlib.suppress(Exception):  # it raised on the new state; its old one is what it holds
            module.set_extra_state(previous[key])


# ---------------------------------------------------------------------- encoding


class _Encoder:
    """JSON-encodes nested containers; tensors are moved into ``tensors`` and referenced by name."""

    def __init__(self, tensors: dict[str, torch.Tensor], seen: set[tuple[int, int]]) -> None:
        self.tensors = tensors
        self.seen = seen

    def encode(self, value: Any, where: str) -> Any:
        if value is None or isinstance(value, bool | int | float | str):
            return value
        if isinstance(value, torch.Tensor):
            name = f"t/{len(self.tensors)}"
            self.tensors[name] = _storable(value, where, self.seen)
            return {"__tensor__": name}
        if isinstance(value, tuple | list):
            items = [self.encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
            return {"__tuple__": items} if isinstance(value, tuple) else items
        if isinstance(value, dict):
            return {
                "__dict__": [
                    [self.encode(k, f"{where} key {k!r}"), self.encode(v, f"{where}[{k!r}]")]
                    for k, v in value.items()
                ]
            }
        raise TypeError(
            f"cannot checkpoint a {type(value).__name__} at {where}: only tensors, None, bool, int, "
            "float, str, lists, tuples and dicts are stored (convert it, e.g. with .item() or str())"
        )


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__tuple__" in value:
            return tuple(_decode(v, tensors) for v in value["__tuple__"])
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value["__dict__"]}
    return value


def _storable(t: torch.Tensor, where: str, seen: set[tuple[int, int]]) -> torch.Tensor:
    """A detached, contiguous CPU tensor owning its storage (safetensors refuses shared memory)."""
    if local_tensor(t) is not t:
        raise TypeError(
            f"{where} is a sharded DTensor; save sharded models with torch.distributed.checkpoint, or "
            "gather a full state dict first"
        )
    t = t.detach().to("cpu").contiguous()
    storage = t.untyped_storage()
    key = (storage.data_ptr(), storage.nbytes())
    if key in seen or storage.nbytes() != t.numel() * t.element_size():
        t = t.clone()
    seen.add((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
    return t


def _param_shapes(optimizer: torch.optim.Optimizer) -> list[list[list[int]]]:
    return [[list(p.shape) for p in group["params"]] for group in optimizer.param_groups]


def _digest(metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the metadata (but its own entry) and of every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    for key in sorted(k for k in metadata if k != "sha256"):
        h.update(f"{key}={metadata[key]}\0".encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\0".encode())
        h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _optimizer_name(optimizer: torch.optim.Optimizer) -> str:
    base = getattr(optimizer, "base_optimizer", None)
    name = type(optimizer).__name__
    return f"{name}({type(base).__name__})" if base is not None else name


# ---------------------------------------------------------------------- RNG


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": random.getstate(),
        "cuda": None,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _check_rng_state(path: Path, state: Any) -> None:
    """Apply the saved states to scratch generators, so a bad one fails before anything is loaded."""
    try:
        torch.Generator().set_state(state["torch"])
        name, keys, *rest = state["numpy"]
        np.random.RandomState().set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
        random.Random().setstate(state["python"])
        cuda = state["cuda"]
        if cuda is not None and not all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in cuda):
            raise TypeError("CUDA RNG states must be uint8 tensors")
    except Exception as exc:
        raise ValueError(
            f"checkpoint {path} holds an invalid RNG state ({type(exc).__name__}: {exc}); pass "
            "restore_rng=False to load the model and optimizer without it"
        ) from None


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    random.setstate(state["python"])
    cuda = state["cuda"]
    if cuda is not None:
        if torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
            torch.cuda.set_rng_state_all(cuda)
        else:
            warnings.warn(
                f"the checkpoint holds RNG states for {len(cuda)} CUDA devices but "
                f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} are visible; CUDA RNGs "
                "were not restored, so CUDA sampling will not repeat the saved run",
                stacklevel=3,
            )


# ---------------------------------------------------------------------- checks and I/O


def _check_model(path: Path, model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    current = model.state_dict()
    missing = sorted(set(current) - set(saved))
    unexpected = sorted(set(saved) - set(current))
    shapes = [
        f"{k}: saved {tuple(saved[k].shape)} vs model {tuple(current[k].shape)}"
        for k in current
        if k in saved and _shape(saved[k]) != _shape(current[k])
    ]
    if missing or unexpected or shapes:
        problems = []
        if missing:
            problems.append(f"missing from the checkpoint: {_few(missing)}")
        if unexpected:
            problems.append(f"not in the model: {_few(unexpected)}")
        if shapes:
            problems.append(f"shape mismatch: {_few(shapes)}")
        hint = ""
        if any(k.startswith("module.") for k in [*missing, *unexpected]):
            hint = (
                " Keys starting with 'module.' come from a DDP/accelerate wrapper: save and load the "
                "unwrapped model (model.module or accelerator.unwrap_model(model))."
            )
        raise ValueError(
            f"checkpoint {path} does not match the model ({'; '.join(problems)}). Build the same "
            f"architecture as the saved run before loading.{hint}"
        )


def _check_optimizer(path: Path, optimizer: torch.optim.Optimizer, saved: Any, saved_shapes: Any) -> None:
    """Same group sizes and, for version-2 files, the same shape for every parameter."""
    try:
        stored = [len(g["params"]) for g in saved["param_groups"]]
        if not isinstance(saved["state"], dict):
            raise TypeError("its state is not a dict")
        if saved_shapes is not None:  # version 1 recorded no shapes
            saved_shapes = [[tuple(int(n) for n in shape) for shape in group] for group in saved_shapes]
            if [len(group) for group in saved_shapes] != stored:
                raise ValueError("its parameter shapes do not match its param groups")
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(
            f"checkpoint {path} holds a malformed optimizer state ({type(exc).__name__}: {exc}); it was "
            "not written by save_checkpoint or was edited afterwards"
        ) from None
    current = [len(g["params"]) for g in optimizer.param_groups]
    if current != stored:
        raise ValueError(
            f"checkpoint {path} holds optimizer state for param groups of sizes {stored}, but the "
            f"optimizer has {current}; pass the same parameters, grouped the same way, as the saved run"
        )
    if saved_shapes is None:
        return
    differ = [
        f"group {g} parameter {i}: saved {a} vs optimizer {tuple(p.shape)}"
        for g, (saved_group, group) in enumerate(zip(saved_shapes, optimizer.param_groups, strict=True))
        for i, (a, p) in enumerate(zip(saved_group, group["params"], strict=True))
        if a != tuple(p.shape)
    ]
    if differ:
        raise ValueError(
            f"checkpoint {path} holds optimizer state for parameters of other shapes ({_few(differ)}); "
            "pass the same parameters, in the same order, as the saved run"
        )


def _shape(value: Any) -> tuple[int, ...] | str:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else "not a tensor"


def _few(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def _read(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    _safetensors()
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as fh:
            metadata = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except SafetensorError as exc:
        raise ValueError(
            f"{path} is not a readable safetensors file ({exc}); it may be truncated or not a checkpoint"
        ) from exc
    if metadata.get("format") != FORMAT:
        raise ValueError(
            f"{path} was not written by constrained_opt.save_checkpoint (no checkpoint metadata)"
        )
    try:
        version = int(metadata["version"])
    except (KeyError, ValueError):
        raise ValueError(f"{path} has malformed checkpoint metadata (no format version)") from None
    if version > VERSION:
        raise ValueError(
            f"{path} has checkpoint format version {version}, newer than this library's "
            f"{VERSION}; upgrade constrained_opt to load it"
        )
    if version == 1:
        warnings.warn(
            f"{path} is a version-1 checkpoint: it carries no checksum, so corruption cannot be detected, "
            "and no parameter shapes for the optimizer; save it again to upgrade it",
            stacklevel=3,
        )
    elif metadata.get("sha256") != _digest(metadata, tensors):
        raise ValueError(
            f"{path} fails its SHA-256 check: the file was modified or corrupted after it was saved; "
            "load an intact copy or an earlier checkpoint"
        )
    return metadata, tensors


def _fsync_directory(directory: Path) -> None:
    """Persist the rename itself (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _safetensors() -> Any:
    try:
        import safetensors.torch
    except ImportError as exc:
        raise ImportError(
            "checkpoints need the safetensors package: pip install safetensors "
            "(or constrained_opt[diffusion])"
        ) from exc
    return safetensors.torch
