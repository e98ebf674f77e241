"""Distributed reductions of a step: the loss values averaged over data-parallel ranks (each rank
measures its own losses, hence its own g and a_t; DDP/FSDP average the gradients already), and the
partial Gram matrices of sharded parameters summed over their shard groups.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ._flat import FlatLayout
from .errors import SettingError


def reduction_group(process_group: Any, layout: FlatLayout) -> Any:
    """The process group over which loss values are averaged (None: no reduction)."""
    if process_group is None:
        if layout.sharded:
            raise SettingError(
                "the parameters are sharded DTensors (FSDP2 / tensor parallel), so loss values and "
                "overflow checks must be reduced across ranks; leave process_group='auto' or pass "
                "the data-parallel process group"
            )
        return None
    if not (dist.is_available() and dist.is_initialized()):
        if isinstance(process_group, str):
            return None
        raise RuntimeError(
            "a process_group was given but torch.distributed is not initialized; call "
            "torch.distributed.init_process_group first, or pass process_group=None"
        )
    group = dist.group.WORLD if isinstance(process_group, str) else process_group
    return group if dist.get_world_size(group) > 1 else None


def average_losses(losses: Tensor, overflow: Tensor, group: Any) -> tuple[Tensor, Tensor]:
    """(losses averaged over ``group``, overflow flags summed over it), with one all-reduce."""
    if group is None:
        return losses, overflow
    n = losses.numel()
    packed = torch.cat([losses, overflow])
    dist.all_reduce(packed, group=group)
    return packed[:n] / dist.get_world_size(group), packed[n:]


def average_tensor(t: Tensor, group: Any) -> None:
    """Average ``t`` over ``group`` in place (an adversary's input gradient, shared by the ranks)."""
    dist.all_reduce(t, group=group)
    t.div_(dist.get_world_size(group))


def sum_over_shards(grams: list[list[Tensor]], shard_groups: list[list[list[Any]]]) -> None:
    """All-reduce (sum) the partial Gram matrices of sharded buckets in place of ``grams``,
    with one collective per distinct set of shard groups."""
    by_groups: dict[tuple[int, ...], tuple[list[Any], list[tuple[int, int]]]] = {}
    for i, row in enumerate(shard_groups):
        for j, groups in enumerate(row):
            if groups:
                by_groups.setdefault(tuple(id(g) for g in groups), (groups, []))[1].append((i, j))
    for groups, where in by_groups.values():
        stacked = torch.stack([grams[i][j] for i, j in where])
        for pg in groups:
            dist.all_reduce(stacked, group=pg)
        for (i, j), m in zip(where, stacked, strict=True):
            grams[i][j] = m
