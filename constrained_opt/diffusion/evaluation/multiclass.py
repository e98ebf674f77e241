"""Forgetting several classes in one run: the forget set as their union (one pooled constraint) or one
constraint per class.

With forget classes C = {c_1, ..., c_m} and D_f = ∪ D_{c_i}, the pooled problem is EraseDiff's own,

    min_θ L_r(θ)  s.t.  L_f(θ; D_f) − min_φ L_f(φ; D_f) ≤ 0,

and the per-class problem keeps one constraint per class,

    min_θ L_r(θ)  s.t.  L_f(θ; D_{c_i}) − min_φ L_f(φ; D_{c_i}) ≤ 0,   i = 1..m,

so a class whose loss already fell cannot hide another that has not (the pooled constraint only sees
their mean). Forget batches are stratified: every batch holds ⌊B/m⌋ or ⌈B/m⌉ images of each class,
so both problems see exactly the same images and the per-class one splits each batch by label.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable

import torch
from torch import Tensor

from ...functional import MAX_CONSTRAINTS
from ..data import BatchSampler, ImageData, check_class
from ..runtime.errors import UsageError
from .metrics import classifier_probs, evaluate_generated

ForgetClasses = int | tuple[int, ...]


def parse_classes(spec: str) -> tuple[int, ...]:
    """``"0"`` → (0,); ``"0,3"`` → (0, 3). Order kept; duplicates and non-integers are errors."""
    parts = [p.strip() for p in str(spec).split(",")]
    try:
        classes = tuple(int(p) for p in parts)
    except ValueError:
        raise UsageError(
            f"--forget-class expects integers separated by commas (e.g. 0,3), got {spec!r}"
        ) from None
    if len(set(classes)) != len(classes):
        raise UsageError(f"--forget-class lists a class twice: {spec!r}")
    return classes


def class_list(text: str) -> tuple[int, ...]:
    """argparse ``type=`` for ``--forget-class``: :func:`parse_classes`, each index ≥ 0, failing while
    parsing with one line."""
    try:
        classes = parse_classes(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if min(classes) < 0:
        raise argparse.ArgumentTypeError(f"class indices are ≥ 0, got {text!r}")
    return classes


def as_classes(forget: ForgetClasses | Iterable[int]) -> tuple[int, ...]:
    return (forget,) if isinstance(forget, int) else tuple(int(c) for c in forget)


def check_classes(forget: ForgetClasses, num_classes: int) -> tuple[int, ...]:
    """Each class in range, and at least one class left to retain."""
    classes = as_classes(forget)
    if not classes:
        raise UsageError("no forget class given")
    for c in classes:
        check_class(c, num_classes)
    if len(classes) >= num_classes:
        raise UsageError(f"forgetting all {num_classes} classes leaves nothing to retain")
    return classes


def check_batch_holds_every_part(batch_size: int, parts: int) -> None:
    """A stratified batch holds ≥ 1 image of each of ``parts`` forget classes or concepts: B ≥ m."""
    if batch_size < parts:
        raise UsageError(
            f"batch size {batch_size} is smaller than the number of forget classes or concepts "
            f"({parts}): each batch must hold every one of them; pass --batch-size {parts} or more"
        )


def check_per_class_constraints(classes: ForgetClasses) -> None:
    """One constraint per class is limited by the optimizer's exact dual solver, which enumerates all
    2^m active sets (:data:`constrained_opt.functional.MAX_CONSTRAINTS` constraints at most)."""
    m = len(as_classes(classes))
    if m > MAX_CONSTRAINTS:
        raise UsageError(
            f"--per-class-constraints with {m} forget classes makes {m} constraints, and the optimizer's "
            f"exact solver takes at most {MAX_CONSTRAINTS}: drop --per-class-constraints (one pooled "
            f"constraint over all {m} classes) or forget at most {MAX_CONSTRAINTS} classes per run"
        )


def is_forgotten(labels: Tensor, forget: ForgetClasses) -> Tensor:
    return torch.isin(labels, torch.tensor(as_classes(forget), dtype=labels.dtype, device=labels.device))


def split_forget_classes(data: ImageData, forget: ForgetClasses) -> tuple[ImageData, ImageData]:
    """(D_r, D_f) with D_f the union of the forget classes' images and D_r the rest."""
    mask = is_forgotten(data.labels, check_classes(forget, data.num_classes))
    return data.subset(~mask), data.subset(mask)


class StratifiedSampler:
    """Endless batches with a fixed share of every part (a class, a concept's prompts, ...): part i
    contributes ⌈B/m⌉ images for i < B mod m and ⌊B/m⌋ otherwise, each from its own
    :class:`BatchSampler` (own seed and state)."""

    def __init__(self, parts: list[ImageData], batch_size: int, seed: int):
        check_batch_holds_every_part(batch_size, len(parts))
        base, extra = divmod(batch_size, len(parts))
        self.samplers = [BatchSampler(p, base + (i < extra), seed + 1000 * i) for i, p in enumerate(parts)]

    def next(self) -> tuple[Tensor, Tensor]:
        batches = [s.next() for s in self.samplers]
        return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])

    def state_dict(self) -> dict:
        return {str(i): s.state_dict() for i, s in enumerate(self.samplers)}

    def load_state_dict(self, state: dict) -> None:
        for i, s in enumerate(self.samplers):
            s.load_state_dict(state[str(i)])


def forget_sampler(forget: ImageData, classes: ForgetClasses, batch_size: int, seed: int):
    """One class: today's :class:`BatchSampler` over D_f (bit-identical runs); several: stratified."""
    classes = as_classes(classes)
    if len(classes) == 1:
        return BatchSampler(forget, batch_size, seed)
    return StratifiedSampler([forget.subset(forget.labels == c) for c in classes], batch_size, seed)


def evaluate_classes(
    classifier,
    samples: Tensor,
    labels: Tensor,
    real: Tensor,
    forget: ForgetClasses,
    inception_weights: str | None = None,
) -> dict[str, float]:
    """:func:`~.metrics.evaluate_generated` for one or several forget classes.

    Several: ``p_forget`` is the mean over all forget-class samples of P(y = own class | x), with one
    ``p_forget_c<k>`` per class beside it, and ``p_forget_set`` = mean over those samples of
    P(y ∈ C_f | x) = Σ_{c ∈ C_f} P(y = c | x): a model that draws one forgotten class when asked for
    another scores low on ``p_forget`` but not on ``p_forget_set``. Accuracy, FID and
    precision/recall cover the other classes.
    """
    classes = as_classes(forget)
    mask = is_forgotten(labels, classes)
    # The pooled figures are evaluate_generated's with every forget class as one: relabel them as the first.
    out = evaluate_generated(
        classifier, samples, torch.where(mask, classes[0], labels), real, classes[0], inception_weights
    )
    if len(classes) > 1:
        probs = classifier_probs(classifier, samples[mask])
        out["p_forget"] = probs.gather(1, labels[mask].unsqueeze(1)).mean().item()
        out.update({f"p_forget_c{c}": probs[labels[mask] == c, c].mean().item() for c in classes})
        out["p_forget_set"] = probs[:, list(classes)].sum(1).mean().item()
    return out


def class_rows(labels: Tensor, classes: tuple[int, ...]) -> dict[str, Tensor]:
    """``{"class_<c>": indices of the rows labelled c}``: the per-class constraints' share of a batch."""
    return {f"class_{c}": (labels == c).nonzero().squeeze(1) for c in classes}
