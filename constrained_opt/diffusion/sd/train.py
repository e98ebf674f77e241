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

Parameter sets (``--train-params``), ESD's definitions in diffusers naming:

- ``noxattn`` (default; the paper's choice for nudity): everything except cross-attention (``attn2``)
  *and*, as in ESD's code, which the EraseDiff/SalUn SD code inherits, the output head
  (``conv_norm_out``, ``conv_out``) and the timestep MLP (``time_embedding``). That is 94.6% of SD v1.4's
  UNet (813.5M of 859.5M parameters).
- ``xattn``: the ``attn2`` modules only (44M).
- ``full``: every parameter (the authors' choice for Imagenette classes).
"""

from __future__ import annotations

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
from ..losses import denoising_loss, diffuse, forget_loss, saliency_mask
from ..metrics import PeakMemory
from ..multiclass import StratifiedSampler
from .latents import SetSpec, fingerprint, generate_set, load_set
from .loading import load_pipeline
from .prompts import Task

TRAIN_PARAMS = ("noxattn", "xattn", "full")
METHODS = ("erasediff", "esd", "salun")
MIXED_PRECISION = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}
OPTIMIZERS = ("adam", "adam8bit")
DEFAULT_BATCH = {"erasediff": 16, "esd": 1, "salun": 8}
ESD_STEPS = 1000
NOXATTN_EXCLUDED = ("conv_norm_out.", "conv_out.", "time_embedding.")


def trains(name: str, mode: str) -> bool:
    """Whether parameter ``name`` (diffusers UNet2DConditionModel naming) is trained under ``mode``."""
    if mode == "full":
        return True
    if mode == "xattn":
        return "attn2" in name
    if mode == "noxattn":
        return "attn2" not in name and not name.startswith(NOXATTN_EXCLUDED)
    raise UsageError(f"unknown --train-params {mode!r}; expected one of {', '.join(TRAIN_PARAMS)}")


def select_trainable(unet, mode: str) -> list[torch.nn.Parameter]:
    """Set ``requires_grad`` on every UNet parameter by ``mode``; returns the trained ones."""
    out = []
    for name, p in unet.named_parameters():
        p.requires_grad_(trains(name, mode))
        if p.requires_grad:
            out.append(p)
    return out


@dataclass
class SDJob:
    """One ``unlearn sd`` run. ``steps``/``batch_size`` default per method (see :meth:`resolved`)."""

    model: str
    out: str
    task: Task
    method: str = "erasediff"
    train_params: str = "noxattn"
    steps: int | None = None
    batch_size: int | None = None
    num_forget: int = 400
    num_retain: int = 400
    resolution: int = 512
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
        return dataclasses.replace(self, batch_size=batch, steps=steps, inner_lr=inner_lr)

    def validate(self) -> None:
        choices = (
            ("method", METHODS),
            ("train_params", TRAIN_PARAMS),
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
        if self.resolution % 8:
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
def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype`` on ``device``'s type, or a disabled one for ``None``."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


class Denoiser:
    """ε_θ(x_t, t, c) of a (possibly DDP-wrapped) UNet under autocast; outputs in float32."""

    def __init__(self, unet, device: torch.device, dtype: torch.dtype | None):
        self.unet, self.device, self.dtype = unet, device, dtype

    def __call__(self, x_t: Tensor, t: Tensor, c: Tensor) -> Tensor:
        with autocast(self.device, self.dtype):
            return self.unet(x_t, t, encoder_hidden_states=c).sample.float()


@dataclass
class Context:
    """Shared by the methods: the trained model, its parameters, the prompt-embedding table and RNG."""

    eps: Denoiser
    params: list[torch.nn.Parameter]
    table: Tensor  # (P, L, D) text embeddings of every prompt used
    ids: dict[str, int]
    anchors: Tensor  # table indices of the anchor prompts c_m
    scheduler: object  # DDPMScheduler of the model (forward process)
    generator: torch.Generator
    job: SDJob
    scaler: torch.amp.GradScaler | None = None  # fp16 loss scaling

    def descend(self, optimizer, loss: Tensor, mask: list[Tensor] | None = None) -> None:
        """One step of a plain optimizer on ``loss`` (loss-scaled under fp16), gradients ⊙ ``mask``."""
        optimizer.zero_grad(set_to_none=True)
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        if mask is not None:
            for p, m in zip(self.params, mask, strict=True):
                p.grad.mul_(m)
        if self.scaler:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()

    def cond(self, labels: Tensor) -> Tensor:
        return self.table[labels.to(self.table.device)]

    def batch(self, sampler: BatchSampler):
        return self.labelled_batch(sampler)[0]

    def labelled_batch(self, sampler: BatchSampler):
        """A diffused batch and its prompt labels."""
        z0, labels = sampler.next()
        return diffuse(self.scheduler, z0.to(self.table.device), self.cond(labels), self.generator), labels

    def anchor_target(self, b) -> Tensor:
        """ε_f = sg ε_θ(x_t | c_m), one anchor c_m drawn per sample."""
        pick = torch.randint(len(self.anchors), (len(b.x_t),), generator=self.generator)
        with torch.no_grad():
            return self.eps(b.x_t, b.t, self.cond(self.anchors[pick])).detach()


class EraseDiffSD:
    def __init__(self, ctx: Context):
        from constrained_opt import ValueFunctionBilevelOptimizer

        j = ctx.job
        self.ctx = ctx
        self.optimizer = ValueFunctionBilevelOptimizer(
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

    def step(self, retain: BatchSampler, forget: BatchSampler) -> dict[str, float]:
        ctx = self.ctx
        br, (bf, labels) = ctx.batch(retain), ctx.labelled_batch(forget)
        target = ctx.anchor_target(bf)
        groups = ctx.job.task.groups
        if groups:  # one constraint per concept, on its rows of the stratified batch
            constraints = {}
            for name, group in zip(ctx.job.task.group_names, groups, strict=True):
                rows = torch.isin(labels, torch.tensor([ctx.ids[p] for p in group])).nonzero().squeeze(1)
                part = type(bf)(*(field[rows.to(field.device)] for field in bf))
                constraints[name] = functools.partial(
                    forget_loss, ctx.eps, part, target[rows.to(target.device)]
                )
        else:
            constraints = lambda: forget_loss(ctx.eps, bf, target)  # noqa: E731
        stats = self.optimizer.step(lambda: denoising_loss(ctx.eps, br), constraints)
        out = {k: v for k, v in stats.as_dict().items() if isinstance(v, float | bool)}
        if groups:
            for name, lam, loss in zip(stats.constraint_names, stats.lams, stats.forget_losses, strict=True):
                out[f"lam[{name}]"], out[f"forget_loss[{name}]"] = lam, loss
        return out


class SalUnSD:
    def __init__(self, ctx: Context, forget: ImageData):
        self.ctx = ctx
        self.optimizer = base_optimizer(ctx.job.optimizer)(ctx.params, lr=ctx.job.lr)
        self.mask = self.saliency(forget)

    def saliency(self, forget: ImageData) -> list[Tensor]:
        """m = top-``keep`` of |Σ_{D_f} ∇L_denoise| over the trained parameters (one pass over D_f)."""
        ctx, bs = self.ctx, self.ctx.job.batch_size
        for p in ctx.params:
            p.grad = None
        for start in range(0, len(forget), bs):
            z0 = forget.images[start : start + bs].to(ctx.table.device)
            b = diffuse(ctx.scheduler, z0, ctx.cond(forget.labels[start : start + bs]), ctx.generator)
            denoising_loss(ctx.eps, b).backward()
        scores = {
            str(i): p.grad if p.grad is not None else torch.zeros_like(p) for i, p in enumerate(ctx.params)
        }
        mask = saliency_mask(scores, ctx.job.keep)
        for p in ctx.params:
            p.grad = None
        return [mask[str(i)].bool() for i in range(len(ctx.params))]

    def step(self, retain: BatchSampler, forget: BatchSampler) -> dict[str, float]:
        ctx = self.ctx
        bf, br = ctx.batch(forget), ctx.batch(retain)
        lf = forget_loss(ctx.eps, bf, ctx.anchor_target(bf))
        lr = denoising_loss(ctx.eps, br)
        ctx.descend(self.optimizer, lf + ctx.job.alpha * lr, self.mask)
        return {"forget_loss": lf.item(), "retain_loss": lr.item()}


class ESD:
    def __init__(self, ctx: Context, frozen: Denoiser, ddim, latent_shape: tuple[int, int, int]):
        self.ctx, self.frozen, self.ddim, self.latent_shape = ctx, frozen, ddim, latent_shape
        self.optimizer = base_optimizer(ctx.job.optimizer)(ctx.params, lr=ctx.job.lr)
        self.forget_ids = torch.tensor([ctx.ids[p] for p in ctx.job.task.forget])
        self.null = ctx.ids[""]

    @torch.no_grad()
    def partial_sample(self, c: Tensor, shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """(x_t, t) after i ~ U{0..n−1} DDIM steps of ε* with CFG s: ε̂ = ε*(∅) + s(ε*(c) − ε*(∅))."""
        ctx, s = self.ctx, self.ctx.job.start_guidance
        self.ddim.set_timesteps(ctx.job.gen_steps)
        i = int(torch.randint(len(self.ddim.timesteps), (), generator=ctx.generator))
        x = torch.randn(shape, generator=ctx.generator).to(c.device) * self.ddim.init_noise_sigma
        null = ctx.table[self.null].expand_as(c)
        for t in self.ddim.timesteps[:i]:
            e_u, e_c = self.frozen(
                torch.cat([x, x]), t.expand(2 * len(x)).to(c.device), torch.cat([null, c])
            ).chunk(2)
            x = self.ddim.step(e_u + s * (e_c - e_u), t, x).prev_sample
        return x, self.ddim.timesteps[i].expand(len(x)).to(c.device)

    def step(self, retain: BatchSampler | None, forget: BatchSampler | None) -> dict[str, float]:
        ctx, bs = self.ctx, self.ctx.job.batch_size
        pick = self.forget_ids[torch.randint(len(self.forget_ids), (bs,), generator=ctx.generator)]
        c = ctx.cond(pick)
        x_t, t = self.partial_sample(c, (bs, *self.latent_shape))
        with torch.no_grad():
            e_0 = self.frozen(x_t, t, ctx.table[self.null].expand_as(c))
            e_c = self.frozen(x_t, t, c)
        target = e_0 - ctx.job.negative_guidance * (e_c - e_0)
        loss = F.mse_loss(ctx.eps(x_t, t, c), target)
        ctx.descend(self.optimizer, loss)
        return {"loss": loss.item(), "t": float(t[0])}


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
def unlearn_sd(job: SDJob) -> dict:
    """Run one job: load, self-generate D_f/D_r (cached), train, write ``out/unet``, the grid and records.

    Writes ``out/unet/`` (diffusers layout), ``out/before_after.png`` (rows = ``grid_prompts``, left
    half before, right half after), ``out/run.json`` (settings and summary) and ``out/history.json``
    (per-step statistics). Every input is validated before anything is written. Under
    ``accelerate launch`` each process generates its share of the data and trains a DDP replica;
    only the main process writes.
    """
    from accelerate import PartialState
    from diffusers import DDIMScheduler, DDPMScheduler
    from tqdm.auto import tqdm

    from ..ddpm import cache_dir, check_output_dir, resolve_device

    job = job.resolved()
    check_output_dir(job.out)
    state = PartialState()
    device = state.device if state.num_processes > 1 else resolve_device(job.device)
    amp = MIXED_PRECISION[job.mixed_precision]
    base_optimizer(job.optimizer)  # fails now, not after generation, when bitsandbytes is missing
    pipe = load_pipeline(
        job.model, config=job.config, original_config=job.original_config, offline=job.offline
    )
    unet = pipe.unet
    factor = pipe.vae_scale_factor * 2 ** (len(unet.config.block_out_channels) - 1)
    if job.resolution % factor:
        raise UsageError(f"--resolution must be a multiple of {factor} for this model, got {job.resolution}")
    latent = job.resolution // pipe.vae_scale_factor
    latent_shape = (unet.config.in_channels, latent, latent)
    pipe.to(device)
    progress = job.progress and state.is_main_process

    task = job.task
    prompts = list(dict.fromkeys([*task.forget, *task.retain, *task.anchors, ""]))
    ids = {p: i for i, p in enumerate(prompts)}
    with torch.no_grad():
        table = pipe.encode_prompt(prompts, device, 1, False)[0].float()

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
            data[name] = load_set(directory, count, [ids[p] for p in set_prompts], f"{name}:{directory}")
            set_dirs[name] = directory

    grid_prompts = list(job.grid_prompts or [*task.forget, *task.retain[:2]])
    before = render(pipe, grid_prompts, job) if state.is_main_process else None

    frozen = None
    if job.method == "esd":
        frozen = copy.deepcopy(unet).requires_grad_(False).eval()
    params = select_trainable(unet, job.train_params)
    if device.type == "cuda":  # the VAE and text encoder are not needed while training
        pipe.vae.to("cpu")
        pipe.text_encoder.to("cpu")
    if job.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    model = unet
    if state.num_processes > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            unet, device_ids=[device] if device.type == "cuda" else None
        )
    generator = torch.Generator().manual_seed(job.seed + 1 + state.process_index)
    ctx = Context(
        eps=Denoiser(model, device, amp),
        params=params,
        table=table,
        ids=ids,
        anchors=torch.tensor([ids[a] for a in task.anchors]),
        scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
        generator=generator,
        job=job,
        scaler=torch.amp.GradScaler(device.type) if amp is torch.float16 else None,
    )
    samplers = {
        k: BatchSampler(d, job.batch_size, job.seed + 2 * state.process_index + i)
        for i, (k, d) in enumerate(data.items())
    }
    if task.groups and "forget" in data:  # every forget batch holds every concept
        forget_data = data["forget"]
        parts = [
            forget_data.subset(torch.isin(forget_data.labels, torch.tensor([ids[p] for p in g])))
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
            method = ESD(ctx, Denoiser(frozen, device, amp), ddim, latent_shape)
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
    record = {
        "method": job.method,
        "task": task.name,
        "forget_prompts": list(task.forget),
        "retain_prompts": list(task.retain),
        "anchors": list(task.anchors),
        "constraints": {name: list(g) for name, g in zip(task.group_names, task.groups, strict=True)},
        "trained_parameters": sum(p.numel() for p in params),
        "total_parameters": sum(p.numel() for p in unet.parameters()),
        "time_s": time_s,
        "prep_s": prep_s,
        "peak_mem_mb": meter.peak_mb,
        "final": history[-1],
        "grid_prompts": grid_prompts,
        "data_sets": set_dirs,
        "settings": {k: v for k, v in asdict(job).items() if k != "task"},
    }
    if state.is_main_process:
        save_unet(unet, job.out)
        pipe.to(device)
        save_before_after(
            os.path.join(job.out, "before_after.png"),
            before,
            render(pipe, grid_prompts, job),
            job.grid_images,
        )
        write_json(os.path.join(job.out, "history.json"), history)
        write_json(os.path.join(job.out, "run.json"), record)
    state.wait_for_everyone()
    return record
