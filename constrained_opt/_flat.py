"""Flat, fused gradient storage for the bilevel optimizer.

For each (device, dtype) the optimizer owns one contiguous ``(2, n)`` tensor: row 0 holds ∇g = ∇L_f(θ),
row 1 holds ∇L_r (and, before that, serves as scratch for the inner steps k ≥ 1). Each parameter's
``.grad`` is set to a view into a row, so autograd accumulates straight into the buffer: there is no
gather copy, the Gram matrix is one GEMM per buffer, and δ is one in-place axpy. The θ snapshot for
the inner loop is one more flat tensor of n elements.

torch.optim has no such layout (its foreach paths take lists of separate tensors), and
torch.nn.utils.parameters_to_vector copies, so the layout is written here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

CONSTRAINT_ROW = 0
RETAIN_ROW = 1


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
    """The parameters of one param group inside one bucket, with their index range [start, end)."""

    group: int
    start: int
    end: int
    params: list[Tensor]
    views: tuple[list[Tensor], list[Tensor]]
    snapshot_views: list[Tensor] = field(default_factory=list)


@dataclass
class Bucket:
    """All trainable parameters of one (device, dtype), ordered by param group."""

    device: torch.device
    dtype: torch.dtype
    rows: Tensor
    params: list[Tensor]
    views: tuple[list[Tensor], list[Tensor]]
    groups: list[GroupSlice]
    snapshot: Tensor | None = None

    def attach(self, row: int) -> None:
        """Zero ``row`` and make every ``p.grad`` a view into it."""
        self.rows[row].zero_()
        for p, v in zip(self.params, self.views[row], strict=True):
            p.grad = v

    def adopt(self, row: int) -> None:
        """After backward: if a closure replaced ``p.grad`` (e.g. with zero_grad), fold it back in."""
        for p, v in zip(self.params, self.views[row], strict=True):
            g = p.grad
            if g is not v:
                if g is not None:
                    v.copy_(g)
                p.grad = v

    def detach_grads(self) -> None:
        for p in self.params:
            p.grad = None

    def save_theta(self) -> None:
        if self.snapshot is None:
            self.snapshot = torch.empty(self.rows.shape[1], dtype=self.dtype, device=self.device)
            for gs in self.groups:
                gs.snapshot_views = [
                    _view(self.snapshot, p, off)
                    for p, off in zip(gs.params, _offsets(gs.params, gs.start), strict=True)
                ]
        for gs in self.groups:
            torch._foreach_copy_(gs.snapshot_views, gs.params)

    def restore_theta(self) -> None:
        for gs in self.groups:
            torch._foreach_copy_(gs.params, gs.snapshot_views)

    def descend(self, row: int, inner_lrs: list[float]) -> None:
        """φ ← φ − ξ_group · grad for each param group (plain gradient descent, no optimizer state)."""
        for gs in self.groups:
            lr = inner_lrs[gs.group]
            if lr != 0.0:
                torch._foreach_add_(gs.params, gs.views[row], alpha=-lr)


def _offsets(params: list[Tensor], start: int) -> list[int]:
    out, off = [], start
    for p in params:
        out.append(off)
        off += p.numel()
    return out


class FlatLayout:
    """Buckets for the trainable parameters of a list of param groups."""

    def __init__(self, param_groups: list[dict]) -> None:
        by_key: dict[tuple[torch.device, torch.dtype], list[tuple[int, Tensor]]] = {}
        for gi, group in enumerate(param_groups):
            for p in group["params"]:
                if p.requires_grad:
                    if not p.is_floating_point():
                        raise TypeError(f"parameter of dtype {p.dtype} cannot be optimized; freeze it")
                    if p.is_sparse:
                        raise TypeError("sparse parameters are not supported by the flat gradient buffers")
                    by_key.setdefault((p.device, p.dtype), []).append((gi, p))
        if not by_key:
            raise ValueError("no trainable parameters: every parameter has requires_grad=False")
        self.buckets = [self._bucket(dev, dt, entries) for (dev, dt), entries in by_key.items()]
        self.params = [p for b in self.buckets for p in b.params]
        self.param_ids = frozenset(id(p) for p in self.params)
        self.numel = sum(b.rows.shape[1] for b in self.buckets)

    @staticmethod
    def _bucket(device: torch.device, dtype: torch.dtype, entries: list[tuple[int, Tensor]]) -> Bucket:
        n = sum(p.numel() for _, p in entries)
        rows = torch.zeros(2, n, dtype=dtype, device=device)
        params = [p for _, p in entries]
        offsets = _offsets(params, 0)
        views = tuple(
            [_view(rows[r], p, off) for p, off in zip(params, offsets, strict=True)] for r in (0, 1)
        )
        groups: list[GroupSlice] = []
        i = 0
        while i < len(entries):
            gi, j = entries[i][0], i
            while j < len(entries) and entries[j][0] == gi:
                j += 1
            end = offsets[j] if j < len(entries) else n
            groups.append(GroupSlice(gi, offsets[i], end, params[i:j], (views[0][i:j], views[1][i:j])))
            i = j
        return Bucket(device, dtype, rows, params, views, groups)

    @staticmethod
    def key(param_groups: list[dict]) -> tuple:
        """Identity of the trainable set: rebuild the layout when a parameter is added, frozen,
        unfrozen, or moved to another device or dtype (new storage)."""
        return tuple(
            (id(p), p.requires_grad, p.data_ptr()) for group in param_groups for p in group["params"]
        )
