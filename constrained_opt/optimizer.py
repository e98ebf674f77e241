"""ValueFunctionBilevelOptimizer: EraseDiff's Algorithm 1 as a torch.optim optimizer, for m constraints.

Solves  min_θ L_r(θ)  s.t.  g_i(θ) = L_f,i(θ) − min_φ L_f,i(φ) ≤ 0  (i = 1..m)  one step at a time:

1. For each constraint: φ⁰ = θ_t; K plain gradient steps φ^{k+1} = φ^k − ξ∇L_f,i(φ^k) (never through the
   base optimizer).
2. g_i(θ_t) = L_f,i(θ_t) − L_f,i(φ^K), with φ^K held constant so ∇g_i(θ_t) = ∇L_f,i(θ_t): the gradient of
   the first inner step, reused.
3. ∇L_r(θ_t).
4. δ = c_r∇L_r + Σ_i c_f,i∇g_i from the rule (for the KKT rules c_r = 1 and c_f = λ, the solution of the
   projection; Theorem 3.1 for m = 1), written into ``.grad``; then the base optimizer steps.

The class orchestrates: the math is in :mod:`.functional` and :mod:`.rules`, the buffers in :mod:`._flat`.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch.amp.grad_scaler import OptState

from . import functional as F
from . import rules as R
from ._flat import CONSTRAINT_ROW, Bucket, FlatLayout
from .errors import ClosureError, UpdateError

Closure = Callable[[], Tensor]
Hyperparameter = float | Sequence[float] | Mapping[str, float]


class Closures(NamedTuple):
    """The closures of one step as a single argument, for callers that pass exactly one (accelerate's
    ``AcceleratedOptimizer.step(closure)``): ``opt.step(Closures(retain, forget))``; ``constraints``
    may be one closure, a sequence or a name → closure mapping, as in ``step(retain, constraints)``."""

    retain: Closure
    constraints: Closure | Sequence[Closure] | Mapping[str, Closure]


class MicroBatches:
    """A closure over several micro-batches, for gradient accumulation: ``MicroBatches([c_1, ..., c_n])``
    stands for the mean loss (1/n)·Σ c_j(). Pass it wherever a closure goes. The optimizer calls the parts
    one at a time and differentiates each (times 1/n) before calling the next, so only one micro-batch's
    graph is alive at once; each part must use the same micro-batch at every call within a step (as any
    closure must). Called directly, it returns the mean loss with every graph alive."""

    def __init__(self, parts: Sequence[Closure]) -> None:
        parts = tuple(parts)
        if not parts or not all(callable(c) for c in parts):
            raise TypeError("MicroBatches needs a non-empty sequence of closures returning scalar losses")
        self.parts = parts

    def __call__(self) -> Tensor:
        return sum(c() for c in self.parts) / len(self.parts)


@dataclass(frozen=True)
class _Task:
    """A parsed step: the retain closure (None for a pure multi-objective step) and the constraint (or
    objective) closures with their names and the labels used in error messages."""

    retain: Closure | None
    closures: tuple[Closure, ...]
    names: tuple[str, ...]
    labels: tuple[str, ...]

    @property
    def rows(self) -> int:
        return len(self.closures) + (self.retain is not None)


def parse_step_arguments(retain_closure: Any, forget_closure: Any = None) -> _Task:
    """The argument forms of :meth:`ValueFunctionBilevelOptimizer.step`, in one place:

    * ``(retain, forget)``: one constraint (its name is ``"forget"``);
    * ``(retain, [c_1, ..., c_m])`` or ``(retain, {"name": c, ...})``: m constraints (names ``"0"``..
      for a sequence);
    * ``(Closures(retain, constraints),)`` or a plain 2-tuple: the same, as one argument;
    * ``([f_1, ..., f_m],)`` or ``({"name": f, ...},)``: m objectives, no constraint (multi-objective rules).
    """
    if forget_closure is None:
        if isinstance(retain_closure, tuple) and len(retain_closure) == 2:
            return parse_step_arguments(*retain_closure)
        if isinstance(retain_closure, list | Mapping):
            names, closures = _named(retain_closure, "objectives")
            if len(closures) < 2:
                raise ValueError(f"a multi-objective step needs at least 2 objectives, got {len(closures)}")
            return _Task(None, closures, names, tuple(f"objective[{n!r}]" for n in names))
        raise TypeError(
            "step takes (retain_closure, forget_closure), (retain_closure, [closures] or {name: closure}), "
            "one Closures(retain, constraints) tuple, or a list of objective closures; got a single "
            f"{type(retain_closure).__name__}"
        )
    if not callable(retain_closure):
        raise TypeError(
            "retain_closure must be a callable returning the scalar loss, got "
            f"{type(retain_closure).__name__}"
        )
    if callable(forget_closure):
        return _Task(retain_closure, (forget_closure,), ("forget",), ("forget_closure",))
    names, closures = _named(forget_closure, "constraints")
    return _Task(retain_closure, closures, names, tuple(f"forget_closure[{n!r}]" for n in names))


def _named(closures: Any, what: str) -> tuple[tuple[str, ...], tuple[Closure, ...]]:
    if isinstance(closures, Mapping):
        items = list(closures.items())
        if not all(isinstance(k, str) for k, _ in items):
            raise TypeError(f"{what} given as a mapping need str names, got keys {[k for k, _ in items]}")
    elif isinstance(closures, Sequence) and not isinstance(closures, str):
        items = [(str(i), c) for i, c in enumerate(closures)]
    else:
        raise TypeError(
            f"{what} must be a callable, a sequence of callables or a name -> callable mapping, "
            f"got {type(closures).__name__}"
        )
    if not items:
        raise ValueError(f"no {what} given")
    for name, c in items:
        if not callable(c):
            raise TypeError(
                f"{what}[{name!r}] must be a callable returning the scalar loss, got {type(c).__name__}"
            )
    return tuple(n for n, _ in items), tuple(c for _, c in items)


@dataclass(frozen=True)
class StepStats:
    """What one step measured. Gradient quantities are over all trainable parameters.

    The scalar fields describe the constraint(s) as one: for a single constraint they are its values;
    for m > 1 they are the pooled values of Σ_i g_i (losses, g, λ and a_t summed, ∇g = Σ_i ∇g_i), and
    the per-constraint values are in the tuples ``lams``, ``g_values``, ``forget_losses``,
    ``inner_forget_losses``, ``a_ts``, ``forget_grad_norms``, ``grad_dots``, ``cos_update_forgets`` and
    ``shortfalls``, in the order of ``constraint_names``.

    ``a_t`` is NaN for rules that set λ directly (cosine, scalarized, pcgrad, mgda, upgrad). ``lam`` is
    the coefficient of ∇g in δ before clipping (for ``projection="per_group"``, the ‖∇g_G‖²-weighted mean
    of ``group_lams``). ``shortfalls`` are (a_i − ∇g_i·δ)₊ of the least-violation direction when the
    targets cannot all be met (``infeasible``), else 0. Losses are averages over the data-parallel ranks
    when distributed.

    ``objective_losses``, ``weights`` and ``cos_update_objectives`` view every row at once (constraints
    first, retain last; for ``step([f_1, ..., f_m])`` the objectives): the loss at θ, the coefficient
    of its gradient in δ (after clipping) and cos(δ, its gradient). A multi-objective step without a
    constraint leaves the constraint fields empty or NaN.

    ``skipped`` is True when a GradScaler found an inf/NaN in a scaled gradient: θ and the base
    optimizer were left untouched and the scale was backed off. ``grad_scale`` is the loss scale the
    step used (1.0 without a scaler).
    """

    retain_loss: float
    forget_loss: float
    inner_forget_loss: float
    g_value: float
    lam: float
    a_t: float
    grad_dot: float
    retain_grad_norm: float
    forget_grad_norm: float
    update_norm: float
    cos_update_retain: float
    cos_update_forget: float
    clip_scale: float
    inner_losses: tuple[float, ...]
    group_lams: tuple[float, ...]
    skipped: bool = False
    grad_scale: float = 1.0
    constraint_names: tuple[str, ...] = ()
    lams: tuple[float, ...] = ()
    g_values: tuple[float, ...] = ()
    forget_losses: tuple[float, ...] = ()
    inner_forget_losses: tuple[float, ...] = ()
    a_ts: tuple[float, ...] = ()
    forget_grad_norms: tuple[float, ...] = ()
    grad_dots: tuple[float, ...] = ()
    cos_update_forgets: tuple[float, ...] = ()
    shortfalls: tuple[float, ...] = ()
    infeasible: bool = False
    objective_losses: tuple[float, ...] = ()
    weights: tuple[float, ...] = ()
    cos_update_objectives: tuple[float, ...] = field(default=())

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


_BaseFactory = Callable[..., torch.optim.Optimizer]


class ValueFunctionBilevelOptimizer(torch.optim.Optimizer):
    r"""Constrained multi-objective optimizer wrapping any torch.optim optimizer.

    Args:
        params: parameters or param groups (omit when ``base_optimizer`` is an instance).
        base_optimizer: an optimizer class/factory called as ``base_optimizer(param_groups, **kwargs)``,
            or an already-built optimizer whose ``param_groups`` are adopted. ``param_groups`` are
            shared with it, so LR schedulers work on either object.
        inner_steps: K ≥ 0 inner gradient steps on each forget loss. K = 0 skips the inner loops (g = 0).
            With several constraints the loops run only under rules that read g (``value``,
            ``barrier``, callables): under the others they would change nothing but the reported g.
        inner_lr: ξ, the inner step size (per group).
        rule: ``"grad_norm"`` (paper default), ``"value"``, ``"barrier"``, ``"cosine"``,
            ``"scalarized"``, ``"pcgrad"``, ``"mgda"``, ``"upgrad"``, a :class:`~constrained_opt.rules.Rule`,
            or a callable ``geometry -> a_t``.
        projection: ``"global"`` (one λ per constraint over all parameters, as in the paper) or
            ``"per_group"`` (each param group solves its own KKT problem with its own hyperparameters).
        max_grad_norm: clip ‖δ‖ to this value (computed from the Gram: free).
        grad_scaler: a ``torch.amp.GradScaler`` for fp16 training. Each loss is multiplied by the
            scale before backward and 1/scale is folded into the projection; a step whose scaled
            gradients overflow is skipped (``StepStats.skipped``) and the scaler is updated. The
            optimizer calls ``grad_scaler.update()`` itself, once per step: do not call it.
        process_group: where loss values are averaged under data parallelism (DDP gradients are
            averaged already, but each rank measures its own losses, hence its own g and a_t).
            ``"auto"``: the default group when torch.distributed is initialized, else nothing;
            ``None``: never (e.g. independent models per rank); or a ``ProcessGroup``.
        eta, alpha, beta, forget_weight: the rule's hyperparameters (per group); only those the rule
            uses may be given. Each is a number (every constraint), a sequence (one per constraint, in
            order) or a mapping from constraint name to number, e.g. ``eta={"nudity": 1.0, "van gogh": 0.5}``.
        **base_kwargs: forwarded to ``base_optimizer`` (``lr``, ``betas``, ``weight_decay``, ...).

    ``step(retain_closure, forget_closure)`` performs one device→host sync, after all the math and
    before the base step: it validates the losses, gradients, coefficients and the update, and returns
    :class:`StepStats` as floats. The projection itself is sync-free, and so are the collectives (one
    all-reduce of the loss values per step when distributed, plus one of the Gram for sharded
    parameters). After a successful or skipped step ``p.grad`` is ``None``. On any failure before the
    base step (bad closure, non-finite value without a scaler, a non-finite coefficient or update,
    exception, KeyboardInterrupt) θ, the base optimizer's state and every ``p.grad`` are left exactly as
    they were. A KeyboardInterrupt that arrives during the base step is held until the step is complete
    (main thread); an exception raised by the base step or its hooks restores θ and ``p.grad``, but not
    the base optimizer's state (docs/api.md).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict] | None = None,
        base_optimizer: _BaseFactory | torch.optim.Optimizer = torch.optim.Adam,
        *,
        inner_steps: int = 1,
        inner_lr: float = 1e-4,
        rule: str | R.Rule | Callable[[R.Geometry], Tensor | float] = "grad_norm",
        projection: Literal["global", "per_group"] = "global",
        max_grad_norm: float | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        process_group: Any = "auto",
        eta: Hyperparameter | None = None,
        alpha: Hyperparameter | None = None,
        beta: Hyperparameter | None = None,
        forget_weight: Hyperparameter | None = None,
        **base_kwargs: Any,
    ) -> None:
        if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 0:
            raise ValueError(f"inner_steps must be an int >= 0, got {inner_steps!r}")
        _check_nonneg("inner_lr", inner_lr)
        if projection not in ("global", "per_group"):
            raise ValueError(f"projection must be 'global' or 'per_group', got {projection!r}")
        if max_grad_norm is not None and not (max_grad_norm > 0 and math.isfinite(max_grad_norm)):
            raise ValueError(f"max_grad_norm must be a positive finite number or None, got {max_grad_norm!r}")
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
                "process_group must be 'auto', None or a torch.distributed.ProcessGroup, "
                f"got {process_group!r}"
            )
        self.rule = R.resolve(rule)
        given = {"eta": eta, "alpha": alpha, "beta": beta, "forget_weight": forget_weight}
        unused = [k for k, v in given.items() if v is not None and k not in self.rule.hyperparameters]
        if unused:
            raise ValueError(
                f"rule {self.rule.name!r} does not use {', '.join(unused)}; its hyperparameters are "
                f"{sorted(self.rule.hyperparameters) or 'none'}"
            )
        hyper = {k: (given[k] if given[k] is not None else v) for k, v in self.rule.hyperparameters.items()}
        for k, v in hyper.items():
            _check_hyperparameter(k, v)
        self.inner_steps = inner_steps
        self.projection = projection
        self.max_grad_norm = max_grad_norm
        self.grad_scaler = grad_scaler
        if grad_scaler is not None and grad_scaler.is_enabled():
            # GradScaler.step (accelerate's fp16 path) checks that the scale exists before calling this
            # step, which is where it would otherwise be created (GradScaler.scale creates it lazily).
            grad_scaler.scale(torch.zeros((), device=grad_scaler._device))
        self.process_group = process_group
        self._steps = 0
        self._layout: FlatLayout | None = None
        self._layout_key: tuple | None = None
        own_defaults = {"inner_lr": inner_lr, **hyper}

        if isinstance(base_optimizer, torch.optim.Optimizer):
            if params is not None:
                raise ValueError("pass params or an optimizer instance as base_optimizer, not both")
            if base_kwargs:
                raise ValueError(
                    f"{sorted(base_kwargs)} cannot be applied to an existing optimizer instance; "
                    "set them when building it"
                )
            for group in base_optimizer.param_groups:
                _check_unique(group["params"])
            super().__init__(base_optimizer.param_groups, own_defaults)  # fills our keys in place
            self.base_optimizer = base_optimizer
        else:
            if params is None:
                raise ValueError("params is required when base_optimizer is a class or factory")
            super().__init__(params, own_defaults)
            self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        # SAM-style sharing: one list of group dicts for both optimizers.
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self.defaults.update(own_defaults)

    # ------------------------------------------------------------------ torch.optim plumbing
    @property
    def state(self) -> Any:  # type: ignore[override]
        """The base optimizer's per-parameter state (Adam's moments, ...), as torch.optim users expect."""
        base = self.__dict__.get("base_optimizer")
        return base.state if base is not None else self.__dict__.get("_own_state")

    @state.setter
    def state(self, value: Any) -> None:  # torch.optim.Optimizer.__init__ assigns an empty dict
        self.__dict__["_own_state"] = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        params = param_group["params"]
        _check_unique([params] if isinstance(params, Tensor) else list(params))
        if not hasattr(self, "base_optimizer"):  # called from torch.optim.Optimizer.__init__
            super().add_param_group(param_group)
            return
        for k in ("inner_lr", *self.rule.hyperparameters):
            param_group.setdefault(k, self.defaults[k])
        self.base_optimizer.add_param_group(param_group)

    def __getstate__(self) -> dict[str, Any]:
        """Everything but the flat buffers (rebuilt on the next step), so ``pickle`` and
        ``copy.deepcopy`` give a working optimizer with the same base optimizer, rule and state."""
        state = dict(self.__dict__)
        state["_layout"] = state["_layout_key"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.param_groups = self.base_optimizer.param_groups

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict (its param_groups carry our per-group hyperparameters)
        plus this optimizer's own counters, and the GradScaler's state if any, under ``"bilevel"``."""
        sd = self.base_optimizer.state_dict()
        sd["bilevel"] = {"steps": self._steps}
        if self.grad_scaler is not None and self.grad_scaler.is_enabled():
            sd["bilevel"]["grad_scaler"] = self.grad_scaler.state_dict()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a dict from :meth:`state_dict`; a plain base-optimizer state dict is accepted too
        (per-group hyperparameters missing from it keep their current values)."""
        state_dict = dict(state_dict)
        own = state_dict.pop("bilevel", {"steps": 0})
        current = [{k: g[k] for k in ("inner_lr", *self.rule.hyperparameters)} for g in self.param_groups]
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        for group, keep in zip(self.param_groups, current, strict=True):
            for k, v in keep.items():
                group.setdefault(k, v)
        self._steps = int(own["steps"])
        if "grad_scaler" in own and self.grad_scaler is not None:
            self.grad_scaler.load_state_dict(own["grad_scaler"])
        self._layout = None

    @property
    def steps_taken(self) -> int:
        return self._steps

    # ------------------------------------------------------------------ GradScaler.step and accelerate
    # ``torch.amp.GradScaler.step(opt, *args)`` lets an optimizer that sets ``_step_supports_amp_scaling``
    # scale by itself: it calls ``opt.step(*args)`` directly and leaves ``update()`` to its own caller.
    # It passes itself as ``grad_scaler=`` when ``step``'s signature has that keyword. accelerate's
    # ``AcceleratedOptimizer`` (mixed_precision="fp16") calls ``scaler.step(opt, closure)`` then
    # ``scaler.update()``, but first replaces ``opt.step`` with a ``(*args, **kwargs)`` wrapper, so the
    # scaler takes its other path: it sets ``opt.grad_scale``/``opt.found_inf`` for the duration of the
    # call and passes nothing. A closure optimizer computes its gradients inside ``step``, so neither the
    # scaler's pre-step inf check nor ``found_inf`` means anything here: the step scales its own losses
    # with the scaler's scale and records its own overflow for the caller's ``update()``.
    _step_supports_amp_scaling = True
    last_stats: StepStats | None = None

    def _scaler_of_this_step(
        self, grad_scaler: torch.amp.GradScaler | None
    ) -> tuple[torch.amp.GradScaler | None, bool]:
        """(the GradScaler to scale this step's losses with, whether ``GradScaler.step`` is the caller,
        which then updates the scale itself)."""
        _check_no_accelerate_accumulation()
        if grad_scaler is not None:
            if self.grad_scaler is not None and grad_scaler is not self.grad_scaler:
                raise ValueError(
                    "step was given a grad_scaler other than the one this optimizer was built with; use one "
                    "GradScaler (with accelerate: grad_scaler=accelerator.scaler)"
                )
            return grad_scaler, True
        if "grad_scale" in self.__dict__:  # set by GradScaler.step for this call (accelerate's path)
            if self.grad_scaler is None:
                raise ValueError(
                    "this step is called by GradScaler.step (accelerate with mixed_precision='fp16'), which "
                    "does not hand over the scaler: build the optimizer with grad_scaler=accelerator.scaler "
                    "so it can scale its losses and report overflows to that scaler"
                )
            return self.grad_scaler, True
        return self.grad_scaler, False

    # ------------------------------------------------------------------ the step
    def step(  # type: ignore[override]
        self,
        retain_closure: Any = None,
        forget_closure: Any = None,
        *,
        grad_scaler: torch.amp.GradScaler | None = None,
    ) -> StepStats:
        """One step of Algorithm 1; see the class docstring for the cost and the guarantees.

        ``step(retain, forget)``; ``step(retain, [c_1, ..., c_m])`` or ``step(retain, {name: c})`` for m
        constraints; ``step(Closures(retain, constraints))`` as one argument; ``step([f_1, ..., f_m])``
        for m objectives under a multi-objective rule (:func:`parse_step_arguments`). ``grad_scaler`` is
        passed by ``GradScaler.step`` (see :meth:`_scaler_of_this_step`). The stats are also kept in
        ``last_stats`` (accelerate's ``AcceleratedOptimizer.step`` does not return them).
        """
        scaler, caller_updates = self._scaler_of_this_step(grad_scaler)
        task = parse_step_arguments(retain_closure, forget_closure)
        if task.retain is None and not self.rule.objectives:
            raise ValueError(
                f"step([f_1, ..., f_m]) aggregates objectives without a constraint, which needs a "
                f"multi-objective rule ('pcgrad', 'mgda', 'upgrad'); this optimizer uses {self.rule.name!r}. "
                "For constraints call step(retain_closure, [forget closures])"
            )
        m = len(task.closures) if task.retain is not None else task.rows - 1
        if m > F.MAX_CONSTRAINTS:
            raise ValueError(F.too_many_constraints(m))
        hyper = self._check_groups(task)
        layout = self._current_layout(task.rows)
        group = self._reduction_group(layout)
        saved_grads = [p.grad for p in layout.params]
        moved = [False]
        try:
            amp = self._loss_scaling(layout, scaler)
            losses, retain_loss, inner = self._gradients(layout, task, amp, moved)
            with torch.no_grad():
                stats, coefficients = self._project(
                    layout, task, hyper, losses, retain_loss, inner, amp, group
                )
                if not stats.skipped:
                    _apply(self._blocks_slices(layout), coefficients, layout.retain_row)
        except BaseException:
            with _HeldInterrupt():
                if moved[0]:
                    with torch.no_grad():
                        for b in layout.buckets:
                            b.restore_theta(layout.retain_row)
                _set_grads(layout.params, saved_grads)
            raise
        with _HeldInterrupt():
            if not stats.skipped:
                self._base_step(layout, saved_grads)
            for b in layout.buckets:
                b.detach_grads()
            if amp is not None:
                amp.update(self, stats.skipped, caller_updates)
            if not stats.skipped:
                self._steps += 1
        self.last_stats = stats
        return stats

    def _base_step(self, layout: FlatLayout, saved_grads: list[Tensor | None]) -> None:
        """δ into ``.grad``, then the base step. θ is copied into the first constraint row, free after the
        projection, so an exception from the base step or its hooks restores θ at no memory cost."""
        with torch.no_grad():
            for b in layout.buckets:
                b.save_theta(CONSTRAINT_ROW)
        try:
            for b in layout.buckets:
                for p, g in zip(b.params, b.grads[layout.retain_row], strict=True):
                    p.grad = g
            self.base_optimizer.step()
        except BaseException:
            with torch.no_grad():
                for b in layout.buckets:
                    b.restore_theta(CONSTRAINT_ROW)
            _set_grads(layout.params, saved_grads)
            raise

    def _gradients(
        self, layout: FlatLayout, task: _Task, amp: _LossScaling | None, moved: list[bool]
    ) -> tuple[list[list[Tensor]], Tensor | None, bool]:
        """Fill the rows: each constraint's gradient at θ (with its inner loop), then the retain gradient.
        Returns the losses per constraint (L(θ), then L(φ^k) for k = 1..K when the loop runs), the retain
        loss and whether the inner loops ran. ``moved[0]`` is True while θ is displaced to some φ."""
        run_inner = (
            task.retain is not None and self.inner_steps > 0 and (len(task.closures) == 1 or self.rule.uses_g)
        )
        snapshot = layout.retain_row
        saved = False
        losses = []
        for row, (closure, label) in enumerate(zip(task.closures, task.labels, strict=True)):
            measured = [self._backward(layout, row, closure, label, 0, amp, run_inner)]
            if run_inner:
                inner_lrs = [float(g["inner_lr"]) for g in self.param_groups]
                with torch.no_grad():
                    if not saved:
                        for b in layout.buckets:
                            b.save_theta(snapshot)
                        saved = True
                moved[0] = True
                for k in range(1, self.inner_steps + 1):
                    source = row if k == 1 else None
                    with torch.no_grad():
                        for b in layout.buckets:
                            b.descend(source, inner_lrs)
                            if source is None:
                                b.detach_grads()  # free φ^{k-1}'s gradient before the next pass
                    if k < self.inner_steps:
                        measured.append(self._backward(layout, None, closure, label, k, amp, True))
                with torch.no_grad():
                    measured.append(self._evaluate(closure, label, self.inner_steps))
                    for b in layout.buckets:
                        b.restore_theta(snapshot)
                moved[0] = False
            losses.append(measured)
        retain_loss = None
        if task.retain is not None:
            retain_loss = self._backward(
                layout, layout.retain_row, task.retain, "retain_closure", None, amp, False
            )
        return losses, retain_loss, run_inner

    # ------------------------------------------------------------------ internals
    def _check_groups(self, task: _Task) -> list[dict[str, Any]]:
        """Validate the per-group hyperparameters and resolve them for this step's constraints: a
        number stays a number for one constraint (the closed form's arithmetic); otherwise a [m] tensor."""
        names = task.names if task.retain is not None else ()
        out = []
        for i, group in enumerate(self.param_groups):
            _check_nonneg(f"param_groups[{i}]['inner_lr']", group["inner_lr"])
            resolved = {}
            for k in self.rule.hyperparameters:
                _check_hyperparameter(f"param_groups[{i}][{k!r}]", group[k])
                resolved[k] = _per_constraint(k, group[k], names)
            out.append(resolved)
        if self.projection == "global" and len(self.param_groups) > 1:
            for k in self.rule.hyperparameters:
                values = [g[k] for g in self.param_groups]
                if any(v != values[0] for v in values[1:]):
                    raise ValueError(
                        f"{k} differs across param groups ({values}) but projection='global' uses "
                        "one multiplier for all parameters; pass projection='per_group' to give each "
                        "group its own KKT problem, or use one value"
                    )
        return out

    def _current_layout(self, rows: int = 2) -> FlatLayout:
        key = FlatLayout.key(self.param_groups, rows)
        if self._layout is None or key != self._layout_key:
            self._layout = None  # free the old buffer before allocating the new one
            self._layout = FlatLayout(self.param_groups, rows)
            self._layout_key = key
        return self._layout

    def _reduction_group(self, layout: FlatLayout) -> Any:
        """The process group over which loss values are averaged (None: no reduction)."""
        if self.process_group is None:
            if layout.sharded:
                raise ValueError(
                    "the parameters are sharded DTensors (FSDP2 / tensor parallel), so loss values and "
                    "overflow checks must be reduced across ranks; leave process_group='auto' or pass "
                    "the data-parallel process group"
                )
            return None
        if not (dist.is_available() and dist.is_initialized()):
            if isinstance(self.process_group, str):
                return None
            raise RuntimeError(
                "a process_group was given but torch.distributed is not initialized; call "
                "torch.distributed.init_process_group first, or pass process_group=None"
            )
        group = dist.group.WORLD if isinstance(self.process_group, str) else self.process_group
        return group if dist.get_world_size(group) > 1 else None

    def _loss_scaling(self, layout: FlatLayout, scaler: torch.amp.GradScaler | None) -> _LossScaling | None:
        if scaler is None or not scaler.is_enabled():
            return None
        return _LossScaling(scaler, layout.buckets[0].rows.device)

    @staticmethod
    def _checked(out: object, name: str, where: str) -> Tensor:
        if not isinstance(out, Tensor):
            raise ClosureError(
                f"{name} returned {type(out).__name__} {where}; it must return the scalar loss tensor "
                "(e.g. `return loss`, not `loss.item()` or a tuple)"
            )
        if out.numel() != 1:
            raise ClosureError(
                f"{name} returned a tensor of shape {tuple(out.shape)} {where}; it must return a scalar "
                "loss (reduce it, e.g. with .mean())"
            )
        if not out.is_floating_point():
            raise ClosureError(
                f"{name} returned a {out.dtype} tensor {where}; the loss must be floating point"
            )
        return out.reshape(())

    def _backward(
        self,
        layout: FlatLayout,
        row: int | None,
        closure: Closure,
        name: str,
        k: int | None,
        amp: _LossScaling | None,
        unscale: bool,
    ) -> Tensor:
        """Zero ``row``, run the closure, differentiate it (times the loss scale) into ``row`` (for
        ``None``: into fresh ``.grad`` tensors); returns the detached loss. ``unscale``: divide the
        gradient by the scale now (the inner descent reads it) and record whether it overflowed."""
        where = "at θ" if not k else f"at inner step φ^{k}"
        for b in layout.buckets:
            b.attach(row)
        parts = _parts(closure)
        total = None
        for part in parts:  # one part unless the closure is MicroBatches
            loss = self._differentiate(layout, part, name, where, amp, len(parts))
            total = loss if total is None else total + loss
        assert total is not None
        if row is not None:
            for b in layout.buckets:
                b.adopt(row)
        if amp is not None and unscale:
            overflow = amp.unscale(layout, row)
            if k:
                amp.inner_overflow.append(overflow)
        return total / len(parts)

    def _differentiate(
        self, layout: FlatLayout, closure: Closure, name: str, where: str, amp: _LossScaling | None, n: int
    ) -> Tensor:
        """Run the closure and accumulate the gradient of its loss (times 1/n and the loss scale) into
        the attached gradients; returns the detached loss."""
        loss = self._checked(closure(), name, where)
        if loss.grad_fn is None:
            raise ClosureError(
                f"{name} returned a tensor with no autograd graph {where} (requires_grad=False); compute "
                "the loss with gradients enabled and do not detach it or call .backward() in the closure"
            )
        # FSDP2 differentiates into its unsharded copies and reduce-scatters them from hooks, so the
        # sharded parameters are neither reachable in the graph nor usable as backward inputs.
        if not layout.sharded and not _reaches(loss.grad_fn, layout.param_ids):
            raise ClosureError(
                f"{name}'s loss {where} does not depend on any parameter this optimizer trains; check that "
                "the closure uses the model whose parameters were passed to the optimizer"
            )
        target = loss if n == 1 else loss / n
        target = target if amp is None else amp.scaled(target)
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

    def _evaluate(self, closure: Closure, name: str, k: int) -> Tensor:
        parts = _parts(closure)
        return sum(self._checked(c(), name, f"at inner step φ^{k}").detach() for c in parts) / len(parts)

    def _project(
        self,
        layout: FlatLayout,
        task: _Task,
        hyper: list[dict[str, Any]],
        losses: list[list[Tensor]],
        retain_loss: Tensor | None,
        inner: bool,
        amp: _LossScaling | None,
        group: Any,
    ) -> tuple[StepStats, list[tuple[Tensor, Tensor, bool]]]:
        """Gram → rule → (clip) → coefficients; one host sync for validation and stats.

        Under data parallelism the loss values (and overflow flags) are averaged over ``group`` with one
        all-reduce; the gradients already are (DDP/FSDP average them during backward). A Gram out of the
        fp32 range (an overflowed square of a finite gradient, or a squared norm below ~1e-31) is
        recomputed in fp64 after the sync, on that step only (one more pass and sync).
        """
        matrices = self._blocks(layout)
        device, acc = matrices[0][1].device, matrices[0][1].dtype
        flat = [x for measured in losses for x in measured] + (
            [retain_loss] if retain_loss is not None else []
        )
        measured = torch.stack(flat).to(device=device, dtype=acc)
        overflow = (
            torch.stack(amp.inner_overflow).to(device=device, dtype=acc)
            if amp is not None and amp.inner_overflow
            else measured.new_zeros(0)
        )
        if group is not None:
            n = measured.numel()
            packed = torch.cat([measured, overflow])
            dist.all_reduce(packed, group=group)
            measured, overflow = packed[:n] / dist.get_world_size(group), packed[n:]
        starts = [0]
        for m_i in losses:
            starts.append(starts[-1] + len(m_i))
        first = starts[:-1] + ([len(flat) - 1] if retain_loss is not None else [])
        at_theta = measured[torch.tensor(first, device=device)]
        single = task.retain is not None and len(task.closures) == 1
        if task.retain is None or not inner:
            g = (
                torch.zeros((), dtype=acc, device=device)
                if task.rows == 2
                else at_theta.new_zeros(task.rows - 1)
            )
        elif single:
            g = measured[0] - measured[starts[1] - 1]
        else:
            last = torch.tensor([s - 1 for s in starts[1:]], device=device)
            g = at_theta[: len(losses)] - measured[last]
        grad_scale = (
            torch.ones((), dtype=acc, device=device)
            if amp is None
            else amp.scale.to(device=device, dtype=acc)
        )
        unscale = (
            torch.ones(task.rows, dtype=acc, device=device)
            if amp is None
            else amp.row_factors(task.rows, inner).to(device=device, dtype=acc)
        )
        solution = self._solve(matrices, g, unscale, hyper, amp)
        host = self._summary(solution, measured, at_theta, g, overflow, grad_scale).tolist()
        if acc != torch.float64 and not all(v > 0 for v in host[-len(matrices) - 1 : -1]):
            matrices = self._blocks(layout, torch.float64)
            solution = self._solve(matrices, g.double(), unscale.double(), hyper, amp)
            host = self._summary(solution, measured, at_theta, g.double(), overflow, grad_scale).tolist()
        return self._stats(task, losses, host, solution, amp, inner, acc)

    def _solve(
        self,
        matrices: list[tuple[int, Tensor]],
        g: Tensor,
        unscale: Tensor,
        hyper: list[dict[str, Any]],
        amp: _LossScaling | None,
    ) -> _Solution:
        """The rule on each projection block's Gram, clipping, and δ's coefficients; sync-free."""
        device, acc = matrices[0][1].device, matrices[0][1].dtype
        grams, combos, products, total = [], [], None, None
        for group_index, m in matrices:
            gram = F.gram_from_matrix(m.to(device=device, dtype=acc) * torch.outer(unscale, unscale))
            values = {k: _as_tensor(v, acc, device) for k, v in hyper[group_index].items()}
            combo = self.rule(R.Geometry(gram.gg, gram.rr, gram.gr, g), **values)
            retain_coef, constraint_coef, a_t = (
                torch.as_tensor(c, dtype=acc, device=device) for c in combo[:3]
            )
            constraint_coef = constraint_coef.expand(gram.gr.shape)
            shortfall = combo.shortfall if combo.shortfall is not None else torch.zeros_like(constraint_coef)
            combo = R.Combination(retain_coef, constraint_coef, a_t.expand(gram.gr.shape), shortfall.to(acc))
            prod = F.direction_products(gram, combo.retain_coef, combo.constraint_coef)
            grams.append(gram)
            combos.append(combo)
            products = prod if products is None else products + prod
            total = gram if total is None else total + gram
        assert products is not None and total is not None
        scale, norm = _clip(grams, combos, products, self.max_grad_norm)
        single_axpy = self.rule.unit_retain and self.max_grad_norm is None and amp is None
        coefficients = [
            (
                combo.retain_coef * scale * unscale[-1],
                combo.constraint_coef * scale * (unscale[0] if unscale.numel() == 2 else unscale[:-1]),
                single_axpy,
            )
            for combo in combos
        ]
        return _Solution(grams, combos, products, total, scale, norm, coefficients)

    @staticmethod
    def _summary(
        solution: _Solution,
        measured: Tensor,
        at_theta: Tensor,
        g: Tensor,
        overflow: Tensor,
        grad_scale: Tensor,
    ) -> Tensor:
        """Everything the host needs, as one vector (read with one sync)."""
        s = solution
        acc = s.total.rr.dtype
        lams = torch.stack([c.constraint_coef for c in s.combos])  # [B] or [B, m]
        if len(s.combos) == 1:
            lam = lams[0]
        else:
            sq = torch.stack([gr.constraint_sq_norms() for gr in s.grams])
            positive = s.total.constraint_sq_norms() > 0
            weighted = (lams * sq).sum(0) / torch.where(positive, s.total.constraint_sq_norms(), 1.0)
            lam = torch.where(positive, weighted, lams.mean(0))
        a_t = torch.stack([c.a_t for c in s.combos]).sum(0)
        shortfall = torch.stack([c.shortfall for c in s.combos]).sum(0)
        gg_rows = s.total.constraint_sq_norms()
        pooled_gg = s.total.gg.sum()
        pooled_gr = s.total.gr.sum()
        dot_f = s.products.dot_constraint
        update_sq = s.products.sq_norm * s.scale**2
        coefficient_rows = torch.cat(
            [
                torch.stack([c.constraint_coef.reshape(-1) for c in s.combos]).reshape(-1),
                torch.stack([c.retain_coef for c in s.combos]),
            ]
        )
        in_range = torch.stack([F.gram_in_range(gr) for gr in s.grams]).to(acc)
        row_sq = torch.cat([gg_rows.reshape(-1), s.total.rr.reshape(1)])
        dot_rows = torch.cat([dot_f.reshape(-1), s.products.dot_retain.reshape(1)])
        scalars = [
            g.sum(),
            lam.sum(),
            a_t.sum(),
            pooled_gr,
            s.total.rr,
            pooled_gg,
            update_sq,
            F.safe_cosine(s.products.dot_retain, s.products.sq_norm, s.total.rr),
            F.safe_cosine(dot_f.sum(), s.products.sq_norm, pooled_gg),
            s.scale,
            grad_scale,
        ]
        vectors = [
            measured,
            overflow,
            lams.sum(-1) if lams.dim() == 2 else lams,
            lam.reshape(-1),
            g.reshape(-1),
            a_t.reshape(-1),
            gg_rows.reshape(-1),
            s.total.gr.reshape(-1),
            F.safe_cosine(dot_f, s.products.sq_norm, gg_rows).reshape(-1),
            shortfall.reshape(-1),
            coefficient_rows,
            at_theta,
            F.safe_cosine(dot_rows, s.products.sq_norm, row_sq),
        ]
        wide = [t.double() for t in (*scalars, *vectors)]
        return torch.cat(
            [
                torch.stack(wide[: len(scalars)]),
                *wide[len(scalars) :],
                s.norm.reshape(1),
                in_range.double(),
                torch.ones(1, dtype=torch.float64, device=s.norm.device),
            ]
        )

    def _stats(
        self,
        task: _Task,
        losses: list[list[Tensor]],
        host: list[float],
        solution: _Solution,
        amp: _LossScaling | None,
        inner: bool,
        acc: torch.dtype,
    ) -> tuple[StepStats, list[tuple[Tensor, Tensor, bool]]]:
        """Parse the synced vector, validate it (closures, then the rule's output), build the stats."""
        blocks = len(solution.combos)
        m = solution.total.m
        rows = task.rows
        n_measured = sum(len(x) for x in losses) + (task.retain is not None)
        n_overflow = len(amp.inner_overflow) if amp is not None else 0
        (g_sum, lam_sum, a_sum, gr_sum, rr, gg_sum, update_sq, cos_r, cos_f, scale, grad_scale), rest = (
            host[:11],
            host[11:],
        )
        cursor = 0

        def take(n: int) -> list[float]:
            nonlocal cursor
            out = rest[cursor : cursor + n]
            cursor += n
            return out

        measured, overflow = take(n_measured), take(n_overflow)
        group_lams, lams, g_values, a_ts = take(blocks), take(m), take(m), take(m)
        gg_rows, gr_rows, cos_forgets, shortfalls = take(m), take(m), take(m), take(m)
        coefficient_rows, at_theta = take(blocks * m + blocks), take(len(losses) + (task.retain is not None))
        cos_rows = take(rows)
        (norm,) = take(1)
        # per-constraint losses, and the inner-loop overflow flags (K - 1 per constraint)
        per_constraint, i = [], 0
        for x in losses:
            per_constraint.append(measured[i : i + len(x)])
            i += len(x)
        retain_loss = measured[-1] if task.retain is not None else math.nan
        flags = [f > 0 for f in overflow]
        per = len(flags) // len(losses)
        per_flags = [flags[j * per : (j + 1) * per] for j in range(len(losses))]
        row_sq = [*gg_rows, rr]
        skipped = _check_finite(task, per_constraint, per_flags, retain_loss, row_sq, amp is not None)
        if not skipped:
            _check_update(self.rule.name, coefficient_rows, scale, norm, acc, self.max_grad_norm)
        if blocks == 1:
            weights = [c * scale for c in [*coefficient_rows[:m], coefficient_rows[m]]]
        else:
            weights = [math.nan] * rows
        constrained = task.retain is not None
        inner_losses = _inner_sums(per_constraint) if constrained else ()
        nan = math.nan
        stats = StepStats(
            retain_loss=retain_loss,
            forget_loss=sum(at_theta[:m]) if constrained else nan,
            inner_forget_loss=sum(x[-1] for x in per_constraint) if constrained else nan,
            g_value=g_sum if constrained else nan,
            lam=lam_sum if constrained else nan,
            a_t=a_sum if constrained else nan,
            grad_dot=gr_sum if constrained else nan,
            retain_grad_norm=math.sqrt(rr) if constrained else nan,
            forget_grad_norm=math.sqrt(gg_sum) if constrained and gg_sum >= 0 else nan,
            update_norm=math.sqrt(update_sq) if math.isfinite(update_sq) else norm,
            cos_update_retain=cos_r if constrained else nan,
            cos_update_forget=cos_f if constrained else nan,
            clip_scale=scale,
            inner_losses=tuple(inner_losses),
            group_lams=tuple(group_lams) if constrained else (),
            skipped=skipped,
            grad_scale=grad_scale,
            constraint_names=task.names if constrained else (),
            lams=tuple(lams) if constrained else (),
            g_values=tuple(g_values) if constrained else (),
            forget_losses=tuple(x[0] for x in per_constraint) if constrained else (),
            inner_forget_losses=tuple(x[-1] for x in per_constraint) if constrained else (),
            a_ts=tuple(a_ts) if constrained else (),
            forget_grad_norms=tuple(math.sqrt(max(v, 0.0)) for v in gg_rows) if constrained else (),
            grad_dots=tuple(gr_rows) if constrained else (),
            cos_update_forgets=tuple(cos_forgets) if constrained else (),
            shortfalls=tuple(shortfalls) if constrained else (),
            infeasible=constrained and any(v > 0 for v in shortfalls),
            objective_losses=tuple(at_theta),
            weights=tuple(weights),
            cos_update_objectives=tuple(cos_rows),
        )
        return stats, solution.coefficients

    def _blocks(self, layout: FlatLayout, dtype: torch.dtype | None = None) -> list[tuple[int, Tensor]]:
        """Projection blocks as (group index for hyperparameters, k×k Gram accumulated in ``dtype``).

        Global: one block over every bucket. Per group: one block per param group. Gram matrices of
        sharded buckets are partial sums; they are all-reduced over the shard groups here.
        """
        spec = self._spec(layout)
        grams = [[F.gram_rows(rows, dtype) for _, rows in parts] for _, parts in spec]
        if layout.sharded:
            _sum_over_shards(grams, [[b.shard_groups for b, _ in parts] for _, parts in spec])
        out = []
        for (gi, _), partial in zip(spec, grams, strict=True):
            acc = torch.float64 if any(g.dtype == torch.float64 for g in partial) else torch.float32
            device = partial[0].device
            total = sum((g.to(device=device, dtype=acc) for g in partial[1:]), partial[0].to(acc))
            out.append((gi, total))
        return out

    def _blocks_slices(self, layout: FlatLayout) -> list[list[Tensor]]:
        return [[rows for _, rows in parts] for _, parts in self._spec(layout)]

    def _spec(self, layout: FlatLayout) -> list[tuple[int, list[tuple[Bucket, Tensor]]]]:
        if self.projection == "global":
            return [(0, [(b, b.rows) for b in layout.buckets])]
        per_group: dict[int, list[tuple[Bucket, Tensor]]] = {}
        for b in layout.buckets:
            for gs in b.groups:
                per_group.setdefault(gs.group, []).append((b, b.rows[:, gs.start : gs.end]))
        return sorted(per_group.items())


class _Solution(NamedTuple):
    grams: list[F.Gram]
    combos: list[R.Combination]
    products: F.DirectionProducts
    total: F.Gram
    scale: Tensor
    norm: Tensor  # ‖δ‖ after clipping, computed without overflow (fp64)
    coefficients: list[tuple[Tensor, Tensor, bool]]


def _clip(
    grams: list[F.Gram], combos: list[R.Combination], products: F.DirectionProducts, max_norm: float | None
) -> tuple[Tensor, Tensor]:
    """The clip scale min(1, max_norm/‖δ‖) and ‖δ‖ after clipping.

    The Gram-based ‖δ‖² of :func:`~constrained_opt.functional.clip_scale` is used whenever it is finite
    (bit for bit the two-objective arithmetic). ‖δ‖ is also computed in fp64 with the coefficients
    scaled by their largest magnitude, ‖δ_b‖ = s·√(ĉᵀGĉ), which cannot overflow for finite fp32 inputs:
    a huge λ is still clipped, and an update whose square overflows is reported, not applied.
    """
    scale = F.clip_scale(products, max_norm)
    sq = torch.zeros((), dtype=torch.float64, device=scale.device)
    for gram, combo in zip(grams, combos, strict=True):
        c = torch.cat([combo.constraint_coef.reshape(-1), combo.retain_coef.reshape(1)]).double()
        s = c.abs().amax()
        s = torch.where(s > 0, s, torch.ones_like(s))
        c_hat = c / s
        q = torch.clamp_min(c_hat @ gram.matrix().double() @ c_hat, 0.0)
        sq = sq + (s * s) * q
    norm = torch.sqrt(sq)
    if max_norm is not None:
        safe = torch.clamp_max(max_norm / torch.clamp_min(norm, torch.finfo(torch.float64).tiny), 1.0)
        scale = torch.where(torch.isfinite(products.sq_norm), scale, safe.to(scale.dtype))
        norm = norm * torch.where(torch.isfinite(products.sq_norm), scale.double(), safe)
    return scale, norm


def _apply(blocks: list[list[Tensor]], coefficients: list[tuple[Tensor, Tensor, bool]], retain: int) -> None:
    """δ = c_r·r + Σ_i c_f,i·f_i into the retain row of each block, in place."""
    for slices, (c_r, c_f, single_axpy) in zip(blocks, coefficients, strict=True):
        for rows in slices:
            target = rows[retain]
            if not single_axpy:
                target.mul_(c_r.to(rows.device))
            if c_f.dim() == 0:
                target.addcmul_(rows[CONSTRAINT_ROW], c_f.to(rows.device))
            elif rows.dtype == c_f.dtype:
                target.addmv_(rows[:retain].T, c_f.to(rows.device))  # one pass over the constraint rows
            else:
                for i in range(retain):
                    target.addcmul_(rows[i], c_f[i].to(rows.device))


def _set_grads(params: list[Tensor], grads: list[Tensor | None]) -> None:
    for p, g in zip(params, grads, strict=True):
        p.grad = g


class _HeldInterrupt:
    """Hold SIGINT (Ctrl-C) for the duration of the block and deliver it afterwards, so a state change
    is never left half done. Only on the main thread (where Python delivers signals), and only when the
    current handler was installed from Python (it can be put back)."""

    def __enter__(self) -> _HeldInterrupt:
        self.pending = False
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGINT)
            if previous is not None:
                self.previous = signal.signal(signal.SIGINT, self._hold)
        return self

    def _hold(self, signum: int, frame: Any) -> None:
        self.pending = True

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            if self.pending:
                signal.raise_signal(signal.SIGINT)  # delivered to the handler that was in place


