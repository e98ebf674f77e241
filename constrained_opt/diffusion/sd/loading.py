"""A Stable Diffusion (1.x, 2.x) or SDXL pipeline from whatever the user has, never with a safety checker.

- A diffusers folder (has ``model_index.json``): ``from_pretrained(path, local_files_only=True)``.
- An original ``.ckpt``/``.safetensors`` file: ``from_single_file``. Offline it needs ``config``, a local
  diffusers folder holding the component configs and the tokenizer (the weights are not read from
  it); online, diffusers fetches them for the detected architecture. ``original_config`` is the LDM
  YAML, when the architecture cannot be inferred from the keys.
- A hub id (``CompVis/stable-diffusion-v1-4``): ``from_pretrained(id)``, cache only when offline
  (``offline=True`` or ``HF_HUB_OFFLINE=1``).

SDXL is recognised by its second text encoder (``text_encoder_2`` in ``model_index.json``, or the
``conditioner.embedders.1`` keys of an original checkpoint) and loaded as ``StableDiffusionXLPipeline``;
the SDXL refiner (no first text encoder, aesthetic-score conditioning) is refused. ε- and v-prediction
models are accepted (the losses are written in the model's parametrisation, see :mod:`.model`).

The safety checker is left out because the forget set is generated from the very prompts it would
blank out.
"""

from __future__ import annotations

import json
import os

import torch

from ..runtime.errors import UsageError

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


def _pipeline_index(model: str, config: str | None, offline: bool) -> dict | None:
    """The ``model_index.json`` that describes the pipeline, when there is one to read."""
    folder = config if config is not None else model if os.path.isdir(model) else None
    if folder is not None:
        path = os.path.join(folder, "model_index.json")
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    if os.path.isfile(model):
        return None
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.load_config(model, local_files_only=is_offline(offline))
    except (OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"cannot load Stable Diffusion from {model}: {reason}") from None


def _checkpoint_is_sdxl(path: str) -> bool:
    """Whether an original (LDM/SGM) checkpoint file holds SDXL's second text encoder."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
    else:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        keys = list(state.get("state_dict", state))
    return any(k.startswith("conditioner.embedders.1.") for k in keys)


def pipeline_class(model: str, config: str | None = None, offline: bool = False):
    """``StableDiffusionXLPipeline`` for an SDXL model, ``StableDiffusionPipeline`` otherwise."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    index = _pipeline_index(model, config, offline)
    if index is None:
        try:
            sdxl = os.path.isfile(model) and _checkpoint_is_sdxl(model)
        except (OSError, RuntimeError, ValueError) as e:
            raise UsageError(f"cannot read the checkpoint {model}: {str(e).splitlines()[0]}") from None
        return StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    present = {k for k, v in index.items() if isinstance(v, list | tuple) and v and v[0] is not None}
    if "text_encoder_2" in present and "text_encoder" not in present:
        raise UsageError(
            f"{model} is an SDXL refiner (one text encoder, aesthetic-score conditioning); "
            "erase from the SDXL base model instead"
        )
    return StableDiffusionXLPipeline if "text_encoder_2" in present else StableDiffusionPipeline


def load_pipeline(
    model: str,
    *,
    config: str | None = None,
    original_config: str | None = None,
    offline: bool = False,
    dtype: torch.dtype = torch.float32,
):
    """A ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` (see the module docstring)."""
    from diffusers import StableDiffusionPipeline

    from .model import PREDICTION_TYPES

    check_model_arg(model, config, original_config, offline)
    cls = pipeline_class(model, config, offline)
    common: dict = {"dtype": dtype}
    if cls is StableDiffusionPipeline:
        common.update(safety_checker=None, requires_safety_checker=False)
    try:
        if os.path.isfile(model):
            pipe = cls.from_single_file(
                model,
                config=config,
                original_config=original_config,
                local_files_only=config is not None or is_offline(offline),
                **common,
            )
        else:
            local = os.path.isdir(model) or is_offline(offline)
            pipe = cls.from_pretrained(model, local_files_only=local, **common)
    except (OSError, ValueError, KeyError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"cannot load Stable Diffusion from {model}: {reason}") from None
    prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise UsageError(
            f"{model} is a {prediction}-prediction model; supported: ε-prediction (SD 1.x, SD 2-base, "
            "SDXL) and v-prediction (SD 2.x 768)"
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

# The UNet2DConditionModel config of SDXL base 1.0 (stabilityai/stable-diffusion-xl-base-1.0,
# unet/config.json): 2.57B parameters, for parameter counts and memory arithmetic without a download.
SDXL_UNET_CONFIG = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
    norm_eps=1e-5,
    act_fn="silu",
    flip_sin_to_cos=True,
    freq_shift=0,
)
