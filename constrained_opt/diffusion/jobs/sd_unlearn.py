"""``constrained-opt unlearn sd``: load a pipeline, self-generate the forget and retain sets (cached),
train with one of the methods of :mod:`constrained_opt.diffusion.sd.methods` through accelerate, and
write the scrubbed UNet or LoRA adapter, a before/after grid and the run's records."""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import shutil
import tempfile
import time
from dataclasses import asdict

import torch
from torch import Tensor

from ..data import BatchSampler, ImageData
from ..evaluation.metrics import PeakMemory
from ..evaluation.multiclass import StratifiedSampler
from ..runtime.errors import UsageError
from ..runtime.io import atomic_path, write_json
from ..sd.job import MIXED_PRECISION, SDJob
from ..sd.latents import SetSpec, fingerprint, generate_set, load_set
from ..sd.loading import load_pipeline
from ..sd.lora import is_lora_parameter
from ..sd.methods import ESD, Context, EraseDiffSD, SalUnSD, base_optimizer
from ..sd.model import (
    Denoiser,
    PrefixedPrompts,
    PromptTable,
    autocast,
    encode_prompts,
    is_sdxl,
    text_encoders,
)
from ..sd.params import select_trainable
from ..sd.robust import RobustRows, initial_tokens, row_name


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


def trained_parameters(unet, job: SDJob, amp: torch.dtype | None) -> list[tuple[str, torch.nn.Parameter]]:
    """Make the job's parameters trainable and return them by name.

    ``lora``: the base UNet is frozen (and, under mixed precision, stored in the autocast dtype, as
    diffusers' LoRA examples do: it is only ever read in that dtype) and a float32 adapter is attached.
    """
    from ..sd.lora import add_lora

    if job.lora:
        if amp is not None:
            unet.to(dtype=amp)
        add_lora(unet, job.lora_target, job.lora_rank, job.lora_alpha)
    else:
        select_trainable(unet, job.train_params)
    return [(n, p) for n, p in unet.named_parameters() if p.requires_grad]


def check_inversion_pipeline(pipe) -> None:
    """``--robust inversion`` prepends token embeddings to one CLIP text encoder's input (SD 1.x/2.x)."""
    if is_sdxl(pipe):
        raise UsageError(
            "--robust inversion attacks the token embeddings of one CLIP text encoder (SD 1.x/2.x); SDXL's "
            "two encoders are not supported: drop inversion from --robust"
        )
    if getattr(pipe, "text_encoder", None) is None or getattr(pipe, "tokenizer", None) is None:
        raise UsageError(
            "--robust inversion needs the pipeline's text encoder and tokenizer, and this pipeline has "
            "none: load a full pipeline or drop inversion from --robust"
        )


def relearn_latents(pipe, job: SDJob, table: PromptTable) -> ImageData:
    """The relearning attacker's images (``--relearn-images``): every image of the folder, resized and
    centre-cropped to the job's resolution and VAE-encoded once; image i is paired with the forget
    prompt i mod P."""
    from ..attacks.sd import encode_images
    from ..sd.evaluate import list_images

    paths = [e["path"] for e in list_images(job.relearn_images)]
    if not paths:
        raise UsageError(f"--relearn-images: no images in {job.relearn_images}")
    prompts = job.task.generation_prompts()
    rows = torch.tensor([table.ids[p] for p in prompts])[torch.arange(len(paths)) % len(prompts)]
    latents = encode_images(pipe, paths, job.resolution)
    return ImageData(latents, rows, len(table.ids), f"relearn:{job.relearn_images}")


def robust_rows(pipe, ctx: Context) -> dict[str, RobustRows]:
    """Each concept's :class:`RobustRows` (keyed like ``EraseDiffSD.per_concept``). For inversion, its own
    adversarial tokens x_0 (K random vocabulary tokens, seed ``job.seed``) and prompt encoder."""
    job, task = ctx.job, ctx.job.task
    concepts = dict(zip(task.group_names, task.groups, strict=True)) if task.groups else {"": task.forget}
    generator = torch.Generator().manual_seed(job.seed)
    out = {}
    for name, prompts in concepts.items():
        vector = eps_prefixed = None
        if "inversion" in job.robust:
            embedding = pipe.text_encoder.get_input_embeddings()
            vector = initial_tokens(embedding, len(pipe.tokenizer), job.inversion_tokens, generator)
            eps_prefixed = ctx.eps.conditioned(PrefixedPrompts(pipe, prompts, ctx.table, vector))
        out[name] = RobustRows(job, ctx.eps, vector, eps_prefixed)
    return out


