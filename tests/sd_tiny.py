"""Tiny random Stable Diffusion components built in code (no download), saved as a diffusers folder."""

from __future__ import annotations

import json
import os

import pytest
import torch

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def write_tokenizer_files(directory: str) -> tuple[str, str]:
    """A character-level CLIP BPE vocabulary: every letter, alone and word-final, and no merges."""
    os.makedirs(directory, exist_ok=True)
    tokens = ["<|startoftext|>", "<|endoftext|>", *LETTERS, *(c + "</w>" for c in LETTERS)]
    vocab, merges = os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt")
    with open(vocab, "w") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f)
    with open(merges, "w") as f:
        f.write("#version: 0.2\n")
    return vocab, merges


def tokenizer(directory: str):
    from transformers import CLIPTokenizer

    return CLIPTokenizer(*write_tokenizer_files(directory), model_max_length=32)


def text_config(vocab_size: int, **overrides):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=vocab_size,
        max_position_embeddings=32,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        **overrides,
    )


def vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        sample_size=16,
    )


SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
# The toy UNet shape every tiny pipeline shares: two levels, cross-attention on the second, 8×8 latents.
UNET = dict(
    block_out_channels=(32, 64),
    layers_per_block=1,
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
)
# `unlearn sd` settings that make a run take seconds on the tiny pipelines (a command's own flags override).
FAST = "--num-forget 4 --num-retain 4 --resolution 16 --gen-steps 2 --grid-steps 2 --batch-size 2 --quiet"


def cli(command: str, *paths) -> int:
    """The CLI in-process: ``command`` formatted with ``paths``; ``unlearn sd`` gets FAST first.
    argparse errors (SystemExit) become their exit code."""
    import shlex

    from constrained_opt.cli import main

    words = shlex.split(command.format(*paths))
    if words[:2] == ["unlearn", "sd"]:
        words = [*words[:2], *FAST.split(), *words[2:]]
    try:
        return main(words)
    except SystemExit as e:
        return e.code


def unet_params(path) -> dict[str, torch.Tensor]:
    from diffusers import UNet2DConditionModel

    return {n: p.detach() for n, p in UNet2DConditionModel.from_pretrained(path).named_parameters()}


def changed(before, after) -> set[str]:
    """Names of the parameters that differ between two ``unet_params`` dicts."""
    assert before.keys() == after.keys()
    return {n for n in before if not torch.equal(before[n], after[n])}


def build_pipeline(path: str, seed: int = 0, sd2: bool = False) -> str:
    """Save a ~1M-parameter StableDiffusionPipeline (16×16 images, 8×8 latents) to ``path``.

    ``sd2``: shaped like SD 2.x 768-v: linear transformer projections, per-block head dims and a
    v-prediction DDIM scheduler.
    """
    from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tok = tokenizer(os.path.join(path, "_tokenizer_src"))
    unet = UNet2DConditionModel(
        **UNET,
        cross_attention_dim=32,
        attention_head_dim=(2, 4) if sd2 else 8,
        use_linear_projection=sd2,
    )
    if sd2:
        scheduler = DDIMScheduler(
            **SCHEDULE, clip_sample=False, set_alpha_to_one=False, prediction_type="v_prediction"
        )
    else:
        scheduler = PNDMScheduler(**SCHEDULE, skip_prk_steps=True, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(
        vae=vae(),
        text_encoder=CLIPTextModel(text_config(len(tok))),
        tokenizer=tok,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return path


def build_xl_pipeline(path: str, seed: int = 0, prediction_type: str = "epsilon") -> str:
    """Save a tiny StableDiffusionXLPipeline (16×16 images, 8×8 latents) to ``path``: two text encoders
    (the second with a projection, giving the pooled embedding) and a ``text_time`` UNet, shaped like
    SDXL base (linear projections, per-block transformer depth) at toy width."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tok = tokenizer(os.path.join(path, "_tokenizer_src"))
    pooled_dim, time_dim = 32, 8
    unet = UNet2DConditionModel(
        **UNET,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * time_dim + pooled_dim,  # six size ids + pooled text
        cross_attention_dim=64,  # the two encoders' hidden states, concatenated
    )
    scheduler = EulerDiscreteScheduler(
        **SCHEDULE, timestep_spacing="leading", prediction_type=prediction_type
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae(),
        text_encoder=CLIPTextModel(text_config(len(tok))),
        text_encoder_2=CLIPTextModelWithProjection(text_config(len(tok), projection_dim=pooled_dim)),
        tokenizer=tok,
        tokenizer_2=tok,
        unet=unet,
        scheduler=scheduler,
    )
    pipe.save_pretrained(path)
    return path


def build_clip(path: str) -> str:
    """A tiny CLIPModel + CLIPProcessor (32×32 images) saved to ``path``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPVisionConfig

    torch.manual_seed(0)
    tok = tokenizer(os.path.join(path, "_tokenizer_src"))
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        image_size=32,
        patch_size=8,
    )
    config = CLIPConfig(
        text_config=text_config(len(tok)).to_dict(), vision_config=vision.to_dict(), projection_dim=16
    )
    CLIPModel(config).save_pretrained(path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny SD v1 pipeline saved once per test module (use as ``model = sd_tiny.model``)."""
    return build_pipeline(str(tmp_path_factory.mktemp("sd") / "pipe"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A cache folder shared by one test module's runs (use as ``cache = sd_tiny.cache``)."""
    return str(tmp_path_factory.mktemp("sd-cache"))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny models run fastest on one intra-op thread (and do not spin on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
