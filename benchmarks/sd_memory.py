"""Peak memory of one EraseDiff step on the full-size SD v1.4 UNet against one plain base-optimizer step.

Each measurement runs in a fresh subprocess (``--worker base`` or ``--worker erasediff``) that builds
the SD v1.4 ``UNet2DConditionModel`` from its config with random weights on the CPU (no download),
trains the ``--train-params`` set, takes one step on random latents (``--latent``² at batch
``--batch``, small so activations stay small) with random 77×768 text embeddings, and reports its peak
resident set size (``ru_maxrss``). The baseline is one plain step of the base optimizer on L_r; the
EraseDiff step is ``ValueFunctionBilevelOptimizer.step`` with K = ``--inner-steps`` and the same base.

    extra = (peak_erasediff − peak_base) / (bytes per parameter × trained parameters)

The optimizer owns one second flat gradient row (the base step's ``.grad`` is the first), which also
holds the θ snapshot during the inner loop; for K ≥ 2 autograd's gradient at φ^1 is alive during the
second inner pass. Workers run with glibc's mmap threshold fixed (see ``benchmarks/memory.py``) so
peak RSS follows live bytes. Needs roughly (weights + 3×trained + base state) bytes of RAM: about
17 GB for noxattn in fp32 with Adam at K ≤ 1.

    python benchmarks/sd_memory.py [--train-params noxattn] [--base adam] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import psutil
import torch

BASES = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def worker(args: argparse.Namespace) -> dict:
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from constrained_opt import ValueFunctionBilevelOptimizer
    from constrained_opt.diffusion.losses import denoising_loss, diffuse, forget_loss
    from constrained_opt.diffusion.sd.loading import SD14_UNET_CONFIG
    from constrained_opt.diffusion.sd.train import select_trainable

    torch.manual_seed(0)
    dtype = DTYPES[args.dtype]
    unet = UNet2DConditionModel(**SD14_UNET_CONFIG).to(dtype).train()
    params = select_trainable(unet, args.train_params)
    rss_model = psutil.Process().memory_info().rss
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    g = torch.Generator().manual_seed(0)
    shape = (args.batch, 4, args.latent, args.latent)

    def batch():
        z0, c = (
            torch.randn(shape, generator=g).to(dtype),
            torch.randn(args.batch, 77, 768, generator=g).to(dtype),
        )
        return diffuse(scheduler, z0, c, g)

    def eps(x, t, c):
        return unet(x.to(dtype), t, encoder_hidden_states=c).sample.float()

    br, bf = batch(), batch()
    lr = 1e-5
    t0 = time.perf_counter()
    if args.worker == "erasediff":
        with torch.no_grad():
            target = eps(bf.x_t, bf.t, torch.randn(args.batch, 77, 768, generator=g).to(dtype))
        opt = ValueFunctionBilevelOptimizer(
            params, base_optimizer=BASES[args.base], lr=lr, inner_steps=args.inner_steps, inner_lr=lr, eta=1.0
        )
        opt.step(lambda: denoising_loss(eps, br), lambda: forget_loss(eps, bf, target))
    else:
        opt = BASES[args.base](params, lr=lr)
        denoising_loss(eps, br).backward()
        opt.step()
    return {
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_build_mb": rss_model / 2**20,
        "trained_params": sum(p.numel() for p in params),
        "total_params": sum(p.numel() for p in unet.parameters()),
        "step_s": time.perf_counter() - t0,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-params", default="noxattn", choices=("noxattn", "xattn", "full"))
    p.add_argument("--base", default="adam", choices=tuple(BASES))
    p.add_argument("--dtype", default="fp32", choices=tuple(DTYPES))
    p.add_argument("--inner-steps", type=int, default=2, help="K (default 2, the authors' nudity setting)")
    p.add_argument("--latent", type=int, default=8, help="latent side (default 8, i.e. 64×64 pixels)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--worker", choices=("base", "erasediff"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("json", "worker")]
    results = {}
    for kind in ("base", "erasediff"):
        print(f"one {args.base if kind == 'base' else 'EraseDiff'} step in a fresh process ...", flush=True)
        done = subprocess.run(
            [sys.executable, os.path.abspath(__file__), *flags, f"--worker={kind}"],
            check=True,
            capture_output=True,
            text=True,
            env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)},
        )
        results[kind] = json.loads(done.stdout.strip().splitlines()[-1])
    n = results["base"]["trained_params"]
    unit = n * DTYPES[args.dtype].itemsize / 2**20
    extra = results["erasediff"]["peak_rss_mb"] - results["base"]["peak_rss_mb"]
    summary = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "worker")},
        "trained_params": n,
        "total_params": results["base"]["total_params"],
        "trained_bytes_mb": unit,
        f"peak_rss_{args.base}_mb": results["base"]["peak_rss_mb"],
        "peak_rss_erasediff_mb": results["erasediff"]["peak_rss_mb"],
        "extra_mb": extra,
        "extra_in_trained_bytes": extra / unit,
        f"step_s_{args.base}": results["base"]["step_s"],
        "step_s_erasediff": results["erasediff"]["step_s"],
        "machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}",
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
