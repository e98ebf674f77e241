"""Robust forget rows on Stable Diffusion (``unlearn sd --robust relearn,sharpness,inversion``) on a tiny
random pipeline, offline: every form for full, noxattn and LoRA, what moves and what does not, the rows'
stats, the prefixed prompt encoding and the CLI's errors."""

import json
import os
import types

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

import sd_tiny

from constrained_opt.diffusion.jobs import sd_unlearn
from constrained_opt.diffusion.sd import lora, params
from constrained_opt.diffusion.sd import robust as sd_robust
from constrained_opt.diffusion.sd.model import PrefixedPrompts, encode_prompts

one_thread = sd_tiny.one_thread  # autouse: the tiny models run fastest on one intra-op thread

model = sd_tiny.model
cache = sd_tiny.cache
run, unet_params, changed = sd_tiny.cli, sd_tiny.unet_params, sd_tiny.changed

ALL = "--robust relearn,sharpness,inversion --inversion-steps 2 --relearn-steps 2 --steps 2"
ROWS = ["forget", "relearn", "sharpness", "inversion"]


def load(model):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(model, local_files_only=True)


def weights(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.state_dict().items()}


def base_weights(unet) -> dict[str, torch.Tensor]:
    """The UNet's own weights, named as without adapters (peft moves W to ``….base_layer``)."""
    return {
        n.replace(".base_layer", ""): p.detach().clone()
        for n, p in unet.named_parameters()
        if not lora.is_lora_parameter(n)
    }


