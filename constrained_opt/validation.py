"""Validation: settings when the optimizer is built, hyperparameters when a step starts, and every
measured value once the step's one host sync has read them.

Each check raises an :mod:`~constrained_opt.errors` type whose message names the value and the fix.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from . import functional as F
from . import rules as R
from ._flat import FlatLayout
from .errors import ClosureError, SettingError, UpdateError
from .problem import Task
from .robust import Inversion, Relearn, Robust

Hyperparameter = float | Sequence[float] | Mapping[str, float]


def check_settings(
    inner_steps: object,
    inner_lr: object,
    projection: object,
    max_grad_norm: float | None,
    grad_scaler: object,
    process_group: object,
) -> None:
    """The constructor's own arguments (the rule's hyperparameters: :func:`rule_hyperparameters`)."""
    if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 0:
        raise SettingError(f"inner_steps must be an int >= 0, got {inner_steps!r}")
    check_nonneg("inner_lr", inner_lr)
    if projection not in ("global", "per_group"):
        raise SettingError(f"projection must be 'global' or 'per_group', got {projection!r}")
    if max_grad_norm is not None and not (max_grad_norm > 0 and math.isfinite(max_grad_norm)):
        raise SettingError(f"max_grad_norm must be a positive finite number or None, got {max_grad_norm!r}")
    if grad_scaler is not None and not isinstance(grad_scaler, torch.amp.GradScaler):
        raise TypeError(
            f"grad_scaler must be a torch.amp.GradScaler or None, got {type(grad_scaler).__name__}"
        )
    if not (
        process_group is None
        or process_group == "auto"
        or (dist.is_available() and isinstance(process_group, dist.ProcessGroup))
    ):
        raise TypeError(
            f"process_group must be 'auto', None or a torch.distributed.ProcessGroup, got {process_group!r}"
        )


def rule_hyperparameters(rule: R.Rule, given: dict[str, Hyperparameter | None]) -> dict[str, Hyperparameter]:
    """The rule's hyperparameters: the given ones (only those the rule uses) over its defaults."""
    unused = [k for k, v in given.items() if v is not None and k not in rule.hyperparameters]
    if unused:
        raise SettingError(
            f"rule {rule.name!r} does not use {', '.join(unused)}; its hyperparameters are "
            f"{sorted(rule.hyperparameters) or 'none'}"
        )
    hyper = {k: (given[k] if given.get(k) is not None else v) for k, v in rule.hyperparameters.items()}
    for k, v in hyper.items():
        check_hyperparameter(k, v)
    return hyper


def check_task(task: Task, rule: R.Rule) -> None:
    """The step's form against the rule, and the number of constraints against the exact dual solver."""
    if not task.constrained and not rule.objectives:
        raise SettingError(
            f"step([f_1, ..., f_m]) aggregates objectives without a constraint, which needs a "
            f"multi-objective rule ('pcgrad', 'mgda', 'upgrad'); this optimizer uses {rule.name!r}. "
            "For constraints call step(retain_closure, [forget closures])"
        )
    m = len(task.closures) if task.constrained else task.rows - 1
    if m > F.MAX_CONSTRAINTS:
        raise SettingError(F.too_many_constraints(m))


def check_adversaries(task: Task, layout: FlatLayout, scaled: bool, group: Any) -> None:
    """What the step's robust constraints need from the setup (:mod:`.robust`), before anything moves."""
    if isinstance(task.retain, Robust):
        raise SettingError(
            "the retain closure is a robust declaration; adversaries apply to constraints only: pass "
            "Relearn/Sharpness/Inversion among the constraints, e.g. step(retain, {'robust': Relearn(...)})"
        )
    for closure, label in zip(task.closures, task.labels, strict=True):
        if isinstance(closure, Relearn) and closure.second_order:
            reasons = [
                (scaled, "a GradScaler is in use"),
                (layout.sharded, "the parameters are sharded"),
                (group is not None, "the losses are reduced over a process group"),
            ]
            reason = next((why for applies, why in reasons if applies), None)
            if reason is not None:
                raise SettingError(
                    f"{label} is Relearn(second_order=True), which differentiates twice in one process "
                    f"without loss scaling, but {reason}; use the first-order look-ahead "
                    "(second_order=False) or a single-process fp32/bf16 run"
                )
        if isinstance(closure, Inversion) and id(closure.input) in layout.param_ids:
            raise SettingError(
                f"{label} is an Inversion over a tensor this optimizer trains; the adversary's input must "
                "be a tensor outside the optimizer's parameters (e.g. a frozen embedding or a copy of it)"
            )


