"""ValueFunctionBilevelOptimizer: EraseDiff's Algorithm 1 as a torch.optim optimizer.

Solves  min_θ L_r(θ)  s.t.  g(θ) = L_f(θ) − min_φ L_f(φ) ≤ 0  one step at a time:

1. φ⁰ = θ_t; K plain gradient steps φ^{k+1} = φ^k − ξ∇L_f(φ^k) (never through the base optimizer).
2. g(θ_t) = L_f(θ_t) − L_f(φ^K), with φ^K held constant so ∇g(θ_t) = ∇L_f(θ_t): the gradient of the
   first inner step, reused.
3. ∇L_r(θ_t).
4. δ = c_r∇L_r + c_f∇g from the rule (for the KKT rules c_r = 1, c_f = λ_t of Theorem 3.1), written
   into ``.grad``; then the base optimizer steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor
from torch.amp.grad_scaler import OptState

from . import functional as F
from . import rules as R
from ._flat import CONSTRAINT_ROW, RETAIN_ROW, Bucket, FlatLayout

Closure = Callable[[], Tensor]


class ClosureError(ValueError):
    """A closure returned something the optimizer cannot differentiate or trust."""


@dataclass(frozen=True)
class StepStats:
    """What one step measured. Gradient quantities are over all trainable parameters.

    ``a_t`` is NaN for rules that set λ directly (cosine, scalarized, pcgrad, mgda). ``lam`` is the
    coefficient of ∇g in δ before clipping (for ``projection="per_group"``, the ‖∇g_G‖²-weighted
    mean of ``group_lams``). Losses are averages over the data-parallel ranks when distributed.

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

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


_BaseFactory = Callable[..., torch.optim.Optimizer]


