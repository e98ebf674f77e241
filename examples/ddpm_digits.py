"""Forget one digit from the shipped class-conditional DDPM with EraseDiff, from Python.

Equivalent to ``constrained-opt demo --methods moo --out runs/example``: EraseDiff and the scalarised
MOO baseline, evaluated side by side; see ``docs/ddpm.md`` for every option.

    python examples/ddpm_digits.py [FORGET_CLASS]
"""

import sys

from constrained_opt.diffusion.evaluation.report import metrics_table
from constrained_opt.diffusion.jobs.demo import demo

if __name__ == "__main__":
    forget_class = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    results = demo(forget_class=forget_class, methods=("moo",), out="runs/example")
    print(metrics_table(results))
    print("report: runs/example/report.md; Fig. 2: runs/example/fig2_cosines.png")
