"""Deprecated alias of ``constrained_opt.diffusion.metrics``, kept for one release. Moved to:

- ``constrained_opt.diffusion.evaluation.metrics``
"""

import warnings

from constrained_opt.diffusion.evaluation.metrics import (  # noqa: F401
    METRICS,
    FeatureExtractor,
    PeakMemory,
    SampleScores,
    accuracy,
    bootstrap_ci95,
    classifier_features,
    classifier_probs,
    evaluate_generated,
    fid,
    forget_scores,
    identity_features,
    inception_fid,
    mean_ci95,
    metrics_from_scores,
    precision_recall,
    real_split_floor,
    require_finite,
    score_samples,
    t975,
)

MOVED_TO = ("constrained_opt.diffusion.evaluation.metrics",)

warnings.warn(
    f"{__name__} is deprecated; import from " + ", ".join(MOVED_TO),
    DeprecationWarning,
    stacklevel=2,
)
