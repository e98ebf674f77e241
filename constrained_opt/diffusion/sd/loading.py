"""A Stable Diffusion pipeline from whatever the user has, without ever loading the safety checker.

- A diffusers folder (has ``model_index.json``): ``from_pretrained(path, local_files_only=True)``.
- An original ``.ckpt``/``.safetensors`` file: ``from_single_file``. Offline it needs ``config``, a local
  diffusers folder holding the component configs and the tokenizer (the weights are not read from
  it); online, diffusers fetches them for the detected architecture. ``original_config`` is the LDM
  YAML, when the architecture cannot be inferred from the keys.
- A hub id (``CompVis/stable-diffusion-v1-4``): ``from_pretrained(id)``, cache only when offline
  (``offline=True`` or ``HF_HUB_OFFLINE=1``).

The safety checker is left out because the forget set is generated from the very prompts it would
blank out. The losses are ε-prediction losses, so v-prediction models are refused.
"""

from __future__ import annotations

import os

import torch

from ..errors import UsageError

SINGLE_FILE_SUFFIXES = (".ckpt", ".safetensors")


def is_offline(offline: bool) -> bool:
    from huggingface_hub import constants

    return offline or bool(constants.HF_HUB_OFFLINE)


def check_model_arg(model: str, config: str | None, original_config: str | None, offline: bool) -> None:
    """Validate ``--model``/``--config``/``--original-config`` without loading anything."""
    for flag, path in (("--config", config), ("--original-config", original_config)):
        if path is not None and not os.path.exists(path):
            raise UsageError(f"{flag} not found: {path}")
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "model_index.json")):
            raise UsageError(f"{model} is not a diffusers pipeline folder (no model_index.json)")
    elif os.path.isfile(model):
        if not model.endswith(SINGLE_FILE_SUFFIXES):
            raise UsageError(f"{model}: expected a diffusers folder, a .ckpt or a .safetensors file")
        if config is None and is_offline(offline):
            raise UsageError(
                "loading a single checkpoint file offline needs --config DIR, a local diffusers folder "
                "with the pipeline's configs and tokenizer"
            )
    elif os.path.isabs(model) or model.startswith(".") or model.endswith(SINGLE_FILE_SUFFIXES):
        raise UsageError(f"model not found: {model}")
    elif model.count("/") != 1:
        raise UsageError(f"{model!r} is neither a local path nor a hub id of the form owner/name")


def load_pipeline(
    model: str,
    *,
    config: str | None = None,
    original_config: str | None = None,
    offline: bool = False,
    dtype: torch.dtype = torch.float32,
):
    """A ``StableDiffusionPipeline`` (see the module docstring for the three sources)."""
    from diffusers import StableDiffusionPipeline

    check_model_arg(model, config, original_config, offline)
    common = dict(safety_checker=None, requires_safety_checker=False, dtype=dtype)
    try:
        if os.path.isfile(model):
            pipe = StableDiffusionPipeline.from_single_file(
                model,
                config=config,
                original_config=original_config,
                local_files_only=config is not None or is_offline(offline),
                **common,
            )
        else:
            local = os.path.isdir(model) or is_offline(offline)
            pipe = StableDiffusionPipeline.from_pretrained(model, local_files_only=local, **common)
    except (OSError, ValueError, KeyError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"cannot load Stable Diffusion from {model}: {reason}") from None
    prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise UsageError(
            f"{model} is a {prediction}-prediction model; only ε-prediction (SD v1.x) is supported"
        )
    return pipe


# The UNet2DConditionModel config of SD v1.4 (CompVis/stable-diffusion-v1-4, unet/config.json), so its
# full-size architecture can be built with random weights, without a download (benchmarks, tests).
SD14_UNET_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=768,
    attention_head_dim=8,
)
