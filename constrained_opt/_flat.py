"""Flat, fused gradient storage for the bilevel optimizer.

For each (device, dtype, sharding) the optimizer owns one contiguous ``(m + 1, n)`` tensor: rows
0..m-1 hold the constraint gradients ∇g_i = ∇L_f,i(θ), the last row holds ∇L_r (for two objectives:
row 0 = ∇g, row 1 = ∇L_r). Each parameter's ``.grad`` is set to a view into a row, so autograd
accumulates straight into the buffer: there is no gather copy, the Gram matrix is one pass over the
buffer, and δ is formed in place in the retain row.

The retain row is free until the retain pass, so during the inner loops it holds the θ snapshot: the
inner loop costs no memory beyond the m + 1 rows (two rows for one constraint and K = 1). Inner
gradients at φ^k, k ≥ 2, are left to autograd (fresh ``.grad`` tensors, freed after each descent),
like any training step's gradients. After the projection the constraint rows are free again; row 0
then holds θ's snapshot across the base optimizer's step, so a failing base step can be undone.

Sharded parameters (``DTensor``, e.g. from FSDP2's ``fully_shard``) are stored by their local shard:
the buffer holds this rank's n elements, ``.grad`` is a ``DTensor`` wrapping the view, and the Gram of
the bucket is a partial sum that the optimizer all-reduces over the mesh dimensions the parameter is
sharded on.

torch.optim has no such layout (its foreach paths take lists of separate tensors), and
torch.nn.utils.parameters_to_vector copies, so the layout is written here.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .errors import SettingError

CONSTRAINT_ROW = 0  # the first constraint row; θ's snapshot across the base step
RETAIN_ROW = 1  # the retain row of a two-row buffer (in general the last row)


def _dtensor_type() -> type | None:
    """``DTensor`` if torch.distributed.tensor has been imported (no DTensor can exist otherwise)."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def local_tensor(t: Tensor) -> Tensor:
    """This rank's data of ``t``: the local shard of a ``DTensor``, ``t`` itself otherwise."""
    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(t, dtensor):
        return t
    with torch.no_grad():
        return t.to_local()


def _sharding(p: Tensor) -> tuple[Any, tuple] | None:
    """``(device_mesh, placements)`` of a ``DTensor`` parameter, None for a plain tensor."""
    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(p, dtensor):
        return None
    placements = tuple(p.placements)
    if any(pl.is_partial() for pl in placements):
        raise TypeError(
            f"parameter with placements {placements} holds a partial sum; the flat gradient buffers "
            "need Shard or Replicate placements (redistribute the parameter first)"
        )
    return p.device_mesh, placements


def _dense_strides(t: Tensor) -> bool:
    """True when ``t`` covers exactly ``t.numel()`` consecutive elements in some dimension order."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride(), strict=True), key=lambda d: d[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def _view(storage: Tensor, like: Tensor, offset: int) -> Tensor:
    """A view of ``storage`` at ``offset`` with ``like``'s shape and, when dense, its strides,
    so gradients obey autograd's layout contract (channels_last stays channels_last)."""
    stride = like.stride() if _dense_strides(like) else torch.empty(like.shape, device="meta").stride()
    return storage.as_strided(like.shape, stride, storage.storage_offset() + offset)


@dataclass
class GroupSlice:
    """The parameters of one param group inside one bucket, with their index range [start, end).

    ``tensors`` are the parameters' local data (the parameters themselves unless sharded)."""

    group: int
    start: int
    end: int
    params: list[Tensor]
    tensors: list[Tensor]
    views: tuple[list[Tensor], ...]


@dataclass
class Bucket:
    """All trainable parameters of one (device, dtype, sharding), ordered by param group.

    ``views[row]`` are plain views into ``rows``; ``grads[row]`` are what ``p.grad`` is set to (the
    views themselves, or ``DTensor`` wrappers of them for sharded parameters). ``shard_groups`` are
    the process groups over which this bucket's partial Gram must be summed (empty unless sharded).
    """

    device: torch.device
    dtype: torch.dtype
    rows: Tensor
    params: list[Tensor]
    views: tuple[list[Tensor], ...]
    grads: tuple[list[Tensor], ...]
    groups: list[GroupSlice]
    shard_groups: list[Any]

    def attach(self, row: int | None) -> None:
        """Zero ``row`` and make every ``p.grad`` a view into it; ``None``: set every ``p.grad`` to
        None, so autograd allocates fresh gradients."""
        if row is None:
            self.detach_grads()
            return
        self.rows[row].zero_()
        for p, g in zip(self.params, self.grads[row], strict=True):
            p.grad = g

    def adopt(self, row: int) -> None:
        """After backward: if ``p.grad`` was replaced (a closure's zero_grad, or DDP's
        ``gradient_as_bucket_view``), copy it into the buffer and point ``p.grad`` back."""
        for p, g, v in zip(self.params, self.grads[row], self.views[row], strict=True):
            current = p.grad
            if current is not g:
                if current is not None:
                    v.copy_(local_tensor(current))
                p.grad = g

    def detach_grads(self) -> None:
        for p in self.params:
            p.grad = None

    def fresh_grads(self) -> list[Tensor]:
        """The local data of the gradients autograd allocated (parameters it did not reach have none)."""
        return [local_tensor(p.grad) for p in self.params if p.grad is not None]

    @property
    def retain_row(self) -> int:
        return self.rows.shape[0] - 1

    def save_theta(self, row: int) -> None:
        """Copy θ into ``row``."""
        for gs in self.groups:
            torch._foreach_copy_(gs.views[row], gs.tensors)

    def restore_theta(self, row: int) -> None:
        for gs in self.groups:
            torch._foreach_copy_(gs.tensors, gs.views[row])

    def descend(self, row: int | None, inner_lrs: list[float]) -> None:
        """φ ← φ − ξ_group · grad for each param group (plain gradient descent, no optimizer state),
        with the gradient in ``row`` or, for ``None``, in autograd's fresh ``.grad`` tensors."""
        for gs in self.groups:
            lr = inner_lrs[gs.group]
            if lr == 0.0:
                continue
            if row is not None:
                torch._foreach_add_(gs.tensors, gs.views[row], alpha=-lr)
                continue
            pairs = [
                (t, local_tensor(p.grad))
                for p, t in zip(gs.params, gs.tensors, strict=True)
                if p.grad is not None
            ]
            if pairs:
                torch._foreach_add_([t for t, _ in pairs], [g for _, g in pairs], alpha=-lr)


