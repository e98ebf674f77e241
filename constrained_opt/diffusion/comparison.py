"""Deprecated alias of ``constrained_opt.diffusion.comparison``, kept for one release. Moved to:

- ``constrained_opt.diffusion.jobs.comparison``
- ``constrained_opt.diffusion.evaluation.statistics``
"""

import warnings

from constrained_opt.diffusion.evaluation.statistics import (  # noqa: F401
    LOWER_IS_BETTER,
    aggregate,
    interval,
    interval_verdict,
    lambda_summary,
)
from constrained_opt.diffusion.jobs.comparison import MATCHED, Run, parse_budget, plan_runs  # noqa: F401

MOVED_TO = ("constrained_opt.diffusion.jobs.comparison", "constrained_opt.diffusion.evaluation.statistics")

warnings.warn(
    f"{__name__} is deprecated; import from " + ", ".join(MOVED_TO),
    DeprecationWarning,
    stacklevel=2,
)
