"""Stable Diffusion unlearning (``constrained-opt unlearn sd``) on a tiny random pipeline, offline."""

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import sd_tiny

from constrained_opt.diffusion.sd import latents, params, prompts
from constrained_opt.diffusion.sd.loading import SD14_UNET_CONFIG

one_thread = sd_tiny.one_thread  # autouse: the tiny models run fastest on one intra-op thread

model = sd_tiny.model
cache = sd_tiny.cache


run, unet_params, changed = sd_tiny.cli, sd_tiny.unet_params, sd_tiny.changed


def test_erasediff_noxattn_end_to_end(model, cache, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    out = tmp_path / "out"
    cmd = "unlearn sd --model {} --concept nudity --steps 3 --out {} --cache-dir {}"
    assert run(cmd, model, out, cache) == 0
    assert sorted(os.listdir(out)) == ["before_after.png", "history.json", "run.json", "unet"]
    assert (out / "before_after.png").read_bytes()[:4] == b"\x89PNG"
    record = json.loads((out / "run.json").read_text())
    assert len(json.loads((out / "history.json").read_text())) == 3
    assert record["forget_prompts"] == ["nudity", "naked", "erotic", "sexual"]
    assert record["anchors"] == ["a person wearing clothes"]

    before, after = unet_params(os.path.join(model, "unet")), unet_params(out / "unet")
    diff = changed(before, after)
    assert diff and all(params.trains(n, "noxattn") for n in diff)
    assert not any("attn2" in n for n in diff)  # every cross-attention parameter bit-identical
    trained = {n for n in before if params.trains(n, "noxattn")}
    assert record["trained_parameters"] == sum(before[n].numel() for n in trained)

    # The scrubbed UNet runs inside the original pipeline.
    pipe = StableDiffusionPipeline.from_pretrained(
        model,
        unet=UNet2DConditionModel.from_pretrained(out / "unet"),
        local_files_only=True,
        safety_checker=None,
        requires_safety_checker=False,
    )
    image = pipe("naked", num_inference_steps=1, height=16, width=16, output_type="pt").images
    assert image.shape == (1, 3, 16, 16) and torch.isfinite(image).all()

    # The generated sets were cached (4 latents each) and a second run generates nothing new.
    sets = record["data_sets"]
    assert all(len([f for f in os.listdir(d) if f.endswith(".safetensors")]) == 4 for d in sets.values())
    stamps = {d: os.stat(latents.sample_path(d, 0)).st_mtime_ns for d in sets.values()}
    assert run(cmd, model, tmp_path / "again", cache) == 0
    assert {d: os.stat(latents.sample_path(d, 0)).st_mtime_ns for d in sets.values()} == stamps


def test_xattn_changes_only_attn2_with_fp16_and_checkpointing(model, cache, tmp_path):
    out = tmp_path / "out"
    cmd = (
        "unlearn sd --model {} --forget-class english_springer --train-params xattn --steps 2 --out {} "
        "--cache-dir {} --mixed-precision fp16 --gradient-checkpointing"
    )
    assert run(cmd, model, out, cache) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["forget_prompts"] == ["an image of English springer"]
    assert len(record["retain_prompts"]) == 9 and "an image of English springer" not in record["anchors"]
    diff = changed(unet_params(os.path.join(model, "unet")), unet_params(out / "unet"))
    assert diff and all("attn2" in n for n in diff)


def test_esd_trains_only_the_chosen_set(model, cache, tmp_path):
    out = tmp_path / "out"
    cmd = "unlearn sd --model {} --concept nudity --method esd --train-params xattn --steps 2 --out {}"
    cmd += " --cache-dir {} --mixed-precision bf16"
    assert run(cmd, model, out, cache) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["data_sets"] == {}  # ESD samples x_t from the frozen model instead of a data set
    diff = changed(unet_params(os.path.join(model, "unet")), unet_params(out / "unet"))
    assert diff and all("attn2" in n for n in diff)


def test_salun_updates_only_salient_weights(model, cache, tmp_path):
    out = tmp_path / "out"
    cmd = "unlearn sd --model {} --concept nudity --method salun --keep 0.3 --steps 2 --out {} --cache-dir {}"
    assert run(cmd, model, out, cache) == 0
    before, after = unet_params(os.path.join(model, "unet")), unet_params(out / "unet")
    trained = [n for n in before if params.trains(n, "noxattn")]
    moved = sum((before[n] != after[n]).sum().item() for n in trained)
    total = sum(before[n].numel() for n in trained)
    assert 0 < moved <= 0.3 * total + 1  # Adam leaves a parameter whose gradient is always masked alone
    assert not changed(
        {n: before[n] for n in before if n not in trained}, {n: after[n] for n in before if n not in trained}
    )


def test_latent_cache_resumes_and_is_deterministic(tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        sd_tiny.build_pipeline(str(tmp_path / "pipe")), local_files_only=True
    )
    spec = latents.SetSpec(latents.fingerprint(pipe), ("nudity", "naked"), 16, 2, 7.5, 0)
    directory = spec.directory(str(tmp_path / "c"))
    assert directory != dataclasses.replace(spec, seed=1).directory(str(tmp_path / "c"))

    def make(n, d=directory):
        return latents.generate_set(pipe, spec, n, d, batch_size=2, progress=False)

    assert make(2) == 2
    first = Path(latents.sample_path(directory, 0)).read_bytes()
    assert make(3) == 1 and make(3) == 0
    assert Path(latents.sample_path(directory, 0)).read_bytes() == first
    fresh = str(tmp_path / "fresh")
    assert make(3, fresh) == 3
    a, b = latents.load_set(directory, 3, [5, 7], "a"), latents.load_set(fresh, 3, [5, 7], "b")
    torch.testing.assert_close(a.images, b.images, rtol=1e-4, atol=1e-5)
    assert a.labels.tolist() == [5, 7, 5]


@pytest.mark.parametrize(
    "args, message",
    [
        ("--concept nudity --forget-class tench", "not allowed with"),
        ("--forget-class goldfish", "unknown Imagenette class"),
        ("--concept nudity --steps 0", "argument --steps: expected an integer ≥ 1, got 0"),
        ("--concept nudity --resolution 12", "multiple of 8"),
        ("--concept nudity --keep 0", "argument --keep: expected a finite number > 0 and ≤ 1, got 0"),
        ("--concept nudity --anchor ''", "--anchor"),
    ],
)
def test_bad_arguments_fail_cleanly(model, tmp_path, capsys, args, message):
    out, cache = tmp_path / "out", tmp_path / "cache"
    assert run("unlearn sd --model {} --out {} --cache-dir {} " + args, model, out, cache) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists() and not cache.exists()


def test_bad_model_paths_fail_cleanly(model, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "model.ckpt").write_bytes(b"")
    (tmp_path / "file").write_text("x")
    cases = [
        (f"--model {tmp_path / 'missing'} --out {tmp_path / 'o'}", "model not found"),
        (f"--model {tmp_path / 'empty'} --out {tmp_path / 'o'}", "no model_index.json"),
        (f"--model {tmp_path / 'model.ckpt'} --offline --out {tmp_path / 'o'}", "needs --config"),
        (f"--model {model} --out {tmp_path / 'file'}", "not a directory"),
    ]
    for args, message in cases:
        assert run(f"unlearn sd --concept nudity --cache-dir {tmp_path / 'c'} " + args) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == ["empty", "file", "model.ckpt"]


def test_parameter_sets_on_the_sd14_unet():
    """ESD's sets on the full-size SD v1.4 architecture (meta tensors: no memory, no download)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD14_UNET_CONFIG)
    names = [n for n, _ in unet.named_parameters()]
    sets = {m: {n for n in names if params.trains(n, m)} for m in params.PARAM_SETS}
    excluded = {n for n in names if n.startswith(params.NOXATTN_EXCLUDED)}
    assert sets["full"] == set(names)
    assert sets["xattn"] == {n for n in names if "attn2" in n}
    assert sets["noxattn"] == set(names) - sets["xattn"] - excluded
    assert excluded and {n.split(".")[0] for n in excluded} == {"conv_norm_out", "conv_out", "time_embedding"}
    # attn2 is the cross-attention: its keys read the 768-d CLIP text embedding.
    attn2 = {n.rsplit(".attn2.", 1)[0] + ".attn2" for n in sets["xattn"]}
    assert all(unet.get_submodule(m).to_k.in_features == 768 for m in attn2)
    assert all(unet.get_submodule(m.replace("attn2", "attn1")).to_k.in_features != 768 for m in attn2)


def test_shipped_prompt_sets():
    from torchvision.models import ResNet50_Weights

    assert prompts.nudity_prompts() == ["nudity", "naked", "erotic", "sexual"]
    classes = prompts.imagenette_classes()
    categories = ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
    assert len(classes) == 10 and all(categories[i] == name for name, i in classes.items())
    task = prompts.make_task(None, "Gas-Pump")
    assert task.forget == ("an image of gas pump",) and len(set(task.retain)) == 9
    assert prompts.make_task("nudity", None, ["a photo of pokemon"]).anchors == ("a photo of pokemon",)
