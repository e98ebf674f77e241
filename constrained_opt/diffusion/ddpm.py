"""Deprecated alias of ``constrained_opt.diffusion.ddpm``, kept for one release. Moved to:

- ``constrained_opt.diffusion.evaluation.generated``
- ``constrained_opt.diffusion.runtime.device``
- ``constrained_opt.diffusion.runtime.paths``
- ``constrained_opt.diffusion.jobs.common``
- ``constrained_opt.diffusion.runtime.provenance``
- ``constrained_opt.diffusion.jobs.train_base``
- ``constrained_opt.diffusion.jobs.unlearn``
- ``constrained_opt.diffusion.jobs.evaluate``
- ``constrained_opt.diffusion.jobs.demo``
- ``constrained_opt.diffusion.jobs.demo_seed``
"""

import warnings

from constrained_opt.diffusion.evaluation.generated import EvalSettings, evaluate_unet, generate  # noqa: F401
from constrained_opt.diffusion.jobs.common import check_steps, load_checked  # noqa: F401
from constrained_opt.diffusion.jobs.demo import (  # noqa: F401
    DEMO_DATA,
    acceptance_notes,
    demo,
    noise_floor_notes,
    under_attack,
)
from constrained_opt.diffusion.jobs.demo_seed import (  # noqa: F401
    DemoContext,
    check_done_rows,
    evaluate_model,
    evaluate_reference,
    run_job,
    run_seed,
    seed_dir,
)
from constrained_opt.diffusion.jobs.evaluate import evaluate_checkpoints  # noqa: F401
from constrained_opt.diffusion.jobs.train_base import base_checkpoints, retrain_checkpoint, train_base  # noqa: F401
from constrained_opt.diffusion.jobs.unlearn import UnlearnJob, result_record, unlearn_ddpm  # noqa: F401
from constrained_opt.diffusion.runtime.device import resolve_device  # noqa: F401
from constrained_opt.diffusion.runtime.paths import cache_dir, check_output_dir  # noqa: F401
from constrained_opt.diffusion.runtime.provenance import provenance  # noqa: F401

METRIC_KEYS = (
    "p_forget",
    "forget_entropy",
    "remaining_accuracy",
    "fid",
    "precision",
    "recall",
    "time_s",
    "peak_mem_mb",
)
MOVED_TO = (
    "constrained_opt.diffusion.evaluation.generated",
    "constrained_opt.diffusion.runtime.device",
    "constrained_opt.diffusion.runtime.paths",
    "constrained_opt.diffusion.jobs.common",
    "constrained_opt.diffusion.runtime.provenance",
    "constrained_opt.diffusion.jobs.train_base",
    "constrained_opt.diffusion.jobs.unlearn",
    "constrained_opt.diffusion.jobs.evaluate",
    "constrained_opt.diffusion.jobs.demo",
    "constrained_opt.diffusion.jobs.demo_seed",
)

warnings.warn(
    f"{__name__} is deprecated; import from " + ", ".join(MOVED_TO),
    DeprecationWarning,
    stacklevel=2,
)
