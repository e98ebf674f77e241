"""Stable Diffusion unlearning: trainable-parameter sets, EraseDiff, ESD and SalUn, and ``unlearn_sd``.

Notation: z_0 is a latent, x_t = √ᾱ_t z_0 + √(1−ᾱ_t) ε with t ~ U{0..T−1}, c a CLIP text embedding and
ε_θ(x_t | c) the UNet, always without classifier-free guidance during training.

- ``erasediff``: min_θ L_r(θ) s.t. L_f(θ) − min_φ L_f(φ) ≤ 0 through
  :class:`~constrained_opt.ValueFunctionBilevelOptimizer` (rule ``grad_norm``), with
  L_r = E‖ε − ε_θ(x_t | c_r)‖² on D_r and L_f = E‖ε_f − ε_θ(x_t | c_f)‖² on D_f, where
  ε_f = sg ε_θ_t(x_t | c_m) for an anchor prompt c_m, computed once per step at θ_t.
- ``esd`` (Gandikota et al. 2023): min_θ E‖ε_θ(x_t | c) − [ε*(x_t | ∅) − η(ε*(x_t | c) − ε*(x_t | ∅))]‖²,
  with ε* the frozen original UNet and x_t reached by DDIM sampling with ε* (CFG scale 3) for a random
  number i of the ``gen_steps`` steps; the UNet is queried at the DDIM timestep x_t sits at.
  Plain Adam, no data set.
- ``salun`` (Fan et al. 2024): mask m = top ``keep`` of |∇_θ Σ_{D_f} L_denoise|; min L_f + α L_r (the same
  L_f and ε_f as EraseDiff) with Adam on gradients ⊙ m.

Parameter sets (``--train-params``): ESD's ``noxattn`` (default; the paper's choice for nudity), ``xattn``
and ``full`` (:mod:`.params`), or ``lora``: a LoRA adapter on one of those sets (:mod:`.lora`), the base
weights untouched. The models: SD 1.x/2.x and SDXL, ε- or v-prediction (:mod:`.model`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data import BatchSampler, ImageData
from ..errors import UsageError
from ..io import atomic_path, write_json
from ..losses import denoising_loss, forget_loss, saliency_mask
from ..metrics import PeakMemory
from ..multiclass import StratifiedSampler
from .latents import SetSpec, fingerprint, generate_set, load_set
from .loading import load_pipeline
from .lora import is_lora_parameter
from .model import Denoiser, PromptTable, autocast, encode_prompts, is_sdxl, noised, text_encoders
from .params import NOXATTN_EXCLUDED, PARAM_SETS, select_trainable, trains
from .prompts import Task

__all__ = ["NOXATTN_EXCLUDED", "PARAM_SETS", "SDJob", "select_trainable", "trains", "unlearn_sd"]

TRAIN_PARAMS = (*PARAM_SETS, "lora")
METHODS = ("erasediff", "esd", "salun")
MIXED_PRECISION = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}
OPTIMIZERS = ("adam", "adam8bit")
DEFAULT_BATCH = {"erasediff": 16, "esd": 1, "salun": 8}
ESD_STEPS = 1000


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
        if not 0 < self.keep <= 1:
            raise UsageError(f"SalUn --keep must be in (0, 1], got {self.keep}")
        if self.grid_prompts is not None and not all(p.strip() for p in self.grid_prompts):
            raise UsageError("--grid-prompt must be a non-empty prompt")


def base_optimizer(name: str):
    """``torch.optim.Adam`` or bitsandbytes' ``Adam8bit`` (its moments take 2 bytes per parameter, not 8)."""
    if name == "adam":
        return torch.optim.Adam
    try:
        import bitsandbytes
    except ImportError:
        raise UsageError("--optimizer adam8bit needs bitsandbytes: pip install bitsandbytes") from None
    return bitsandbytes.optim.Adam8bit


