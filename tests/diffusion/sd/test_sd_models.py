"""SD 2.x (v-prediction) and SDXL (two text encoders, ``text_time`` conditioning) on tiny random
pipelines built from configs, offline: detection, erasure with each parameter set, generation."""

import json
import os
import shutil

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

import sd_tiny

from constrained_opt.diffusion.runtime.errors import UsageError
from constrained_opt.diffusion.sd import lora, model, params
from constrained_opt.diffusion.sd.loading import SDXL_UNET_CONFIG, load_pipeline, pipeline_class

one_thread = sd_tiny.one_thread  # autouse: the tiny models run fastest on one intra-op thread


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "sdxl": sd_tiny.build_xl_pipeline(str(root / "sdxl")),
        "sdxl-v": sd_tiny.build_xl_pipeline(str(root / "sdxl-v"), prediction_type="v_prediction"),
        "sd2-v": sd_tiny.build_pipeline(str(root / "sd2"), sd2=True),
        "sd1": sd_tiny.build_pipeline(str(root / "sd1")),
        "cache": str(root / "cache"),
    }


cli, unet_params, changed = sd_tiny.cli, sd_tiny.unet_params, sd_tiny.changed


def xl_output(unet, seed=0):
    """The UNet's prediction for fixed SDXL inputs: latents, 64-d hidden states, pooled text, size ids."""
    g = torch.Generator().manual_seed(seed)
    x, c, pooled = (
        torch.randn(2, 4, 8, 8, generator=g),
        torch.randn(2, 5, 64, generator=g),
        torch.randn(2, 32, generator=g),
    )
    added = {"text_embeds": pooled, "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2)}
    with torch.no_grad():
        return unet(x, torch.tensor([10, 500]), encoder_hidden_states=c, added_cond_kwargs=added).sample


def test_sdxl_is_detected_and_refiners_and_sample_prediction_are_refused(models, tmp_path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from safetensors.torch import save_file

    assert pipeline_class(models["sdxl"]) is StableDiffusionXLPipeline
    assert pipeline_class(models["sd2-v"]) is StableDiffusionPipeline
    pipe = load_pipeline(models["sdxl"])
    assert model.is_sdxl(pipe) and model.text_encoders(pipe) == ["text_encoder", "text_encoder_2"]
    table = model.encode_prompts(pipe, ["naked", ""], torch.device("cpu"), 16)
    assert table.embeds.shape == (2, 32, 64) and table.pooled.shape == (2, 32)
    assert table.time_ids.tolist() == [16, 16, 0, 0, 16, 16]

    refiner = tmp_path / "refiner"
    refiner.mkdir()
    with open(os.path.join(models["sdxl"], "model_index.json")) as f:
        index = json.load(f)
    index["text_encoder"] = [None, None]
    (refiner / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UsageError, match="SDXL refiner"):
        pipeline_class(str(refiner))

    # original (SGM) checkpoints: SDXL has the second text encoder under conditioner.embedders.1
    for keys, cls in (
        (["conditioner.embedders.1.model.ln_final.weight"], StableDiffusionXLPipeline),
        (["cond_stage_model.transformer.text_model.final_layer_norm.weight"], StableDiffusionPipeline),
    ):
        path = str(tmp_path / "ckpt.safetensors")
        save_file({k: torch.zeros(1) for k in keys}, path)
        assert pipeline_class(path) is cls

    x0 = tmp_path / "x0-model"
    shutil.copytree(models["sd2-v"], x0)
    config = x0 / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "prediction_type": "sample"}))
    with pytest.raises(UsageError, match="sample-prediction model; supported"):
        load_pipeline(str(x0))


