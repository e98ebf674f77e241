"""ValueFunctionBilevelOptimizer: EraseDiff's Algorithm 1 as a torch.optim optimizer, for m constraints.

Solves  min_θ L_r(θ)  s.t.  g_i(θ) = L_f,i(θ) − min_φ L_f,i(φ) ≤ 0  (i = 1..m)  one step at a time:

1. For each constraint: φ⁰ = θ_t; K plain gradient steps φ^{k+1} = φ^k − ξ∇L_f,i(φ^k) (never through the
   base optimizer).
2. g_i(θ_t) = L_f,i(θ_t) − L_f,i(φ^K), with φ^K held constant so ∇g_i(θ_t) = ∇L_f,i(θ_t): the gradient of
   the first inner step, reused.
3. ∇L_r(θ_t).
4. δ = c_r∇L_r + Σ_i c_f,i∇g_i from the rule (for the KKT rules c_r = 1 and c_f = λ, the solution of the
   projection; Theorem 3.1 for m = 1), written into ``.grad``; then the base optimizer steps.

The class orchestrates; each stage is one module: :mod:`.problem` (the call forms), :mod:`.gradients`
(the inner loops), :mod:`.projection` (Gram, rule, clip, δ), :mod:`.stats` (the one host sync),
:mod:`.transaction` (all or nothing), :mod:`.amp`, :mod:`.distributed` and :mod:`.validation`; the
math is in :mod:`.functional` and :mod:`.rules`, the buffers in :mod:`._flat` (docs/architecture.md).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import Tensor

from . import amp
from . import rules as R
from ._flat import FlatLayout
from .distributed import reduction_group
from .errors import ClosureError, SettingError, UpdateError
from .gradients import loss_values, take_gradients
from .problem import Closure, Closures, MicroBatches, StepState, Task, parse_step_arguments
from .projection import ProjectionPlan, Solution, apply, solve
from .stats import StepStats, build_stats, read
from .transaction import StepTransaction
from .validation import (
    Hyperparameter,
    check_adversaries,
    check_settings,
    check_task,
    check_unique,
    rule_hyperparameters,
    step_hyperparameters,
)

__all__ = [  # the names this module has always exported
    "Closure",
    "ClosureError",
    "Closures",
    "Hyperparameter",
    "MicroBatches",
    "StepStats",
    "Task",
    "UpdateError",
    "ValueFunctionBilevelOptimizer",
    "parse_step_arguments",
]

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
        check_settings(inner_steps, inner_lr, projection, max_grad_norm, grad_scaler, process_group)
        self.rule = R.resolve(rule)
        hyper = rule_hyperparameters(
            self.rule, {"eta": eta, "alpha": alpha, "beta": beta, "forget_weight": forget_weight}
        )
        self.inner_steps = inner_steps
        self.projection = projection
        self.max_grad_norm = max_grad_norm
        self.grad_scaler = grad_scaler
        amp.prime(grad_scaler)
        self.process_group = process_group
        self._steps = 0
        self._layout: FlatLayout | None = None
        self._plan: ProjectionPlan | None = None
        self._layout_key: tuple | None = None
        own_defaults = {"inner_lr": inner_lr, **{k: _copied(v) for k, v in hyper.items()}}

        if isinstance(base_optimizer, torch.optim.Optimizer):
            if params is not None:
                raise SettingError("pass params or an optimizer instance as base_optimizer, not both")
            if base_kwargs:
                raise SettingError(
                    f"{sorted(base_kwargs)} cannot be applied to an existing optimizer instance; "
                    "set them when building it"
                )
            for group in base_optimizer.param_groups:
                check_unique(group["params"])
            super().__init__(base_optimizer.param_groups, own_defaults)  # fills our keys in place
            self.base_optimizer = base_optimizer
        else:
            if params is None:
                raise SettingError("params is required when base_optimizer is a class or factory")
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
        listed = [params] if isinstance(params, Tensor) else list(params)
        check_unique(listed)
        if not isinstance(params, Tensor | set | list):  # a generator is spent by list(): keep the list
            param_group["params"] = listed
        for k in ("inner_lr", *self.rule.hyperparameters):  # each group its own per-constraint list
            param_group[k] = _copied(param_group.get(k, self.defaults[k]))
        if not hasattr(self, "base_optimizer"):  # called from torch.optim.Optimizer.__init__
            super().add_param_group(param_group)
            return
        self.base_optimizer.add_param_group(param_group)

    def __getstate__(self) -> dict[str, Any]:
        """Everything but the flat buffers (rebuilt on the next step), so ``pickle`` and
        ``copy.deepcopy`` give a working optimizer with the same base optimizer, rule and state."""
        state = dict(self.__dict__)
        state["_layout"] = state["_plan"] = state["_layout_key"] = None
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
        self._layout = self._plan = None

    @property
    def steps_taken(self) -> int:
        """Successful steps so far (a step a GradScaler skips is not counted); checkpointed as
        ``state_dict()["bilevel"]["steps"]``."""
        return self._steps

    # ------------------------------------------------------------------ the step
    # GradScaler.step and accelerate's AcceleratedOptimizer may call step: see :mod:`.amp`.
    _step_supports_amp_scaling = True
    last_stats: StepStats | None = None

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
        for m objectives under a multi-objective rule (:func:`~.problem.parse_step_arguments`).
        ``grad_scaler`` is passed by ``GradScaler.step`` (:func:`.amp.scaler_of_this_step`). The stats are
        also kept in ``last_stats`` (accelerate's ``AcceleratedOptimizer.step`` does not return them).
        """
        scaler, caller_updates = amp.scaler_of_this_step(self, self.grad_scaler, grad_scaler)
        task = parse_step_arguments(retain_closure, forget_closure)  # 1. the closures
        check_task(task, self.rule)
        hyper = step_hyperparameters(self.param_groups, self.rule, self.projection, task)
        layout, plan = self._current_layout(task.rows)  # 2. the buffers
        scaling = amp.LossScaling.of(scaler, layout)
        group = reduction_group(self.process_group, layout)
        check_adversaries(task, layout, scaling is not None, group)
        state = StepState(task, layout, hyper, scaling, group, inner_ran=self._runs_inner_loop(task))
        with StepTransaction(layout) as tx:
            inner_lrs = [float(g["inner_lr"]) for g in self.param_groups]
            take_gradients(state, tx, self.inner_steps, inner_lrs)  # 3. the rows, inner loops included
            solution, host = self._project(state, plan)  # 4. projection, 5. the one host sync
            stats = build_stats(state, host, self.rule.name, self.max_grad_norm, plan.dtype)  # 6.
            if not stats.skipped:
                apply(plan, solution.coefficients)  # 7. δ into the retain row

            def finish() -> None:
                if scaling is not None:
                    scaling.update(self, stats.skipped, caller_updates)
                if not stats.skipped:
                    self._steps += 1

            tx.commit(None if stats.skipped else self.base_optimizer.step, finish)  # 8. the base step
        self.last_stats = stats
        return stats

    @torch.no_grad()
    def _project(self, state: StepState, plan: ProjectionPlan) -> tuple[Solution, dict[str, list[float]]]:
        """The projection (sync-free) and the host values it is read into. An fp32 Gram out of range (an
        overflowed square of a finite gradient, or a squared norm below ~1e-31), or one whose solve
        reports a shortfall (rows within fp32's dependence threshold, sin θ ≤ ε^¼ ≈ 1.07°, solve as
        dependent), is formed again in fp64 after the sync, on that step only (one more pass and sync)."""
        values = loss_values(state, plan.device, plan.dtype)
        args = (state.hyper, self.rule, self.max_grad_norm, state.scaling)
        solution = solve(plan, values.g, values.unscale, *args)
        host = read(solution, values)
        ill_conditioned = plan.dtype != torch.float64 and any(v > 0 for v in host["shortfall"])
        if ill_conditioned or not all(v > 0 for v in host["gram_in_range"]):
            solution = solve(plan, values.g.double(), values.unscale.double(), *args, torch.float64)
            host = read(solution, values)
        return solution, host

    def _runs_inner_loop(self, task: Task) -> bool:
        """The inner loops run for one constraint with K > 0; with several, only under rules that read g
        (under the others they would change nothing but the reported g)."""
        return task.constrained and self.inner_steps > 0 and (len(task.closures) == 1 or self.rule.uses_g)

    def _current_layout(self, rows: int = 2) -> tuple[FlatLayout, ProjectionPlan]:
        """The flat buffers and projection plan, rebuilt when the trainable set or the row count changes."""
        key = FlatLayout.key(self.param_groups, rows)
        if self._layout is None or self._plan is None or key != self._layout_key:
            self._layout = self._plan = None  # free the old buffer before allocating the new one
            self._layout = FlatLayout(self.param_groups, rows)
            self._plan = ProjectionPlan(self._layout, self.projection)
            self._layout_key = key
        return self._layout, self._plan


def _copied(value: Any) -> Any:
    """A per-constraint list or mapping copied (each param group and ``defaults`` own theirs, as after
    a checkpoint round trip); numbers as they are."""
    return copy.copy(value) if isinstance(value, list | dict) else value
