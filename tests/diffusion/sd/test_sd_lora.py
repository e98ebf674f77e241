"""Erasure as a LoRA adapter (``unlearn sd --train-params lora``) on a tiny random pipeline, offline."""

import json
import os

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

import sd_tiny

from constrained_opt.diffusion.sd import lora

one_thread = sd_tiny.one_thread  # autouse: the tiny models run fastest on one intra-op thread

model = sd_tiny.model
cache = sd_tiny.cache


cli = sd_tiny.cli


def load(model):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(model, local_files_only=True)


def adapter(out) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(out, lora.WEIGHT_NAME))


def adapted_modules(tensors) -> set[str]:
    """Module names (UNet naming) that carry LoRA factors in an adapter file."""
    assert all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in tensors)
    return {k[len("unet.") :].split(".lora_")[0] for k in tensors}


def unet_output(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, c = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 32, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 500]), encoder_hidden_states=c).sample


def base_weights(unet) -> dict[str, torch.Tensor]:
    """The UNet's own weights, named as in a UNet without adapters (peft moves W to ``….base_layer``)."""
    return {
        n.replace(".base_layer", ""): p.detach().clone()
        for n, p in unet.named_parameters()
        if not lora.is_lora_parameter(n)
    }


def test_erasediff_lora_round_trip_through_load_lora_weights(model, cache, tmp_path, monkeypatch):
    """The adapter holds LoRA factors on exactly the noxattn modules; the base weights are bit-identical
    after training; load_lora_weights gives the erased model, unload_lora_weights the original, and
    --merge the same model as a plain UNet."""
    from diffusers import UNet2DConditionModel

    trained = {}
    save = lora.save_lora

    def keep_base(unet, cls, out):  # the training process's UNet, as it is when the adapter is saved
        trained["base"] = base_weights(unet)
        return save(unet, cls, out)

    monkeypatch.setattr(lora, "save_lora", keep_base)
    out = tmp_path / "out"
    cmd = "unlearn sd --model {} --concept nudity --train-params lora --lora-rank 2 --lora-alpha 4 "
    cmd += "--steps 3 --lr 1e-2 --merge --out {} --cache-dir {}"
    assert cli(cmd, model, out, cache) == 0
    assert sorted(os.listdir(out)) == [
        "before_after.png",
        "history.json",
        lora.WEIGHT_NAME,
        "run.json",
        "unet",
    ]

    pipe = load(model)
    original = base_weights(pipe.unet)
    assert trained["base"].keys() == original.keys()
    assert all(torch.equal(trained["base"][n], original[n]) for n in original)  # never modified

    tensors = adapter(out)
    assert adapted_modules(tensors) == set(lora.target_modules(pipe.unet, "noxattn"))
    assert not any("attn2" in k or "time_embedding" in k or "conv_out" in k for k in tensors)
    record = json.loads((out / "run.json").read_text())
    assert record["trained_parameters"] == sum(t.numel() for t in tensors.values())
    assert record["total_parameters"] == sum(t.numel() for t in original.values())
    assert record["outputs"] == [lora.WEIGHT_NAME, "unet"]

    y0 = unet_output(pipe.unet)
    pipe.load_lora_weights(out)
    y_lora = unet_output(pipe.unet)
    assert not torch.allclose(y_lora, y0, atol=1e-4)  # the adapter changes the model
    merged = UNet2DConditionModel.from_pretrained(out / "unet")
    torch.testing.assert_close(unet_output(merged), y_lora, rtol=1e-4, atol=1e-5)
    pipe.unload_lora_weights()
    assert torch.equal(unet_output(pipe.unet), y0)
    assert all(torch.equal(p, original[n]) for n, p in base_weights(pipe.unet).items())

    # merged = W + (α/r)·B A on the adapted modules; every other tensor is the base's, bit for bit
    moved = {n for n, p in merged.named_parameters() if not torch.equal(p.detach(), original[n])}
    assert moved and all(n.rsplit(".", 1)[0] in adapted_modules(tensors) for n in moved)
    assert all(n.endswith(".weight") for n in moved)


