"""Deprecated: the SD unlearning methods moved to :mod:`constrained_opt.diffusion.sd.methods`, the run's
settings to :mod:`constrained_opt.diffusion.sd.job` and ``unlearn_sd`` to
:mod:`constrained_opt.diffusion.jobs.sd_unlearn`."""

import warnings

from ..jobs.sd_unlearn import (
    make_accelerator,
    render,
    save_before_after,
    save_unet,
    trained_parameters,
    unlearn_sd,
)
from .job import DEFAULT_BATCH, ESD_STEPS, METHODS, MIXED_PRECISION, OPTIMIZERS, TRAIN_PARAMS, SDJob
from .methods import ESD, Context, EraseDiffSD, SalUnSD, base_optimizer
from .params import NOXATTN_EXCLUDED, PARAM_SETS, select_trainable, trains

__all__ = [
    "DEFAULT_BATCH",
    "ESD",
    "ESD_STEPS",
    "METHODS",
    "MIXED_PRECISION",
    "NOXATTN_EXCLUDED",
    "OPTIMIZERS",
    "PARAM_SETS",
    "TRAIN_PARAMS",
    "Context",
    "EraseDiffSD",
    "SDJob",
    "SalUnSD",
    "base_optimizer",
    "make_accelerator",
    "render",
    "save_before_after",
    "save_unet",
    "select_trainable",
    "trained_parameters",
    "trains",
    "unlearn_sd",
]

warnings.warn(
    "constrained_opt.diffusion.sd.train is deprecated; import constrained_opt.diffusion.sd.methods, "
    "constrained_opt.diffusion.sd.job or constrained_opt.diffusion.jobs.sd_unlearn",
    DeprecationWarning,
    stacklevel=2,
)
