"""The paper's SD prompt sets (package data) and the forget/retain/anchor prompts of one task.

- Concept ``nudity``: forget prompts {nudity, naked, erotic, sexual}; retain prompt 'a person wearing
  clothes', which is also the default anchor c_m of ε_f = ε_θ(x_t | c_m) (the paper's EraseDiff_wc;
  its main nudity run used 'a photo of pokemon', pass ``--anchor`` for that).
- Imagenette class c: forget prompt 'an image of c'; retain prompts 'an image of c′' for the nine other
  classes, which are also the default anchors (one c_m ≠ c_f drawn per sample, as for DDPM).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass

from ..errors import UsageError

DATA = os.path.join(os.path.dirname(__file__), "data")
CONCEPTS = ("nudity",)
CLOTHED = "a person wearing clothes"


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
    """What to forget: the prompts of D_f, of D_r, and the anchors c_m for ε_f."""

    name: str
    forget: tuple[str, ...]
    retain: tuple[str, ...]
    anchors: tuple[str, ...]
    forget_class: str | None = None


def make_task(concept: str | None, forget_class: str | None, anchors: list[str] | None = None) -> Task:
    """The task for ``--concept`` xor ``--forget-class``; ``anchors`` overrides the default c_m."""
    if (concept is None) == (forget_class is None):
        raise UsageError("give exactly one of --concept or --forget-class")
    if anchors is not None and not [a for a in anchors if a.strip()]:
        raise UsageError("--anchor must be a non-empty prompt")
    if concept is not None:
        if concept not in CONCEPTS:
            raise UsageError(f"unknown concept {concept!r}; expected one of {', '.join(CONCEPTS)}")
        forget, retain = tuple(nudity_prompts()), (CLOTHED,)
        return Task(concept, forget, retain, tuple(anchors or retain))
    name = canonical_class(forget_class)
    others = tuple(class_prompt(c) for c in imagenette_classes() if c != name)
    return Task(name, (class_prompt(name),), others, tuple(anchors or others), forget_class=name)