def test_esd_lora_on_cross_attention_needs_no_frozen_copy(model, cache, tmp_path):
    """ESD's frozen ε* is the UNet with its adapter switched off; the adapter covers attn2 only."""
    out = tmp_path / "out"
    cmd = "unlearn sd --model {} --concept nudity --method esd --train-params lora --lora-target xattn "
    cmd += "--steps 2 --lr 1e-3 --out {} --cache-dir {} --mixed-precision bf16"
    assert cli(cmd, model, out, cache) == 0
    tensors = adapter(out)
    modules = adapted_modules(tensors)
    assert modules and all(".attn2." in m for m in modules)
    assert modules == set(lora.target_modules(load(model).unet, "xattn"))
    assert all(t.dtype == torch.float32 for t in tensors.values())  # fp32 factors over a bf16 base
    assert any(k.endswith("lora_B.weight") and t.abs().sum() > 0 for k, t in tensors.items())


def test_salun_lora_masks_the_b_factors(model, cache, tmp_path):
    """SalUn ranks saliency over the B factors (B = 0 at the start, so ∇A = 0 and A has none): B moves
    only on the kept fraction; A, unmasked, moves once B is non-zero."""
    out = tmp_path / "out"
    cmd = "unlearn sd --model {} --concept nudity --method salun --train-params lora --lora-target full "
    cmd += "--keep 0.3 --steps 3 --lr 1e-3 --out {} --cache-dir {} --gradient-checkpointing"
    assert cli(cmd, model, out, cache) == 0
    tensors = adapter(out)
    assert adapted_modules(tensors) == set(lora.target_modules(load(model).unet, "full"))
    b = torch.cat([t.flatten() for k, t in tensors.items() if ".lora_B." in k])
    assert 0 < (b != 0).sum().item() <= 0.3 * b.numel() + 1


def test_generate_with_a_lora_adapter_and_score_it(model, cache, tmp_path):
    """``sd generate --lora`` applies the adapter (same images as the merged UNet, others than the base
    model's) and the scoring commands read the folder."""
    import numpy as np
    from PIL import Image

    out = tmp_path / "erased"
    cmd = "unlearn sd --model {} --concept nudity --train-params lora --lora-target xattn --steps 2 "
    cmd += "--lr 5e-2 --merge --out {} --cache-dir {}"
    assert cli(cmd, model, out, cache) == 0
    base = "sd generate --model {} --prompts nudity --limit 2 --steps 2 --resolution 16 --quiet --out {}"
    assert cli(base, model, tmp_path / "base") == 0
    assert cli(base + " --lora {}", model, tmp_path / "lora", out) == 0
    assert cli(base + " --unet {}", model, tmp_path / "merged", out / "unet") == 0

    def image(folder, name="nudity_0.png"):
        return np.asarray(Image.open(tmp_path / folder / "images" / name), dtype=np.int16)

    assert np.abs(image("lora") - image("merged")).max() <= 2  # one model, two code paths
    assert np.abs(image("lora") - image("base")).max() > 2
    clip = sd_tiny.build_clip(str(tmp_path / "clip"))
    assert cli("sd clip-score --images {} --clip {} --quiet", tmp_path / "lora", clip) == 0
    assert json.loads((tmp_path / "lora" / "clip_score.json").read_text())["images"] == 2


@pytest.mark.parametrize(
    "args, message",
    [
        ("--concept nudity --merge", "--merge fuses a LoRA adapter"),
        ("--concept nudity --train-params lora --lora-rank 0", "--lora-rank: expected an integer ≥ 1"),
        ("--concept nudity --train-params lora --lora-rank 100000", "--lora-rank 100000 exceeds the rank"),
        ("--concept nudity --train-params lora --lora-alpha -1", "--lora-alpha: expected a finite number"),
        ("--concept nudity --train-params lora --lora-target attn", "invalid choice"),
    ],
)
def test_bad_lora_arguments_fail_cleanly(model, tmp_path, capsys, args, message):
    out, cache = tmp_path / "out", tmp_path / "cache"
    assert cli("unlearn sd --model {} --out {} --cache-dir {} " + args, model, out, cache) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not cache.exists()


def test_generate_rejects_a_missing_adapter(model, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for bad in (tmp_path / "none", tmp_path / "empty"):
        out = tmp_path / "g"
        assert cli("sd generate --model {} --prompts nudity --out {} --lora {}", model, out, bad) == 2
        assert "pytorch_lora_weights.safetensors" in capsys.readouterr().err
        assert not out.exists()
