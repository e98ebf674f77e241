"""Deprecated alias of ``constrained_opt.diffusion.report``, kept for one release. Moved to:

- ``constrained_opt.diffusion.evaluation.report``
"""

import warnings

from constrained_opt.diffusion.evaluation.report import (  # noqa: F401
    COLUMNS,
    DISPLAY,
    GAP_COLUMNS,
    gap_table,
    metrics_table,
    render_report,
    save_cosine_plot,
    save_sample_grid,
    write_report,
)

MOVED_TO = ("constrained_opt.diffusion.evaluation.report",)

warnings.warn(
    f"{__name__} is deprecated; import from " + ", ".join(MOVED_TO),
    DeprecationWarning,
    stacklevel=2,
)
