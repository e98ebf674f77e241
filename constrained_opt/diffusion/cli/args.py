"""argparse ``type=`` checkers for the CLI's numeric options: a bad value fails while parsing, before
anything is loaded or written, with one line that names the option and the accepted range.

``argparse`` turns :class:`argparse.ArgumentTypeError` into ``argument --lr: <message>``. Floats must be
finite: ``float()`` accepts ``nan`` and ``inf``, which no option here can use.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def int_in(low: int, high: int | None = None, name: str = "") -> Callable[[str], int]:
    """An integer in [low, high] (``high=None``: no upper bound)."""
    expected = f"an integer ≥ {low}" if high is None else f"an integer in [{low}, {high}]"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value

    parse.__name__ = name or "integer"
    return parse


def float_in(low: float, high: float = math.inf, *, open_low: bool = False) -> Callable[[str], float]:
    """A finite float in [low, high] (or (low, high] with ``open_low``)."""
    lower = f"> {low:g}" if open_low else f"≥ {low:g}"
    expected = f"a finite number {lower}" + (f" and ≤ {high:g}" if high < math.inf else "")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        too_low = value <= low if open_low else value < low
        if not math.isfinite(value) or too_low or value > high:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


COUNT = int_in(1, name="count")  # steps, batch sizes, image sizes, numbers of images
INDEX = int_in(0, name="index")  # class indices
SEED = int_in(0, 2**32 - 1, name="seed")  # numpy's range; torch takes any of them plus the jobs' offsets
POSITIVE = float_in(0.0, open_low=True)  # learning rates, clipping norms
NON_NEGATIVE = float_in(0.0)  # guidance scales, loss weights
FRACTION = float_in(0.0, 1.0, open_low=True)  # SalUn's kept fraction
PROBABILITY = float_in(0.0, 1.0)  # score thresholds
