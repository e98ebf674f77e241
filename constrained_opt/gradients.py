"""The gradient stage of a step: every row of the flat buffers, with the inner loops.

For each constraint i: ∇L_f,i(θ) into row i; then, when the inner loop runs, φ⁰ = θ and K plain
gradient steps φ^{k+1} = φ^k − ξ∇L_f,i(φ^k) (never through the base optimizer; the first reuses row i),
and L_f,i(φ^K) measured without a graph, so g_i(θ) = L_f,i(θ) − L_f,i(φ^K) with ∇g_i(θ) = ∇L_f,i(θ).
Last, ∇L_r(θ) into the retain row. Gradients at φ^k, k ≥ 1, live in autograd's own ``.grad`` tensors
and are freed after each descent.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ._flat import FlatLayout
from .amp import LossScaling
from .distributed import average_losses
from .errors import ClosureError
from .problem import Closure, StepState, checked_loss, parts, reaches
from .transaction import StepTransaction


def take_gradients(state: StepState, tx: StepTransaction, inner_steps: int, inner_lrs: list[float]) -> None:
    """Fill every row of ``state.layout`` and record the losses in ``state`` (``inner_lrs``: ξ per
    param group; the inner loops run when ``state.inner_ran``)."""
    task, layout, scaling = state.task, state.layout, state.scaling
    for row, (closure, label) in enumerate(zip(task.closures, task.labels, strict=True)):
        measured = [backward(layout, row, closure, label, 0, scaling, unscale=state.inner_ran)]
        if state.inner_ran:
            with tx.displaced(layout.retain_row):  # the retain row is free until the retain pass
                for k in range(1, inner_steps + 1):
                    source = row if k == 1 else None
                    with torch.no_grad():
                        for b in layout.buckets:
                            b.descend(source, inner_lrs)
                            if source is None:
                                b.detach_grads()  # free φ^{k-1}'s gradient before the next pass
                    if k < inner_steps:
                        measured.append(backward(layout, None, closure, label, k, scaling, unscale=True))
                with torch.no_grad():
                    measured.append(evaluate(closure, label, inner_steps))
        state.losses.append(measured)
    if task.retain is not None:
        state.retain_loss = backward(
            layout, layout.retain_row, task.retain, "retain_closure", None, scaling, unscale=False
        )


def backward(
    layout: FlatLayout,
    row: int | None,
    closure: Closure,
    name: str,
    k: int | None,
    scaling: LossScaling | None,
    unscale: bool,
) -> Tensor:
    """Zero ``row``, run the closure, differentiate it (times the loss scale) into ``row`` (for
    ``None``: into fresh ``.grad`` tensors); returns the detached loss. ``unscale``: divide the
    gradient by the scale now (the inner descent reads it) and record whether it overflowed."""
    where = "at θ" if not k else f"at inner step φ^{k}"
    for b in layout.buckets:
        b.attach(row)
    pieces = parts(closure)
    total = sum(differentiate(layout, piece, name, where, scaling, len(pieces)) for piece in pieces)
    if row is not None:
        for b in layout.buckets:
            b.adopt(row)
    if scaling is not None and unscale:
        overflow = scaling.unscale(layout, row)
        if k:
            scaling.inner_overflow.append(overflow)
    return total / len(pieces)


def differentiate(
    layout: FlatLayout, closure: Closure, name: str, where: str, scaling: LossScaling | None, n: int
) -> Tensor:
    """Run the closure and accumulate the gradient of its loss (times 1/n and the loss scale) into
    the attached gradients; returns the detached loss."""
    loss = checked_loss(closure(), name, where)
    if loss.grad_fn is None:
        raise ClosureError(
            f"{name} returned a tensor with no autograd graph {where} (requires_grad=False); compute "
            "the loss with gradients enabled and do not detach it or call .backward() in the closure"
        )
    # FSDP2 differentiates into its unsharded copies and reduce-scatters them from hooks, so the
    # sharded parameters are neither reachable in the graph nor usable as backward inputs.
    if not layout.sharded and not reaches(loss.grad_fn, layout.param_ids):
        raise ClosureError(
            f"{name}'s loss {where} does not depend on any parameter this optimizer trains; check that "
            "the closure uses the model whose parameters were passed to the optimizer"
        )
    target = loss if n == 1 else loss / n
    target = target if scaling is None else scaling.scaled(target)
    try:
        torch.autograd.backward(target, inputs=None if layout.sharded else layout.params)
    except RuntimeError as exc:
        if "backward through the graph a second time" not in str(exc):
            raise
        raise ClosureError(
            f"{name} called .backward() itself {where}: the optimizer differentiates the returned loss "
            "into its own buffers, so the closure must only compute and return the loss (remove the "
            "backward() and zero_grad() calls; see docs/api.md)"
        ) from exc
    return loss.detach()


def evaluate(closure: Closure, name: str, k: int) -> Tensor:
    """L(φ^k) without a graph (the caller holds ``torch.no_grad``)."""
    pieces = parts(closure)
    return sum(checked_loss(c(), name, f"at inner step φ^{k}").detach() for c in pieces) / len(pieces)


class LossValues(NamedTuple):
    """The measured losses as one device vector, averaged over data-parallel ranks, and what follows
    from them: ``losses`` in measuring order (constraint i: L(θ), L(φ^1..φ^K); retain last),
    ``overflow`` the inner-loop overflow flags (summed over ranks), ``at_theta`` the losses at θ,
    ``g`` the constraint values, ``grad_scale`` the loss scale, ``unscale`` each row's 1/scale factor."""

    losses: Tensor
    overflow: Tensor
    at_theta: Tensor
    g: Tensor
    grad_scale: Tensor
    unscale: Tensor


def loss_values(state: StepState, device: torch.device, acc: torch.dtype) -> LossValues:
    """The losses of ``state`` on ``device`` in the accumulation dtype ``acc``, reduced over ranks (one
    all-reduce), with g_i = L_f,i(θ) − L_f,i(φ^K) (0 when the inner loops did not run)."""
    task, scaling = state.task, state.scaling
    flat = [x for measured in state.losses for x in measured]
    if state.retain_loss is not None:
        flat.append(state.retain_loss)
    overflow = (
        torch.stack(scaling.inner_overflow).to(device=device, dtype=acc)
        if scaling is not None and scaling.inner_overflow
        else torch.zeros(0, dtype=acc, device=device)
    )
    losses, overflow = average_losses(torch.stack(flat).to(device=device, dtype=acc), overflow, state.group)
    starts = [0]
    for measured in state.losses:
        starts.append(starts[-1] + len(measured))
    first = starts[:-1] + ([len(flat) - 1] if task.constrained else [])
    at_theta = losses[torch.tensor(first, device=device)]
    if not (task.constrained and state.inner_ran):
        g = torch.zeros((), dtype=acc, device=device) if task.rows == 2 else at_theta.new_zeros(task.rows - 1)
    elif len(task.closures) == 1:
        g = losses[0] - losses[starts[1] - 1]
    else:
        last = torch.tensor([s - 1 for s in starts[1:]], device=device)
        g = at_theta[: len(state.losses)] - losses[last]
    if scaling is None:
        grad_scale = torch.ones((), dtype=acc, device=device)
        unscale = torch.ones(task.rows, dtype=acc, device=device)
    else:
        grad_scale = scaling.scale.to(device=device, dtype=acc)
        unscale = scaling.row_factors(task.rows, state.inner_ran).to(device=device, dtype=acc)
    return LossValues(losses, overflow, at_theta, g, grad_scale, unscale)
