"""Peak memory and time of EraseDiff steps on a full-size SD UNet against plain base-optimizer steps.

Each measurement runs in a fresh subprocess (``--worker base`` or ``--worker erasediff``) that builds
the ``--family`` UNet (SD v1.4 or SDXL base) from its config with random weights on the CPU (no
download), trains ``--train-params`` (one of ESD's sets, or ``lora``: a rank-``--lora-rank`` adapter on
the ``--lora-target`` set, the base frozen), takes ``--repeat`` steps on random latents (``--latent``² at
batch ``--batch``, small so activations stay small) with random text conditioning, and reports its
peak resident set size (``VmHWM``) and the time of each step. The baseline is plain steps of the base
optimizer on L_r; the EraseDiff step is ``ValueFunctionBilevelOptimizer.step`` with K = ``--inner-steps``
and the same base.

    extra = (peak_erasediff − peak_base) / (bytes per parameter × trained parameters)

The optimizer owns one second flat gradient row (the base step's ``.grad`` is the first), which also
holds the θ snapshot during the inner loop; for K ≥ 2 autograd's gradient at φ^1 is alive during the
second inner pass. Workers run with glibc's mmap threshold fixed (see ``benchmarks/memory.py``) so
peak RSS follows live bytes. Needs roughly (weights + 3×trained + base state) bytes of RAM: about
17 GB for SD v1.4 noxattn in fp32 with Adam at K ≤ 1, 3.5 GB with a LoRA adapter.

``--plan FAMILY`` prints, instead, the training-state arithmetic (weights, gradient rows, Adam state,
ESD's frozen copy) of every configuration on that family's UNet, from parameter counts of the
architecture built on the meta device: what a 24 GB GPU can hold before activations.

    python benchmarks/sd_memory.py [--family sd14] [--train-params noxattn|lora] [--json out.json]
    python benchmarks/sd_memory.py --plan sdxl [--json plan.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

BASES = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
GiB = 2**30


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status: the CPU memory benchmark needs Linux")


def build_unet(family: str, device: str | torch.device = "cpu"):
    from diffusers import UNet2DConditionModel

    from constrained_opt.diffusion.sd.loading import SD14_UNET_CONFIG, SDXL_UNET_CONFIG

    config = {"sd14": SD14_UNET_CONFIG, "sdxl": SDXL_UNET_CONFIG}[family]
    with torch.device(device):
        return UNet2DConditionModel(**config)


def trainable(unet, train_params: str, lora_target: str, lora_rank: int) -> list[torch.nn.Parameter]:
    from constrained_opt.diffusion.sd.lora import add_lora
    from constrained_opt.diffusion.sd.params import select_trainable

    if train_params == "lora":
        return add_lora(unet, lora_target, lora_rank, float(lora_rank))
    return select_trainable(unet, train_params)


def worker(args: argparse.Namespace) -> dict:
    from diffusers import DDPMScheduler

    from constrained_opt import ValueFunctionBilevelOptimizer
    from constrained_opt.diffusion.losses import denoising_loss, diffuse, forget_loss

    torch.manual_seed(0)
    dtype = DTYPES[args.dtype]
    unet = build_unet(args.family).to(dtype).train()
    params = trainable(unet, args.train_params, args.lora_target, args.lora_rank)
    rss_model = _peak_rss_mb()
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    g = torch.Generator().manual_seed(0)
    shape = (args.batch, 4, args.latent, args.latent)
    config = unet.config

    def condition():
        c = {"encoder_hidden_states": torch.randn(args.batch, 77, config.cross_attention_dim, generator=g)}
        if config.addition_embed_type == "text_time":  # SDXL: pooled text (1280) and six size ids
            pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
            c["added_cond_kwargs"] = {
                "text_embeds": torch.randn(args.batch, pooled, generator=g),
                "time_ids": torch.tensor([[8.0 * args.latent] * 2 + [0.0] * 2 + [8.0 * args.latent] * 2]),
            }
        return torch.utils._pytree.tree_map(lambda t: t.to(dtype), c)

    def batch():
        return diffuse(scheduler, torch.randn(shape, generator=g).to(dtype), condition(), g)

    def eps(x, t, c):
        return unet(x.to(dtype), t, **c).sample.float()

    lr = 1e-5
    if args.worker == "erasediff":
        opt = ValueFunctionBilevelOptimizer(
            params, base_optimizer=BASES[args.base], lr=lr, inner_steps=args.inner_steps, inner_lr=lr, eta=1.0
        )
    else:
        opt = BASES[args.base](params, lr=lr)
    step_s = []
    for _ in range(args.repeat):
        br, bf = batch(), batch()
        t0 = time.perf_counter()
        if args.worker == "erasediff":
            with torch.no_grad():
                target = eps(bf.x_t, bf.t, condition())
            opt.step(lambda br=br: denoising_loss(eps, br), lambda bf=bf, y=target: forget_loss(eps, bf, y))
        else:
            opt.zero_grad(set_to_none=True)
            denoising_loss(eps, br).backward()
            opt.step()
        step_s.append(time.perf_counter() - t0)
    return {
        "peak_rss_mb": _peak_rss_mb(),
        "rss_after_build_mb": rss_model,
        "trained_params": sum(p.numel() for p in params),
        "total_params": sum(p.numel() for n, p in unet.named_parameters() if ".lora_" not in n),
        "step_s": step_s,
    }


def plan(family: str) -> dict:
    """Training-state bytes of each configuration on ``family``'s UNet (weights, gradient rows, base
    optimizer state, ESD's frozen copy); activations and the CUDA context come on top."""
    sizes: dict[str, int] = {}
    unet = build_unet(family, "meta")
    total = sum(p.numel() for p in unet.parameters())
    for train_params in ("noxattn", "xattn", "full"):
        sizes[train_params] = sum(p.numel() for p in trainable(unet, train_params, "", 0))
    for target in ("xattn", "noxattn"):
        for rank in (4, 16):
            sizes[f"lora-{target}-r{rank}"] = sum(p.numel() for p in trainable(unet, "lora", target, rank))
            unet.unload_lora()
    rows = []
    configs = [  # (trained set, base weight bytes, trained weight bytes, Adam bytes per trained parameter)
        ("full", 4, 4, 8, "fp32 weights, Adam"),
        ("noxattn", 4, 4, 8, "fp32 weights, Adam"),
        ("noxattn", 4, 4, 2, "fp32 weights, 8-bit Adam"),
        ("noxattn", 2, 2, 2, "bf16 weights (no fp32 master), 8-bit Adam"),
        ("xattn", 4, 4, 8, "fp32 weights, Adam"),
        ("xattn", 4, 4, 2, "fp32 weights, 8-bit Adam"),
        ("lora-noxattn-r4", 2, 4, 8, "LoRA r=4 on noxattn, bf16 base, fp32 adapter, Adam"),
        ("lora-noxattn-r16", 2, 4, 8, "LoRA r=16 on noxattn, bf16 base, fp32 adapter, Adam"),
        ("lora-xattn-r4", 2, 4, 8, "LoRA r=4 on xattn, bf16 base, fp32 adapter, Adam"),
    ]
    for key, base_bytes, trained_bytes, adam_bytes, label in configs:
        n = sizes[key]
        lora = key.startswith("lora")
        frozen = total if lora else total - n
        weights = frozen * base_bytes + n * trained_bytes
        grads = 2 * n * trained_bytes  # ∇L_r's row (.grad) and the optimizer's second row
        adam = n * adam_bytes
        esd_copy = 0 if lora else total * base_bytes  # with an adapter, ε* is the adapter switched off
        rows.append(
            {
                "config": label,
                "trained_set": key,
                "trained_params": n,
                "weights_gib": weights / GiB,
                "grad_rows_gib": grads / GiB,
                "adam_gib": adam / GiB,
                "erasediff_gib": (weights + grads + adam) / GiB,
                "erasediff_k2_peak_gib": (weights + grads + n * trained_bytes + adam) / GiB,
                "esd_gib": (weights + grads / 2 + adam + esd_copy) / GiB,
            }
        )
    return {"family": family, "total_params": total, "sets": sizes, "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="sd14", choices=("sd14", "sdxl"))
    p.add_argument("--train-params", default="noxattn", choices=("noxattn", "xattn", "full", "lora"))
    p.add_argument("--lora-target", default="noxattn", choices=("noxattn", "xattn", "full"))
    p.add_argument("--lora-rank", type=int, default=4)
    p.add_argument("--base", default="adam", choices=tuple(BASES))
    p.add_argument("--dtype", default="fp32", choices=tuple(DTYPES), help="weights (LoRA: base) dtype")
    p.add_argument("--inner-steps", type=int, default=2, help="K (default 2, the authors' nudity setting)")
    p.add_argument("--latent", type=int, default=8, help="latent side (default 8, i.e. 64×64 pixels)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeat", type=int, default=1, help="steps per worker (time: fastest after the first)")
    p.add_argument("--plan", choices=("sd14", "sdxl"), help="print the training-state arithmetic instead")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--worker", choices=("base", "erasediff"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    summary = plan(args.plan) if args.plan else measure(args)
    summary["command"] = " ".join(["python benchmarks/sd_memory.py", *sys.argv[1:]])
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


def measure(args: argparse.Namespace) -> dict:
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "worker", "plan")}
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]
    results = {}
    for kind in ("base", "erasediff"):
        print(
            f"{args.repeat} {args.base if kind == 'base' else 'EraseDiff'} step(s) in a fresh process",
            flush=True,
        )
        done = subprocess.run(
            [sys.executable, os.path.abspath(__file__), *flags, f"--worker={kind}"],
            check=True,
            capture_output=True,
            text=True,
            env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)},
        )
        results[kind] = json.loads(done.stdout.strip().splitlines()[-1])
    n = results["base"]["trained_params"]
    unit = n * 4 / 2**20  # trained parameters are float32 (LoRA factors always; otherwise --dtype fp32)
    if args.train_params != "lora":
        unit = n * DTYPES[args.dtype].itemsize / 2**20
    extra = results["erasediff"]["peak_rss_mb"] - results["base"]["peak_rss_mb"]

    def step_time(kind):  # the fastest step after the first (which also allocates the optimizer state)
        times = results[kind]["step_s"]
        return min(times[1:]) if len(times) > 1 else times[0]

    return {
        "settings": settings,
        "trained_params": n,
        "total_params": results["base"]["total_params"],
        "trained_bytes_mb": unit,
        f"peak_rss_{args.base}_mb": results["base"]["peak_rss_mb"],
        "peak_rss_erasediff_mb": results["erasediff"]["peak_rss_mb"],
        "rss_after_build_mb": results["base"]["rss_after_build_mb"],
        "extra_mb": extra,
        "extra_in_trained_bytes": extra / unit,
        f"step_s_{args.base}": step_time("base"),
        "step_s_erasediff": step_time("erasediff"),
        "step_times": {k: r["step_s"] for k, r in results.items()},
        "load_average": os.getloadavg(),
        "machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}",
    }


if __name__ == "__main__":
    main()