def _as_tensor(value: float | Tensor, dtype: torch.dtype, device: torch.device) -> float | Tensor:
    return value if isinstance(value, float | int) else value.to(dtype=dtype, device=device)


def _inner_sums(per_constraint: list[list[float]]) -> list[float]:
    """L_f(φ^0 … φ^K), summed over the constraints when there are several."""
    if len(per_constraint) == 1:
        return list(per_constraint[0])
    length = min(len(x) for x in per_constraint)
    return [sum(x[k] for x in per_constraint) for k in range(length)]


def _per_constraint(name: str, value: Any, names: tuple[str, ...]) -> float | Tensor:
    """A hyperparameter for this step's constraints: a number for one constraint, else a [m] tensor."""
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(names))
        missing = [n for n in names if n not in value]
        if unknown or missing:
            raise ValueError(
                f"{name} is given per constraint name, but this step's constraints are {list(names)}: "
                + (f"no value for {missing}" if missing else "")
                + ("; " if missing and unknown else "")
                + (f"unknown names {unknown}" if unknown else "")
            )
        values = [float(value[n]) for n in names]
    elif isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != len(names):
            raise ValueError(
                f"{name} has {len(value)} values but this step has {len(names)} constraints {list(names)}"
            )
        values = [float(v) for v in value]
    else:
        return value if len(names) <= 1 else torch.tensor([float(value)] * len(names), dtype=torch.float64)
    return values[0] if len(names) == 1 else torch.tensor(values, dtype=torch.float64)


