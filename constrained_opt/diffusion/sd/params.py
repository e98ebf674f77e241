"""Which UNet weights an erasure trains: ESD's parameter sets in diffusers naming, for SD 1.x/2.x and SDXL.

- ``noxattn``: everything except the cross-attention modules (``attn2``) and, as in ESD's code (which the
  EraseDiff and SalUn SD scripts reuse), except the output head (``conv_norm_out``, ``conv_out``) and the
  timestep MLP (``time_embedding``). For SDXL also except ``add_embedding``, the MLP whose output (pooled
  text + size conditioning, ``addition_embed_type="text_time"``) is added to the timestep embedding: it
  is the SDXL extension of ``time_embedding``. (ESD's own SDXL script, ``esd_sdxl.py``, defines its
  ``esd-u`` set more narrowly still: no name containing ``emb``, so also no resnet ``time_emb_proj``.)
- ``xattn``: the ``attn2`` modules only.
- ``full``: every parameter.

``--train-params lora`` trains LoRA factors instead (:mod:`.lora`); ``--lora-target`` picks one of the
three sets above, whose Linear and Conv2d modules get the adapters.
"""

from __future__ import annotations

import torch

from ..runtime.errors import UsageError

PARAM_SETS = ("noxattn", "xattn", "full")
NOXATTN_EXCLUDED = ("conv_norm_out.", "conv_out.", "time_embedding.", "add_embedding.")


def trains(name: str, mode: str) -> bool:
    """Whether parameter ``name`` (diffusers UNet2DConditionModel naming) is trained under ``mode``."""
    if mode == "full":
        return True
    if mode == "xattn":
        return "attn2" in name
    if mode == "noxattn":
        return "attn2" not in name and not name.startswith(NOXATTN_EXCLUDED)
    raise UsageError(f"unknown parameter set {mode!r}; expected one of {', '.join(PARAM_SETS)}")


def select_trainable(unet, mode: str) -> list[torch.nn.Parameter]:
    """Set ``requires_grad`` on every UNet parameter by ``mode``; returns the trained ones."""
    out = []
    for name, p in unet.named_parameters():
        p.requires_grad_(trains(name, mode))
        if p.requires_grad:
            out.append(p)
    return out
