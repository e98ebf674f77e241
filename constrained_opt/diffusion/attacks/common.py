"""What the attacks on DDPM and Stable Diffusion share: the DDPM attack :class:`Budget`, an embedding
table with appended rows (:class:`~constrained_opt.diffusion.losses.AppendedEmbedding`, defined in layer 2
since the SD methods' robust rows use it too), the simplex projection, the bootstrap interval and the
loss record."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..losses import AppendedEmbedding  # noqa: F401  (re-exported: the attacks import it from here)
from ..runtime.errors import UsageError

MIXTURE_STARTS = ("best", "uniform")


@dataclass(frozen=True)
class Budget:
    """The fixed budget of every attack. Defaults: minutes per model on 2 CPU cores for the digits DDPM.

    - inversion / mixture: ``num_images`` (N) real images of c_f, ``steps`` Adam steps of batch
      ``batch_size`` at ``inversion_lr`` / ``mixture_lr``; the mixture starts at :func:`best_start`
      (``mixture_start="best"``) or at the uniform point as UnlearnDiffAtk (``"uniform"``);
    - relearn: ``relearn_images`` (n) real images of c_f, ``relearn_steps`` (m) steps of batch n at
      ``relearn_lr``, probed every ``probe_every`` steps;
    - benign: ``benign_steps`` steps of batch ``batch_size`` on the retained classes at ``relearn_lr``,
      probed every ``benign_probe_every`` steps;
    - evaluation: ``samples`` images of the attacked class, DDIM ``sampling_steps``, CFG ``guidance``;
      probes use ``probe_samples`` images and DDIM ``probe_sampling_steps``;
    - ``seed`` fixes the image subsets, every (t, ε) draw and the sampling noise x_T.
    """

    num_images: int = 32
    steps: int = 300
    batch_size: int = 32
    inversion_lr: float = 0.1
    mixture_lr: float = 0.01
    mixture_start: str = field(default="best", metadata={"choices": MIXTURE_STARTS})
    relearn_images: int = 8
    relearn_steps: int = 60
    relearn_lr: float = 1e-4
    benign_steps: int = 100
    probe_every: int = 5
    benign_probe_every: int = 25
    samples: int = 100
    sampling_steps: int = 50
    guidance: float = 2.0
    probe_samples: int = 50
    probe_sampling_steps: int = 25
    seed: int = 0

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "seed":
                continue
            if "choices" in f.metadata:
                if value not in f.metadata["choices"]:
                    raise UsageError(
                        f"attack budget: {f.name} must be one of {', '.join(f.metadata['choices'])}"
                    )
            elif f.name == "guidance":
                if not value >= 0:
                    raise UsageError(f"attack budget: guidance must be ≥ 0, got {value}")
            elif not value > 0:
                raise UsageError(f"attack budget: {f.name} must be positive, got {value}")


def project_simplex(v: Tensor) -> Tensor:
    """Euclidean projection of each row of ``v`` onto the probability simplex {w ≥ 0, Σw = 1}.

    The sort-based algorithm (Held et al. 1974; Duchi et al. 2008): with u sorted descending and
    ρ = max{j : u_j − (Σ_{i≤j} u_i − 1)/j > 0}, w = max(v − τ, 0) for τ = (Σ_{i≤ρ} u_i − 1)/ρ.
    Hand-written: no library in our dependencies has it, and UnlearnDiffAtk's bisection is slower.
    """
    u = v.sort(dim=-1, descending=True).values
    css = u.cumsum(-1) - 1
    j = torch.arange(1, v.shape[-1] + 1, device=v.device, dtype=v.dtype)
    rho = ((u - css / j) > 0).sum(-1, keepdim=True)
    tau = css.gather(-1, rho - 1) / rho.to(v.dtype)
    return (v - tau).clamp_min(0)


def bootstrap_ci(values: Tensor, seed: int, resamples: int = 1000, level: float = 0.95) -> list[float]:
    """Percentile bootstrap interval of mean(values) over resampled samples."""
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(values), (resamples, len(values)), generator=generator)
    means = values.double()[idx].mean(-1)
    lo, hi = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=means.dtype))
    return [lo.item(), hi.item()]


def probe_auc(probes: dict[int, float], steps: int) -> float:
    """Mean P over a fine-tuning attack: (1/m)∫₀^m P(s) ds by the trapezoid rule over the probed steps
    ``probes`` ({step: P}, from step 0 to step m = ``steps``), in [0, 1]; lower = erased deeper."""
    curve = sorted((int(s), float(p)) for s, p in probes.items())  # stored results key steps by text
    if curve[0][0] != 0 or curve[-1][0] != steps:
        raise ValueError(f"probes must span steps 0 to {steps}, got {curve[0][0]} to {curve[-1][0]}")
    xs, ys = torch.tensor(curve, dtype=torch.float64).T
    return torch.trapezoid(ys, xs).item() / steps


def loss_record(losses: list[float], t0: float) -> dict[str, Any]:
    """Mean loss over the first and the last tenth of the steps (single-batch losses are noisy)."""
    window = max(1, len(losses) // 10)
    return {
        "steps": len(losses),
        "loss_first": sum(losses[:window]) / window,
        "loss_last": sum(losses[-window:]) / window,
        "time_s": time.perf_counter() - t0,
    }
