"""The settings of one ``unlearn sd`` run (:class:`SDJob`), validated, and their choices."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

import torch

from ...functional import MAX_CONSTRAINTS
from ..losses import robust_forms_error
from ..runtime.errors import UsageError
from .params import PARAM_SETS
from .prompts import Task

TRAIN_PARAMS = (*PARAM_SETS, "lora")
METHODS = ("erasediff", "esd", "salun")
MIXED_PRECISION = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}
OPTIMIZERS = ("adam", "adam8bit")
DEFAULT_BATCH = {"erasediff": 16, "esd": 1, "salun": 8}
ESD_STEPS = 1000
INVERSION_NORMS = {"2": 2, "inf": math.inf}


def parse_robust(text: str) -> tuple[str, ...]:
    """``"relearn,inversion"`` → ``("relearn", "inversion")``; an unknown, repeated or empty form raises."""
    forms = tuple(f.strip() for f in text.split(","))
    check_forms(forms)
    return forms


def check_forms(forms: tuple[str, ...]) -> None:
    if error := robust_forms_error(forms, ","):
        raise UsageError(f"--robust: {error}")


@dataclass
class SDJob:
    """One ``unlearn sd`` run. ``steps``/``batch_size`` default per method (see :meth:`resolved`)."""

    model: str
    out: str
    task: Task
    method: str = "erasediff"
    train_params: str = "noxattn"
    lora_rank: int = 4
    lora_alpha: float | None = None  # None: the rank (α/r = 1)
    lora_target: str = "noxattn"
    merge: bool = False
    steps: int | None = None
    batch_size: int | None = None
    gradient_accumulation_steps: int = 1  # micro-batches per step, each of batch_size
    num_forget: int = 400
    num_retain: int = 400
    resolution: int | None = None  # None: the model's native size (UNet sample_size × VAE factor)
    lr: float = 1e-5
    inner_steps: int = 2
    inner_lr: float | None = None
    eta: float = 1.0
    max_grad_norm: float = 1.0
    negative_guidance: float = 1.0
    start_guidance: float = 3.0
    alpha: float = 0.5
    keep: float = 0.5
    robust: tuple[str, ...] = ()  # robust forget rows next to the plain one (EraseDiff; sd.robust)
    relearn_steps: int = 1
    relearn_lr: float = 1e-4
    relearn_sign: bool = False  # sign steps, the attacker's first Adam step (Relearn(sign=True))
    relearn_images: str | None = None  # None: the relearning attacker uses the step's forget batch
    sharpness_rho: float = 0.05
    inversion_steps: int = 30
    inversion_lr: float = 1e-3
    inversion_eps: float | None = None  # None: unconstrained (AdvUnlearn's); else the ε-ball's radius
    inversion_norm: str = "inf"
    inversion_tokens: int = 1
    gen_steps: int = 50
    gen_guidance: float = 7.5
    gen_batch_size: int = 4
    grid_prompts: tuple[str, ...] | None = None
    grid_images: int = 2
    grid_steps: int = 50
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    optimizer: str = "adam"
    seed: int = 0
    cache_dir: str | None = None
    config: str | None = None
    original_config: str | None = None
    offline: bool = False
    device: str = "auto"
    progress: bool = True

    def resolved(self) -> SDJob:
        """Validated, with the per-method defaults filled in: batch 16 (EraseDiff), 1 (ESD), 8 (SalUn);
        steps = 5 epochs over D_f (EraseDiff, SalUn: the authors' nudity runs) or 1000 (ESD);
        inner_lr = lr."""
        self.validate()
        batch = self.batch_size or DEFAULT_BATCH[self.method]
        groups = len(self.task.groups)
        if self.method == "erasediff" and groups > MAX_CONSTRAINTS:  # one constraint per group
            raise UsageError(
                f"{groups} concepts or classes make {groups} EraseDiff constraints (one each), and the "
                f"optimizer's exact solver takes at most {MAX_CONSTRAINTS}: give at most {MAX_CONSTRAINTS} "
                "--concept or --forget-class per run"
            )
        rows = max(groups, 1) * (1 + len(self.robust))
        if self.robust and rows > MAX_CONSTRAINTS:  # a plain row and one per robust form, per concept
            raise UsageError(
                f"{max(groups, 1)} concept(s) × (1 plain + {len(self.robust)} robust rows) make {rows} "
                f"constraints, and the optimizer's exact solver takes at most {MAX_CONSTRAINTS}: give fewer "
                "--robust forms or fewer concepts"
            )
        if groups and self.method != "esd" and min(batch, self.num_forget) < groups:
            raise UsageError(
                f"{groups} concepts need --batch-size and --num-forget of at least {groups} "
                "(every forget batch holds every concept)"
            )
        steps = self.steps or (ESD_STEPS if self.method == "esd" else math.ceil(5 * self.num_forget / batch))
        inner_lr = self.lr if self.inner_lr is None else self.inner_lr
        alpha = float(self.lora_rank) if self.lora_alpha is None else self.lora_alpha
        return dataclasses.replace(self, batch_size=batch, steps=steps, inner_lr=inner_lr, lora_alpha=alpha)

    @property
    def lora(self) -> bool:
        return self.train_params == "lora"

    def validate(self) -> None:
        choices = (
            ("method", METHODS),
            ("train_params", TRAIN_PARAMS),
            ("lora_target", PARAM_SETS),
            ("mixed_precision", tuple(MIXED_PRECISION)),
            ("optimizer", OPTIMIZERS),
        )
        for name, allowed in choices:
            if getattr(self, name) not in allowed:
                flag = "--" + name.replace("_", "-")
                raise UsageError(
                    f"unknown {flag} {getattr(self, name)!r}; expected one of {', '.join(allowed)}"
                )
        positive = (
            "steps",
            "batch_size",
            "num_forget",
            "num_retain",
            "resolution",
            "gen_steps",
            "gen_batch_size",
            "grid_images",
            "grid_steps",
            "lora_rank",
            "gradient_accumulation_steps",
        )
        for name in positive:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
        for name in ("lr", "max_grad_norm"):
            if not getattr(self, name) > 0:
                raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.inner_steps < 0 or self.eta < 0 or (self.inner_lr is not None and self.inner_lr < 0):
            raise UsageError("--inner-steps, --inner-lr and --eta must be >= 0")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise UsageError(f"--lora-alpha must be positive, got {self.lora_alpha}")
        if self.merge and not self.lora:
            raise UsageError("--merge fuses a LoRA adapter into the UNet: it needs --train-params lora")
        if self.resolution is not None and self.resolution % 8:
            raise UsageError(
                f"--resolution must be a multiple of 8 (the VAE downsamples by 8), got {self.resolution}"
            )
        self.validate_robust()
        if not 0 < self.keep <= 1:
            raise UsageError(f"SalUn --keep must be in (0, 1], got {self.keep}")
        if self.grid_prompts is not None and not all(p.strip() for p in self.grid_prompts):
            raise UsageError("--grid-prompt must be a non-empty prompt")

    def validate_robust(self) -> None:
        check_forms(tuple(self.robust))
        if self.robust and self.method != "erasediff":
            raise UsageError(
                f"--robust adds constraint rows to EraseDiff's optimizer; --method {self.method} trains with "
                "a plain optimizer and has none: use --method erasediff"
            )
        if self.relearn_sign and "relearn" not in self.robust:
            raise UsageError("--relearn-sign shapes the relearning look-ahead: add relearn to --robust")
        if self.relearn_images is not None:
            if "relearn" not in self.robust:
                raise UsageError(
                    "--relearn-images are the relearning attacker's images: add relearn to --robust"
                )
            if self.task.groups:
                raise UsageError(
                    "--relearn-images serves one concept; with several concepts the relearning attacker "
                    "uses each concept's rows of the forget batch (leave --relearn-images out)"
                )
            if not os.path.isdir(self.relearn_images):
                raise UsageError(f"--relearn-images: image folder not found: {self.relearn_images}")
        for name in ("relearn_steps", "inversion_steps", "inversion_tokens"):
            if getattr(self, name) < 1:
                flag = "--" + name.replace("_", "-")
                raise UsageError(f"{flag} must be a positive integer, got {getattr(self, name)}")
        for name in ("relearn_lr", "sharpness_rho", "inversion_lr"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise UsageError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
        radius = self.inversion_eps
        if radius is not None and not (math.isfinite(radius) and radius > 0):
            raise UsageError(f"--inversion-eps must be a finite number > 0, got {radius}")
        if self.inversion_norm not in INVERSION_NORMS:
            raise UsageError(
                f"--inversion-norm must be one of {', '.join(INVERSION_NORMS)}, got {self.inversion_norm!r}"
            )
