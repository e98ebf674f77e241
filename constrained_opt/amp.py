"""Mixed precision and accelerate: which GradScaler a step scales its losses with, and its bookkeeping.

``torch.amp.GradScaler.step(opt, *args)`` lets an optimizer that sets ``_step_supports_amp_scaling``
scale by itself: it calls ``opt.step(*args)`` directly and leaves ``update()`` to its own caller. It
passes itself as ``grad_scaler=`` when ``step``'s signature has that keyword. accelerate's
``AcceleratedOptimizer`` (mixed_precision="fp16") calls ``scaler.step(opt, closure)`` then
``scaler.update()``, but first replaces ``opt.step`` with a ``(*args, **kwargs)`` wrapper, so the
scaler takes its other path: it sets ``opt.grad_scale``/``opt.found_inf`` for the duration of the call
and passes nothing. A closure optimizer computes its gradients inside ``step``, so neither the scaler's
pre-step inf check nor ``found_inf`` means anything here: the step scales its own losses with the
scaler's scale and records its own overflow for the caller's ``update()``.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor
from torch.amp.grad_scaler import OptState

from ._flat import FlatLayout
from .errors import SettingError


def prime(grad_scaler: torch.amp.GradScaler | None) -> None:
    """Create the scale now: ``GradScaler.step`` (accelerate's fp16 path) checks that it exists before
    calling the optimizer's step, which is where it would otherwise be created lazily."""
    if grad_scaler is not None and grad_scaler.is_enabled():
        grad_scaler.scale(torch.zeros((), device=grad_scaler._device))


def scaler_of_this_step(
    optimizer: torch.optim.Optimizer,
    own: torch.amp.GradScaler | None,
    passed: torch.amp.GradScaler | None,
) -> tuple[torch.amp.GradScaler | None, bool]:
    """(the GradScaler to scale this step's losses with, whether ``GradScaler.step`` is the caller,
    which then updates the scale itself). ``own``: the optimizer's; ``passed``: the step's argument."""
    check_no_accelerate_accumulation()
    if passed is not None:
        if own is not None and passed is not own:
            raise SettingError(
                "step was given a grad_scaler other than the one this optimizer was built with; use one "
                "GradScaler (with accelerate: grad_scaler=accelerator.scaler)"
            )
        return passed, True
    if "grad_scale" in optimizer.__dict__:  # set by GradScaler.step for this call (accelerate's path)
        if own is None:
            raise SettingError(
                "this step is called by GradScaler.step (accelerate with mixed_precision='fp16'), which "
                "does not hand over the scaler: build the optimizer with grad_scaler=accelerator.scaler "
                "so it can scale its losses and report overflows to that scaler"
            )
        return own, True
    return own, False


def check_no_accelerate_accumulation() -> None:
    """Refuse accelerate's gradient accumulation, which would drop closures silently: under
    ``accelerator.accumulate`` its ``AcceleratedOptimizer`` skips ``step`` on all but every N-th call, and a
    skipped call's closures are never run. (Reads accelerate's state only if accelerate is imported.)"""
    state = sys.modules.get("accelerate.state")
    shared = getattr(getattr(state, "GradientState", None), "_shared_state", None) or {}
    steps = (shared.get("plugin_kwargs") or {}).get("num_steps", 1)
    if steps > 1:
        raise SettingError(
            f"accelerate's gradient_accumulation_steps is {steps}: its AcceleratedOptimizer would skip "
            f"this optimizer's step on {steps - 1} of every {steps} calls and drop their closures. Build the "
            "Accelerator with gradient_accumulation_steps=1 and accumulate inside the step instead: pass "
            "each closure as MicroBatches([micro-batch closures])"
        )


class LossScaling:
    """GradScaler bookkeeping for one step.

    Each loss is multiplied by the scale s before backward. Rows that the inner descent reads are
    unscaled in place right after their backward, with the inf/NaN check fused into the same pass.
    The rows at θ stay scaled: 1/s is folded into the Gram (1/s² per product) and into δ's
    coefficients, and a non-finite entry shows up as a non-finite Gram entry, for free.
    """

    def __init__(self, scaler: torch.amp.GradScaler, device: torch.device) -> None:
        self.scaler = scaler
        self.scale = scaler.scale(torch.ones((), dtype=torch.float32, device=device))
        self.inv = self.scale.double().reciprocal().float()
        self.inner_overflow: list[Tensor] = []
        self.attack_overflow: list[Tensor] = []  # one flag per gradient of an adversary's attacker

    @classmethod
    def of(cls, scaler: torch.amp.GradScaler | None, layout: FlatLayout) -> LossScaling | None:
        """The step's loss scaling, or None without an enabled scaler."""
        if scaler is None or not scaler.is_enabled():
            return None
        return cls(scaler, layout.buckets[0].rows.device)

    def scaled(self, loss: Tensor) -> Tensor:
        return loss * self.scale.to(loss.device)

    def unscale(self, layout: FlatLayout, row: int | None) -> Tensor:
        """Divide ``row`` (``None``: the fresh ``.grad`` tensors) by s in place; returns 1.0 if it
        held an inf/NaN, else 0.0."""
        found = torch.zeros((), dtype=torch.float32, device=self.scale.device)
        for b in layout.buckets:
            grads = [b.rows[row]] if row is not None else b.fresh_grads()
            if not grads:
                continue
            local = torch.zeros((), dtype=torch.float32, device=b.rows.device)
            torch._amp_foreach_non_finite_check_and_unscale_(grads, local, self.inv.to(b.rows.device))
            found = found + local.to(found.device)
        return found

    def row_factors(self, rows: int, constraint_unscaled: bool) -> Tensor:
        """[u_f, ..., u_f, u_r]: the factor that turns each row back into a gradient."""
        one = torch.ones_like(self.inv)
        return torch.stack([*([one if constraint_unscaled else self.inv] * (rows - 1)), self.inv])

    def update(self, optimizer: torch.optim.Optimizer, skipped: bool, caller_updates: bool = False) -> None:
        """Record this step's overflow with the scaler and update its scale (back off on a skip);
        ``caller_updates``: only record it, ``GradScaler.step`` is calling and its caller updates."""
        found = torch.full((), float(skipped), dtype=torch.float32, device=self.scale.device)
        # GradScaler.update() reads the per-optimizer overflow records that its own unscale_/step
        # write; this optimizer unscales itself, so it writes its record the same way.
        state = self.scaler._per_optimizer_states[id(optimizer)]
        state["found_inf_per_device"] = {found.device: found}
        if caller_updates:
            return
        state["stage"] = OptState.STEPPED
        self.scaler.update()
