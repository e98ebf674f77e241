"""The methods by name, their published budgets, and ``--hp`` parsing."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..runtime.errors import UsageError
from .advunlearn import AdvUnlearn
from .base import Method, Setup
from .erasediff import EraseDiff, EraseDiffPerClass, EraseDiffSharedAdam
from .erasediff_release import EraseDiffRelease
from .finetune import Finetune
from .meta_unlearning import MetaUnlearning
from .moo import Moo
from .neggrad import NegGrad
from .sa import SelectiveAmnesia
from .salun import SalUn

# Published (steps, batch size) per method: the EraseDiff paper §8 ("batch size 128, lr 1e-4, around
# 300 training steps"), also used for its MOO/FT/NG baselines; SalUn's DDPM config
# (configs/cifar10_saliency_unlearn.yml: n_iters 1000, batch_size 128); SA's
# (configs/cifar10_forget.yml: n_iters 20000, batch_size 128); EraseDiff's released loop
# (JingWu321/EraseDiff ddpm/main.py: unl_eps 4 × S_steps 2 phases of ⌊rem_num 4500 / 128⌋ + 1 = 36
# outer steps, train_batch_size 128). Not here (their releases erase prompts from Stable Diffusion and
# give no DDPM/class budget, so they run at the demo's --steps × --batch-size, 300 × 64 by default):
# meta_unlearning (sail-sg/Meta-Unlearning scripts/esd_meta.sh: 1500 steps × 10 SD samples) and
# advunlearn (OPTML-Group/AdvUnlearn train-scripts/AdvUnlearn.py: 1000 iterations, one prompt each).
PUBLISHED: dict[str, tuple[int, int]] = {
    "erasediff": (300, 128),
    "erasediff_shared_adam": (300, 128),
    "erasediff_release": (288, 128),
    "moo": (300, 128),
    "finetune": (300, 128),
    "neggrad": (300, 128),
    "salun": (1000, 128),
    "sa": (20_000, 128),
}


METHODS: dict[str, type[Method]] = {
    m.name: m
    for m in (
        EraseDiff,
        Finetune,
        NegGrad,
        Moo,
        SalUn,
        SelectiveAmnesia,
        EraseDiffSharedAdam,
        EraseDiffRelease,
        MetaUnlearning,
        AdvUnlearn,
    )
}
BASELINES = ("finetune", "neggrad", "moo", "salun", "sa")  # the demo's default comparison


def parse_hparams(method: str, pairs: list[str]) -> dict[str, Any]:
    """``["eta=0.5", "forget_target=noise"]`` → typed kwargs for ``method``'s Hyper dataclass."""
    if method not in METHODS:
        raise UsageError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    fields = {f.name: f for f in dataclasses.fields(METHODS[method].Hyper)}
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in fields:
            raise UsageError(f"bad hyperparameter {pair!r} for {method}; known: {', '.join(fields)}")
        kind = type(fields[key].default)
        try:
            out[key] = parse_bool(value) if kind is bool else kind(value)
        except ValueError:
            raise UsageError(
                f"hyperparameter {key} of {method} needs a {kind.__name__}"
                f"{' (true, false, 1 or 0)' if kind is bool else ''}, got {value!r}"
            ) from None
    METHODS[method].Hyper(**out)  # range checks
    return out


def parse_bool(text: str) -> bool:
    """``true``/``1`` → True, ``false``/``0`` → False (any case); anything else raises ValueError (``bool``
    would read every non-empty text, "false" included, as True)."""
    value = {"true": True, "1": True, "false": False, "0": False}.get(text.strip().lower())
    if value is None:
        raise ValueError(f"not a bool: {text!r}")
    return value


# Variants chosen by a flag rather than by --method (they take the hyperparameters of the method named).
VARIANTS: dict[str, type[Method]] = {EraseDiffPerClass.name: EraseDiffPerClass}


def method_class(name: str) -> type[Method]:
    """The class of method (or variant) ``name``; unknown names raise :class:`UsageError`."""
    if name not in METHODS and name not in VARIANTS:
        raise UsageError(f"unknown method {name!r}; expected one of {', '.join(METHODS)}")
    return METHODS.get(name) or VARIANTS[name]


def make_method(name: str, setup: Setup, hparams: dict[str, Any]) -> Method:
    """Instantiate method ``name``; unknown names and invalid values raise :class:`UsageError`."""
    return method_class(name)(setup, **hparams)
