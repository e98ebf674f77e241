"""Deprecated: the SD attacks moved to :mod:`constrained_opt.diffusion.attacks.sd`, the ``attack sd``
job to :mod:`constrained_opt.diffusion.jobs.sd_attack` and its flags to
:mod:`constrained_opt.diffusion.cli.sd`."""

import warnings

from ..attacks.sd import (
    PRECISIONS,
    PREFIX_MODES,
    SD_ATTACKS,
    SD_HELP,
    TEMPLATES,
    Denoising,
    PromptAttack,
    SDBudget,
    concept_latents,
    encode,
    encode_images,
    placeholder_tokens,
    prompt_prefix,
    relearn,
    sweep_timesteps,
    textual_inversion,
)
from ..cli.sd import add_attack_arguments as add_sd_arguments
from ..cli.sd import run_attack as run_from_args
from ..jobs.sd_attack import Scorer, SDAttackJob, render, replace_dir, report_line, run_attacks, save_grid

__all__ = [
    "PRECISIONS",
    "PREFIX_MODES",
    "SD_ATTACKS",
    "SD_HELP",
    "TEMPLATES",
    "Denoising",
    "PromptAttack",
    "SDAttackJob",
    "SDBudget",
    "Scorer",
    "add_sd_arguments",
    "concept_latents",
    "encode",
    "encode_images",
    "placeholder_tokens",
    "prompt_prefix",
    "relearn",
    "render",
    "replace_dir",
    "report_line",
    "run_attacks",
    "run_from_args",
    "save_grid",
    "sweep_timesteps",
    "textual_inversion",
]

warnings.warn(
    "constrained_opt.diffusion.sd.attacks is deprecated; import constrained_opt.diffusion.attacks.sd "
    "(the attacks) or constrained_opt.diffusion.jobs.sd_attack (the job)",
    DeprecationWarning,
    stacklevel=2,
)