def _offsets(tensors: list[Tensor], start: int) -> list[int]:
    out, off = [], start
    for t in tensors:
        out.append(off)
        off += t.numel()
    return out


class FlatLayout:
    """Buckets for the trainable parameters of a list of param groups."""

    def __init__(self, param_groups: list[dict], rows: int = 2) -> None:
        by_key: dict[tuple, list[tuple[int, Tensor]]] = {}
        seen: set[int] = set()
        for gi, group in enumerate(param_groups):
            for p in group["params"]:
                if id(p) in seen:
                    raise SettingError(
                        f"a parameter of shape {tuple(p.shape)} appears twice in the param groups "
                        f"(group {gi}); its gradient would be counted twice in every inner product: pass "
                        "each parameter once"
                    )
                seen.add(id(p))
                if p.requires_grad:
                    if not p.is_floating_point():
                        raise TypeError(f"parameter of dtype {p.dtype} cannot be optimized; freeze it")
                    if p.is_sparse:
                        raise TypeError("sparse parameters are not supported by the flat gradient buffers")
                    by_key.setdefault((p.device, p.dtype, _sharding(p)), []).append((gi, p))
        if not by_key:
            raise SettingError("no trainable parameters: every parameter has requires_grad=False")
        self.buckets = [self._bucket(*key, entries, rows) for key, entries in by_key.items()]
        self.params = [p for b in self.buckets for p in b.params]
        self.param_ids = frozenset(id(p) for p in self.params)
        self.sharded = any(key[2] is not None for key in by_key)
        self.numel = sum(b.rows.shape[1] for b in self.buckets)
        self.rows = rows
        self.retain_row = rows - 1
        self.groups = len(param_groups)

    @staticmethod
    def _bucket(
        device: torch.device,
        dtype: torch.dtype,
        sharding: tuple | None,
        entries: list[tuple[int, Tensor]],
        k: int,
    ) -> Bucket:
        params = [p for _, p in entries]
        tensors = [local_tensor(p) for p in params]
        n = sum(t.numel() for t in tensors)
        rows = torch.zeros(k, n, dtype=dtype, device=tensors[0].device)
        offsets = _offsets(tensors, 0)
        views = tuple(
            [_view(rows[r], t, off) for t, off in zip(tensors, offsets, strict=True)] for r in range(k)
        )
        grads, shard_groups = views, []
        if sharding is not None:
            mesh, placements = sharding
            dtensor = _dtensor_type()
            grads = tuple(
                [
                    dtensor.from_local(v, mesh, placements, shape=p.shape, stride=p.stride())
                    for p, v in zip(params, views[r], strict=True)
                ]
                for r in range(k)
            )
            shard_groups = [mesh.get_group(d) for d, pl in enumerate(placements) if pl.is_shard()]
        groups: list[GroupSlice] = []
        i = 0
        while i < len(entries):
            gi, j = entries[i][0], i
            while j < len(entries) and entries[j][0] == gi:
                j += 1
            end = offsets[j] if j < len(entries) else n
            groups.append(
                GroupSlice(gi, offsets[i], end, params[i:j], tensors[i:j], tuple(v[i:j] for v in views))
            )
            i = j
        return Bucket(device, dtype, rows, params, views, grads, groups, shard_groups)

    @staticmethod
    def key(param_groups: list[dict], rows: int = 2) -> tuple:
        """Identity of the trainable set and the row count: rebuild the layout when a parameter is
        added, frozen, unfrozen, or moved to another device or dtype (new storage), or when a step has
        another number of objectives."""
        return (
            rows,
            *(
                (id(p), p.requires_grad, local_tensor(p).data_ptr())
                for group in param_groups
                for p in group["params"]
            ),
        )
