"""Item 1b: the time of a robust ``opt.step`` over its floor, the same computation written by hand.

Configurations: one robust constraint (``Relearn`` with k = 1 and 3 first-order steps, ``Sharpness``,
``Inversion`` with k = 3 steps on the forget class's embedding vector), alone or after a plain
constraint on the same forget batch, with K = 0 or 1 inner steps (K = 1 under the ``value`` rule, which
reads g, so that the plain row runs its inner loop too; K = 0 under ``grad_norm``).

The floor is what a user would write by hand for the same passes, in plain torch: θ copied once, the
attacker's gradient steps θ ← θ − β∇L_a (Relearn), θ + ρ·g/‖g‖ (Sharpness) or the normalized ascent
and ε-ball projection of x (Inversion), the constraint's backward at the adversary's point, for K = 1
the descent φ¹ = θ′ − ξ∇L_c(θ′) and a forward at φ¹, θ (and x) put back, the retain backward and one
plain Adam step. As in item 1 the floor has no projection (Gram, λ, δ): that is part of the overhead.

Each round times the step and the floor back to back (their order alternating), and the ratio of the
two is taken per round, so load that lasts longer than one round cancels; the item reports the median
of these ratios and their quartiles.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch.nn import functional as F

from constrained_opt import Inversion, Relearn, Sharpness, ValueFunctionBilevelOptimizer

from .common import denoiser_problem, synchronize

BATCH = {"tiny": 4, "digits": 64, "cifar10": 4}
ADVERSARIES = ("relearn_k1", "relearn_k3", "sharpness", "inversion_k3")
BETA, RHO, ALPHA, EPS = 1e-4, 0.05, 0.05, 0.1  # Relearn's β, Sharpness's ρ, Inversion's α and ε (L2)


class Problem:
    """step_overhead's model and closures (:func:`~benchmarks.common.denoiser_problem`), plus the
    attacker's relearning loss (the ε-prediction loss on the forget batch) and the forget loss with the
    class embedding of the forget class read from a leaf vector (the Inversion's input)."""

    def __init__(self, preset: str, device: torch.device) -> None:
        from constrained_opt.diffusion.losses import unet_eps_with_row

        batch = BATCH[preset]
        self.unet, self.retain, self.forget = denoiser_problem(preset, batch, device)
        g = torch.Generator().manual_seed(1)
        size, channels = (8, 1) if preset in ("digits", "tiny") else (32, 3)
        x = torch.randn(batch, channels, size, size, generator=g).to(device)
        noise, target = torch.randn_like(x), torch.randn_like(x)
        t = torch.randint(0, 1000, (batch,), generator=g).to(device)
        c = torch.zeros(batch, dtype=torch.long, device=device)
        self.vector = self.unet.class_embedding.weight[0].detach().clone()
        eps = unet_eps_with_row(self.unet, 0, self.vector)
        self.attack = lambda: F.mse_loss(self.unet(x, t, class_labels=c).sample, noise)
        self.forget_at_vector = lambda: F.mse_loss(eps(x, t, c), target)
        self.params = [p for p in self.unet.parameters() if p.requires_grad]

    def declaration(self, adversary: str):
        if adversary.startswith("relearn"):
            return Relearn(self.forget, attack=self.attack, steps=int(adversary[-1]), lr=BETA)
        if adversary == "sharpness":
            return Sharpness(self.forget, rho=RHO)
        return Inversion(self.forget_at_vector, input=self.vector, steps=3, lr=ALPHA, eps=EPS)


def floor_step(pb: Problem, adversary: str, plain: bool, inner_steps: int, base_step: Callable) -> Callable:
    """The hand-written step (see the module docstring); it returns the constraint rows as autograd left
    them (lists of gradients, the plain row first)."""
    params, vector = pb.params, pb.vector
    theta = [torch.empty_like(p) for p in params]
    center = torch.empty_like(vector)

    def grads() -> list[torch.Tensor]:
        out = [p.grad for p in params]
        for p in params:
            p.grad = None
        return out

    def inner_loop(closure: Callable, row: list[torch.Tensor]) -> None:  # K = 1: φ¹ = θ − ξ·row
        with torch.no_grad():
            torch._foreach_add_(params, row, alpha=-1e-4)
            closure()

    moves = inner_steps > 0 or not adversary.startswith("inversion")  # θ is displaced: copy it once

    def step() -> list[list[torch.Tensor]]:
        rows = []
        if moves:
            with torch.no_grad():
                torch._foreach_copy_(theta, params)
        if plain:
            pb.forget().backward()
            rows.append(grads())
            if inner_steps:
                inner_loop(pb.forget, rows[-1])
                with torch.no_grad():
                    torch._foreach_copy_(params, theta)
        closure = pb.forget
        if adversary.startswith("relearn"):
            for _ in range(int(adversary[-1])):
                pb.attack().backward()
                with torch.no_grad():
                    torch._foreach_add_(params, grads(), alpha=-BETA)
        elif adversary == "sharpness":
            pb.forget().backward()
            g = grads()
            with torch.no_grad():
                norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(g))).item()
                torch._foreach_add_(params, g, alpha=RHO / norm)
        else:
            closure = pb.forget_at_vector
            center.copy_(vector)
            for _ in range(3):
                vector.requires_grad_(True)
                (g,) = torch.autograd.grad(closure(), [vector])
                vector.requires_grad_(False)
                with torch.no_grad():
                    vector.add_(g, alpha=ALPHA / torch.linalg.vector_norm(g).item())
                    d = vector.sub_(center)
                    d.mul_(min(1.0, EPS / torch.linalg.vector_norm(d).item())).add_(center)
        closure().backward()
        rows.append(grads())
        if inner_steps:
            inner_loop(closure, rows[-1])
        with torch.no_grad():
            if moves:
                torch._foreach_copy_(params, theta)
            if adversary.startswith("inversion"):
                vector.copy_(center)
        pb.retain().backward()
        base_step()
        for p in params:
            p.grad = None
        return rows

    return step


