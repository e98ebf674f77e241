"""Erasure as a LoRA adapter: train only low-rank factors, share one small file, switch it on and off.

Each Linear/Conv2d module W of the chosen parameter set (``--lora-target``, :mod:`.params`) gets peft's
LoRA: W x + (α/r)·B A x, with A ~ N(0, 1/r²) and B = 0 at the start (peft's ``"gaussian"`` init, as in
diffusers' LoRA training examples), so training starts exactly at the base model, and only A and B are
trained. Norms and biases have no low-rank form and stay as they are. The base weights never change.

The adapter is written in the layout ``pipe.load_lora_weights(OUT)`` reads: ``OUT/{WEIGHT_NAME}`` with
``unet.``-prefixed peft keys (``….lora_A.weight``/``….lora_B.weight``) and the adapter's ``LoraConfig``
(rank, α, target modules) in the safetensors metadata, so α/r survives the round trip.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

import torch

from ..runtime.errors import UsageError
from .params import trains

WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def target_modules(unet, target: str) -> list[str]:
    """Names of the Linear and Conv2d modules whose weight belongs to parameter set ``target``."""
    return [
        name
        for name, module in unet.named_modules()
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d) and trains(f"{name}.weight", target)
    ]


def check_lora_rank(unet, target: str, rank: int) -> list[str]:
    """``target``'s module names, after checking that ``rank`` fits them: ΔW = BA of a weight with
    n_out rows and n_in inputs per row (in × kh × kw for a Conv2d) has rank ≤ min(n_out, n_in), so a
    larger r only adds parameters; r is bounded by the narrowest targeted layer."""
    names = target_modules(unet, target)
    if not names:
        raise UsageError(f"--lora-target {target}: this UNet has no Linear or Conv2d module in that set")
    widths = {
        name: min(w.shape[0], w[0].numel()) for name in names for w in [unet.get_submodule(name).weight]
    }
    narrowest = min(widths, key=widths.get)
    if rank > widths[narrowest]:
        raise UsageError(
            f"--lora-rank {rank} exceeds the rank of the narrowest --lora-target {target} layer "
            f"({narrowest}, whose update has rank ≤ {widths[narrowest]}): pass --lora-rank "
            f"{widths[narrowest]} or less"
        )
    return names


def add_lora(unet, target: str, rank: int, alpha: float) -> list[torch.nn.Parameter]:
    """Freeze the UNet and attach a LoRA adapter (rank ``rank``, scale α/r) to ``target``'s modules;
    returns the adapter's parameters, in float32 whatever the base weights' dtype."""
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    names = check_lora_rank(unet, target, rank)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=names))
    cast_training_params(unet, dtype=torch.float32)
    return [p for p in unet.parameters() if p.requires_grad]


@contextlib.contextmanager
def adapters_disabled(unet):
    """The base model inside the block (e.g. ESD's frozen ε*): no copy of the weights is needed."""
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()


def is_lora_parameter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def save_lora(unet, pipeline_cls, out: str) -> str:
    """Write the UNet's adapter to ``out/WEIGHT_NAME`` atomically; returns the file's path.

    The keys are peft's (``get_peft_model_state_dict``), not converted with diffusers'
    ``convert_state_dict_to_diffusers``: for an adapter on attention *and* other modules that
    conversion renames only the attention keys, and ``load_lora_weights`` then silently drops them.
    """
    from peft.utils import get_peft_model_state_dict

    os.makedirs(out, exist_ok=True)
    layers = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    metadata = unet.peft_config["default"].to_dict()
    tmp = tempfile.mkdtemp(dir=out, prefix=".lora.")
    try:
        pipeline_cls.save_lora_weights(
            tmp, unet_lora_layers=layers, unet_lora_adapter_metadata=metadata, weight_name=WEIGHT_NAME
        )
        os.replace(os.path.join(tmp, WEIGHT_NAME), os.path.join(out, WEIGHT_NAME))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return os.path.join(out, WEIGHT_NAME)


def check_lora_path(path: str) -> tuple[str, str]:
    """``(folder, weight file name)`` of an adapter given as a folder holding ``WEIGHT_NAME`` or as the
    ``.safetensors`` file itself; a clear error otherwise."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, WEIGHT_NAME)):
            raise UsageError(
                f"{path} has no {WEIGHT_NAME} (the adapter `unlearn sd --train-params lora` writes)"
            )
        return path, WEIGHT_NAME
    if os.path.isfile(path) and path.endswith(".safetensors"):
        return os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    raise UsageError(f"LoRA adapter not found: {path} (a folder with {WEIGHT_NAME} or a .safetensors file)")


def load_lora(pipe, path: str) -> None:
    """``pipe.load_lora_weights`` on an adapter folder or file, with errors that name the file."""
    folder, weight_name = check_lora_path(path)
    try:
        pipe.load_lora_weights(folder, weight_name=weight_name)
    except (ValueError, KeyError, RuntimeError, OSError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"cannot load the LoRA adapter {path} into this model: {reason}") from None


def merged_unet(pipe, path: str):
    """The pipeline's UNet with the adapter at ``path`` fused into its weights (W + (α/r)·B A) and the
    LoRA layers removed: a plain UNet2DConditionModel."""
    load_lora(pipe, path)
    pipe.fuse_lora(components=["unet"])
    pipe.unload_lora_weights()
    return pipe.unet