class ValueFunctionBilevelOptimizer(torch.optim.Optimizer):
    r"""Constrained two-objective optimizer wrapping any torch.optim optimizer.

    Args:
        params: parameters or param groups (omit when ``base_optimizer`` is an instance).
        base_optimizer: an optimizer class/factory called as ``base_optimizer(param_groups, **kwargs)``,
            or an already-built optimizer whose ``param_groups`` are adopted. ``param_groups`` are
            shared with it, so LR schedulers work on either object.
        inner_steps: K ≥ 0 inner gradient steps on the forget loss. K = 0 skips the inner loop (g = 0).
        inner_lr: ξ, the inner step size (per group).
        rule: ``"grad_norm"`` (paper default), ``"value"``, ``"barrier"``, ``"cosine"``,
            ``"scalarized"``, ``"pcgrad"``, ``"mgda"``, a :class:`~constrained_opt.rules.Rule`, or a
            callable ``geometry -> a_t``.
        projection: ``"global"`` (one λ over all parameters, as in the paper) or ``"per_group"``
            (each param group solves its own KKT problem with its own hyperparameters).
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
            uses may be given.
        **base_kwargs: forwarded to ``base_optimizer`` (``lr``, ``betas``, ``weight_decay``, ...).

    ``step(retain_closure, forget_closure)`` performs one device→host sync, after all the math and
    before the base step: it validates the losses and gradients and returns :class:`StepStats` as
    floats. The projection itself is sync-free, and so are the collectives (one all-reduce of the
    loss values per step when distributed, plus one of the Gram for sharded parameters). After a
    successful or skipped step ``p.grad`` is ``None``; on any failure (bad closure, non-finite value
    without a scaler, exception, KeyboardInterrupt) θ, the base optimizer's state and every ``p.grad``
    are left exactly as they were.
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
        eta: float | None = None,
        alpha: float | None = None,
        beta: float | None = None,
        forget_weight: float | None = None,
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
            _check_nonneg(k, v)
        self.inner_steps = inner_steps
        self.projection = projection
        self.max_grad_norm = max_grad_norm
        self.grad_scaler = grad_scaler
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
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not hasattr(self, "base_optimizer"):  # called from torch.optim.Optimizer.__init__
            super().add_param_group(param_group)
            return
        for k in ("inner_lr", *self.rule.hyperparameters):
            param_group.setdefault(k, self.defaults[k])
        self.base_optimizer.add_param_group(param_group)

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

    # ------------------------------------------------------------------ the step
    def step(self, retain_closure: Closure, forget_closure: Closure) -> StepStats:  # type: ignore[override]
        """One step of Algorithm 1; see the class docstring for the cost and the guarantees."""
        for name, fn in (("retain_closure", retain_closure), ("forget_closure", forget_closure)):
            if not callable(fn):
                raise TypeError(
                    f"{name} must be a callable returning the scalar loss, got {type(fn).__name__}"
                )
        self._check_groups()
        layout = self._current_layout()
        group = self._reduction_group(layout)
        saved_grads = [p.grad for p in layout.params]
        theta_moved = False
        try:
            amp = self._loss_scaling(layout)
            losses = [
                self._backward(
                    layout, CONSTRAINT_ROW, forget_closure, "forget_closure", 0, amp, self.inner_steps > 0
                )
            ]
            if self.inner_steps > 0:
                inner_lrs = [float(g["inner_lr"]) for g in self.param_groups]
                with torch.no_grad():
                    for b in layout.buckets:
                        b.save_theta()
                theta_moved = True
                for k in range(1, self.inner_steps + 1):
                    row = CONSTRAINT_ROW if k == 1 else None
                    with torch.no_grad():
                        for b in layout.buckets:
                            b.descend(row, inner_lrs)
                            if row is None:
                                b.detach_grads()  # free φ^{k-1}'s gradient before the next pass
                    if k < self.inner_steps:
                        losses.append(
                            self._backward(layout, None, forget_closure, "forget_closure", k, amp, True)
                        )
                with torch.no_grad():
                    losses.append(self._evaluate(forget_closure, self.inner_steps))
                    for b in layout.buckets:
                        b.restore_theta()
                theta_moved = False
            retain_loss = self._backward(
                layout, RETAIN_ROW, retain_closure, "retain_closure", None, amp, False
            )
            with torch.no_grad():
                stats = self._project(layout, losses, retain_loss, amp, group)
            if not stats.skipped:
                for b in layout.buckets:
                    for p, g in zip(b.params, b.grads[RETAIN_ROW], strict=True):
                        p.grad = g
                self.base_optimizer.step()
        except BaseException:
            if theta_moved:
                with torch.no_grad():
                    for b in layout.buckets:
                        b.restore_theta()
            for p, g in zip(layout.params, saved_grads, strict=True):
                p.grad = g
            raise
        for b in layout.buckets:
            b.detach_grads()
        if amp is not None:
            amp.update(self, stats.skipped)
        if not stats.skipped:
            self._steps += 1
        return stats

    # ------------------------------------------------------------------ internals
    def _check_groups(self) -> None:
        for i, group in enumerate(self.param_groups):
            _check_nonneg(f"param_groups[{i}]['inner_lr']", group["inner_lr"])
            for k in self.rule.hyperparameters:
                _check_nonneg(f"param_groups[{i}][{k!r}]", group[k])
        if self.projection == "global" and len(self.param_groups) > 1:
            for k in self.rule.hyperparameters:
                values = {float(g[k]) for g in self.param_groups}
                if len(values) > 1:
                    raise ValueError(
                        f"{k} differs across param groups ({sorted(values)}) but projection='global' uses "
                        "one multiplier for all parameters; pass projection='per_group' to give each "
                        "group its own KKT problem, or use one value"
                    )

    def _current_layout(self) -> FlatLayout:
        key = FlatLayout.key(self.param_groups)
        if self._layout is None or key != self._layout_key:
            self._layout = FlatLayout(self.param_groups)
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

    def _loss_scaling(self, layout: FlatLayout) -> _LossScaling | None:
        scaler = self.grad_scaler
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
        target = loss if amp is None else amp.scaled(loss)
        torch.autograd.backward(target, inputs=None if layout.sharded else layout.params)
        if row is not None:
            for b in layout.buckets:
                b.adopt(row)
        if amp is not None and unscale:
            overflow = amp.unscale(layout, row)
            if k:
                amp.inner_overflow.append(overflow)
        return loss.detach()

    def _evaluate(self, closure: Closure, k: int) -> Tensor:
        return self._checked(closure(), "forget_closure", f"at inner step φ^{k}").detach()

    def _project(
        self,
        layout: FlatLayout,
        losses: list[Tensor],
        retain_loss: Tensor,
        amp: _LossScaling | None,
        group: Any,
    ) -> StepStats:
        """Gram → rule → (clip) → δ into the retain row; one host sync for validation and stats.

        Under data parallelism the loss values (and overflow flags) are averaged over ``group`` with
        one all-reduce; the gradients already are (DDP/FSDP average them during backward).
        """
        blocks = self._blocks(layout)
        device = blocks[0][1].device
        acc = blocks[0][1].dtype
        measured = torch.stack([*losses, retain_loss]).to(device=device, dtype=acc)
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
        forget_losses, retain_loss = measured[:-1], measured[-1]
        g_value = (
            forget_losses[0] - forget_losses[-1]
            if self.inner_steps > 0
            else torch.zeros((), dtype=acc, device=device)
        )
        # Rows still multiplied by the loss scale s: fold 1/s into the Gram (1/s² per product) and
        # into δ's coefficients instead of unscaling the vectors.
        unscale = (
            torch.ones(2, dtype=acc, device=device)
            if amp is None
            else amp.row_factors(self.inner_steps > 0).to(device=device, dtype=acc)
        )
        grams = [
            F.gram_from_matrix(m.to(device=device, dtype=acc) * torch.outer(unscale, unscale))
            for _, m, _ in blocks
        ]
        combos, products, total = [], None, None
        for (group_index, _, _), gram in zip(blocks, grams, strict=True):
            hyper = {k: float(self.param_groups[group_index][k]) for k in self.rule.hyperparameters}
            combo = self.rule(R.Geometry(gram.gg, gram.rr, gram.gr, g_value), **hyper)
            combo = R.Combination(*(torch.as_tensor(c, dtype=acc, device=device) for c in combo))
            prod = F.direction_products(gram, combo.retain_coef, combo.constraint_coef)
            combos.append(combo)
            products = prod if products is None else products + prod
            total = gram if total is None else total + gram
        assert products is not None and total is not None
        scale = F.clip_scale(products, self.max_grad_norm)
        single_axpy = self.rule.unit_retain and self.max_grad_norm is None and amp is None
        for (_, _, slices), combo in zip(blocks, combos, strict=True):
            c_r = combo.retain_coef * scale * unscale[RETAIN_ROW]
            c_f = combo.constraint_coef * scale * unscale[CONSTRAINT_ROW]
            for rows in slices:
                c_f_local = c_f.to(rows.device)
                if single_axpy:
                    rows[RETAIN_ROW].addcmul_(rows[CONSTRAINT_ROW], c_f_local)
                else:
                    rows[RETAIN_ROW].mul_(c_r.to(rows.device)).addcmul_(rows[CONSTRAINT_ROW], c_f_local)
        lams = torch.stack([c.constraint_coef for c in combos])
        if len(combos) == 1:
            lam = lams[0]
        else:
            grams_gg = torch.stack([g.gg for g in grams])
            positive = total.gg > 0
            weighted = (lams * grams_gg).sum() / torch.where(positive, total.gg, 1.0)
            lam = torch.where(positive, weighted, lams.mean())
        a_t = torch.stack([c.a_t for c in combos]).sum()
        update_sq = products.sq_norm * scale**2
        grad_scale = (
            torch.ones((), dtype=acc, device=device)
            if amp is None
            else amp.scale.to(device=device, dtype=acc)
        )
        values = torch.cat(
            [
                torch.stack(
                    [
                        retain_loss,
                        g_value,
                        lam,
                        a_t,
                        total.gr,
                        total.rr,
                        total.gg,
                        update_sq,
                        F.safe_cosine(products.dot_retain, products.sq_norm, total.rr),
                        F.safe_cosine(products.dot_constraint, products.sq_norm, total.gg),
                        scale,
                        grad_scale,
                    ]
                ),
                forget_losses,
                lams,
                overflow,
            ]
        ).tolist()
        (r_loss, g_val, lam_v, a_v, gr, rr, gg, upd, cos_r, cos_f, scale_v, s_v), rest = (
            values[:12],
            values[12:],
        )
        n = len(forget_losses)
        inner_losses, group_lams, flags = rest[:n], rest[n : n + len(lams)], rest[n + len(lams) :]
        skipped = _check_finite(inner_losses, [f > 0 for f in flags], r_loss, gg, rr, amp is not None)
        return StepStats(
            retain_loss=r_loss,
            forget_loss=inner_losses[0],
            inner_forget_loss=inner_losses[-1],
            g_value=g_val,
            lam=lam_v,
            a_t=a_v,
            grad_dot=gr,
            retain_grad_norm=math.sqrt(rr),
            forget_grad_norm=math.sqrt(gg),
            update_norm=math.sqrt(upd),
            cos_update_retain=cos_r,
            cos_update_forget=cos_f,
            clip_scale=scale_v,
            inner_losses=tuple(inner_losses),
            group_lams=tuple(group_lams),
            skipped=skipped,
            grad_scale=s_v,
        )

    def _blocks(self, layout: FlatLayout) -> list[tuple[int, Tensor, list[Tensor]]]:
        """Projection blocks as (group index for hyperparameters, 2x2 Gram, (2, m) slices).

        Global: one block over every bucket. Per group: one block per param group. Gram matrices of
        sharded buckets are partial sums; they are all-reduced over the shard groups here.
        """
        if self.projection == "global":
            spec = [(0, [(b, b.rows) for b in layout.buckets])]
        else:
            per_group: dict[int, list[tuple[Bucket, Tensor]]] = {}
            for b in layout.buckets:
                for gs in b.groups:
                    per_group.setdefault(gs.group, []).append((b, b.rows[:, gs.start : gs.end]))
            spec = sorted(per_group.items())
        grams = [[F.gram_rows(rows) for _, rows in parts] for _, parts in spec]
        if layout.sharded:
            _sum_over_shards(grams, [[b.shard_groups for b, _ in parts] for _, parts in spec])
        out = []
        for (gi, parts), partial in zip(spec, grams, strict=True):
            acc = torch.float64 if any(g.dtype == torch.float64 for g in partial) else torch.float32
            device = partial[0].device
            total = sum((g.to(device=device, dtype=acc) for g in partial[1:]), partial[0].to(acc))
            out.append((gi, total, [rows for _, rows in parts]))
        return out


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

    def row_factors(self, constraint_unscaled: bool) -> Tensor:
        """[u_f, u_r]: the factor that turns each row back into a gradient."""
        one = torch.ones_like(self.inv)
        return torch.stack([one if constraint_unscaled else self.inv, self.inv])

    def update(self, optimizer: torch.optim.Optimizer, skipped: bool) -> None:
        """Record this step's overflow with the scaler and update its scale (back off on a skip)."""
        found = torch.full((), float(skipped), dtype=torch.float32, device=self.scale.device)
        # GradScaler.update() reads the per-optimizer overflow records that its own unscale_/step
        # write; this optimizer unscales itself, so it writes its record the same way.
        state = self.scaler._per_optimizer_states[id(optimizer)]
        state["found_inf_per_device"] = {found.device: found}
        state["stage"] = OptState.STEPPED
        self.scaler.update()


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
    forget_losses: list[float],
    inner_overflow: list[bool],
    retain_loss: float,
    gg: float,
    rr: float,
    scaled: bool,
) -> bool:
    """Check every measured quantity in the order it was computed, so the root cause is reported
    (a NaN gradient at θ would otherwise surface as a NaN loss at φ^1).

    A non-finite gradient under a GradScaler is an overflow of the scaled backward: the step is
    skipped (returns True). Anything else non-finite raises :class:`ClosureError`.
    """
    checks: list[tuple[bool, bool, str]] = [
        (
            math.isfinite(forget_losses[0]),
            False,
            f"forget_closure returned a non-finite loss ({forget_losses[0]}) at θ",
        ),
        (
            math.isfinite(gg),
            True,
            f"the gradient of forget_closure at θ contains NaN or inf (squared norm {gg})",
        ),
    ]
    for k, loss in enumerate(forget_losses[1:], start=1):
        checks.append(
            (
                math.isfinite(loss),
                False,
                f"forget_closure returned a non-finite loss ({loss}) at inner step φ^{k}; lower inner_lr if "
                "the inner steps diverge",
            )
        )
        if k <= len(inner_overflow):  # recorded with a scaler only, so an overflow is always a skip
            checks.append((not inner_overflow[k - 1], True, ""))
    checks.append(
        (math.isfinite(retain_loss), False, f"retain_closure returned a non-finite loss ({retain_loss})")
    )
    checks.append(
        (math.isfinite(rr), True, f"the gradient of retain_closure contains NaN or inf (squared norm {rr})")
    )
    for ok, is_gradient, message in checks:
        if not ok:
            if is_gradient and scaled:
                return True
            raise ClosureError(message + "; the step was not taken and θ is unchanged")
    return False


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


def _check_nonneg(name: str, value: object) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (value >= 0 and math.isfinite(value))
    ):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