def write_images(folder, count: int) -> str:
    from PIL import Image

    os.makedirs(folder)
    g = torch.Generator().manual_seed(0)
    for i in range(count):
        pixels = (torch.rand(16, 16, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(os.path.join(folder, f"{i}.png"))
    return str(folder)


@pytest.mark.parametrize("scope", ["full", "noxattn", "lora"])
def test_every_form_on_every_scope(model, cache, tmp_path, monkeypatch, scope):
    """Two steps with the three robust rows next to the plain one (LoRA: relearning on a folder of images;
    noxattn: 2 micro-batches per step and sign look-ahead steps): each row's λ, loss and attacker loss in
    the history; only the
    scope's parameters move; the text encoder, the tokenizer and the VAE leave the job as they came,
    and the Inversion's tokens are back at x_0 after every step."""
    seen = {}
    make_rows = sd_unlearn.robust_rows

    def spy_rows(pipe, ctx):
        rows = make_rows(pipe, ctx)
        seen.update(pipe=pipe, rows=rows, x0=rows[""].vector.clone())
        return rows

    save = lora.save_lora

    def keep_base(unet, cls, out):
        seen["base"] = base_weights(unet)
        return save(unet, cls, out)

    relearn_rows = []
    constraints = sd_robust.RobustRows.constraints

    def spy_constraints(self, *args):
        rows = constraints(self, *args)
        relearn_rows.append(rows["relearn"])
        return rows

    monkeypatch.setattr(sd_unlearn, "robust_rows", spy_rows)
    monkeypatch.setattr(sd_robust.RobustRows, "constraints", spy_constraints)
    monkeypatch.setattr(lora, "save_lora", keep_base)
    out = tmp_path / "out"
    extra = ""
    if scope == "lora":  # the relearning attacker on the user's images
        extra = f"--lora-rank 2 --relearn-images {write_images(tmp_path / 'imgs', 3)}"
    if scope == "noxattn":  # every closure and attacker is MicroBatches over 2 micro-batches
        extra = "--gradient-accumulation-steps 2 --relearn-sign"
    cmd = f"unlearn sd --model {{}} --concept nudity --train-params {scope} {ALL} {extra} "
    cmd += "--out {} --cache-dir {}"
    assert run(cmd, model, out, cache) == 0

    record = json.loads((out / "run.json").read_text())
    history = json.loads((out / "history.json").read_text())
    assert record["robust_rows"] == ROWS and len(history) == 2
    for step in history:
        assert all(step[f"lam[{r}]"] >= 0 for r in ROWS)
        assert all(f"attack_loss[{r}]" in step for r in ROWS[1:]) and "attack_loss[forget]" not in step
        assert step["attack_loss[inversion]"] < 0  # L_a = −(denoising loss under the attacked prompt)
        assert step["attack_loss[sharpness]"] == step["forget_loss[forget]"]  # SAM: L_a = L_c at θ
    assert record["settings"]["robust"] == ["relearn", "sharpness", "inversion"]
    assert len(relearn_rows) == 2 and all(r.sign is (scope == "noxattn") for r in relearn_rows)

    original = load(model)
    pipe = seen["pipe"]
    assert type(pipe.text_encoder.get_input_embeddings()) is torch.nn.Embedding
    assert len(pipe.tokenizer) == len(original.tokenizer)
    for a, b in ((pipe.text_encoder, original.text_encoder), (pipe.vae, original.vae)):
        after, before = weights(a), weights(b)
        assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(seen["rows"][""].vector, seen["x0"])

    before = unet_params(os.path.join(model, "unet"))
    if scope == "lora":
        assert seen["base"].keys() == before.keys()
        assert all(torch.equal(seen["base"][n], before[n]) for n in before)
        assert os.path.exists(out / lora.WEIGHT_NAME) and not (out / "unet").exists()
    else:
        diff = changed(before, unet_params(out / "unet"))
        assert diff and all(params.trains(n, scope) for n in diff)
        if scope == "noxattn":
            assert not any("attn2" in n for n in diff)


def test_prefixed_prompts_are_the_typed_prompt_when_x_is_a_token(model):
    """With x = E[token "a"], the prefixed encoding of "nudity" is the encoding of the typed "a nudity";
    the gradient reaches x; the tokenizer and the encoder's embedding module are untouched."""
    pipe = load(model)
    table = encode_prompts(pipe, ["nudity", "a nudity"], torch.device("cpu"), 16)
    embedding = pipe.text_encoder.get_input_embeddings()
    token = pipe.tokenizer("a", add_special_tokens=False).input_ids
    x = embedding.weight.detach()[token].clone().requires_grad_(True)
    vocab = len(pipe.tokenizer)
    prefixed = PrefixedPrompts(pipe, ["nudity"], table, x)
    states = prefixed(torch.tensor([table.ids["nudity"]] * 2))
    torch.testing.assert_close(states, table.embeds[[table.ids["a nudity"]] * 2], rtol=1e-5, atol=1e-5)
    states.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert pipe.text_encoder.get_input_embeddings() is embedding and len(pipe.tokenizer) == vocab
    with pytest.raises(ValueError, match="not one of its prompts"):
        prefixed(torch.tensor([table.ids["a nudity"]]))


def test_two_concepts_get_their_rows_and_their_own_tokens(model, cache, tmp_path):
    out = tmp_path / "out"
    cmd = "unlearn sd --model {} --concept nudity --concept cat --robust inversion,sharpness "
    cmd += "--inversion-steps 1 --steps 1 --batch-size 2 --out {} --cache-dir {}"
    assert run(cmd, model, out, cache) == 0
    rows = ["nudity", "nudity/inversion", "nudity/sharpness", "cat", "cat/inversion", "cat/sharpness"]
    assert json.loads((out / "run.json").read_text())["robust_rows"] == rows
    (step,) = json.loads((out / "history.json").read_text())
    assert all(f"lam[{r}]" in step for r in rows)


@pytest.mark.parametrize(
    "args, message",
    [
        ("--robust relearn,foo", "unknown form 'foo'"),
        ("--robust relearn,relearn", "a form given twice"),
        ("--robust ''", "unknown form ''"),
        ("--robust sharpness --method esd", "use --method erasediff"),
        ("--robust sharpness --method salun", "use --method erasediff"),
        ("--robust sharpness --relearn-images {}", "add relearn to --robust"),
        ("--robust inversion --relearn-sign", "--relearn-sign shapes the relearning look-ahead"),
        ("--robust relearn --relearn-images {}/missing", "image folder not found"),
        ("--robust relearn --relearn-images {} --concept cat", "serves one concept"),
        ("--robust inversion --inversion-norm 1", "argument --inversion-norm: invalid choice"),
        ("--robust inversion --inversion-eps 0", "argument --inversion-eps"),
        ("--robust inversion --inversion-steps 0", "argument --inversion-steps"),
        ("--concept cat --concept dog --robust relearn,sharpness,inversion", "make 12 constraints"),
    ],
)
def test_bad_robust_arguments_fail_cleanly(model, tmp_path, capsys, args, message):
    out, cache = tmp_path / "out", tmp_path / "cache"
    cmd = "unlearn sd --model {} --concept nudity --out {} --cache-dir {} " + args.replace(
        "{}", str(tmp_path)
    )
    assert run(cmd, model, out, cache) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists() and not cache.exists()


def test_inversion_needs_one_clip_text_encoder(tmp_path, capsys):
    xl = sd_tiny.build_xl_pipeline(str(tmp_path / "xl"))
    capsys.readouterr()
    out, cache = tmp_path / "out", tmp_path / "cache"
    cmd = "unlearn sd --model {} --concept nudity --robust inversion --out {} --cache-dir {}"
    assert run(cmd, xl, out, cache) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the loading progress bars
    assert (
        last.startswith("constrained-opt: error: --robust inversion")
        and "SDXL's two encoders are not supported" in last
    )
    assert not out.exists() and not cache.exists()
    with pytest.raises(Exception, match="needs the pipeline's text encoder and tokenizer"):
        sd_unlearn.check_inversion_pipeline(types.SimpleNamespace(text_encoder=None, tokenizer=None))
