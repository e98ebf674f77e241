"""Layer 5: attacks that try to bring an erased class or concept back.

- :mod:`.common`: what every attack shares (:class:`~.common.Budget`, appended embeddings, the simplex
  projection, the bootstrap interval, the loss record);
- :mod:`.ddpm`: the four attacks on a class-conditional DDPM;
- :mod:`.report`: the ``attack_*`` keys, the "under attack" table, the sample grid.

The names that ``constrained_opt.diffusion.attacks`` held when it was one module still resolve here
for one release, with a :class:`DeprecationWarning`; import them from the modules above.
"""

from __future__ import annotations

import importlib
import warnings

_MOVED = {
    "common": (
        "AppendedEmbedding",
        "Budget",
        "MIXTURE_STARTS",
        "bootstrap_ci",
        "loss_record",
        "project_simplex",
    ),
    "ddpm": (
        "ATTACKS",
        "ATTACK_FUNCTIONS",
        "AttackRun",
        "RELEARN_THRESHOLD",
        "Scorer",
        "attack_unet",
        "attacked_embedding",
        "benign",
        "best_start",
        "cached_attack",
        "concept_inversion",
        "demo_attacks",
        "embedding_mixture",
        "fine_tune_attack",
        "optimise_embedding",
        "parse_attacks",
        "pick",
        "relearn",
    ),
    "report": ("ATTACK_COLUMNS", "attack_table", "report_line", "save_attack_grid", "summary"),
}
_WHERE = {name: module for module, names in _MOVED.items() for name in names}
_JOBS = {
    "attack_ddpm": "constrained_opt.diffusion.jobs.attack",
    "list_models": "constrained_opt.diffusion.jobs.attack",
}


def __getattr__(name: str):
    """The deprecated flat names (``from constrained_opt.diffusion.attacks import Budget``)."""
    if name in _WHERE:
        where = f"{__name__}.{_WHERE[name]}"
    elif name in _JOBS:
        where = _JOBS[name]
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(
        f"{__name__}.{name} is deprecated; import it from {where}", DeprecationWarning, stacklevel=2
    )
    return getattr(importlib.import_module(where), name)
