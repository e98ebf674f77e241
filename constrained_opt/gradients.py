"""The gradient stage of a step: every row of the flat buffers, with the inner loops.

For each constraint i: ∇L_f,i(θ) into row i; then, when the inner loop runs, φ⁰ = θ and K plain
gradient steps φ^{k+1} = φ^k − ξ∇L_f,i(φ^k) (never through the base optimizer; the first reuses row i),
and L_f,i(φ^K) measured without a graph, so g_i(θ) = L_f,i(θ) − L_f,i(φ^K) with ∇g_i(θ) = ∇L_f,i(θ).
Last, ∇L_r(θ) into the retain row. Gradients at φ^k, k ≥ 1, live in autograd's own ``.grad`` tensors
and are freed after each descent.

A robust constraint (:mod:`.robust`) first moves to its adversary's point θ′ (or x*), with the attacker's
gradients in row i as scratch; its row, its loss and its inner loop (φ⁰ = θ′) are then taken there,
and θ (or x) is put back before the next constraint.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor

from . import functional as F
from ._flat import FlatLayout
from .amp import LossScaling
from .distributed import average_losses, average_tensor, sum_over_shards
from .errors import ClosureError
from .problem import Closure, StepState, checked_loss, parts, reaches
from .robust import Inversion, Relearn, Robust, Sharpness
from .transaction import StepTransaction


def take_gradients(state: StepState, tx: StepTransaction, inner_steps: int, inner_lrs: list[float]) -> None:
    """Fill every row of ``state.layout`` and record the losses in ``state`` (``inner_lrs``: ξ per
    param group; the inner loops run when ``state.inner_ran``). A robust constraint's row, loss and inner
    loop are taken at its adversary's point (:func:`adversary_point`)."""
    task, layout, scaling = state.task, state.layout, state.scaling
    for row, (closure, label) in enumerate(zip(task.closures, task.labels, strict=True)):
        robust = closure if isinstance(closure, Robust) else None
        objective = closure if robust is None else robust.closure
        moves = state.inner_ran or (robust is not None and robust.moves_weights)
        # the retain row is free until the retain pass: it holds θ's copy while θ is displaced
        with (
            tx.displaced(layout.retain_row) if moves else contextlib.nullcontext(),
            adversary_point(state, tx, row, robust, label),
        ):
            measured = [backward(layout, row, objective, label, where(0, robust), scaling, state.inner_ran)]
            if state.inner_ran:
                for k in range(1, inner_steps + 1):
                    source = row if k == 1 else None
                    with torch.no_grad():
                        for b in layout.buckets:
                            b.descend(source, inner_lrs)
                            if source is None:
                                b.detach_grads()  # free φ^{k-1}'s gradient before the next pass
                    if k < inner_steps:
                        flags = scaling.inner_overflow if scaling is not None else None
                        measured.append(
                            backward(layout, None, objective, label, where(k, robust), scaling, True, flags)
                        )
                with torch.no_grad():
                    measured.append(evaluate(objective, label, where(inner_steps, robust)))
        state.losses.append(measured)
    if task.retain is not None:
        state.retain_loss = backward(
            layout, layout.retain_row, task.retain, "retain_closure", "at θ", scaling, unscale=False
        )


@contextlib.contextmanager
def adversary_point(
    state: StepState, tx: StepTransaction, row: int, robust: Robust | None, label: str
) -> Iterator[None]:
    """Inside the block the closures see the adversary's point of ``robust`` (θ′, or the input x*;
    nothing moves for a plain constraint); the attacker's losses go to ``state.attack_losses``. The
    attacker's gradients use ``row`` as scratch, before the block writes the constraint's gradient
    there. A displaced input is put back when the block ends; θ is put back by the caller's
    ``tx.displaced``. For ``Relearn(second_order=True)`` the row is carried back through the attacker's
    steps when the block ends."""
    losses: list[Tensor] = []
    state.attack_losses.append(losses)
    if robust is None:
        yield
        return
    name = f"the attack of {label}"
    if isinstance(robust, Inversion):
        with tx.input_displaced(robust.input, robust.saved_input()):
            invert(state, row, robust, name, losses)
            yield
        return
    if isinstance(robust, Relearn):
        relearn(state, row, robust, name, losses)
    else:
        sharpen(state, row, robust, name, losses)
    yield
    if isinstance(robust, Relearn) and robust.second_order:
        through_the_steps(state, tx, row, robust, name)


def _flags(state: StepState) -> list[Tensor] | None:
    return state.scaling.attack_overflow if state.scaling is not None else None