# ------------------------------------------------------------------------------------------- methods
@dataclass
class Context:
    """Shared by the methods: the trained model, its parameters, the prompt table and RNG.

    Batches carry prompt-table rows as their condition c (see :mod:`.model`)."""

    eps: Denoiser
    params: list[torch.nn.Parameter]
    names: list[str]  # the parameters' names in the UNet
    table: PromptTable
    anchors: Tensor  # table rows of the anchor prompts c_m
    scheduler: object  # DDPMScheduler of the model (forward process, prediction type)
    generator: torch.Generator
    job: SDJob
    accelerator: object  # accelerate.Accelerator: the model and the optimizers are prepared by it
    model: torch.nn.Module  # the prepared UNet (DDP-wrapped with several processes)
    scaler: torch.amp.GradScaler | None = None  # fp16 loss scaling: accelerate's (CUDA) or our own (CPU)

    @property
    def own_scaler(self) -> torch.amp.GradScaler | None:
        """The scaler this loop steps itself; accelerate's prepared optimizers step and update theirs."""
        return self.scaler if self.scaler is not self.accelerator.scaler else None

    def descend(self, optimizer, micro_loss, mask: list[Tensor] | None = None) -> dict[str, float]:
        """One step of a prepared plain optimizer on the mean of ``gradient_accumulation_steps`` losses
        ``micro_loss() -> (loss, stats)``, each on its own micro-batch (gradients accumulated, DDP's
        all-reduce only on the last); loss-scaled under fp16, gradients ⊙ ``mask``. Returns the mean stats."""
        n, scaler = self.job.gradient_accumulation_steps, self.own_scaler
        optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        for i in range(n):
            sync = contextlib.nullcontext() if i == n - 1 else self.accelerator.no_sync(self.model)
            with sync:
                loss, stats = micro_loss()
                if scaler is not None:
                    scaler.scale(loss / n).backward()
                else:
                    self.accelerator.backward(loss / n)
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + float(v) / n
        if mask is not None:
            for p, m in zip(self.params, mask, strict=True):
                p.grad.mul_(m)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        return totals

    def batch(self, sampler: BatchSampler):
        z0, rows = sampler.next()
        return noised(self.scheduler, z0.to(self.table.device), rows.to(self.table.device), self.generator)

    def anchor_target(self, b) -> Tensor:
        """ε_f = sg ε_θ(x_t | c_m) (v_f for a v-model), one anchor c_m drawn per sample."""
        pick = torch.randint(len(self.anchors), (len(b.x_t),), generator=self.generator)
        with torch.no_grad():
            return self.eps(b.x_t, b.t, self.anchors[pick]).detach()


class EraseDiffSD:
    def __init__(self, ctx: Context):
        from constrained_opt import ValueFunctionBilevelOptimizer

        j = ctx.job
        self.ctx = ctx
        optimizer = ValueFunctionBilevelOptimizer(
            ctx.params,
            base_optimizer=base_optimizer(j.optimizer),
            lr=j.lr,
            inner_steps=j.inner_steps,
            inner_lr=j.inner_lr,
            rule="grad_norm",
            eta=j.eta,
            max_grad_norm=j.max_grad_norm,
            grad_scaler=ctx.scaler,
        )
        self.optimizer = ctx.accelerator.prepare_optimizer(optimizer, device_placement=False)

    def step(self, retain: BatchSampler, forget: BatchSampler) -> dict[str, float]:
        """One update through accelerate's prepared optimizer: ``opt.step(Closures(retain, forget))``. With
        gradient accumulation each closure is ``MicroBatches`` over that many micro-batches, fixed for
        the step (the inner loop evaluates the forget loss at θ and φ^k on the same data). With several
        concepts the forget closures are ``{concept: L_f on its rows of the stratified batch}``, one
        constraint each."""
        from constrained_opt import Closures, MicroBatches

        ctx, n = self.ctx, self.ctx.job.gradient_accumulation_steps
        task = ctx.job.task
        retain_parts, forget_parts = [], {}
        for _ in range(n):
            br, bf = ctx.batch(retain), ctx.batch(forget)
            target = ctx.anchor_target(bf)
            retain_parts.append(lambda br=br: denoising_loss(ctx.eps, br))
            for name, (b, y) in self.per_concept(bf, target).items():
                forget_parts.setdefault(name, []).append(lambda b=b, y=y: forget_loss(ctx.eps, b, y))

        def closure(parts):
            return parts[0] if n == 1 else MicroBatches(parts)

        constraints = {k: closure(v) for k, v in forget_parts.items()}
        self.optimizer.step(Closures(closure(retain_parts), constraints if task.groups else constraints[""]))
        stats = self.optimizer.optimizer.last_stats
        out = {k: v for k, v in stats.as_dict().items() if isinstance(v, float | bool)}
        if task.groups:
            for name, lam, loss in zip(stats.constraint_names, stats.lams, stats.forget_losses, strict=True):
                out[f"lam[{name}]"], out[f"forget_loss[{name}]"] = lam, loss
        return out

    def per_concept(self, bf, target) -> dict[str, tuple]:
        """``{"": (bf, target)}``, or each concept's rows of the forget batch (its cond holds prompt rows)."""
        task, ids = self.ctx.job.task, self.ctx.table.ids
        if not task.groups:
            return {"": (bf, target)}
        out = {}
        for name, group in zip(task.group_names, task.groups, strict=True):
            rows = torch.isin(bf.cond, torch.tensor([ids[p] for p in group], device=bf.cond.device))
            rows = rows.nonzero().squeeze(1)
            out[name] = (type(bf)(*(field[rows] for field in bf)), target[rows])
        return out


