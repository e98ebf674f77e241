"""Every option of the demo, declared once: :class:`DemoOptions`.

:func:`~.demo.demo` takes one, and ``constrained-opt demo`` derives its flags from the fields
(:mod:`constrained_opt.diffusion.cli.demo`): the flag's name, help, kind and default all come from
here, as the attack flags come from :class:`~constrained_opt.diffusion.attacks.common.Budget`.

Field metadata (read by the CLI): ``flag`` and ``help``; ``kind``, how the flag's text is checked
(``index``, ``seed``, ``count``, ``positive``, ``int``; default: text, or a switch for a bool);
``choices``; ``repeatable`` (a flag given once per item) with its ``metavar``; ``comma_list`` (one
flag, items separated by commas, ``none`` for no item); ``negation`` (a second switch that sets the
field to False). The fields without a flag come from the CLI's shared evaluation and device flags.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..evaluation.generated import EvalSettings
from ..methods.registry import BASELINES


def option(default, flag: str, help: str, **cli):
    """A field with its default, set by ``flag`` on the command line (see the module docstring)."""
    return field(default=default, metadata={"flag": flag, "help": help, **cli})


@dataclass(frozen=True)
class DemoOptions:
    """What one demo runs: data, class, seeds, methods and budgets, base models, evaluation, output."""

    data: str = option("digits", "--data", "digits (default) or mnist5k (28×28, 500 per class)")
    forget_class: int = option(0, "--forget-class", "digit to forget (default 0)", kind="index")
    seed: int = option(0, "--seed", "first seed (unlearning and evaluation)", kind="seed")
    seeds: int = option(
        1, "--seeds", "number of seeds; with ≥ 2, means ± 95%% intervals (default 1)", kind="count"
    )
    out: str = option("runs/demo", "--out", "output directory (default %(default)s)")
    methods: tuple[str, ...] = option(
        BASELINES,
        "--methods",
        "comma-separated runs beside EraseDiff (finetune, neggrad, moo, moo_matched, salun, sa, "
        "erasediff_shared_adam, erasediff_release, meta_unlearning, advunlearn), or 'none' "
        "(default: finetune,neggrad,moo,salun,sa)",
        comma_list=True,
    )
    variants: tuple[str, ...] = option(
        (),
        "--variant",
        "an extra run of METHOD with its own settings, e.g. moo_w3=moo:forget_weight=3 (repeatable)",
        repeatable=True,
        metavar="LABEL=METHOD[:KEY=VALUE,...]",
    )
    robust: tuple[str, ...] = option(
        (),
        "--robust",
        "comma-separated robust forms (relearn, sharpness, inversion): one more EraseDiff run per form, "
        "erasediff_<form>, with that robust forget row beside the plain one (docs/ddpm.md)",
        comma_list=True,
    )
    steps: int = option(300, "--steps", "unlearning steps per method (default %(default)s)", kind="count")
    batch_size: int = option(64, "--batch-size", "retain and forget batch size", kind="count")
    published_budgets: bool = option(
        False,
        "--published-budgets",
        "each method at its published steps × batch (EraseDiff 300×128, SalUn 1000×128, SA 20000×128; "
        "methods with no DDPM budget, meta_unlearning and advunlearn, at --steps × --batch-size)",
    )
    budgets: tuple[str, ...] = option(
        (),
        "--budget",
        "steps × batch size for one run, e.g. sa=2000x128 (repeatable)",
        repeatable=True,
        metavar="LABEL=STEPSxBATCH",
    )
    lr: float = option(1e-4, "--lr", "Adam learning rate of every method", kind="positive")
    forget_target: str = option(
        "rl",
        "--forget-target",
        "EraseDiff/MOO ε_f: rl = ε_θ(x_t|c_m), c_m ≠ c_f; noise = U(0, I)",
        choices=("rl", "noise"),
    )
    hp: tuple[str, ...] = option(
        (),
        "--hp",
        "override a method default, e.g. erasediff.eta=0.5, sa.samples_per_class=500 (repeatable)",
        repeatable=True,
        metavar="METHOD.KEY=VALUE",
    )
    resume: bool = option(False, "--resume", "reuse finished methods and resume an interrupted one")
    train: bool = option(
        False,
        "--train-base",
        "train the base DDPM and classifier with the seeded script (cached) instead of the shipped ones",
    )
    checkpoint: str | None = option(None, "--checkpoint", "base UNet checkpoint (default: the shipped one)")
    classifier: str | None = option(None, "--classifier", "evaluation classifier (default: the shipped one)")
    retrain: bool | str = option(
        True,
        "--retrain",
        "Retrain reference checkpoint (default: shipped for class 0, else trained here once with the "
        "base recipe, as long as the base model's training; the demo prints the expected time first "
        "and caches the model)",
        negation=("--no-retrain", "no Retrain row, and no Retrain training for a class other than 0"),
    )
    bootstrap: int = option(
        0,
        "--bootstrap",
        "bootstrap rounds over evaluation samples for 95%% intervals (default 0: none)",
        kind="int",
    )
    cache: str | None = option(None, "--cache-dir", "default $XDG_CACHE_HOME/constrained_opt")
    attacks: bool = option(
        False,
        "--attacks",
        "also attack every model (inversion, mixture, relearning, benign fine-tuning; minutes each)",
    )
    es: EvalSettings | None = None  # None: EvalSettings(seed=seed); the CLI's evaluation flags
    device: str = "auto"  # the CLI's --device
    progress: bool = True  # the CLI's --quiet
