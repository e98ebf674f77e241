"""ε-prediction losses for unlearning, independent of the UNet flavour.

``eps_fn(x_t, t, c) -> ε̂`` is any callable (a class-conditional ``UNet2DModel`` through
:func:`unet_eps`, or a text-conditioned SD UNet wrapped by the caller), so the same losses serve DDPM
and Stable Diffusion. Notation: x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε, with t ~ U{0..T−1} and ε ~ N(0, I).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .models import null_class
from .runtime.errors import UsageError

EpsFn = Callable[[Tensor, Tensor, Tensor], Tensor]
FORGET_TARGETS = ("rl", "noise")
# the robust forget rows both applications offer (constrained_opt.Relearn, Sharpness, Inversion)
ROBUST_FORMS = ("relearn", "sharpness", "inversion")


def robust_forms_error(forms: tuple[str, ...], sep: str) -> str | None:
    """Why ``forms`` (split at ``sep``) is not a list of distinct :data:`ROBUST_FORMS`, or None when it is."""
    bad = [f for f in forms if f not in ROBUST_FORMS]
    if not bad and len(set(forms)) == len(forms):
        return None
    what = f"unknown form {bad[0]!r}" if bad else "a form given twice"
    example = sep.join(ROBUST_FORMS[::2])
    listed = ", ".join(ROBUST_FORMS)
    return f"{what}; expected distinct forms among {listed} separated by {sep!r} (e.g. {example})"


class Noised(NamedTuple):
    """A forward-diffused batch: x_t, its timesteps t, the noise ε used, and the conditions c."""

    x_t: Tensor
    t: Tensor
    noise: Tensor
    cond: Tensor


def unet_eps(unet) -> EpsFn:
    """ε_θ(x_t, t, c) for a class-conditional diffusers ``UNet2DModel``."""
    return lambda x_t, t, c: unet(x_t, t, class_labels=c).sample


class RowReplaced(torch.nn.Module):
    """``table`` with row ``label`` read from ``vector`` (a tensor the caller owns, e.g. an adversary's
    class embedding); the table is read, never written, so its other rows keep their gradients."""

    def __init__(self, table: torch.nn.Embedding, label: int, vector: Tensor):
        super().__init__()
        self.table, self.label, self.vector = table, label, vector

    def forward(self, ids: Tensor) -> Tensor:
        rows = self.table(ids)
        return torch.where((ids == self.label).unsqueeze(-1), self.vector.to(rows), rows)


class AppendedEmbedding(torch.nn.Module):
    """An ``nn.Embedding`` with rows appended: index ``first + i`` reads ``extra()[i]``, others the table.

    ``extra`` is called on every forward pass, so the rows may be a function of attack variables
    (e = wᵀE for the mixture). The original table is kept as a submodule and read, never copied or
    written. ``first`` defaults to the table size; a tokenizer whose length is below its embedding
    table's (padded vocabularies) assigns new tokens lower ids, which are redirected all the same.
    """

    def __init__(self, table: torch.nn.Embedding, extra: Callable[[], Tensor], first: int | None = None):
        super().__init__()
        self.table, self.extra = table, extra
        self.first = table.num_embeddings if first is None else first

    def forward(self, ids: Tensor) -> Tensor:
        rows = self.extra().to(self.table.weight)
        is_new = (ids >= self.first).unsqueeze(-1)
        base = self.table(ids.clamp(max=self.table.num_embeddings - 1))
        return torch.where(is_new, rows[(ids - self.first).clamp(0, len(rows) - 1)], base)


def class_table(unet) -> torch.nn.Embedding:
    """The class-embedding table E of a class-conditional ``UNet2DModel``; :class:`UsageError` without one."""
    table = getattr(unet, "class_embedding", None)
    if not isinstance(table, torch.nn.Embedding):
        raise UsageError(
            "the model has no class-embedding table (num_class_embeds): not a class-conditional DDPM"
        )
    return table


def unet_eps_with_row(unet, label: int, vector: Tensor) -> EpsFn:
    """ε_θ(x_t, t, c) of a class-conditional ``UNet2DModel`` with the class embedding E[label] replaced
    by ``vector`` (differentiable in both θ and ``vector``); other classes read their own rows. The
    UNet's ``class_embedding`` is swapped for the duration of each call only."""
    table = class_table(unet)
    replaced = RowReplaced(table, label, vector)

    def eps(x_t: Tensor, t: Tensor, c: Tensor) -> Tensor:
        unet.class_embedding = replaced
        try:
            return unet(x_t, t, class_labels=c).sample
        finally:
            unet.class_embedding = table

    return eps


