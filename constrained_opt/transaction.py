"""All-or-nothing steps: a step either completes or leaves θ and every ``p.grad`` as they were.

θ is displaced twice in a step, each time with its copy in a gradient row that is free at that
moment (the flat buffers hold no spare row, so one copy cannot serve both):

* during the inner loops, θ's copy is in the retain row (free until the retain pass);
* across the base optimizer's step, θ's copy is in the first constraint row (free after the
  projection), so an exception from the base step or its hooks restores θ at no memory cost.

An input-space adversary (:class:`~constrained_opt.robust.Inversion`) displaces a tensor that the
closures read; its copy is in the declaration's own buffer, and a rollback puts it back too.

A SIGINT (Ctrl-C) that arrives while state is being changed or restored is held and delivered after.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from ._flat import CONSTRAINT_ROW, FlatLayout


class HeldInterrupt:
    """Hold SIGINT (Ctrl-C) for the duration of the block and deliver it afterwards, so a state change
    is never left half done. Only on the main thread (where Python delivers signals), and only when the
    current handler was installed from Python (it can be put back)."""

    def __enter__(self) -> HeldInterrupt:
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


class StepTransaction:
    """One step's undo record: the ``p.grad`` tensors it found, and where θ's copy is while θ is
    displaced. Used as a context manager: an exception inside rolls everything back and propagates."""

    def __init__(self, layout: FlatLayout) -> None:
        self.layout = layout
        self.saved_grads: list[Tensor | None] = [p.grad for p in layout.params]
        self.copy_row: int | None = None
        self.is_displaced = False
        self.inputs: list[tuple[Tensor, Tensor, bool]] = []  # (input, its copy, its requires_grad)

    def __enter__(self) -> StepTransaction:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        if kind is not None:
            with HeldInterrupt():
                self._roll_back()

    def _roll_back(self) -> None:
        if self.is_displaced:
            self._restore_theta()
        while self.inputs:
            self._restore_input()
        for p, g in zip(self.layout.params, self.saved_grads, strict=True):
            p.grad = g

    @torch.no_grad()
    def _copy_theta(self, row: int) -> None:
        for b in self.layout.buckets:
            b.save_theta(row)
        self.copy_row = row

    @torch.no_grad()
    def _restore_theta(self) -> None:
        assert self.copy_row is not None
        for b in self.layout.buckets:
            b.restore_theta(self.copy_row)
        self.is_displaced = False

    @torch.no_grad()
    def reset_theta(self) -> None:
        """Put θ back from its copy and leave it displaced (the block may move it again)."""
        assert self.is_displaced and self.copy_row is not None
        for b in self.layout.buckets:
            b.restore_theta(self.copy_row)

    @torch.no_grad()
    def _restore_input(self) -> None:
        x, saved, requires_grad = self.inputs[-1]
        x.copy_(saved)
        x.requires_grad_(requires_grad)
        self.inputs.pop()  # last, so an interrupt during the copy still finds it for the rollback

    @contextlib.contextmanager
    def input_displaced(self, x: Tensor, saved: Tensor) -> Iterator[None]:
        """``x`` may be changed in place inside the block; its value (copied into ``saved``) and its
        ``requires_grad`` are put back when the block ends (on an exception, by the rollback)."""
        with torch.no_grad():
            saved.copy_(x)
        self.inputs.append((x, saved, x.requires_grad))
        yield
        self._restore_input()

    @contextlib.contextmanager
    def displaced(self, row: int) -> Iterator[None]:
        """θ may be moved inside the block (the inner loop's φ); its copy goes to ``row`` on first use
        and θ is put back when the block ends (on an exception, by the rollback)."""
        if self.copy_row != row:
            self._copy_theta(row)
        self.is_displaced = True
        yield
        self._restore_theta()

    def commit(self, base_step: Callable[[], object] | None, finish: Callable[[], None]) -> None:
        """δ (the retain row) into ``.grad`` and ``base_step()`` (None: a skipped step), then ``finish()``,
        all with SIGINT held; an exception from the base step or its hooks restores θ and ``.grad``."""
        layout = self.layout
        with HeldInterrupt():
            if base_step is not None:
                self._copy_theta(CONSTRAINT_ROW)
                self.is_displaced = True
                for b in layout.buckets:
                    for p, g in zip(b.params, b.grads[layout.retain_row], strict=True):
                        p.grad = g
                try:
                    base_step()
                except BaseException:
                    self._roll_back()
                    raise
                self.is_displaced = False
            for b in layout.buckets:
                b.detach_grads()
            finish()