def test_v_prediction_target_is_the_velocity():
    """For a v-model the regression target is v = √ᾱ ε − √(1−ᾱ) z_0, i.e. ε = √ᾱ v + √(1−ᾱ) x_t."""
    from diffusers import DDPMScheduler

    g = torch.Generator().manual_seed(0)
    z0, rows = torch.randn(3, 4, 8, 8, generator=g), torch.tensor([0, 1, 2])
    for kind in ("epsilon", "v_prediction"):
        scheduler = DDPMScheduler(beta_schedule="scaled_linear", prediction_type=kind)
        b = model.noised(scheduler, z0, rows, torch.Generator().manual_seed(1))
        eps = model.noised(DDPMScheduler(), z0, rows, torch.Generator().manual_seed(1)).noise
        a = scheduler.alphas_cumprod[b.t].view(-1, 1, 1, 1)
        assert torch.equal(b.cond, rows)
        torch.testing.assert_close(b.x_t, a.sqrt() * z0 + (1 - a).sqrt() * eps)
        target = eps if kind == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * z0
        torch.testing.assert_close(b.noise, target)
        if kind == "v_prediction":
            torch.testing.assert_close(a.sqrt() * b.noise + (1 - a).sqrt() * b.x_t, eps, rtol=1e-4, atol=1e-5)