def step_hyperparameters(
    param_groups: list[dict[str, Any]], rule: R.Rule, projection: str, task: Task
) -> list[dict[str, float | Tensor]]:
    """Validate the per-group hyperparameters and resolve them for this step's constraints: a number
    stays a number for one constraint (the closed form's arithmetic); otherwise a [m] tensor."""
    out = []
    for i, group in enumerate(param_groups):
        check_nonneg(f"param_groups[{i}]['inner_lr']", group["inner_lr"])
        resolved = {}
        for k in rule.hyperparameters:
            check_hyperparameter(f"param_groups[{i}][{k!r}]", group[k])
            resolved[k] = per_constraint(k, group[k], task.constraint_names)
        out.append(resolved)
    if projection == "global" and len(param_groups) > 1:
        for k in rule.hyperparameters:
            values = [g[k] for g in param_groups]
            if any(v != values[0] for v in values[1:]):
                raise SettingError(
                    f"{k} differs across param groups ({values}) but projection='global' uses one "
                    "multiplier for all parameters; pass projection='per_group' to give each group its "
                    "own KKT problem, or use one value"
                )
    return out


def per_constraint(name: str, value: Any, names: tuple[str, ...]) -> float | Tensor:
    """A hyperparameter for this step's constraints: a number for one constraint, else a [m] tensor."""
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(names))
        missing = [n for n in names if n not in value]
        if unknown or missing:
            raise SettingError(
                f"{name} is given per constraint name, but this step's constraints are {list(names)}: "
                + (f"no value for {missing}" if missing else "")
                + ("; " if missing and unknown else "")
                + (f"unknown names {unknown}" if unknown else "")
            )
        values = [float(value[n]) for n in names]
    elif isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != len(names):
            raise SettingError(
                f"{name} has {len(value)} values but this step has {len(names)} constraints {list(names)}"
            )
        values = [float(v) for v in value]
    else:
        return value if len(names) <= 1 else torch.tensor([float(value)] * len(names), dtype=torch.float64)
    return values[0] if len(names) == 1 else torch.tensor(values, dtype=torch.float64)


