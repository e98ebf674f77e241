"""Item 9: the scale of Selective Amnesia's released Fisher against the estimate the harness used before.

SA's release (``save_fim``) squares, per generated sample, the gradient of the pixel-summed loss summed
over all T = 1000 timesteps. The harness used to square the gradient of a single-timestep pixel-*mean*
loss (50 DDIM samples per class, one (t, ε) each). This item loads the released-style Fisher shipped for
the digits UNet (``assets/sa-prep-*.safetensors``, computed by the comparison's first SA run), recomputes
the old estimate on the same model, and reports the ratio of their totals and the median per-entry ratio:
how much stronger the EWC term λ Σ F (θ − θ*)² is with the released computation.
"""

from __future__ import annotations

import glob
import os

import torch
import torch.nn.functional as F


def run(device: torch.device, smoke: bool) -> dict:
    from constrained_opt.diffusion.losses import diffuse, unet_eps
    from constrained_opt.diffusion.models import ASSETS, SHIPPED_UNET, load_unet
    from constrained_opt.diffusion.runtime.io import load_state
    from constrained_opt.diffusion.sampling import make_scheduler, sample

    shipped = sorted(glob.glob(os.path.join(ASSETS, "sa-prep-*.safetensors")))
    if not shipped:
        raise SystemExit("no shipped SA preparation in assets/: run the comparison item first")
    prep = load_state(shipped[0])
    unet, _ = load_unet(SHIPPED_UNET)
    unet = unet.to(device).eval()
    per_class = 2 if smoke else 50
    labels = torch.arange(10).repeat_interleave(per_class)
    images = sample(unet, labels, num_steps=2 if smoke else 50, seed=0, progress=False)
    b = diffuse(make_scheduler(), images.to(device), labels.to(device), torch.Generator().manual_seed(0))
    eps = unet_eps(unet)
    params = dict(unet.named_parameters())
    old = {k: torch.zeros_like(p) for k, p in params.items()}
    for i in range(len(images)):
        one = slice(i, i + 1)
        loss = F.mse_loss(eps(b.x_t[one], b.t[one], b.cond[one]), b.noise[one])
        for k, g in zip(params, torch.autograd.grad(loss, list(params.values())), strict=True):
            old[k] += g.square() / len(images)
    released = {k: v.to(device) for k, v in prep["fisher"].items()}
    total_new = sum(f.sum() for f in released.values()).item()
    total_old = sum(f.sum() for f in old.values()).item()
    per_entry = torch.cat([(released[k] / old[k].clamp_min(1e-30)).flatten() for k in old])
    result = {
        "prep_file": os.path.basename(shipped[0]),
        "released_samples": len(prep["labels"]),
        "old_samples": len(images),
        "released_total": total_new,
        "old_total": total_old,
        "ratio_of_totals": total_new / total_old,
        "median_entry_ratio": per_entry.median().item(),
    }
    print(
        f"sa_fisher  released/old Fisher: totals {result['ratio_of_totals']:.3g}, "
        f"median {result['median_entry_ratio']:.3g}"
    )
    return result


def markdown(result: dict) -> str:
    return (
        f"SA's released Fisher ({result['released_samples']} generated samples, loss summed over all 1000 "
        f"timesteps, pixel sums) has total {result['released_total']:.4g}; the single-timestep pixel-mean "
        f"estimate the harness used before ({result['old_samples']} samples) has {result['old_total']:.4g}: "
        f"ratio {result['ratio_of_totals']:.3g} (median per-parameter ratio "
        f"{result['median_entry_ratio']:.3g})."
    )
