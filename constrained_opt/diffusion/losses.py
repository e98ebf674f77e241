"""ε-prediction losses for unlearning, independent of the UNet flavour.

``eps_fn(x_t, t, c) -> ε̂`` is any callable (a class-conditional ``UNet2DModel`` through
:func:`unet_eps`, or a text-conditioned SD UNet wrapped by the caller), so the same losses serve DDPM
and Stable Diffusion. Notation: x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε, with t ~ U{0..T−1} and ε ~ N(0, I).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

EpsFn = Callable[[Tensor, Tensor, Tensor], Tensor]
FORGET_TARGETS = ("rl", "noise")


class Noised(NamedTuple):
    """A forward-diffused batch: x_t, its timesteps t, the noise ε used, and the conditions c."""

    x_t: Tensor
    t: Tensor
    noise: Tensor
    cond: Tensor


def unet_eps(unet) -> EpsFn:
    """ε_θ(x_t, t, c) for a class-conditional diffusers ``UNet2DModel``."""
    return lambda x_t, t, c: unet(x_t, t, class_labels=c).sample


def diffuse(scheduler, x0: Tensor, cond: Tensor, generator: torch.Generator) -> Noised:
    """Draw t ~ U{0..T−1}, ε ~ N(0, I) from a CPU ``generator`` and form x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε."""
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    t, noise = t.to(x0.device), noise.to(x0.device)
    return Noised(scheduler.add_noise(x0, noise, t), t, noise, cond)


def denoising_loss(eps_fn: EpsFn, b: Noised) -> Tensor:
    """L = E‖ε − ε_θ(x_t | c)‖² (Eq. 1; the retain loss L_r on D_r, the DDPM training loss)."""
    return F.mse_loss(eps_fn(b.x_t, b.t, b.cond), b.noise)


def other_labels(labels: Tensor, num_classes: int, generator: torch.Generator) -> Tensor:
    """c_m uniform over the classes ≠ each label: (c + U{1..C−1}) mod C.

    Excludes each sample's *own* class (the authors' release hard-wires forget class 0 here).
    """
    shift = torch.randint(1, num_classes, labels.shape, generator=generator).to(labels.device)
    return (labels + shift) % num_classes


def forget_target(
    eps_fn: EpsFn, b: Noised, kind: str, num_classes: int, generator: torch.Generator
) -> Tensor:
    """The substitute noise ε_f of Eq. 2 for a forget batch, detached.

    - ``rl`` (EraseDiff_rl, SalUn): ε_f = ε_θ(x_t | c_m), c_m ≠ c random, at the *same* x_t and t as
      the forget loss (the authors' release mixes in the retain batch's t);
    - ``noise`` (EraseDiff_noise): ε_f ~ U(0, I_d).
    """
    if kind == "rl":
        with torch.no_grad():
            return eps_fn(b.x_t, b.t, other_labels(b.cond, num_classes, generator)).detach()
    if kind == "noise":
        return torch.rand(b.noise.shape, generator=generator).to(b.noise.device)
    raise ValueError(f"unknown forget target {kind!r}; expected one of {FORGET_TARGETS}")


def forget_loss(eps_fn: EpsFn, b: Noised, target: Tensor) -> Tensor:
    """L_f = E‖ε_f − ε_θ(x_t | c)‖² on the forget batch (Eq. 2)."""
    return F.mse_loss(eps_fn(b.x_t, b.t, b.cond), target)


def saliency_mask(scores: dict[str, Tensor], keep: float = 0.5) -> dict[str, Tensor]:
    """SalUn weight saliency: 1 for the globally top-``keep`` fraction of |∇L_f| entries, else 0.

    ``scores`` maps parameter names to |∇_θ L_f| accumulated over the forget data. Ties at the
    threshold are kept, so slightly more than ``keep`` may survive.
    """
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    flat = torch.cat([s.detach().abs().flatten().float() for s in scores.values()])
    k = max(1, round(keep * flat.numel()))
    threshold = flat.kthvalue(flat.numel() - k + 1).values
    return {name: (s.detach().abs().float() >= threshold).to(s.dtype) for name, s in scores.items()}


def per_sample_grad_squares(
    model: nn.Module, loss_fn: Callable[..., Tensor], inputs: tuple[Tensor, ...], chunk: int = 32
) -> dict[str, Tensor]:
    """Σ_i (∇_θ ℓ_i)² over samples i, with ℓ_i = ``loss_fn(model_output_fn, *inputs_i)``.

    ``loss_fn(call, *sample)`` receives ``call(*args, **kwargs)`` (the model evaluated at the
    parameters being differentiated) and one un-batched sample. Uses ``torch.func.vmap(grad(·))``:
    one batched backward per chunk instead of one backward per sample. The model runs in eval mode.
    """
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def sample_loss(p, *sample):
        def call(*args, **kwargs):
            return functional_call(model, (p, buffers), args, kwargs)

        return loss_fn(call, *sample)

    per_sample = vmap(grad(sample_loss), in_dims=(None,) + (0,) * len(inputs))
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    was_training = model.training
    model.eval()  # deterministic (no dropout): vmap refuses random ops by default
    with warnings.catch_warnings():  # SDPA has no vmap batching rule yet; the fallback is correct
        warnings.filterwarnings("ignore", message=".*performance drop.*")
        for start in range(0, len(inputs[0]), chunk):
            grads = per_sample(params, *(x[start : start + chunk] for x in inputs))
            for k, g in grads.items():
                total[k] += g.pow(2).sum(0)
    model.train(was_training)
    return total


def denoising_fisher(
    unet, scheduler, x0: Tensor, cond: Tensor, generator: torch.Generator, chunk: int = 32
) -> dict[str, Tensor]:
    """Diagonal Fisher F = E_i[(∇_θ ℓ_i)²] of the denoising loss ℓ_i = ‖ε_i − ε_θ(x_t,i | c_i)‖²/d.

    One (t, ε) draw per sample (Selective Amnesia sums over timesteps; repeat samples for more draws).
    """
    b = diffuse(scheduler, x0, cond, generator)

    def loss_fn(call, x_t, t, noise, c):
        out = call(x_t[None], t[None], class_labels=c[None]).sample
        return F.mse_loss(out, noise[None])

    sums = per_sample_grad_squares(unet, loss_fn, (b.x_t, b.t, b.noise, b.cond), chunk)
    return {k: v / len(x0) for k, v in sums.items()}


def ewc_penalty(
    named_params: dict[str, Tensor], anchor: dict[str, Tensor], fisher: dict[str, Tensor]
) -> Tensor:
    """Σ_j F_j (θ_j − θ*_j)² (elastic weight consolidation around the original weights θ*)."""
    return sum((fisher[k] * (p - anchor[k]).pow(2)).sum() for k, p in named_params.items())
