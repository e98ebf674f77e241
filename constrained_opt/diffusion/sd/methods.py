"""Stable Diffusion unlearning methods: EraseDiff, ESD and SalUn (run by ``jobs.sd_unlearn.unlearn_sd``).

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
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data import BatchSampler, ImageData
from ..losses import denoising_loss, forget_loss, saliency_mask
from ..runtime.errors import UsageError
from .job import SDJob
from .model import Denoiser, PromptTable, noised
from .robust import RobustRows


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
    """EraseDiff through the constrained optimizer. ``robust`` (``--robust``): each concept's
    :class:`~.robust.RobustRows`, keyed like :meth:`per_concept`; ``relearn``: the sampler of the
    relearning attacker's own images (``--relearn-images``), else it uses the forget batch."""

    def __init__(self, ctx: Context, robust: dict[str, RobustRows] | None = None, relearn=None):
        from constrained_opt import ValueFunctionBilevelOptimizer

        j = ctx.job
        self.ctx, self.robust, self.relearn = ctx, robust, relearn
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
        constraint each; with robust rows each concept adds one row per form (:mod:`.robust`), and the
        stats hold every row's λ, forget loss and last attacker loss."""
        from constrained_opt import Closures, MicroBatches

        ctx, n = self.ctx, self.ctx.job.gradient_accumulation_steps
        task = ctx.job.task
        retain_parts, forget_parts = [], {}
        for _ in range(n):
            br, bf = ctx.batch(retain), ctx.batch(forget)
            target = ctx.anchor_target(bf)
            relearn_batch = ctx.batch(self.relearn) if self.relearn is not None else None
            retain_parts.append(lambda br=br: denoising_loss(ctx.eps, br))
            for name, (b, y) in self.per_concept(bf, target).items():
                part = (
                    self.robust[name].parts(b, y, relearn_batch)
                    if self.robust is not None
                    else lambda b=b, y=y: forget_loss(ctx.eps, b, y)
                )
                forget_parts.setdefault(name, []).append(part)

        def closure(parts):
            return parts[0] if n == 1 else MicroBatches(parts)

        if self.robust is None:
            constraints = {k: closure(v) for k, v in forget_parts.items()}
            several = bool(task.groups)
        else:
            constraints = {}
            for k, v in forget_parts.items():
                constraints.update(self.robust[k].constraints(k, v, closure))
            several = True
        self.optimizer.step(Closures(closure(retain_parts), constraints if several else constraints[""]))
        stats = self.optimizer.optimizer.last_stats
        out = {k: v for k, v in stats.as_dict().items() if isinstance(v, float | bool)}
        if several:
            rows = zip(
                stats.constraint_names, stats.lams, stats.forget_losses, stats.attack_losses, strict=True
            )
            for name, lam, loss, attack in rows:
                out[f"lam[{name}]"], out[f"forget_loss[{name}]"] = lam, loss
                if attack:
                    out[f"attack_loss[{name}]"] = attack[-1]
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
