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
from torch import Tensor

from . import functional as F
from . import rules as R
from ._flat import CONSTRAINT_ROW, RETAIN_ROW, FlatLayout

Closure = Callable[[], Tensor]


class ClosureError(ValueError):
    """A closure returned something the optimizer cannot differentiate or trust."""


@dataclass(frozen=True)
class StepStats:
    """What one step measured. Gradient quantities are over all trainable parameters.

    ``a_t`` is NaN for rules that set λ directly (cosine, scalarized, pcgrad, mgda). ``lam`` is the
    coefficient of ∇g in δ before clipping (for ``projection="per_group"``, the ‖∇g_G‖²-weighted
    mean of ``group_lams``).
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
        eta, alpha, beta, forget_weight: the rule's hyperparameters (per group); only those the rule
            uses may be given.
        **base_kwargs: forwarded to ``base_optimizer`` (``lr``, ``betas``, ``weight_decay``, ...).

    ``step(retain_closure, forget_closure)`` performs one device→host sync, after all the math and
    before the base step: it validates the losses and gradients and returns :class:`StepStats` as
    floats. The projection itself is sync-free. After a successful step ``p.grad`` is ``None``; on
    any failure (bad closure, non-finite value, exception, KeyboardInterrupt) θ, the base optimizer's
    state and every ``p.grad`` are left exactly as they were.
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
        plus this optimizer's own counters under ``"bilevel"``."""
        sd = self.base_optimizer.state_dict()
        sd["bilevel"] = {"steps": self._steps}
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
        saved_grads = [p.grad for p in layout.params]
        theta_moved = False
        try:
            losses = [self._backward(layout, CONSTRAINT_ROW, forget_closure, "forget_closure", 0)]
            if self.inner_steps > 0:
                inner_lrs = [float(g["inner_lr"]) for g in self.param_groups]
                with torch.no_grad():
                    for b in layout.buckets:
                        b.save_theta()
                theta_moved = True
                for k in range(1, self.inner_steps + 1):
                    row = CONSTRAINT_ROW if k == 1 else RETAIN_ROW
                    with torch.no_grad():
                        for b in layout.buckets:
                            b.descend(row, inner_lrs)
                    if k < self.inner_steps:
                        losses.append(self._backward(layout, RETAIN_ROW, forget_closure, "forget_closure", k))
                with torch.no_grad():
                    losses.append(self._evaluate(forget_closure, self.inner_steps))
                    for b in layout.buckets:
                        b.restore_theta()
                theta_moved = False
            retain_loss = self._backward(layout, RETAIN_ROW, retain_closure, "retain_closure", None)
            with torch.no_grad():
                stats = self._project(layout, losses, retain_loss)
                for b in layout.buckets:
                    for p, v in zip(b.params, b.views[RETAIN_ROW], strict=True):
                        p.grad = v
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

    def _backward(self, layout: FlatLayout, row: int, closure: Closure, name: str, k: int | None) -> Tensor:
        """Zero ``row``, run the closure, differentiate it into ``row``; returns the detached loss."""
        where = "at θ" if not k else f"at inner step φ^{k}"
        for b in layout.buckets:
            b.attach(row)
        loss = self._checked(closure(), name, where)
        if loss.grad_fn is None:
            raise ClosureError(
                f"{name} returned a tensor with no autograd graph {where} (requires_grad=False); compute "
                "the loss with gradients enabled and do not detach it or call .backward() in the closure"
            )
        if not _reaches(loss.grad_fn, layout.param_ids):
            raise ClosureError(
                f"{name}'s loss {where} does not depend on any parameter this optimizer trains; check that "
                "the closure uses the model whose parameters were passed to the optimizer"
            )
        torch.autograd.backward(loss, inputs=layout.params)
        for b in layout.buckets:
            b.adopt(row)
        return loss.detach()

    def _evaluate(self, closure: Closure, k: int) -> Tensor:
        return self._checked(closure(), "forget_closure", f"at inner step φ^{k}").detach()

    def _project(self, layout: FlatLayout, losses: list[Tensor], retain_loss: Tensor) -> StepStats:
        """Gram → rule → (clip) → δ into the retain row; one host sync for validation and stats."""
        blocks = self._blocks(layout)
        device = blocks[0][1].device
        acc = blocks[0][1].dtype
        losses = [loss.to(device=device, dtype=acc) for loss in losses]
        g_value = (
            losses[0] - losses[-1] if self.inner_steps > 0 else torch.zeros((), dtype=acc, device=device)
        )
        combos, products, total = [], None, None
        for group_index, gram_matrix, _ in blocks:
            gram = F.gram_from_matrix(gram_matrix.to(device=device, dtype=acc))
            hyper = {k: float(self.param_groups[group_index][k]) for k in self.rule.hyperparameters}
            combo = self.rule(R.Geometry(gram.gg, gram.rr, gram.gr, g_value), **hyper)
            combo = R.Combination(*(torch.as_tensor(c, dtype=acc, device=device) for c in combo))
            prod = F.direction_products(gram, combo.retain_coef, combo.constraint_coef)
            combos.append(combo)
            products = prod if products is None else products + prod
            total = gram if total is None else total + gram
        assert products is not None and total is not None
        scale = F.clip_scale(products, self.max_grad_norm)
        for (_, _, slices), combo in zip(blocks, combos, strict=True):
            c_r, c_f = combo.retain_coef * scale, combo.constraint_coef * scale
            for rows in slices:
                c_f_local = c_f.to(rows.device)
                if self.rule.unit_retain and self.max_grad_norm is None:
                    rows[RETAIN_ROW].addcmul_(rows[CONSTRAINT_ROW], c_f_local)
                else:
                    rows[RETAIN_ROW].mul_(c_r.to(rows.device)).addcmul_(rows[CONSTRAINT_ROW], c_f_local)
        lams = torch.stack([c.constraint_coef for c in combos])
        grams_gg = torch.stack([F.gram_from_matrix(m.to(device=device, dtype=acc)).gg for _, m, _ in blocks])
        if len(combos) == 1:
            lam = lams[0]
        else:
            positive = total.gg > 0
            weighted = (lams * grams_gg).sum() / torch.where(positive, total.gg, 1.0)
            lam = torch.where(positive, weighted, lams.mean())
        a_t = torch.stack([c.a_t for c in combos]).sum()
        update_sq = products.sq_norm * scale**2
        values = torch.cat(
            [
                torch.stack(
                    [
                        retain_loss.to(device=device, dtype=acc),
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
                    ]
                ),
                torch.stack(losses),
                lams,
            ]
        ).tolist()
        (r_loss, g_val, lam_v, a_v, gr, rr, gg, upd, cos_r, cos_f, scale_v), rest = values[:11], values[11:]
        inner_losses, group_lams = rest[: len(losses)], rest[len(losses) :]
        _validate(inner_losses, r_loss, gg, rr)
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
        )

    def _blocks(self, layout: FlatLayout) -> list[tuple[int, Tensor, list[Tensor]]]:
        """Projection blocks as (group index for hyperparameters, 2x2 Gram, (2, m) slices).

        Global: one block over every bucket. Per group: one block per param group.
        """
        if self.projection == "global":
            grams = [F.gram_rows(b.rows) for b in layout.buckets]
            acc = torch.float64 if any(g.dtype == torch.float64 for g in grams) else torch.float32
            device = grams[0].device
            total = sum((g.to(device=device, dtype=acc) for g in grams[1:]), grams[0].to(acc))
            return [(0, total, [b.rows for b in layout.buckets])]
        per_group: dict[int, tuple[list[Tensor], list[Tensor]]] = {}
        for b in layout.buckets:
            for gs in b.groups:
                rows = b.rows[:, gs.start : gs.end]
                entry = per_group.setdefault(gs.group, ([], []))
                entry[0].append(F.gram_rows(rows))
                entry[1].append(rows)
        out = []
        for gi in sorted(per_group):
            grams, slices = per_group[gi]
            acc = torch.float64 if any(g.dtype == torch.float64 for g in grams) else torch.float32
            device = grams[0].device
            total = sum((g.to(device=device, dtype=acc) for g in grams[1:]), grams[0].to(acc))
            out.append((gi, total, slices))
        return out


def _validate(forget_losses: list[float], retain_loss: float, gg: float, rr: float) -> None:
    """Name the first non-finite quantity in the order it was computed, so the root cause is reported
    (a NaN gradient at θ would otherwise surface as a NaN loss at φ^1)."""
    checks = [(forget_losses[0], "forget_closure returned a non-finite loss ({}) at θ")]
    checks.append((gg, "the gradient of forget_closure at θ contains NaN or inf (squared norm {})"))
    checks += [
        (
            v,
            f"forget_closure returned a non-finite loss ({{}}) at inner step φ^{k}; lower inner_lr if "
            "the inner steps diverge",
        )
        for k, v in enumerate(forget_losses[1:], start=1)
    ]
    checks.append((retain_loss, "retain_closure returned a non-finite loss ({})"))
    checks.append((rr, "the gradient of retain_closure contains NaN or inf (squared norm {})"))
    for value, message in checks:
        if not math.isfinite(value):
            raise ClosureError(message.format(value) + "; the step was not taken and θ is unchanged")


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