class SalUnSD:
    def __init__(self, ctx: Context, forget: ImageData):
        self.ctx = ctx
        optimizer = base_optimizer(ctx.job.optimizer)(ctx.params, lr=ctx.job.lr)
        self.optimizer = ctx.accelerator.prepare_optimizer(optimizer, device_placement=False)
        self.mask = self.saliency(forget)

    def saliency(self, forget: ImageData) -> list[Tensor]:
        """m = top-``keep`` of |Σ_{D_f} ∇L_denoise| over the trained parameters (one pass over D_f).

        For a LoRA adapter the ranking is over the B factors only and A is not masked: at the adapter's
        start B = 0, so ∇_A L = (α/r) Bᵀ ∇_W L vanishes and A has no saliency, while
        ∇_B L = (α/r) ∇_W L Aᵀ is the weight gradient seen through A's random projection.
        """
        ctx, bs = self.ctx, self.ctx.job.batch_size
        for p in ctx.params:
            p.grad = None
        for start in range(0, len(forget), bs):
            z0 = forget.images[start : start + bs].to(ctx.table.device)
            rows = forget.labels[start : start + bs].to(ctx.table.device)
            denoising_loss(ctx.eps, noised(ctx.scheduler, z0, rows, ctx.generator)).backward()
        ranked = [i for i, n in enumerate(ctx.names) if not (ctx.job.lora and ".lora_A." in n)]
        scores = {
            str(i): ctx.params[i].grad if ctx.params[i].grad is not None else torch.zeros_like(ctx.params[i])
            for i in ranked
        }
        mask = saliency_mask(scores, ctx.job.keep)
        for p in ctx.params:
            p.grad = None
        return [
            mask[str(i)].bool() if str(i) in mask else torch.ones_like(p, dtype=torch.bool)
            for i, p in enumerate(ctx.params)
        ]

    def step(self, retain: BatchSampler, forget: BatchSampler) -> dict[str, float]:
        ctx = self.ctx

        def micro_loss():
            bf, br = ctx.batch(forget), ctx.batch(retain)
            lf = forget_loss(ctx.eps, bf, ctx.anchor_target(bf))
            lr = denoising_loss(ctx.eps, br)
            return lf + ctx.job.alpha * lr, {"forget_loss": lf.detach(), "retain_loss": lr.detach()}

        return ctx.descend(self.optimizer, micro_loss, self.mask)