def check_hyperparameter(name: str, value: object) -> None:
    """A number ≥ 0, or a sequence / name → number mapping of them (one per constraint)."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise SettingError(f"{name} maps constraint names to values; got the key {k!r}")
            check_nonneg(f"{name}[{k!r}]", v)
    elif isinstance(value, Sequence) and not isinstance(value, str):
        if not value:
            raise SettingError(f"{name} is an empty sequence")
        for i, v in enumerate(value):
            check_nonneg(f"{name}[{i}]", v)
    else:
        check_nonneg(name, value)


def check_nonneg(name: str, value: object) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (value >= 0 and math.isfinite(value))
    ):
        raise SettingError(f"{name} must be a finite number >= 0, got {value!r}")


def check_unique(params: list[Tensor]) -> None:
    ids = [id(p) for p in params]
    if len(set(ids)) != len(ids):
        dup = next(p for i, p in enumerate(params) if ids.index(id(p)) != i)
        raise SettingError(
            f"a parameter of shape {tuple(dup.shape)} appears more than once in a param group; its gradient "
            "would be counted twice in every inner product: pass each parameter once"
        )


def check_measured(
    task: Task,
    losses: list[list[float]],
    inner_overflow: list[list[bool]],
    retain_loss: float,
    row_sq: list[float],
    scaled: bool,
    attacks: list[list[tuple[float, bool]]] | None = None,
) -> bool:
    """Check every measured quantity in the order it was computed, so the root cause is reported
    (a NaN gradient at θ would otherwise surface as a NaN loss at φ^1). ``attacks``: per constraint,
    (loss, overflowed) at each step of its adversary's attacker, checked before the constraint.

    A non-finite gradient under a GradScaler is an overflow of the scaled backward: the step is
    skipped (returns True). Anything else non-finite raises :class:`ClosureError`.
    """
    checks: list[tuple[bool, bool, str]] = []
    attacks = attacks if attacks is not None else [[] for _ in losses]
    for label, measured, flags, sq, attack in zip(
        task.labels, losses, inner_overflow, row_sq, attacks, strict=False
    ):
        for j, (loss, overflowed) in enumerate(attack):
            checks.append(
                (
                    math.isfinite(loss),
                    False,
                    f"the attack of {label} returned a non-finite loss ({loss}) at its step {j}; lower the "
                    "adversary's step size if its steps diverge",
                )
            )
            checks.append((not overflowed, True, ""))  # recorded with a scaler only: a skip
        checks.append(
            (math.isfinite(measured[0]), False, f"{label} returned a non-finite loss ({measured[0]}) at θ")
        )
        checks.append(
            (math.isfinite(sq), True, f"the gradient of {label} at θ contains NaN or inf (squared norm {sq})")
        )
        for k, loss in enumerate(measured[1:], start=1):
            checks.append(
                (
                    math.isfinite(loss),
                    False,
                    f"{label} returned a non-finite loss ({loss}) at inner step φ^{k}; lower inner_lr if "
                    "the inner steps diverge",
                )
            )
            if k <= len(flags):  # recorded with a scaler only, so an overflow is always a skip
                checks.append((not flags[k - 1], True, ""))
    if task.constrained:
        checks.append(
            (math.isfinite(retain_loss), False, f"retain_closure returned a non-finite loss ({retain_loss})")
        )
        checks.append(
            (
                math.isfinite(row_sq[-1]),
                True,
                f"the gradient of retain_closure contains NaN or inf (squared norm {row_sq[-1]})",
            )
        )
    for ok, is_gradient, message in checks:
        if not ok:
            if is_gradient and scaled:
                return True
            raise ClosureError(message + "; the step was not taken and θ is unchanged")
    return False


def check_update(
    rule: str,
    coefficients: list[float],
    scale: float,
    norm: float,
    dtype: torch.dtype,
    max_norm: float | None,
) -> None:
    """No step may write a non-finite value into θ or the base optimizer's state: every coefficient and
    the clip scale must be finite, and ‖δ‖² representable in the accumulation dtype (so every δ_j² is,
    and Adam-like second moments stay finite)."""
    bad = [c for c in coefficients if not math.isfinite(c)]
    if bad:
        raise UpdateError(
            f"rule {rule!r} gave a non-finite coefficient ({bad[0]}) for the update δ; the step was not "
            "taken and θ and the optimizer state are unchanged (check the rule's hyperparameters)"
        )
    if not math.isfinite(scale):
        raise UpdateError(f"the clip scale is {scale}; the step was not taken and θ is unchanged")
    limit = torch.finfo(dtype).max
    if not (norm * norm <= limit):
        raise UpdateError(
            f"the update δ of rule {rule!r} has norm {norm:.4g}, whose square overflows {dtype} (largest "
            f"norm {math.sqrt(limit):.3g}): an optimizer with a second moment (Adam, RMSprop, ...) would "
            "store inf. "
            + (
                "Lower max_grad_norm"
                if max_norm is not None
                else "Set max_grad_norm (clipping cannot overflow)"
            )
            + ", lower the rule's hyperparameters or scale the losses down; the step was not taken and θ "
            "and the optimizer state are unchanged"
        )
