"""Deprecated alias of ``constrained_opt.diffusion.multiclass``, kept for one release. Moved to:

- ``constrained_opt.diffusion.evaluation.multiclass``
"""

import warnings

from constrained_opt.diffusion.evaluation.multiclass import (  # noqa: F401
    ForgetClasses,
    StratifiedSampler,
    as_classes,
    check_classes,
    class_list,
    class_rows,
    evaluate_classes,
    forget_sampler,
    is_forgotten,
    parse_classes,
    split_forget_classes,
)

MOVED_TO = ("constrained_opt.diffusion.evaluation.multiclass",)

warnings.warn(
    f"{__name__} is deprecated; import from " + ", ".join(MOVED_TO),
    DeprecationWarning,
    stacklevel=2,
)