def relearn(state: StepState, row: int, robust: Relearn, name: str, losses: list[Tensor]) -> None:
    """θ ← θ − β·s·∇L_a(θ), ``robust.steps`` times, each gradient in ``row``; s = min(1, c/‖∇L_a‖) with
    ``max_norm`` c, else 1; with ``sign``, θ ← θ − β·sign(∇L_a(θ)) (elementwise, so shards need no
    reduction)."""
    layout = state.layout
    lrs = [robust.lr] * layout.groups
    for j in range(robust.steps):
        at = f"at relearning step θ_{j}"
        losses.append(backward(layout, row, robust.attack, name, at, state.scaling, True, _flags(state)))
        with torch.no_grad():
            if robust.max_norm is not None:
                scale_row(layout, row, F.norm_clip_scale(row_sq_norm(layout, row), robust.max_norm))
            for b in layout.buckets:
                if robust.sign:
                    b.rows[row].sign_()
                b.descend(row, lrs)


def sharpen(state: StepState, row: int, robust: Sharpness, name: str, losses: list[Tensor]) -> None:
    """θ ← θ + ρ·g/‖g‖, g = ∇L_a(θ) in ``row``."""
    layout = state.layout
    losses.append(backward(layout, row, robust.attacker, name, "at θ", state.scaling, True, _flags(state)))
    with torch.no_grad():
        scale_row(layout, row, F.sharpness_scale(row_sq_norm(layout, row), robust.rho))
        for b in layout.buckets:
            b.descend(row, [-1.0] * layout.groups)


def row_sq_norm(layout: FlatLayout, row: int) -> Tensor:
    """‖row‖² over every trained parameter, in fp64 (the shards of sharded buckets summed)."""
    sq = [[F.gram_rows(b.rows[row : row + 1], torch.float64)] for b in layout.buckets]
    if layout.sharded:
        sum_over_shards(sq, [[b.shard_groups] for b in layout.buckets])
    device = layout.buckets[0].rows.device
    return sum(s.reshape(()).to(device) for (s,) in sq)


def scale_row(layout: FlatLayout, row: int, scale: Tensor) -> None:
    """row ← scale·row in every bucket."""
    for b in layout.buckets:
        b.rows[row].mul_(scale.to(device=b.rows.device, dtype=b.dtype))


def invert(state: StepState, row: int, robust: Inversion, name: str, losses: list[Tensor]) -> None:
    """x ← Π_ε(x + α·u(∇_x L_a)), ``robust.steps`` times (x_0 is in ``robust.saved_input()``)."""
    x, center, scaling = robust.input, robust.saved_input(), state.scaling
    for j in range(robust.steps):
        loss, grad = input_gradient(state, row, robust.attacker, x, name, f"at input step x_{j}")
        if scaling is not None:
            flags = _flags(state)
            assert flags is not None
            flags.append((~torch.isfinite(grad).all()).float().to(scaling.scale.device))
            grad = grad * scaling.inv.to(grad.device)
        with torch.no_grad():
            moved = x + robust.lr * F.steepest_ascent(grad, robust.norm)
            x.copy_(F.ball_projection(moved, center, robust.eps, robust.norm))
        losses.append(loss)


def input_gradient(
    state: StepState, row: int, closure: Closure, x: Tensor, name: str, where: str
) -> tuple[Tensor, Tensor]:
    """(the loss, its gradient in x, times the loss scale), averaged over data-parallel ranks.

    One process: ``torch.autograd.grad`` into x alone. Data parallel: a backward into the parameters
    too (``row`` as scratch), since DDP's reducer expects every forward's backward to reach them."""
    layout, scaling = state.layout, state.scaling
    pieces = parts(closure)
    total, grad = None, torch.zeros_like(x)
    for piece in pieces:
        x.requires_grad_(True)
        loss = checked_loss(piece(), name, where)
        target = loss / len(pieces)
        target = target if scaling is None else scaling.scaled(target)
        if state.group is None:
            (g,) = torch.autograd.grad(target, [x], allow_unused=True) if target.requires_grad else (None,)
        else:
            for b in layout.buckets:
                b.attach(row)
            x.grad = None
            if target.requires_grad:
                torch.autograd.backward(target, inputs=None if layout.sharded else [*layout.params, x])
            g, x.grad = x.grad, None
            for b in layout.buckets:
                b.detach_grads()
        x.requires_grad_(False)
        if g is None:
            raise ClosureError(
                f"{name}'s loss {where} does not depend on the Inversion's input; the closures must read "
                "the tensor passed as input= (the optimizer changes it in place)"
            )
        grad += g
        total = loss.detach() if total is None else total + loss.detach()
    assert total is not None
    if state.group is not None:
        average_tensor(grad, state.group)
    return total / len(pieces), grad


