"""The quick-start example runs and actually forgets."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quickstart_forgets_the_digit_and_keeps_the_others():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--forget-digit", "3", "--steps", "150"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # a tiny MLP: one thread is fastest
    ).stdout
    pattern = r"accuracy on digit 3 = ([\d.]+), on the other digits = ([\d.]+)"
    (forget_before, keep_before), (forget_after, keep_after) = [
        tuple(map(float, m)) for m in re.findall(pattern, out)
    ]
    assert forget_before > 0.9 and forget_after < 0.3
    assert keep_after > keep_before - 0.05
