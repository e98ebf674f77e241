"""How the training code calls a Stable Diffusion UNet: SD 1.x/2.x or SDXL, ε- or v-prediction.

Every prompt a run uses is encoded once into a :class:`PromptTable`; batches then carry *row indices*
into the table as their condition c, and :class:`Denoiser` turns rows into the UNet's inputs:

- SD 1.x/2.x: ``encoder_hidden_states`` = the text encoder's last hidden state.
- SDXL: the two text encoders' penultimate hidden states concatenated (``encoder_hidden_states``), plus
  ``added_cond_kwargs``: the pooled, projected embedding of the second encoder (``text_embeds``) and
  the micro-conditioning ``time_ids`` = (H, W, 0, 0, H, W) — original size, crop corner and target size,
  the values SDXL's pipeline uses for an uncropped H×W image.

The UNet predicts in its scheduler's parametrisation (``prediction_type``): ε, or v = √ᾱ_t ε − √(1−ᾱ_t) x_0.
The losses are written in that same parametrisation (:func:`noised` puts the matching regression target
in the batch), so L_r is the model's own training loss. For a v-model, the ε-form of a loss at the same
(x_t, t) is ᾱ_t times the v-form: ε̂ = √ᾱ_t v̂ + √(1−ᾱ_t) x_t is affine in v̂ with slope √ᾱ_t, so
‖ε̂₁ − ε̂₂‖² = ᾱ_t‖v̂₁ − v̂₂‖². The same affinity makes ESD's target ε*(∅) − η(ε*(c) − ε*(∅)) and
classifier-free guidance the same formulas in v.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..losses import AppendedEmbedding, EpsFn, Noised, diffuse
from ..runtime.errors import UsageError

PREDICTION_TYPES = ("epsilon", "v_prediction")


def is_sdxl(pipe) -> bool:
    """SDXL: a second text encoder and the ``text_time`` added conditioning."""
    return getattr(pipe, "text_encoder_2", None) is not None


def text_encoders(pipe) -> list[str]:
    return ["text_encoder", "text_encoder_2"] if is_sdxl(pipe) else ["text_encoder"]


@dataclass
class PromptTable:
    """Text conditioning of every prompt of a run; row ``ids[p]`` is prompt p."""

    embeds: Tensor  # (P, L, D) encoder_hidden_states
    ids: dict[str, int]
    pooled: Tensor | None = None  # (P, D2) SDXL text_embeds
    time_ids: Tensor | None = None  # (6,) SDXL micro-conditioning

    @property
    def device(self) -> torch.device:
        return self.embeds.device

    def unet_kwargs(self, rows: Tensor) -> dict:
        rows = rows.to(self.device)
        kwargs: dict = {"encoder_hidden_states": self.embeds[rows]}
        if self.pooled is not None:
            assert self.time_ids is not None
            kwargs["added_cond_kwargs"] = {
                "text_embeds": self.pooled[rows],
                "time_ids": self.time_ids.expand(len(rows), -1),
            }
        return kwargs


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], device: torch.device, resolution: int) -> PromptTable:
    """Encode ``prompts`` once (no classifier-free guidance; '' is encoded like any prompt, as ESD's
    null condition is in both its SD and SDXL scripts)."""
    if is_sdxl(pipe):
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        size = float(resolution)
        time_ids = torch.tensor([size, size, 0.0, 0.0, size, size], device=device)
        return PromptTable(embeds.float(), {p: i for i, p in enumerate(prompts)}, pooled.float(), time_ids)
    embeds = pipe.encode_prompt(prompts, device, 1, False)[0]
    return PromptTable(embeds.float(), {p: i for i, p in enumerate(prompts)})


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype`` on ``device``'s type, or a disabled one for ``None``."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


class Denoiser:
    """The UNet's prediction (ε̂, or v̂ for a v-prediction model) for rows of a :class:`PromptTable`,
    under autocast, in float32. ``base_only``: with the UNet's LoRA adapters switched off (ESD's frozen
    ε* when the trained weights are an adapter)."""

    def __init__(self, unet, table: PromptTable, device, dtype, base_only=None):
        self.unet, self.table, self.device, self.dtype = unet, table, device, dtype
        self.base_only = base_only  # the bare UNet carrying the adapters, or None

    def __call__(self, x_t: Tensor, t: Tensor, rows: Tensor) -> Tensor:
        from .lora import adapters_disabled

        off = adapters_disabled(self.base_only) if self.base_only is not None else contextlib.nullcontext()
        with off, autocast(self.device, self.dtype):
            return self.unet(x_t, t, **self.table.unet_kwargs(rows)).sample.float()

    def conditioned(self, encode: Callable[[Tensor], Tensor]) -> EpsFn:
        """ε_θ(x_t, t | encode(rows)): the trained UNet on hidden states computed at each call (e.g. a
        :class:`PrefixedPrompts`) instead of the table's rows; SD 1.x/2.x, adapters on."""

        def eps(x_t: Tensor, t: Tensor, rows: Tensor) -> Tensor:
            states = encode(rows)
            with autocast(self.device, self.dtype):
                return self.unet(x_t, t, encoder_hidden_states=states).sample.float()

        return eps