def spread(name: str, times: dict[str, list[float]]) -> dict[str, float]:
    """The median of the per-round ratios step/floor, with their quartiles (``name``, ``name_q1``, ...)."""
    ratios = [s / f for s, f in zip(times["opt_step"], times["floor"], strict=True)]
    q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return {name: statistics.median(ratios), f"{name}_q1": q1, f"{name}_q3": q3}


def measure(preset: str, adversary: str, plain: bool, inner_steps: int, device: torch.device, rounds: int):
    pb = Problem(preset, device)
    rule = "value" if inner_steps else "grad_norm"
    settings = {"lr": 1e-4, "inner_steps": inner_steps, "inner_lr": 1e-4, "rule": rule}
    opt = ValueFunctionBilevelOptimizer(pb.params, torch.optim.Adam, **settings)
    robust = pb.declaration(adversary)
    constraints = [pb.forget, robust] if plain else robust
    fns = {
        "opt_step": lambda: opt.step(pb.retain, constraints),
        "floor": floor_step(pb, adversary, plain, inner_steps, opt.base_optimizer.step),
    }
    for fn in fns.values():  # warm-up: allocations, optimizer state
        fn()
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds):
        for name in sorted(fns, reverse=bool(r % 2)):
            synchronize(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            fns[name]()
            synchronize(device)
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return {
        "model": preset,
        "params": sum(p.numel() for p in pb.params),
        "batch": BATCH[preset],
        "adversary": adversary,
        "plain_row": plain,
        "K": inner_steps,
        "rule": rule,
        "rounds": rounds,
        **spread("ratio", wall),
        **(spread("cpu_ratio", cpu) if device.type == "cpu" else {}),
        "ratio_of_minima": min(wall["opt_step"]) / min(wall["floor"]),
        "seconds": {name: statistics.median(ts) for name, ts in wall.items()},
    }


def run(
    device: torch.device, smoke: bool, rounds: int | None = None, cifar_ks: list[int] | None = None
) -> dict:
    """``rounds`` overrides the repetitions; ``cifar_ks``: run the 35.7M model for these K (default: not
    at all; it takes seconds per pass on a CPU). ``smoke``: the tiny model, each adversary alone at K = 0
    and beside a plain row at K = 1."""
    presets = ["tiny"] if smoke else ["digits"] + (["cifar10"] if cifar_ks else [])
    rows = []
    for preset in presets:
        n_rounds = rounds or (2 if smoke else (30 if preset == "digits" else 5))
        ks = cifar_ks if preset == "cifar10" else [0, 1]
        configs = [(k, a, p) for k in ks for a in ADVERSARIES for p in (False, True)]
        if smoke:
            configs = [(k, a, p) for k, a, p in configs if p == bool(k)]
        for k, adversary, plain in configs:
            row = measure(preset, adversary, plain, k, device, n_rounds)
            print(
                f"robust_overhead  {preset:8s} {adversary:12s} plain={plain!s:5s} K={k}  "
                f"step/floor = {row['ratio']:.3f} [{row['ratio_q1']:.3f}, {row['ratio_q3']:.3f}]"
                + (f"  CPU time {row['cpu_ratio']:.3f}" if "cpu_ratio" in row else "")
            )
            rows.append(row)
    return {"target": "ratio <= 1.05", "rows": rows}
