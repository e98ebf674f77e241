"""A plain float64 implementation of EraseDiff's Algorithm 1, written independently of the library.

It works on one flat parameter vector with torch.autograd.grad and states each rule's formula
directly, so that the optimizer's fused buffers, views and rule functions are checked against
nothing but the math.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.func import functional_call

LossFn = Callable[[dict[str, torch.Tensor]], torch.Tensor]


class FlatModel:
    """Evaluate a module's loss at an arbitrary flat parameter vector."""

    def __init__(self, module: torch.nn.Module, trainable: list[str] | None = None):
        self.module = module
        named = dict(module.named_parameters())
        self.names = trainable if trainable is not None else list(named)
        self.shapes = [named[n].shape for n in self.names]
        self.frozen = {n: t.detach() for n, t in named.items() if n not in self.names}

    def flat(self) -> torch.Tensor:
        named = dict(self.module.named_parameters())
        return torch.cat([named[n].detach().reshape(-1) for n in self.names]).double()

    def params(self, vec: torch.Tensor) -> dict[str, torch.Tensor]:
        out, i = dict(self.frozen), 0
        for n, s in zip(self.names, self.shapes, strict=True):
            k = math.prod(s)
            out[n] = vec[i : i + k].view(s)
            i += k
        return out

    def loss(self, vec: torch.Tensor, loss_fn) -> torch.Tensor:
        return loss_fn(self.module, self.params(vec))

    def grad(self, vec: torch.Tensor, loss_fn) -> tuple[torch.Tensor, torch.Tensor]:
        vec = vec.detach().requires_grad_(True)
        loss = self.loss(vec, loss_fn)
        (g,) = torch.autograd.grad(loss, vec, allow_unused=True)
        return loss.detach(), torch.zeros_like(vec) if g is None else g


def call(module, params, x):
    return functional_call(module, params, (x,))


def combine(rule: str, r, f, g_value, hp) -> tuple[torch.Tensor, float, float]:
    """δ, λ, a_t for one rule, straight from the formulas."""
    gg, rr, gr = float(f @ f), float(r @ r), float(f @ r)

    def kkt(a):
        lam = max(0.0, (a - gr) / gg) if gg > 0 else 0.0
        return r + lam * f, lam, a

    if rule == "grad_norm":
        return kkt(hp["eta"] * gg)
    if rule == "value":
        return kkt(hp["eta"] * g_value)
    if rule == "barrier":
        return kkt(min(hp["alpha"] * g_value, hp["beta"] * gg))
    if rule == "cosine":
        cos = gr / math.sqrt(gg * rr) if gg * rr > 0 else 0.0
        lam = max(0.0, hp["eta"] - cos)
        return r + lam * f, lam, math.nan
    if rule == "scalarized":
        return r + hp["forget_weight"] * f, hp["forget_weight"], math.nan
    if rule == "pcgrad":
        r_p = r - min(0.0, gr) / gg * f if gg > 0 else r
        f_p = f - min(0.0, gr) / rr * r if rr > 0 else f
        return r_p + f_p, 1 - min(0.0, gr) / gg if gg > 0 else 1.0, math.nan
    if rule == "mgda":
        d = gg + rr - 2 * gr
        gamma = min(1.0, max(0.0, (gg - gr) / d)) if d > 0 else 0.5
        return gamma * r + (1 - gamma) * f, 1 - gamma, math.nan
    raise ValueError(rule)


def reference_step(model: FlatModel, theta, retain_fn, forget_fns, K, xi, rule, hp):
    """One step of Algorithm 1. ``forget_fns[k]`` is the forget loss used at φ^k (k = 0..K);
    ``xi`` is a per-coordinate inner step size. Returns (δ, info)."""
    forget_loss, f = model.grad(theta, forget_fns[0])
    phi, grad_phi = theta.clone(), f
    for k in range(1, K + 1):
        phi = phi - xi * grad_phi
        if k < K:
            _, grad_phi = model.grad(phi, forget_fns[k])
    inner = model.loss(phi, forget_fns[K]).detach() if K > 0 else forget_loss
    g_value = float(forget_loss - inner) if K > 0 else 0.0
    retain_loss, r = model.grad(theta, retain_fn)
    delta, lam, a_t = combine(rule, r, f, g_value, hp)
    return delta, {
        "retain_loss": float(retain_loss),
        "forget_loss": float(forget_loss),
        "inner_forget_loss": float(inner),
        "g_value": g_value,
        "lam": lam,
        "a_t": a_t,
        "grad_dot": float(f @ r),
        "retain_grad_norm": float(r.norm()),
        "forget_grad_norm": float(f.norm()),
        "update_norm": float(delta.norm()),
        "cos_update_retain": float(delta @ r / (delta.norm() * r.norm())),
        "cos_update_forget": float(delta @ f / (delta.norm() * f.norm())),
    }