def antithetic_timesteps(n: int, num_timesteps: int, generator: torch.Generator) -> Tensor:
    """t = [t₀, T−1−t₀][:n] with t₀ ~ U{0..T−1}^(⌊n/2⌋+1): the antithetic draw of SA's and SalUn's
    DDPM releases (``t = torch.cat([t, T - t - 1])[:n]``)."""
    half = torch.randint(0, num_timesteps, (n // 2 + 1,), generator=generator)
    return torch.cat([half, num_timesteps - 1 - half])[:n]


def diffuse(
    scheduler, x0: Tensor, cond: Tensor, generator: torch.Generator, t: Tensor | None = None
) -> Noised:
    """x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε with ε ~ N(0, I) from a CPU ``generator``; t ~ U{0..T−1} unless given."""
    if t is None:
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    t, noise = t.to(x0.device), noise.to(x0.device)
    return Noised(scheduler.add_noise(x0, noise, t), t, noise, cond)


def denoising_loss(eps_fn: EpsFn, b: Noised) -> Tensor:
    """L = E‖ε − ε_θ(x_t | c)‖² (Eq. 1; the retain loss L_r on D_r, the DDPM training loss)."""
    return F.mse_loss(eps_fn(b.x_t, b.t, b.cond), b.noise)


def pixel_sum_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """(1/B) Σ_i ‖target_i − prediction_i‖², squared error summed over pixels, averaged over the batch.

    The DDPM loss of the Selective Amnesia and SalUn releases (``noise_estimation_loss``:
    ``(e - output).square().sum(dim=(1, 2, 3)).mean(dim=0)``): d times :func:`denoising_loss`'s pixel mean.
    """
    return (target - prediction).square().flatten(1).sum(1).mean()


def drop_labels(cond: Tensor, null: int, p: float, generator: torch.Generator) -> Tensor:
    """c̃ = ∅ (the null class) with probability ``p`` per sample, else c: the releases' ``cond_drop_prob``,
    which their model applies inside every training-mode forward pass."""
    if p <= 0:
        return cond
    drop = (torch.rand(cond.shape, generator=generator) < p).to(cond.device)
    return torch.where(drop, torch.full_like(cond, null), cond)


def other_labels(
    labels: Tensor, num_classes: int, generator: torch.Generator, exclude: Tensor | None = None
) -> Tensor:
    """c_m uniform over the classes ≠ each label: (c + s) mod C with s ~ U{1..C−1}; with ``exclude``
    (a set of classes that holds every label), uniform over the K classes outside it: the s-th of them
    after c in cyclic order, s ~ U{1..K}, the same draw as without it when ``exclude`` = {c}.

    Excludes each sample's *own* class (the authors' release hard-wires forget class 0 here).
    """
    if exclude is None:
        shift = torch.randint(1, num_classes, labels.shape, generator=generator).to(labels.device)
        return (labels + shift) % num_classes
    excluded = torch.isin(torch.arange(num_classes, device=labels.device), exclude.to(labels.device))
    allowed = (~excluded).nonzero().squeeze(1)
    if len(allowed) == 0:
        raise ValueError(f"all {num_classes} classes are excluded: no class is left for c_m")
    shift = torch.randint(1, len(allowed) + 1, labels.shape, generator=generator).to(labels.device)
    below = torch.searchsorted(allowed, labels)  # the allowed classes < c, which come last after c
    return allowed[(below + shift - 1) % len(allowed)]


def forget_target(
    eps_fn: EpsFn, b: Noised, kind: str, num_classes: int, generator: torch.Generator
) -> Tensor:
    """The substitute noise ε_f of Eq. 2 for a forget batch, detached.

    - ``rl`` (EraseDiff_rl, SalUn): ε_f = ε_θ(x_t | c_m), c_m uniform over the classes that no row of
      the batch holds, at the *same* x_t and t as the forget loss (the authors' release mixes in the
      retain batch's t). A forget batch holds every forget class (one, or several stratified:
      :mod:`~.evaluation.multiclass`), so c_m ≠ c and c_m is never another forgotten class;
    - ``noise`` (EraseDiff_noise): ε_f ~ U(0, I_d).
    """
    if kind == "rl":
        present = b.cond[b.cond < num_classes]  # the null class (dropped labels) is no class
        with torch.no_grad():
            return eps_fn(b.x_t, b.t, other_labels(b.cond, num_classes, generator, present)).detach()
    if kind == "noise":
        return torch.rand(b.noise.shape, generator=generator).to(b.noise.device)
    raise ValueError(f"unknown forget target {kind!r}; expected one of {FORGET_TARGETS}")


def forget_loss(eps_fn: EpsFn, b: Noised, target: Tensor) -> Tensor:
    """L_f = E‖ε_f − ε_θ(x_t | c)‖² on the forget batch (Eq. 2)."""
    return F.mse_loss(eps_fn(b.x_t, b.t, b.cond), target)


def saliency_mask(scores: dict[str, Tensor], keep: float = 0.5) -> dict[str, Tensor]:
    """SalUn weight saliency: 1 for the ⌊keep·n⌋ entries of largest |score| over all tensors, else 0.

    ``scores`` maps parameter names to ∇_θ L_f accumulated over the forget data. As in SalUn's
    ``generate_mask`` (a global rank, ``ranks < int(n * keep)``), exactly ⌊keep·n⌋ entries survive
    (at least one); ties at the threshold are broken by position.
    """
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    flat = torch.cat([s.detach().abs().flatten().float() for s in scores.values()])
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[flat.topk(max(1, int(keep * flat.numel())), sorted=False).indices] = True
    out, start = {}, 0
    for name, s in scores.items():
        out[name] = chosen[start : start + s.numel()].view(s.shape).to(s.dtype)
        start += s.numel()
    return out


def timestep_summed_fisher(
    unet,
    scheduler,
    x0: Tensor,
    cond: Tensor,
    generator: torch.Generator,
    *,
    label_dropout: float,
    n_chunks: int = 20,
    timesteps: Tensor | None = None,
    scale: float = 1.0,
    progress: bool = False,
) -> dict[str, Tensor]:
    """Selective Amnesia's diagonal Fisher: F = (1/N) Σ_i (s · ∇_θ Σ_t ℓ_i(t))², with
    ℓ_i(t) = ‖ε_{i,t} − ε_θ(√ᾱ_t x_i + √(1−ᾱ_t) ε_{i,t}, t | c̃_{i,t})‖² summed over pixels.

    As in the release's ``save_fim``: the per-sample loss is summed over *all* T timesteps (one fresh ε
    per (i, t); c̃ = ∅ with probability ``label_dropout``, the model's training-mode condition drop)
    before the gradient is squared, and the squares are averaged over the N samples. The timesteps are
    processed in ``n_chunks`` batches whose gradients accumulate (memory only; the sum is the same).
    The model runs in eval mode, as in the release. ``timesteps`` defaults to 0..T−1; summing every k-th
    timestep with ``scale`` s = k makes s·Σ an unbiased estimate of the full sum, so F keeps the
    release's magnitude (s = 1 over a subset gives ~1/k² of it).
    """
    from tqdm.auto import tqdm

    ts = torch.arange(scheduler.config.num_train_timesteps) if timesteps is None else timesteps
    chunks = torch.chunk(ts, n_chunks)
    eps, null = unet_eps(unet), null_class(unet)
    params = dict(unet.named_parameters())
    fisher = {k: torch.zeros_like(p) for k, p in params.items()}
    was_training = unet.training
    unet.eval()
    for i in tqdm(range(len(x0)), desc="SA Fisher (Σ over T)", disable=not progress):
        unet.zero_grad(set_to_none=True)
        for t in chunks:
            x = x0[i : i + 1].expand(len(t), *x0.shape[1:])
            c = drop_labels(cond[i : i + 1].expand(len(t)), null, label_dropout, generator)
            b = diffuse(scheduler, x, c, generator, t)
            (scale * (b.noise - eps(b.x_t, b.t, b.cond)).square().sum()).backward()
        for k, p in params.items():
            if p.grad is not None:
                fisher[k] += p.grad.square()
    unet.zero_grad(set_to_none=True)
    unet.train(was_training)
    return {k: f / len(x0) for k, f in fisher.items()}


def ewc_penalty(
    named_params: dict[str, Tensor], anchor: dict[str, Tensor], fisher: dict[str, Tensor]
) -> Tensor:
    """Σ_j F_j (θ_j − θ*_j)² (elastic weight consolidation around the original weights θ*)."""
    return sum((fisher[k] * (p - anchor[k]).pow(2)).sum() for k, p in named_params.items())