class _LossScaling:
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


def _parts(closure: Closure) -> tuple[Closure, ...]:
    return closure.parts if isinstance(closure, MicroBatches) else (closure,)


def _check_no_accelerate_accumulation() -> None:
    """Refuse accelerate's gradient accumulation, which would drop closures silently: under
    ``accelerator.accumulate`` its ``AcceleratedOptimizer`` skips ``step`` on all but every N-th call, and a
    skipped call's closures are never run. (Reads accelerate's state only if accelerate is imported.)"""
    state = sys.modules.get("accelerate.state")
    shared = getattr(getattr(state, "GradientState", None), "_shared_state", None) or {}
    steps = (shared.get("plugin_kwargs") or {}).get("num_steps", 1)
    if steps > 1:
        raise ValueError(
            f"accelerate's gradient_accumulation_steps is {steps}: its AcceleratedOptimizer would skip "
            f"this optimizer's step on {steps - 1} of every {steps} calls and drop their closures. Build the "
            "Accelerator with gradient_accumulation_steps=1 and accumulate inside the step instead: pass "
            "each closure as MicroBatches([micro-batch closures])"
        )


def _sum_over_shards(grams: list[list[Tensor]], shard_groups: list[list[list[Any]]]) -> None:
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


def _check_finite(
    task: _Task,
    losses: list[list[float]],
    inner_overflow: list[list[bool]],
    retain_loss: float,
    row_sq: list[float],
    scaled: bool,
) -> bool:
    """Check every measured quantity in the order it was computed, so the root cause is reported
    (a NaN gradient at θ would otherwise surface as a NaN loss at φ^1).

    A non-finite gradient under a GradScaler is an overflow of the scaled backward: the step is
    skipped (returns True). Anything else non-finite raises :class:`ClosureError`.
    """
    checks: list[tuple[bool, bool, str]] = []
    for label, measured, flags, sq in zip(task.labels, losses, inner_overflow, row_sq, strict=False):
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
    if task.retain is not None:
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