class ESD:
    def __init__(self, ctx: Context, frozen: Denoiser, ddim, latent_shape: tuple[int, int, int]):
        self.ctx, self.frozen, self.ddim, self.latent_shape = ctx, frozen, ddim, latent_shape
        optimizer = base_optimizer(ctx.job.optimizer)(ctx.params, lr=ctx.job.lr)
        self.optimizer = ctx.accelerator.prepare_optimizer(optimizer, device_placement=False)
        self.forget_rows = torch.tensor([ctx.table.ids[p] for p in ctx.job.task.forget])
        self.null = ctx.table.ids[""]

    @torch.no_grad()
    def partial_sample(self, c: Tensor, shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """(x_t, t) after i ~ U{0..n−1} DDIM steps of ε* with CFG s: ε̂ = ε*(∅) + s(ε*(c) − ε*(∅))."""
        ctx, s = self.ctx, self.ctx.job.start_guidance
        self.ddim.set_timesteps(ctx.job.gen_steps)
        i = int(torch.randint(len(self.ddim.timesteps), (), generator=ctx.generator))
        x = torch.randn(shape, generator=ctx.generator).to(ctx.table.device) * self.ddim.init_noise_sigma
        null = torch.full_like(c, self.null)
        for t in self.ddim.timesteps[:i]:
            e_u, e_c = self.frozen(
                torch.cat([x, x]), t.expand(2 * len(x)).to(x.device), torch.cat([null, c])
            ).chunk(2)
            x = self.ddim.step(e_u + s * (e_c - e_u), t, x).prev_sample
        return x, self.ddim.timesteps[i].expand(len(x)).to(x.device)

    def step(self, retain: BatchSampler | None, forget: BatchSampler | None) -> dict[str, float]:
        ctx, bs = self.ctx, self.ctx.job.batch_size

        def micro_loss():
            pick = torch.randint(len(self.forget_rows), (bs,), generator=ctx.generator)
            c = self.forget_rows[pick].to(ctx.table.device)
            x_t, t = self.partial_sample(c, (bs, *self.latent_shape))
            with torch.no_grad():
                e_0 = self.frozen(x_t, t, torch.full_like(c, self.null))
                e_c = self.frozen(x_t, t, c)
            target = e_0 - ctx.job.negative_guidance * (e_c - e_0)
            loss = F.mse_loss(ctx.eps(x_t, t, c), target)
            return loss, {"loss": loss.detach(), "t": t[0].float()}

        return ctx.descend(self.optimizer, micro_loss)


# ------------------------------------------------------------------------------------------- outputs
def save_unet(unet, out: str) -> str:
    """``out/unet/`` in the diffusers layout (config.json + safetensors), swapped in atomically."""
    final = os.path.join(out, "unet")
    os.makedirs(out, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=out, prefix=".unet.")
    old = None
    try:
        unet.save_pretrained(tmp, safe_serialization=True)
        if os.path.exists(final):
            old = tempfile.mkdtemp(dir=out, prefix=".unet-old.")
            os.replace(final, os.path.join(old, "unet"))
        os.replace(tmp, final)
    finally:
        for leftover in (tmp, old):
            if leftover and os.path.exists(leftover):
                shutil.rmtree(leftover)
    return final


@torch.no_grad()
def render(pipe, prompts: list[str], job: SDJob) -> Tensor:
    """``grid_images`` images per prompt in [0, 1], seeds ``seed + j`` (the same x_T before and after),
    under the job's autocast."""
    n, out = job.grid_images, []
    pipe.set_progress_bar_config(disable=True)
    device = pipe.unet.device
    jobs = [(p, job.seed + j) for p in prompts for j in range(n)]
    for start in range(0, len(jobs), job.gen_batch_size):
        chunk = jobs[start : start + job.gen_batch_size]
        with autocast(device, MIXED_PRECISION[job.mixed_precision]):
            images = pipe(
                prompt=[p for p, _ in chunk],
                height=job.resolution,
                width=job.resolution,
                num_inference_steps=job.grid_steps,
                guidance_scale=job.gen_guidance,
                generator=[torch.Generator().manual_seed(s) for _, s in chunk],
                output_type="pt",
            ).images
        out.append(images.float().cpu())
    return torch.cat(out)


def save_before_after(path: str, before: Tensor, after: Tensor, n: int) -> None:
    """PNG with one row per prompt: its ``n`` images before unlearning, then the same seeds after.

    Full-resolution tiles with torchvision (``report.save_sample_grid`` draws a matplotlib figure sized
    for 8×8–32×32 class samples, which would shrink 512² images to thumbnails).
    """
    from torchvision.utils import make_grid, save_image

    rows = [torch.cat([b, a]) for b, a in zip(before.split(n), after.split(n), strict=True)]
    grid = make_grid(torch.cat(rows), nrow=2 * n, padding=4, pad_value=1.0)
    with atomic_path(path) as tmp:
        save_image(grid, tmp, format="png")


# ------------------------------------------------------------------------------------------- the job
def trained_parameters(unet, job: SDJob, amp: torch.dtype | None) -> list[tuple[str, torch.nn.Parameter]]:
    """Make the job's parameters trainable and return them by name.

    ``lora``: the base UNet is frozen (and, under mixed precision, stored in the autocast dtype, as
    diffusers' LoRA examples do: it is only ever read in that dtype) and a float32 adapter is attached.
    """
    from .lora import add_lora

    if job.lora:
        if amp is not None:
            unet.to(dtype=amp)
        add_lora(unet, job.lora_target, job.lora_rank, job.lora_alpha)
    else:
        select_trainable(unet, job.train_params)
    return [(n, p) for n, p in unet.named_parameters() if p.requires_grad]


def make_accelerator(job: SDJob, device: torch.device):
    """The run's ``accelerate.Accelerator``: it prepares the UNet (DDP under ``accelerate launch``) and the
    optimizers, and under fp16 on an accelerator it owns the GradScaler (on the CPU accelerate has none
    and the loop keeps its own). In a single process an accelerate state left by an earlier run with
    other settings (a notebook, the tests) is reset first: accelerate refuses to change it in place."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState, PartialState

    cpu = device.type == "cpu"
    partial, full = PartialState._shared_state, AcceleratorState._shared_state
    single = partial.get("num_processes", 1) == 1
    placed = partial.get("device", torch.device("cpu"))
    if (
        full
        and single
        and (full.get("_mixed_precision") != job.mixed_precision or placed.type != device.type)
    ):
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    if device.type == "cuda" and device.index is not None and single:
        torch.cuda.set_device(device)
    return Accelerator(cpu=cpu, mixed_precision=job.mixed_precision)


def unlearn_sd(job: SDJob) -> dict:
    """Run one job: load, self-generate D_f/D_r (cached), train, write the result, the grid and records.

    Writes ``out/unet/`` (diffusers layout) or, for ``--train-params lora``, ``out/{WEIGHT_NAME}``
    (plus ``out/unet/`` merged, with ``--merge``); ``out/before_after.png`` (rows = ``grid_prompts``,
    left half before, right half after), ``out/run.json`` (settings and summary) and
    ``out/history.json`` (per-step statistics). Every input is validated before anything is written.
    Under ``accelerate launch`` each process generates its share of the data and trains a DDP
    replica; only the main process writes.
    """
    from diffusers import DDIMScheduler, DDPMScheduler
    from tqdm.auto import tqdm

    from ..ddpm import cache_dir, check_output_dir, resolve_device
    from .lora import WEIGHT_NAME, merged_unet, save_lora

    job = job.resolved()
    check_output_dir(job.out)
    accelerator = make_accelerator(job, resolve_device(job.device))
    state = accelerator.state
    device = accelerator.device if state.num_processes > 1 else resolve_device(job.device)
    amp = MIXED_PRECISION[job.mixed_precision]
    base_optimizer(job.optimizer)  # fails now, not after generation, when bitsandbytes is missing
    load = functools.partial(
        load_pipeline, job.model, config=job.config, original_config=job.original_config, offline=job.offline
    )
    pipe = load()
    unet = pipe.unet
    factor = pipe.vae_scale_factor * 2 ** (len(unet.config.block_out_channels) - 1)
    native = unet.config.sample_size * pipe.vae_scale_factor
    job = dataclasses.replace(job, resolution=job.resolution or native)
    if job.resolution % factor:
        raise UsageError(f"--resolution must be a multiple of {factor} for this model, got {job.resolution}")
    latent = job.resolution // pipe.vae_scale_factor
    latent_shape = (unet.config.in_channels, latent, latent)
    pipe.to(device)
    progress = job.progress and state.is_main_process

    task = job.task
    prompts = list(dict.fromkeys([*task.forget, *task.retain, *task.anchors, ""]))
    table = encode_prompts(pipe, prompts, device, job.resolution)

    data: dict[str, ImageData] = {}
    set_dirs: dict[str, str] = {}
    sets = {
        "forget": (list(task.generation_prompts()), job.num_forget, 0),
        "retain": (list(task.retain), job.num_retain, 1),
    }
    if job.method != "esd":
        root, weights = os.path.join(cache_dir(job.cache_dir), "sd-latents"), fingerprint(pipe)
        for name, (set_prompts, count, offset) in sets.items():
            spec = SetSpec(
                weights,
                tuple(set_prompts),
                job.resolution,
                job.gen_steps,
                job.gen_guidance,
                job.seed + offset * 10_000_000,
                job.mixed_precision,
            )
            directory = spec.directory(root)
            with autocast(device, amp):
                generate_set(
                    pipe,
                    spec,
                    count,
                    directory,
                    batch_size=job.gen_batch_size,
                    progress=progress,
                    desc=f"{name} set",
                    shard=(state.process_index, state.num_processes),
                )
            state.wait_for_everyone()
            rows = [table.ids[p] for p in set_prompts]
            data[name] = load_set(directory, count, rows, f"{name}:{directory}")
            set_dirs[name] = directory

    grid_prompts = list(job.grid_prompts or [*task.forget, *task.retain[:2]])
    before = render(pipe, grid_prompts, job) if state.is_main_process else None

    frozen = None
    if job.method == "esd" and not job.lora:  # with an adapter, ε* is the UNet with the adapter off
        frozen = copy.deepcopy(unet).requires_grad_(False).eval()
    named = trained_parameters(unet, job, amp)
    if device.type == "cuda":  # the VAE and text encoders are not needed while training
        for name in ("vae", *text_encoders(pipe)):
            getattr(pipe, name).to("cpu")
    if job.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    model = accelerator.prepare_model(unet, device_placement=False)  # DDP with several processes
    generator = torch.Generator().manual_seed(job.seed + 1 + state.process_index)
    ctx = Context(
        eps=Denoiser(model, table, device, amp),
        params=[p for _, p in named],
        names=[n for n, _ in named],
        table=table,
        anchors=torch.tensor([table.ids[a] for a in task.anchors]),
        scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
        generator=generator,
        job=job,
        accelerator=accelerator,
        model=model,
        scaler=accelerator.scaler or (torch.amp.GradScaler(device.type) if amp is torch.float16 else None),
    )
    samplers = {
        k: BatchSampler(d, job.batch_size, job.seed + 2 * state.process_index + i)
        for i, (k, d) in enumerate(data.items())
    }
    if task.groups and "forget" in data:  # every forget batch holds every concept
        parts = [
            data["forget"].subset(torch.isin(data["forget"].labels, torch.tensor([table.ids[p] for p in g])))
            for g in task.groups
        ]
        samplers["forget"] = StratifiedSampler(parts, job.batch_size, job.seed + 2 * state.process_index + 1)
    history: list[dict[str, float]] = []
    meter = PeakMemory(device)
    with meter:
        t0 = time.perf_counter()
        if job.method == "erasediff":
            method = EraseDiffSD(ctx)
        elif job.method == "salun":
            method = SalUnSD(ctx, data["forget"])
        else:
            ddim = DDIMScheduler.from_config(pipe.scheduler.config)
            if job.lora:
                frozen_eps = Denoiser(unet, table, device, amp, base_only=unet)
            else:
                frozen_eps = Denoiser(frozen, table, device, amp)
            method = ESD(ctx, frozen_eps, ddim, latent_shape)
        prep_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in tqdm(range(job.steps), desc=job.method, disable=not progress):
            history.append(method.step(samplers.get("retain"), samplers.get("forget")))
        time_s = time.perf_counter() - t0
    unet.eval()
    if job.gradient_checkpointing:
        unet.disable_gradient_checkpointing()
    for p in unet.parameters():
        p.requires_grad_(False)
    outputs = [WEIGHT_NAME, *(["unet"] if job.merge else [])] if job.lora else ["unet"]
    record = {
        "method": job.method,
        "task": task.name,
        "model": {
            "architecture": "sdxl" if is_sdxl(pipe) else "sd",
            "prediction_type": pipe.scheduler.config.prediction_type,
            "resolution": job.resolution,
        },
        "forget_prompts": list(task.forget),
        "retain_prompts": list(task.retain),
        "anchors": list(task.anchors),
        "constraints": {name: list(g) for name, g in zip(task.group_names, task.groups, strict=True)},
        "trained_parameters": sum(p.numel() for p in ctx.params),
        "total_parameters": sum(p.numel() for n, p in unet.named_parameters() if not is_lora_parameter(n)),
        "time_s": time_s,
        "prep_s": prep_s,
        "peak_mem_mb": meter.peak_mb,
        "final": history[-1],
        "grid_prompts": grid_prompts,
        "data_sets": set_dirs,
        "outputs": outputs,
        "settings": {k: v for k, v in asdict(job).items() if k != "task"},
    }
    if state.is_main_process:
        if job.lora:
            save_lora(unet, type(pipe), job.out)
        else:
            save_unet(unet, job.out)
        pipe.to(device)
        save_before_after(
            os.path.join(job.out, "before_after.png"),
            before,
            render(pipe, grid_prompts, job),
            job.grid_images,
        )
        if job.merge:  # fused into freshly loaded base weights, in their stored precision
            del pipe, unet, model, ctx, method
            save_unet(merged_unet(load(), job.out), job.out)
        write_json(os.path.join(job.out, "history.json"), history)
        write_json(os.path.join(job.out, "run.json"), record)
    state.wait_for_everyone()
    return record
