"""``--resume`` continues only the run it was given: the run's configuration is stored with its state.

An unlearning run is identified by the settings that shape its trajectory — method, forget class,
batch size, learning rate, seed, every method hyperparameter (resolved, defaults included), the data
and the base model's SHA-256 — plus, for a finished ``demo`` row, the classifier and the evaluation
settings that produced its metrics. Resuming compares the stored configuration with the command's and
refuses any difference in one line that names each differing option, so a checkpoint is never
continued under settings it was not made with (and the provenance written at the end records what
actually ran).

``--steps`` is the one setting that may change when resuming an interrupted run: no step depends on
the total, so continuing to N steps from step D ≤ N gives the same model as an uninterrupted N-step
run. Fewer steps than already done are refused. A finished ``demo`` row has no optimizer state left
to continue from, so there ``--steps`` must match too.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

from .errors import UsageError

FLAGS = {
    "method": "--method",
    "forget_class": "--forget-class",
    "batch_size": "--batch-size",
    "lr": "--lr",
    "seed": "--seed",
    "steps": "--steps",
    "data": "--data",
    "image_size": "--image-size",
    "base": "--checkpoint",
    "classifier": "--classifier",
    "evaluation.per_class": "--per-class",
    "evaluation.sampler": "--sampler",
    "evaluation.num_steps": "--sampling-steps",
    "evaluation.guidance": "--guidance",
    "evaluation.seed": "--seed",
}
DIGESTS = ("base", "classifier")  # compared by SHA-256 of the file's bytes


def run_config(
    method: str,
    forget_class: int,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    hparams: dict[str, Any],
    **inputs: Any,
) -> dict[str, Any]:
    """The settings that determine an unlearning run, JSON-normalised (as they read back from disk).

    ``hparams`` must be the resolved hyperparameters (every field of the method's ``Hyper``);
    ``inputs`` identify the data and the models, e.g. ``data="digits", base=<sha256>``.
    """
    config = dict(
        method=method,
        forget_class=forget_class,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        hparams=hparams,
        **inputs,
    )
    return json.loads(json.dumps(config))


def check_resume(
    where: str,
    saved: dict | None,
    current: dict,
    done: int | None = None,
    hp_prefix: str = "",
    hp_defaults: dict[str, Any] | None = None,
) -> str | None:
    """Refuse to resume ``where`` unless ``saved`` (its stored configuration) matches ``current``.

    ``done``: steps already taken by an interrupted run, which may then continue to more ``steps``
    (the note returned says so); ``None`` for a finished result, where ``steps`` must match.
    ``hp_prefix`` is how ``--hp`` names the method (``"erasediff."`` in the demo). ``hp_defaults``: the
    method's default hyperparameters; one that ``saved`` lacks (added since that run was made, e.g.
    ``robust``) matches when it is at its default now, the behaviour of the version that made it; one
    that ``current`` does not record (it does not act) is not compared.
    """
    if not isinstance(saved, dict):
        raise UsageError(
            f"cannot resume {where}: it records no run configuration (written by an older version), so "
            "it cannot be checked against this command; run without --resume to start over"
        )
    current = json.loads(json.dumps(current))
    flat_saved, flat_current = _flatten(saved), _flatten(current)
    keys = [
        k for k in dict.fromkeys([*flat_saved, *flat_current]) if flat_saved.get(k) != flat_current.get(k)
    ]
    defaults = _flatten({"hparams": json.loads(json.dumps(hp_defaults or {}))})
    keys = [k for k in keys if k in flat_saved or k not in defaults or flat_current.get(k) != defaults[k]]
    # a hyperparameter this version does not record does not act in it (e.g. a robust form's settings
    # when the form is off), so the value an older run recorded for it is not compared
    keys = [k for k in keys if not (k.startswith("hparams.") and k not in flat_current)]
    if "method" in keys:  # another method's hyperparameters are not comparable
        keys = [k for k in keys if not k.startswith("hparams.")]
    note = None
    if done is not None and "steps" in keys:
        keys.remove("steps")
        if current["steps"] < done:
            keys.insert(0, "steps")
        else:
            note = (
                f"{where}: --steps changed from {saved['steps']} to {current['steps']}; {done} steps are "
                f"done and no step depends on the total, so continuing to {current['steps']} is safe"
            )
    if keys:
        items = [_describe(k, flat_saved.get(k), flat_current.get(k), hp_prefix) for k in keys]
        if done is not None and "steps" in keys:
            items[0] += f", fewer than the {done} steps already done"
        items = list(dict.fromkeys(items))  # the demo's --seed is also its evaluation seed
        raise UsageError(
            f"cannot resume {where}: it was run with other options: {'; '.join(items)}. Rerun with the "
            "original options, or without --resume (or with another --out) to start over"
        )
    return note


@contextlib.contextmanager
def restoring(where: str) -> Iterator[None]:
    """Turn a failure while loading a stored state (missing key, wrong shape, wrong type) into one line."""
    try:
        yield
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
        reason = " ".join(str(exc).split())
        reason = reason if len(reason) <= 300 else reason[:300] + "…"
        raise UsageError(
            f"cannot resume from {where}: it is damaged or was not written for this run "
            f"({type(exc).__name__}: {reason}); delete it, or run without --resume to start over"
        ) from None


def _flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _describe(key: str, saved: Any, current: Any, hp_prefix: str) -> str:
    """``--lr 0.0001 (now 0.001)``, ``--hp eta=1.0 (now 0.5)``, ``--checkpoint: another file (sha256 …)``."""

    def show(value: Any) -> str:
        return "unset" if value is None else str(value)

    if key.startswith("hparams."):
        name = f"--hp {hp_prefix}{key.removeprefix('hparams.')}"
        return f"{name}={show(saved)} (now {show(current)})"
    flag = FLAGS.get(key, f"--{key.replace('_', '-')}")
    if key in DIGESTS:
        return f"{flag}: another file (sha256 {show(saved)[:12]}…, now {show(current)[:12]}…)"
    return f"{flag} {show(saved)} (now {show(current)})"