def make_accelerator(job: SDJob, device: torch.device):
    """The run's ``accelerate.Accelerator``: it prepares the UNet (DDP under ``accelerate launch``) and the
    optimizers, and under fp16 on an accelerator it owns the GradScaler (on the CPU accelerate has none
    and the loop keeps its own). In a single process an accelerate state left by an earlier run with
    other settings (a notebook, the tests) is reset first: accelerate refuses to change it in place."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState, PartialState

    cpu = device.type == "cpu"
    partial, full = PartialState._shared_state, AcceleratorState._shared_state
    single = partial.get("num_processes", 1) == 1
    placed = partial.get("device", torch.device("cpu"))
    if (
        full
        and single
        and (full.get("_mixed_precision") != job.mixed_precision or placed.type != device.type)
    ):
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    if device.type == "cuda" and device.index is not None and single:
        torch.cuda.set_device(device)
    return Accelerator(cpu=cpu, mixed_precision=job.mixed_precision)


def unlearn_sd(job: SDJob) -> dict:
    """Run one job: load, self-generate D_f/D_r (cached), train, write the result, the grid and records.

    Writes ``out/unet/`` (diffusers layout) or, for ``--train-params lora``, ``out/{WEIGHT_NAME}``
    (plus ``out/unet/`` merged, with ``--merge``); ``out/before_after.png`` (rows = ``grid_prompts``,
    left half before, right half after), ``out/run.json`` (settings and summary) and
    ``out/history.json`` (per-step statistics). Every input is validated before anything is written.
    Under ``accelerate launch`` each process generates its share of the data and trains a DDP
    replica; only the main process writes.
    """
    from diffusers import DDIMScheduler, DDPMScheduler
    from tqdm.auto import tqdm

    from ..runtime.device import resolve_device
    from ..runtime.paths import cache_dir, check_output_dir
    from ..sd.lora import WEIGHT_NAME, check_lora_rank, merged_unet, save_lora

    job = job.resolved()
    check_output_dir(job.out)
    accelerator = make_accelerator(job, resolve_device(job.device))
    state = accelerator.state
    device = accelerator.device if state.num_processes > 1 else resolve_device(job.device)
    amp = MIXED_PRECISION[job.mixed_precision]
    base_optimizer(job.optimizer)  # fails now, not after generation, when bitsandbytes is missing
    load = functools.partial(
        load_pipeline, job.model, config=job.config, original_config=job.original_config, offline=job.offline
    )
    pipe = load()
    unet = pipe.unet
    if job.lora:  # before the data sets are generated
        check_lora_rank(unet, job.lora_target, job.lora_rank)
    if "inversion" in job.robust:
        check_inversion_pipeline(pipe)
    factor = pipe.vae_scale_factor * 2 ** (len(unet.config.block_out_channels) - 1)
    native = unet.config.sample_size * pipe.vae_scale_factor
    job = dataclasses.replace(job, resolution=job.resolution or native)
    if job.resolution % factor:
        raise UsageError(f"--resolution must be a multiple of {factor} for this model, got {job.resolution}")
    latent = job.resolution // pipe.vae_scale_factor
    latent_shape = (unet.config.in_channels, latent, latent)
    pipe.to(device)
    progress = job.progress and state.is_main_process

    task = job.task
    prompts = list(dict.fromkeys([*task.forget, *task.retain, *task.anchors, ""]))
    table = encode_prompts(pipe, prompts, device, job.resolution)
    relearn_data = relearn_latents(pipe, job, table) if job.relearn_images is not None else None

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
            rows = [table.ids[p] for p in set_prompts]
            data[name] = load_set(directory, count, rows, f"{name}:{directory}")
            set_dirs[name] = directory

    grid_prompts = list(job.grid_prompts or [*task.forget, *task.retain[:2]])
    before = render(pipe, grid_prompts, job) if state.is_main_process else None

    frozen = None
    if job.method == "esd" and not job.lora:  # with an adapter, ε* is the UNet with the adapter off
        frozen = copy.deepcopy(unet).requires_grad_(False).eval()
    named = trained_parameters(unet, job, amp)
    if "inversion" in job.robust:  # the adversarial tokens go through the frozen text encoder each step
        pipe.text_encoder.requires_grad_(False)
    if device.type == "cuda":  # the VAE and text encoders are not needed while training (inversion: VAE)
        for name in ("vae", *([] if "inversion" in job.robust else text_encoders(pipe))):
            getattr(pipe, name).to("cpu")
    if job.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    model = accelerator.prepare_model(unet, device_placement=False)  # DDP with several processes
    generator = torch.Generator().manual_seed(job.seed + 1 + state.process_index)
    ctx = Context(
        eps=Denoiser(model, table, device, amp),
        params=[p for _, p in named],
        names=[n for n, _ in named],
        table=table,
        anchors=torch.tensor([table.ids[a] for a in task.anchors]),
        scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
        generator=generator,
        job=job,
        accelerator=accelerator,
        model=model,
        scaler=accelerator.scaler or (torch.amp.GradScaler(device.type) if amp is torch.float16 else None),
    )
    samplers = {
        k: BatchSampler(d, job.batch_size, job.seed + 2 * state.process_index + i)
        for i, (k, d) in enumerate(data.items())
    }
    if task.groups and "forget" in data:  # every forget batch holds every concept
        parts = [
            data["forget"].subset(torch.isin(data["forget"].labels, torch.tensor([table.ids[p] for p in g])))
            for g in task.groups
        ]
        samplers["forget"] = StratifiedSampler(parts, job.batch_size, job.seed + 2 * state.process_index + 1)
    history: list[dict[str, float]] = []
    meter = PeakMemory(device)
    with meter:
        t0 = time.perf_counter()
        if job.method == "erasediff":
            robust = robust_rows(pipe, ctx) if job.robust else None
            relearn = None
            if relearn_data is not None:
                relearn = BatchSampler(relearn_data, job.batch_size, job.seed + 2 * state.process_index + 7)
            method = EraseDiffSD(ctx, robust, relearn)
        elif job.method == "salun":
            method = SalUnSD(ctx, data["forget"])
        else:
            ddim = DDIMScheduler.from_config(pipe.scheduler.config)
            if job.lora:
                frozen_eps = Denoiser(unet, table, device, amp, base_only=unet)
            else:
                frozen_eps = Denoiser(frozen, table, device, amp)
            method = ESD(ctx, frozen_eps, ddim, latent_shape)
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
    outputs = [WEIGHT_NAME, *(["unet"] if job.merge else [])] if job.lora else ["unet"]
    record = {
        "method": job.method,
        "task": task.name,
        "model": {
            "architecture": "sdxl" if is_sdxl(pipe) else "sd",
            "prediction_type": pipe.scheduler.config.prediction_type,
            "resolution": job.resolution,
        },
        "forget_prompts": list(task.forget),
        "retain_prompts": list(task.retain),
        "anchors": list(task.anchors),
        "constraints": {name: list(g) for name, g in zip(task.group_names, task.groups, strict=True)},
        "robust_rows": [
            row_name(c, form) for c in (task.group_names or ("",)) for form in (None, *job.robust)
        ]
        if job.robust
        else [],
        "trained_parameters": sum(p.numel() for p in ctx.params),
        "total_parameters": sum(p.numel() for n, p in unet.named_parameters() if not is_lora_parameter(n)),
        "time_s": time_s,
        "prep_s": prep_s,
        "peak_mem_mb": meter.peak_mb,
        "final": history[-1],
        "grid_prompts": grid_prompts,
        "data_sets": set_dirs,
        "outputs": outputs,
        "settings": {k: v for k, v in asdict(job).items() if k != "task"},
    }
    if state.is_main_process:
        if job.lora:
            save_lora(unet, type(pipe), job.out)
        else:
            save_unet(unet, job.out)
        pipe.to(device)
        save_before_after(
            os.path.join(job.out, "before_after.png"),
            before,
            render(pipe, grid_prompts, job),
            job.grid_images,
        )
        if job.merge:  # fused into freshly loaded base weights, in their stored precision
            del pipe, unet, model, ctx, method
            save_unet(merged_unet(load(), job.out), job.out)
        write_json(os.path.join(job.out, "history.json"), history)
        write_json(os.path.join(job.out, "run.json"), record)
    state.wait_for_everyone()
    return record
