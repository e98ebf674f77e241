"""What a comparison runs and how its seeds are summarised.

- :func:`plan_runs` turns the demo's options (methods, ``--variant``, ``--hp``, budgets) into a list of
  :class:`Run` (a label, the method it runs, its hyperparameters, steps and batch size);
- :func:`aggregate` turns per-seed records into means with 95% intervals, each method's gap to the
  Retrain model, and the distribution of EraseDiff's multiplier λ;
- :func:`interval_verdict` compares two metrics by their intervals: "better", "worse" or "not
  distinguishable" when the intervals overlap.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from .baselines import METHODS, PUBLISHED, parse_hparams
from .metrics import METRICS, mean_ci95
from .runtime.errors import UsageError

MATCHED = "moo_matched"  # MOO with w = the mean λ of EraseDiff's run on the same seed
LOWER_IS_BETTER = {
    "p_forget": True,
    "fid": True,
    "remaining_accuracy": False,
    "precision": False,
    "recall": False,
}


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
) -> list[Run]:
    """EraseDiff first, then ``methods`` (names of :data:`~.baselines.METHODS`, or ``moo_matched``),
    then ``variants`` (``LABEL=METHOD[:KEY=VALUE,...]``).

    ``hp`` items are ``LABEL.KEY=VALUE`` (a method's name is its label). ``forget_target`` applies to
    every run whose method takes one, unless set explicitly. Budgets: ``steps`` × ``batch_size`` for
    all, or (``published``) each method's published one (:data:`~.baselines.PUBLISHED`); ``budgets``
    items ``LABEL=STEPSxBATCH`` override either.
    """
    specs: dict[str, tuple[str, list[str]]] = {}
    for name in ("erasediff", *methods):
        if name not in METHODS and name != MATCHED:
            raise UsageError(f"unknown method {name!r}; expected some of {', '.join([*METHODS, MATCHED])}")
        specs[name] = ("moo" if name == MATCHED else name, [])
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
        label, dot, pair = item.partition(".")
        if not dot or (label not in specs and label not in METHODS and label != MATCHED):
            raise UsageError(f"--hp expects LABEL.KEY=VALUE with a known method or variant, got {item!r}")
        if label in specs:  # settings of methods not run this time are ignored
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
        budget = PUBLISHED[method] if published else (steps, batch_size)
        if label in overrides:
            budget = parse_budget(overrides[label])
        runs.append(Run(label, method, parse_hparams(method, pairs), *budget))
    return runs


def lambda_summary(histories: list[list[dict]]) -> dict[str, float] | None:
    """Distribution of λ over every step of every seed's run (None when the history has no λ)."""
    values = [h["lam"] for history in histories for h in history if "lam" in h]
    if not values:
        return None
    ordered = sorted(values)

    def quantile(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return {
        "mean": statistics.fmean(values),
        "sd": statistics.pstdev(values),
        "min": ordered[0],
        "p05": quantile(0.05),
        "median": quantile(0.5),
        "p95": quantile(0.95),
        "max": ordered[-1],
        "active_fraction": sum(v > 0 for v in values) / len(values),
        "per_seed_mean": [statistics.fmean([h["lam"] for h in hist]) for hist in histories],
    }


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _shared_settings(records: list[dict]) -> dict:
    """``hparams`` as the seeds ran them: one dict when equal on every seed, else one per seed
    (``hparams_per_seed``: MOO at EraseDiff's mean λ has its own weight on each seed)."""
    if "hparams" not in records[0]:
        return {}
    values = [r.get("hparams") for r in records]
    return {"hparams": values[0]} if all(v == values[0] for v in values) else {"hparams_per_seed": values}


def aggregate(per_seed: list[dict[str, dict]], histories: dict[str, list[list[dict]]]) -> dict[str, dict]:
    """Summarise seeds: ``{label: {metric: mean, ..., "ci95": {metric: half-width}, "n_seeds": n,
    "gap_to_retrain": {metric: mean |m − m_retrain|}, "gap_ci95": {...}, "lambda": {...}}}``.

    Intervals are Student-t over seeds when there are several; with one seed they are the bootstrap
    half-widths stored in the seed's record (key ``ci95``), if any, and a gap's half-width is
    √(h² + h_retrain²) (independent samples). A label whose evaluation failed on some seed
    (``{"failed": reason}``) is summarised as ``{"failed": reasons, "n_seeds": n}``, and no model has
    a gap to a Retrain row that failed; its costs (time, memory) and hyperparameters are kept. A figure
    that is None on every seed stays None; one that is None on some seeds only is left out.
    """
    labels = list(per_seed[0])
    n = len(per_seed)
    out: dict[str, dict] = {}
    failed = {
        label: "; ".join(
            f"seed {i + 1} of {n}: {seed[label]['failed']}"
            for i, seed in enumerate(per_seed)
            if "failed" in seed[label]
        )
        for label in labels
    }
    for label in labels:
        records = [seed[label] for seed in per_seed]
        if failed[label]:  # what the runs cost is still known; the metrics are not
            costs = [k for k, v in records[0].items() if _is_number(v) and all(k in r for r in records)]
            row = {k: statistics.fmean([r[k] for r in records]) for k in costs}
            out[label] = {**row, **_shared_settings(records), "failed": failed[label], "n_seeds": n}
            continue
        keys = [k for k in records[0] if all(_is_number(r.get(k)) for r in records)]
        row: dict = {k: statistics.fmean([r[k] for r in records]) for k in keys}
        # a figure that is None on every seed stays None (an attack's step count beyond its budget)
        row.update(
            {k: None for k, v in records[0].items() if v is None and all(r.get(k) is None for r in records)}
        )
        row.update(_shared_settings(records))
        if n > 1:
            row["ci95"] = {k: mean_ci95([r[k] for r in records])[1] for k in keys}
        elif "ci95" in records[0]:
            row["ci95"] = dict(records[0]["ci95"])
        row["n_seeds"] = n
        if "retrain" in labels and not failed["retrain"] and label not in ("base", "retrain"):
            gaps = {
                k: [abs(r[k] - seed["retrain"][k]) for r, seed in zip(records, per_seed, strict=True)]
                for k in METRICS
            }
            row["gap_to_retrain"] = {k: statistics.fmean(v) for k, v in gaps.items()}
            if n > 1:
                row["gap_ci95"] = {k: mean_ci95(v)[1] for k, v in gaps.items()}
            elif "ci95" in records[0] and "ci95" in per_seed[0]["retrain"]:
                h, h_r = records[0]["ci95"], per_seed[0]["retrain"]["ci95"]
                row["gap_ci95"] = {k: math.hypot(h[k], h_r[k]) for k in METRICS if k in h and k in h_r}
        lam = lambda_summary(histories.get(label, []))
        if lam:
            row["lambda"] = lam
        out[label] = row
    return out


def interval(row: dict, key: str) -> tuple[float, float] | None:
    """(low, high) of ``row[key]`` ± its 95% half-width, or None when it has no finite interval."""
    half = row.get("ci95", {}).get(key)
    if half is None or not math.isfinite(half):
        return None
    return row[key] - half, row[key] + half


def interval_verdict(ours: dict, theirs: dict, key: str) -> str:
    """ "better", "worse", "not distinguishable" (the 95% intervals overlap) or "no interval" (one of
    the two has none: a single value decides nothing) for ``ours`` vs ``theirs`` on ``key``."""
    a, b = interval(ours, key), interval(theirs, key)
    if a is None or b is None:
        return "no interval"
    (lo_a, hi_a), (lo_b, hi_b) = a, b
    if hi_a < lo_b:
        return "worse" if not LOWER_IS_BETTER.get(key, True) else "better"
    if hi_b < lo_a:
        return "better" if not LOWER_IS_BETTER.get(key, True) else "worse"
    return "not distinguishable"