def through_the_steps(state: StepState, tx: StepTransaction, row: int, robust: Relearn, name: str) -> None:
    """v ← (I − βH_a(θ_0))⋯(I − βH_a(θ_{k−1}))·v for v = ``row`` = ∇L_c(θ_k): the exact gradient of
    θ ↦ L_c(θ_k(θ)). Each θ_j is replayed from θ; H_a(θ_j)v by double backward."""
    layout = state.layout
    lrs = [robust.lr] * layout.groups
    views = [v for b in layout.buckets for v in b.views[row]]
    for j in reversed(range(robust.steps)):
        tx.reset_theta()
        for i in range(j):
            backward(layout, None, robust.attack, name, f"at relearning step θ_{i}", None, False)
            with torch.no_grad():
                for b in layout.buckets:
                    b.descend(None, lrs)
                    b.detach_grads()
        hv = hessian_vector_product(layout, robust.attack, views, name, f"at relearning step θ_{j}")
        with torch.no_grad():
            torch._foreach_add_(views, hv, alpha=-robust.lr)


def hessian_vector_product(
    layout: FlatLayout, closure: Closure, v: list[Tensor], name: str, where: str
) -> list[Tensor]:
    """H·v for the Hessian H of the closure's loss in the trained parameters (double backward)."""
    out = [torch.zeros_like(t) for t in v]
    pieces = parts(closure)
    for piece in pieces:
        loss = checked_loss(piece(), name, where) / len(pieces)
        grads = torch.autograd.grad(loss, layout.params, create_graph=True, allow_unused=True)
        used = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        if not used:
            continue  # the loss is linear in the parameters: H = 0
        dot = sum((grads[i] * v[i]).sum() for i in used)
        hv = torch.autograd.grad(dot, [layout.params[i] for i in used], allow_unused=True)
        for i, h in zip(used, hv, strict=True):
            if h is not None:
                out[i].add_(h)
    return out


def where(k: int, robust: Robust | None) -> str:
    """Where a loss is measured, for error messages: θ (or the adversary's point), or φ^k."""
    if k:
        return f"at inner step φ^{k}"
    return "at θ" if robust is None else "at the adversary's point"


def backward(
    layout: FlatLayout,
    row: int | None,
    closure: Closure,
    name: str,
    where: str,
    scaling: LossScaling | None,
    unscale: bool,
    flags: list[Tensor] | None = None,
) -> Tensor:
    """Zero ``row``, run the closure, differentiate it (times the loss scale) into ``row`` (for
    ``None``: into fresh ``.grad`` tensors); returns the detached loss. ``unscale``: divide the
    gradient by the scale now (a descent reads it) and append whether it overflowed to ``flags``."""
    for b in layout.buckets:
        b.attach(row)
    pieces = parts(closure)
    total = sum(differentiate(layout, piece, name, where, scaling, len(pieces)) for piece in pieces)
    if row is not None:
        for b in layout.buckets:
            b.adopt(row)
    if scaling is not None and unscale:
        overflow = scaling.unscale(layout, row)
        if flags is not None:
            flags.append(overflow)
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


def evaluate(closure: Closure, name: str, where: str) -> Tensor:
    """The loss without a graph (the caller holds ``torch.no_grad``)."""
    pieces = parts(closure)
    return sum(checked_loss(c(), name, where).detach() for c in pieces) / len(pieces)


class LossValues(NamedTuple):
    """The measured losses as one device vector, averaged over data-parallel ranks, and what follows
    from them: ``losses`` in measuring order (constraint i: L(θ), L(φ^1..φ^K); retain last; a robust
    constraint's "θ" is its adversary's point), ``overflow`` the overflow flags of the inner loops, then
    of the attackers (summed over ranks), ``at_theta`` the losses at θ, ``g`` the constraint values,
    ``grad_scale`` the loss scale, ``unscale`` each row's 1/scale factor, ``attack`` the attackers'
    losses in measuring order."""

    losses: Tensor
    overflow: Tensor
    at_theta: Tensor
    g: Tensor
    grad_scale: Tensor
    unscale: Tensor
    attack: Tensor


def loss_values(state: StepState, device: torch.device, acc: torch.dtype) -> LossValues:
    """The losses of ``state`` on ``device`` in the accumulation dtype ``acc``, reduced over ranks (one
    all-reduce), with g_i = L_f,i(θ) − L_f,i(φ^K) (0 when the inner loops did not run)."""
    task, scaling = state.task, state.scaling
    flat = [x for measured in state.losses for x in measured]
    if state.retain_loss is not None:
        flat.append(state.retain_loss)
    attack = [x for measured in state.attack_losses for x in measured]
    flags = [] if scaling is None else [*scaling.inner_overflow, *scaling.attack_overflow]
    overflow = (
        torch.stack(flags).to(device=device, dtype=acc) if flags else torch.zeros(0, dtype=acc, device=device)
    )
    every, overflow = average_losses(
        torch.stack(flat + attack).to(device=device, dtype=acc), overflow, state.group
    )
    losses, attack_losses = every[: len(flat)], every[len(flat) :]
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
    return LossValues(losses, overflow, at_theta, g, grad_scale, unscale, attack_losses)