def _check_update(
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


def _reaches(root: Any, param_ids: frozenset[int]) -> bool:
    """Whether the autograd graph under ``root`` accumulates into any of ``param_ids``.

    Depth-first, so in a typical network the last layer's parameters are found within a few nodes.
    """
    stack, seen = [root], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) in param_ids:
            return True
        stack.extend(fn for fn, _ in node.next_functions)
    return False


def _check_unique(params: list[Tensor]) -> None:
    ids = [id(p) for p in params]
    if len(set(ids)) != len(ids):
        dup = next(p for i, p in enumerate(params) if ids.index(id(p)) != i)
        raise ValueError(
            f"a parameter of shape {tuple(dup.shape)} appears more than once in a param group; its gradient "
            "would be counted twice in every inner product: pass each parameter once"
        )


def _check_hyperparameter(name: str, value: object) -> None:
    """A number ≥ 0, or a sequence / name → number mapping of them (one per constraint)."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"{name} maps constraint names to values; got the key {k!r}")
            _check_nonneg(f"{name}[{k!r}]", v)
    elif isinstance(value, Sequence) and not isinstance(value, str):
        if not value:
            raise ValueError(f"{name} is an empty sequence")
        for i, v in enumerate(value):
            _check_nonneg(f"{name}[{i}]", v)
    else:
        _check_nonneg(name, value)


def _check_nonneg(name: str, value: object) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (value >= 0 and math.isfinite(value))
    ):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