class PrefixedPrompts:
    """The text conditioning of ``prompts`` with K token embeddings x prepended: AdvUnlearn's ``prefix_k``
    form of its adversarial word embedding (OPTML-Group/AdvUnlearn, ``train-scripts/utils/attack_util.py``,
    ``construct_id``/``construct_embd``): ids = [BOS, n, …, n+K−1, the prompt's tokens, EOS, pad…] cut
    to the tokenizer's length (the last K positions drop, as theirs do), token n+i embedded as x[i]
    (:class:`~constrained_opt.diffusion.losses.AppendedEmbedding`, n = the token table's size), then the
    CLIP text encoder's last hidden state, differentiable in x. ``vector`` is the caller's (K, D) tensor,
    read at every call. The tokenizer is not touched and the encoder's weights are never written: its
    token-embedding module is swapped for the duration of each call only. SD 1.x/2.x (one CLIP encoder);
    the pooled output, which these UNets do not read, is not meaningful with the new ids."""

    def __init__(self, pipe, prompts: Sequence[str], table: PromptTable, vector: Tensor):
        tok, encoder = pipe.tokenizer, pipe.text_encoder
        self.encoder, self.embedding, self.vector = encoder, encoder.get_input_embeddings(), vector
        k, n = len(vector), self.embedding.num_embeddings
        length = tok.model_max_length
        if not 1 <= k <= length - 2:
            raise UsageError(f"--inversion-tokens must be in [1, {length - 2}] for this tokenizer, got {k}")
        ids = tok(
            list(prompts), padding="max_length", max_length=length, truncation=True, return_tensors="pt"
        ).input_ids
        new = torch.arange(n, n + k).expand(len(ids), k)
        self.ids = torch.cat([ids[:, :1], new, ids[:, 1 : length - k]], 1).to(encoder.device)
        index = torch.full((len(table.ids),), -1, dtype=torch.long)
        for i, p in enumerate(prompts):
            index[table.ids[p]] = i
        self.index = index.to(table.device)
        self.appended = AppendedEmbedding(self.embedding, lambda: self.vector, n)

    def __call__(self, rows: Tensor) -> Tensor:
        """``encoder_hidden_states`` (B, L, D) for table rows of the prompts (one encoder pass over them)."""
        pick = self.index[rows.to(self.index.device)]
        if (pick < 0).any():
            raise ValueError("PrefixedPrompts got a table row that is not one of its prompts")
        self.encoder.set_input_embeddings(self.appended)
        try:
            states = self.encoder(self.ids)[0]
        finally:
            self.encoder.set_input_embeddings(self.embedding)
        return states[pick.to(states.device)].float()


def noised(scheduler, z0: Tensor, rows: Tensor, generator: torch.Generator) -> Noised:
    """x_t = √ᾱ_t z_0 + √(1−ᾱ_t) ε at t ~ U{0..T−1}; the batch's ``noise`` field holds the regression
    target of the model's parametrisation: ε, or v = √ᾱ_t ε − √(1−ᾱ_t) z_0 for v-prediction."""
    b = diffuse(scheduler, z0, rows, generator)
    if scheduler.config.prediction_type == "v_prediction":
        return b._replace(noise=scheduler.get_velocity(z0, b.noise, b.t))
    return b
