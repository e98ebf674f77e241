"""The problem of one step: the argument forms of ``step`` and the checks on what a closure returns.

A step solves  min L_r  s.t.  g_i = L_f,i − min_φ L_f,i(φ) ≤ 0  (i = 1..m), or aggregates m objectives
with no constraint. :func:`parse_step_arguments` turns every accepted call form into one
:class:`Task`; :func:`checked_loss` and :func:`reaches` say what is wrong with a closure's loss.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from torch import Tensor

from ._flat import FlatLayout
from .amp import LossScaling
from .errors import ClosureError, SettingError

Closure = Callable[[], Tensor]


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


def parts(closure: Closure) -> tuple[Closure, ...]:
    """The micro-batch closures of ``closure``: its parts for :class:`MicroBatches`, else itself."""
    return closure.parts if isinstance(closure, MicroBatches) else (closure,)


@dataclass(frozen=True)
class Task:
    """A parsed step: the retain closure (None for a pure multi-objective step) and the constraint (or
    objective) closures with their names and the labels used in error messages."""

    retain: Closure | None
    closures: tuple[Closure, ...]
    names: tuple[str, ...]
    labels: tuple[str, ...]

    @property
    def rows(self) -> int:
        """Gradient rows of the step: one per closure, retain last."""
        return len(self.closures) + (self.retain is not None)

    @property
    def constrained(self) -> bool:
        return self.retain is not None

    @property
    def constraint_names(self) -> tuple[str, ...]:
        return self.names if self.constrained else ()


def parse_step_arguments(retain_closure: Any, forget_closure: Any = None) -> Task:
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
                raise SettingError(f"a multi-objective step needs at least 2 objectives, got {len(closures)}")
            return Task(None, closures, names, tuple(f"objective[{n!r}]" for n in names))
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
        return Task(retain_closure, (forget_closure,), ("forget",), ("forget_closure",))
    names, closures = _named(forget_closure, "constraints")
    return Task(retain_closure, closures, names, tuple(f"forget_closure[{n!r}]" for n in names))


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
        raise SettingError(f"no {what} given")
    for name, c in items:
        if not callable(c):
            raise TypeError(
                f"{what}[{name!r}] must be a callable returning the scalar loss, got {type(c).__name__}"
            )
    return tuple(n for n, _ in items), tuple(c for _, c in items)


def checked_loss(out: object, name: str, where: str) -> Tensor:
    """``out`` as a 0-dim floating-point loss, or a :class:`ClosureError` that says what the closure
    returned instead."""
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
        raise ClosureError(f"{name} returned a {out.dtype} tensor {where}; the loss must be floating point")
    return out.reshape(())


def reaches(root: Any, param_ids: frozenset[int]) -> bool:
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


@dataclass
class StepState:
    """Everything one step carries from stage to stage: the parsed task, the buffers, the resolved
    hyperparameters, the loss scaling and reduction group, whether the inner loops run, and what the
    gradient stage measured (per constraint L(θ), then L(φ^1..φ^K) when the inner loop ran; the retain
    loss; per constraint the losses of its adversary's attacker, empty for a plain constraint)."""

    task: Task
    layout: FlatLayout
    hyper: list[dict[str, float | Tensor]]
    scaling: LossScaling | None
    group: Any
    inner_ran: bool  # whether the inner loops run this step
    losses: list[list[Tensor]] = field(default_factory=list)
    retain_loss: Tensor | None = None
    attack_losses: list[list[Tensor]] = field(default_factory=list)
