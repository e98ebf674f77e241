"""The paper's SD prompt sets (package data) and the forget/retain/anchor prompts of one task.

- Concept ``nudity``: forget prompts {nudity, naked, erotic, sexual}; retain prompt 'a person wearing
  clothes', which is also the default anchor c_m of ε_f = ε_θ(x_t | c_m) (the paper's EraseDiff_wc;
  its main nudity run used 'a photo of pokemon', pass ``--anchor`` for that).
- Imagenette class c: forget prompt 'an image of c'; retain prompts 'an image of c′' for the nine other
  classes, which are also the default anchors (one c_m ≠ c_f drawn per sample, as for DDPM).
- Any other concept (``--concept "van gogh"``): the text itself is the forget prompt; the retain set
  and the default anchor are the empty prompt, so ε_f = ε_θ(x_t | "") is the unconditional prediction.

Several concepts (or classes) at once make one task whose ``groups`` hold each one's forget prompts:
EraseDiff keeps one constraint per group; groups may not share a forget prompt (:func:`check_disjoint`).
Retain prompts and anchors are the union of theirs (for classes: the classes not forgotten), without
any forget prompt.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace

from ..runtime.errors import UsageError

DATA = os.path.join(os.path.dirname(__file__), "data")
CONCEPTS = ("nudity",)  # concepts with a shipped prompt set; any other text is a free-text concept
CLOTHED = "a person wearing clothes"
UNCONDITIONAL = ""


def nudity_prompts() -> list[str]:
    with open(os.path.join(DATA, "nudity_prompts.txt"), encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def imagenette_classes() -> dict[str, int]:
    """The ten Imagenette class names → their ImageNet-1k indices (for UA with an ImageNet classifier)."""
    with open(os.path.join(DATA, "imagenette_classes.csv"), encoding="utf-8", newline="") as f:
        return {row["class"]: int(row["imagenet_index"]) for row in csv.DictReader(f)}


def class_prompt(name: str) -> str:
    return f"an image of {name}"


def canonical_class(name: str) -> str:
    """Match an Imagenette class name ignoring case, '_' and '-' ("english_springer" → "English springer")."""
    key = name.lower().replace("_", " ").replace("-", " ").strip()
    for c in imagenette_classes():
        if c.lower() == key:
            return c
    raise UsageError(f"unknown Imagenette class {name!r}; expected one of: {', '.join(imagenette_classes())}")


@dataclass(frozen=True)
class Task:
    """What to forget: the prompts of D_f, of D_r, and the anchors c_m for ε_f. ``groups``: for several
    concepts or classes, each one's forget prompts (one constraint each), named by ``group_names``."""

    name: str
    forget: tuple[str, ...]
    retain: tuple[str, ...]
    anchors: tuple[str, ...]
    forget_class: str | None = None
    groups: tuple[tuple[str, ...], ...] = ()
    group_names: tuple[str, ...] = ()

    def generation_prompts(self) -> tuple[str, ...]:
        """The forget set's prompt cycle (sample i uses entry i mod its length): the groups in turn,
        each cycling through its own prompts, so every group gets 1/len(groups) of the samples."""
        if not self.groups:
            return self.forget
        longest = max(len(g) for g in self.groups)
        return tuple(g[j % len(g)] for j in range(longest) for g in self.groups)


def _as_list(value: str | Sequence[str] | None) -> list[str]:
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def make_task(
    concept: str | Sequence[str] | None,
    forget_class: str | Sequence[str] | None,
    anchors: list[str] | None = None,
) -> Task:
    """The task for ``--concept`` xor ``--forget-class`` (each repeatable); ``anchors`` overrides the
    default c_m."""
    concepts, classes = _as_list(concept), _as_list(forget_class)
    if bool(concepts) == bool(classes):
        raise UsageError("give exactly one of --concept or --forget-class (either may be repeated)")
    if anchors is not None and not [a for a in anchors if a.strip()]:
        raise UsageError("--anchor must be a non-empty prompt")
    if any(not c.strip() for c in concepts):
        raise UsageError("--concept must be a non-empty concept (nudity, or the text of a concept)")
    parts = [_concept_task(c) for c in concepts] or [_class_task(canonical_class(c)) for c in classes]
    if len({p.name for p in parts}) < len(parts):
        raise UsageError(f"a concept or class is given twice: {', '.join(concepts or classes)}")
    check_disjoint(parts)
    if len(parts) == 1:
        task = parts[0]
        return replace(task, anchors=tuple(anchors or task.anchors))
    forget = tuple(dict.fromkeys(p for part in parts for p in part.forget))
    if classes:
        names = {p.forget_class for p in parts}
        retain = tuple(class_prompt(c) for c in imagenette_classes() if c not in names)
    else:
        retain = tuple(p for p in dict.fromkeys(p for part in parts for p in part.retain) if p not in forget)
    default_anchors = (
        retain
        if classes
        else tuple(a for a in dict.fromkeys(a for part in parts for a in part.anchors) if a not in forget)
    )
    return Task(
        " + ".join(p.name for p in parts),
        forget,
        retain or (UNCONDITIONAL,),
        tuple(anchors or default_anchors or (UNCONDITIONAL,)),
        groups=tuple(p.forget for p in parts),
        group_names=tuple(p.name for p in parts),
    )


def _normal(prompt: str) -> str:
    return " ".join(prompt.casefold().split())


def check_disjoint(parts: list[Task]) -> None:
    """Refuse two concepts that share a forget prompt (ignoring case and spacing), e.g. ``--concept
    nudity --concept naked``: "naked" is one of nudity's prompts, so the two constraints would hold the
    same images and one of them adds nothing but a second, dependent gradient row."""
    seen: dict[str, str] = {}
    for part in parts:
        for prompt in part.forget:
            owner = seen.setdefault(_normal(prompt), part.name)
            if owner != part.name:
                raise UsageError(
                    f"concepts {owner!r} and {part.name!r} overlap: both forget the prompt {prompt!r} "
                    f"({owner}'s prompts: {', '.join(next(p.forget for p in parts if p.name == owner))}); "
                    "give each prompt to one concept only, e.g. drop one of them"
                )


def _concept_task(concept: str) -> Task:
    if concept in CONCEPTS:
        return Task(concept, tuple(nudity_prompts()), (CLOTHED,), (CLOTHED,))
    return Task(concept, (concept,), (UNCONDITIONAL,), (UNCONDITIONAL,))


def _class_task(name: str) -> Task:
    others = tuple(class_prompt(c) for c in imagenette_classes() if c != name)
    return Task(name, (class_prompt(name),), others, others, forget_class=name)