def test_sdxl_v_prediction_lora_esd_loads_in_the_sdxl_pipeline(models, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    out, xl = tmp_path / "out", models["sdxl-v"]
    cmd = "unlearn sd --model {} --concept nudity --method esd --train-params lora --lora-target xattn "
    cmd += "--steps 2 --lr 1e-2 --out {} --cache-dir {}"
    assert cli(cmd, xl, out, models["cache"]) == 0
    assert json.loads((out / "run.json").read_text())["model"]["prediction_type"] == "v_prediction"

    pipe = StableDiffusionXLPipeline.from_pretrained(xl, local_files_only=True)
    modules = {k[len("unet.") :].split(".lora_")[0] for k in pipe.lora_state_dict(str(out))[0]}
    assert modules == set(lora.target_modules(pipe.unet, "xattn"))
    y0 = xl_output(pipe.unet)
    pipe.load_lora_weights(out)
    assert not torch.allclose(xl_output(pipe.unet), y0, atol=1e-4)
    pipe.unload_lora_weights()
    assert torch.equal(xl_output(pipe.unet), y0)

    gen = tmp_path / "gen"
    cmd = "sd generate --model {} --lora {} --prompts nudity --limit 1 --steps 2 --resolution 16 --out {}"
    assert cli(cmd + " --quiet", xl, out, gen) == 0
    assert (gen / "images" / "nudity_0.png").is_file()


# The support table of docs/sd.md: every model family × parameter set, each cell one run. Methods rotate
# so that each family is trained by all three; LoRA cells use --lora-target noxattn (test_sd_lora.py
# covers the other targets).
MATRIX = {
    ("sd1", "full"): "salun",
    ("sd1", "xattn"): "esd",
    ("sd1", "noxattn"): "erasediff",
    ("sd1", "lora"): "erasediff",
    ("sd2-v", "full"): "erasediff",
    ("sd2-v", "xattn"): "salun",
    ("sd2-v", "noxattn"): "esd",
    ("sd2-v", "lora"): "salun",
    ("sdxl", "full"): "esd",
    ("sdxl", "xattn"): "erasediff",
    ("sdxl", "noxattn"): "salun",
    ("sdxl", "lora"): "esd",
}


def probe(unet, seed=0):
    """The UNet's prediction on fixed inputs shaped from its config (SDXL: plus pooled text, size ids)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    kwargs = {"encoder_hidden_states": torch.randn(2, 5, unet.config.cross_attention_dim, generator=g)}
    if unet.config.addition_embed_type == "text_time":
        pooled = torch.randn(2, unet.config.projection_class_embeddings_input_dim - 48, generator=g)
        kwargs["added_cond_kwargs"] = {
            "text_embeds": pooled,
            "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2),
        }
    with torch.no_grad():
        return unet(x, torch.tensor([10, 500]), **kwargs).sample


@pytest.mark.parametrize("family, train_params", sorted(MATRIX), ids=lambda v: v)
def test_support_matrix(models, tmp_path, family, train_params):
    """Training changes exactly the chosen set, and the output loads in the family's pipeline class."""
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    method, base, out = MATRIX[family, train_params], models[family], tmp_path / "out"
    cmd = f"unlearn sd --model {{}} --concept nudity --method {method} --train-params {train_params} "
    cmd += "--steps 1 --lr 1e-3 --grid-prompt naked --grid-images 1 --out {} --cache-dir {}"
    assert cli(cmd, base, out, models["cache"]) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["model"]["architecture"] == ("sdxl" if family == "sdxl" else "sd")
    assert record["model"]["prediction_type"] == ("v_prediction" if family == "sd2-v" else "epsilon")

    pipe = DiffusionPipeline.from_pretrained(base, local_files_only=True)
    assert type(pipe) is pipeline_class(base)
    y0 = probe(pipe.unet)
    if train_params == "lora":
        modules = {k[len("unet.") :].split(".lora_")[0] for k in pipe.lora_state_dict(str(out))[0]}
        assert modules == set(lora.target_modules(pipe.unet, "noxattn"))
        pipe.load_lora_weights(out)
        assert not torch.allclose(probe(pipe.unet), y0, atol=1e-6)
        return
    before = unet_params(os.path.join(base, "unet"))
    diff = changed(before, unet_params(out / "unet"))
    assert diff and all(params.trains(n, train_params) for n in diff)
    if train_params == "full":  # beyond both other sets: the output head and cross-attention move
        assert "conv_out.weight" in diff and any("attn2" in n for n in diff)
    assert record["trained_parameters"] == sum(
        p.numel() for n, p in before.items() if params.trains(n, train_params)
    )
    pipe.unet = UNet2DConditionModel.from_pretrained(out / "unet")
    assert not torch.allclose(probe(pipe.unet), y0, atol=1e-6)
    image = pipe("naked", num_inference_steps=1, height=16, width=16, output_type="pt").images
    assert image.shape == (1, 3, 16, 16) and torch.isfinite(image).all()


def test_parameter_sets_on_the_sdxl_unet():
    """ESD's sets on the full-size SDXL base architecture (meta tensors: no memory, no download)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    sizes = {n: p.numel() for n, p in unet.named_parameters()}
    assert sum(sizes.values()) == 2_567_463_684  # SDXL base 1.0's UNet
    count = {m: sum(v for n, v in sizes.items() if params.trains(n, m)) for m in params.PARAM_SETS}
    assert count == {"full": 2_567_463_684, "xattn": 545_670_400, "noxattn": 2_014_485_120}
    excluded = {n.split(".")[0] for n in sizes if not params.trains(n, "noxattn") and "attn2" not in n}
    assert excluded == {"conv_norm_out", "conv_out", "time_embedding", "add_embedding"}
    attn2 = {n.rsplit(".attn2.", 1)[0] + ".attn2" for n in sizes if "attn2" in n}
    assert all(unet.get_submodule(m).to_k.in_features == 2048 for m in attn2)  # reads the text


def test_memory_plan_arithmetic():
    """``benchmarks/sd_memory.py --plan``: training state from parameter counts (the 24 GB tables)."""
    from benchmarks.sd_memory import GiB, plan

    sd14 = plan("sd14")
    assert sd14["total_params"] == 859_520_964
    assert sd14["sets"]["noxattn"] == 813_495_680 and sd14["sets"]["lora-noxattn-r4"] == 3_806_864
    rows = {(r["trained_set"], r["config"]): r for r in sd14["rows"]}
    adam = rows["noxattn", "fp32 weights, Adam"]
    n = 813_495_680
    assert adam["erasediff_gib"] == pytest.approx((4 * 859_520_964 + 2 * 4 * n + 8 * n) / GiB)
    assert adam["erasediff_k2_peak_gib"] == pytest.approx(adam["erasediff_gib"] + 4 * n / GiB)
    lora_row = rows["lora-noxattn-r4", "LoRA r=4 on noxattn, bf16 base, fp32 adapter, Adam"]
    assert (
        lora_row["esd_gib"] < lora_row["erasediff_gib"] < 1.7
    )  # no frozen copy: the adapter is switched off
