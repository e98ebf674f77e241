"""What a comparison runs: :func:`plan_runs` turns the demo's options (methods, ``--variant``, ``--hp``,
budgets) into a list of :class:`Run` (a label, the method it runs, its hyperparameters, steps and batch
size)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..losses import robust_forms_error
from ..methods.registry import METHODS, PUBLISHED, parse_hparams
from ..runtime.errors import UsageError

MATCHED = "moo_matched"  # MOO with w = the mean λ of EraseDiff's run on the same seed


@dataclass(frozen=True)
class Run:
    """A row of the comparison: ``label`` runs ``method`` with ``hparams``, ``steps`` × ``batch_size``."""

    label: str
    method: str
    hparams: dict = field(default_factory=dict)
    steps: int = 300
    batch_size: int = 64


def parse_budget(text: str) -> tuple[int, int]:
    """``"1000x128"`` → (1000, 128)."""
    steps, sep, batch = text.partition("x")
    try:
        out = int(steps), int(batch)
    except ValueError:
        out = (0, 0)
    if not sep or min(out) < 1:
        raise UsageError(f"a budget is STEPSxBATCH with positive integers, e.g. 1000x128; got {text!r}")
    return out


def plan_runs(
    methods: tuple[str, ...],
    *,
    variants: tuple[str, ...] = (),
    hp: tuple[str, ...] = (),
    forget_target: str = "rl",
    steps: int = 300,
    batch_size: int = 64,
    published: bool = False,
    budgets: tuple[str, ...] = (),
    robust: tuple[str, ...] = (),
) -> list[Run]:
    """EraseDiff first, then ``methods`` (names of :data:`~.baselines.METHODS`, or ``moo_matched``),
    then ``variants`` (``LABEL=METHOD[:KEY=VALUE,...]``).

    ``hp`` items are ``LABEL.KEY=VALUE`` (a method's name is its label), each for a run of this plan
    (one for a method or variant that is not run is an error, not silently ignored). ``forget_target``
    applies to every run whose method takes one, unless set explicitly. Budgets: ``steps`` ×
    ``batch_size`` for all, or (``published``) each method's published one
    (:data:`~.baselines.PUBLISHED`; a method without one at ``steps`` × ``batch_size``); ``budgets``
    items ``LABEL=STEPSxBATCH`` override either.
    ``robust`` forms (relearn, sharpness, inversion) each add the run ``erasediff_<form>``, EraseDiff
    with that robust row beside the plain one (``erasediff:robust=<form>``), planned before ``variants``.
    """
    specs: dict[str, tuple[str, list[str]]] = {}
    for name in ("erasediff", *methods):
        if name not in METHODS and name != MATCHED:
            raise UsageError(f"unknown method {name!r}; expected some of {', '.join([*METHODS, MATCHED])}")
        specs[name] = ("moo" if name == MATCHED else name, [])
    if error := robust_forms_error(tuple(robust), ","):
        raise UsageError(f"--robust: {error}")
    for form in robust:
        specs[f"erasediff_{form}"] = ("erasediff", [f"robust={form}"])
    for item in variants:
        label, eq, rest = item.partition("=")
        method, _, pairs = rest.partition(":")
        if not eq or not label or method not in METHODS:
            raise UsageError(
                f"--variant expects LABEL=METHOD[:KEY=VALUE,...] with a known method, got {item!r}"
            )
        if label in specs:
            raise UsageError(f"--variant label {label!r} is already used")
        specs[label] = (method, [p for p in pairs.split(",") if p])
    for item in hp:
        setting, eq, value = item.partition("=")
        label, dot, key = setting.rpartition(".")  # keys have no dots; labels may (sa_lam0.3)
        pair = key + eq + value
        if not dot or (label not in specs and label not in METHODS and label != MATCHED):
            raise UsageError(f"--hp expects LABEL.KEY=VALUE with a known method or variant, got {item!r}")
        if label not in specs:
            raise UsageError(
                f"--hp {item} sets {label!r}, which is not run; run labels: {', '.join(specs)} "
                "(add it to --methods or drop the --hp)"
            )
        specs[label][1].append(pair)
    overrides = dict(item.split("=", 1) if "=" in item else (item, "") for item in budgets)
    for label in overrides:
        if label not in specs:
            raise UsageError(f"--budget for {label!r}, which is not run; run labels: {', '.join(specs)}")
    runs = []
    for label, (method, pairs) in specs.items():
        takes_target = "forget_target" in METHODS[method].Hyper.__dataclass_fields__
        if takes_target and not any(p.startswith("forget_target=") for p in pairs):
            pairs = [f"forget_target={forget_target}", *pairs]
        budget = PUBLISHED.get(method, (steps, batch_size)) if published else (steps, batch_size)
        if label in overrides:
            budget = parse_budget(overrides[label])
        runs.append(Run(label, method, parse_hparams(method, pairs), *budget))
    return runs
