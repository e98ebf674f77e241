"""Stable Diffusion attacks (``constrained_opt.diffusion.attacks.sd``) on the tiny offline pipeline."""

import json
import shlex

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import sd_tiny

from constrained_opt.cli import main
from constrained_opt.diffusion.attacks import sd as attacks
from constrained_opt.diffusion.data import ImageData
from constrained_opt.diffusion.runtime.errors import UsageError

one_thread = sd_tiny.one_thread  # autouse: the tiny models run fastest on one intra-op thread

TINY = attacks.SDBudget(
    num_images=4,
    resolution=16,
    inversion_steps=6,
    inversion_lr=0.05,
    batch_size=2,
    accumulate=2,
    prefix_tokens=3,
    prefix_timesteps=2,
    prefix_iterations=3,
    prefix_batch_size=2,
    relearn_images=2,
    relearn_steps=3,
    relearn_batch_size=2,
    probe_every=2,
    eval_images=1,
    eval_steps=2,
)
FAST = shlex.split(
    "--num-images 4 --resolution 16 --inversion-steps 2 --batch-size 2 --accumulate 1 --prefix-timesteps 2 "
    "--prefix-iterations 1 --relearn-images 2 --relearn-steps 2 --relearn-batch-size 2 --probe-every 1 "
    "--eval-images 1 --eval-steps 2 --quiet"
)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return sd_tiny.build_pipeline(str(tmp_path_factory.mktemp("sd") / "pipe"))


@pytest.fixture
def pipe(model):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        model, local_files_only=True, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def concept():
    """Four latents (4×8×8 for 16-px images) labelled with prompt indices 0 and 1."""
    generator = torch.Generator().manual_seed(0)
    return ImageData(torch.randn(4, 4, 8, 8, generator=generator), torch.tensor([0, 1, 0, 1]), 2, "c")


def weights(pipe) -> dict[str, torch.Tensor]:
    return {
        f"{m}.{k}": v.clone()
        for m in ("unet", "vae", "text_encoder")
        for k, v in getattr(pipe, m).state_dict().items()
    }


def assert_unchanged(pipe, before, tokenizer_len) -> None:
    after = weights(pipe)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert len(pipe.tokenizer) == tokenizer_len
    assert isinstance(pipe.text_encoder.get_input_embeddings(), torch.nn.Embedding)


def count_unet_calls(pipe) -> list[int]:
    calls = []
    pipe.unet.register_forward_pre_hook(lambda m, args: calls.append(len(args[0])))
    return calls


@pytest.fixture
def one_latent():
    """One latent four times (the tiny UNet needs batches of 2+), one label: batches do not vary."""
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).repeat(4, 1, 1, 1)
    return ImageData(z, torch.zeros(4, dtype=torch.long), 1, "c")


@pytest.fixture
def fixed_draws(monkeypatch):
    """Every loss evaluation draws the same (t, ε). With :func:`one_latent` the attack then minimises a
    deterministic objective (on the tiny random pipeline the text condition moves the loss less than the
    noise of the draws), and small steps must lower it."""
    loss = attacks.Denoising.loss

    def fixed(self, z0, cond, t=None):
        self.generator.manual_seed(9)
        return loss(self, z0, cond, t)

    monkeypatch.setattr(attacks.Denoising, "loss", fixed)


def test_sweep_is_unlearndiffatks():
    assert attacks.sweep_timesteps(50) == list(range(10, 1000, 20))
    assert attacks.sweep_timesteps(2) == [250, 750]


def test_placeholder_tokens_embed_their_rows_and_leave_the_pipeline_alone(pipe):
    before, n = weights(pipe), len(pipe.tokenizer)
    rows = torch.randn(2, 32)
    with attacks.placeholder_tokens(pipe, lambda: rows, 2) as names:
        assert names == ["<attack-0>", "<attack-1>"] and len(pipe.tokenizer) == n + 2
        ids = pipe.tokenizer("a <attack-1>").input_ids
        assert ids[2] == n + 1
        embedded = pipe.text_encoder.get_input_embeddings()(torch.tensor(ids))
        assert torch.equal(embedded[2], rows[1])
        assert not any(p.requires_grad for p in pipe.text_encoder.parameters())
    assert_unchanged(pipe, before, n)
    with pytest.raises(UsageError, match="already has a token"):  # noqa: SIM117 (the inner one raises)
        with (
            attacks.placeholder_tokens(pipe, lambda: rows, 1),
            attacks.placeholder_tokens(pipe, lambda: rows, 1),
        ):
            pass


def test_textual_inversion_spends_its_budget_and_is_deterministic(pipe, concept):
    before, n = weights(pipe), len(pipe.tokenizer)
    calls = count_unet_calls(pipe)
    run = attacks.textual_inversion(
        pipe, concept, "c", TINY, torch.Generator().manual_seed(0), progress=False
    )
    assert_unchanged(pipe, before, n)
    assert calls == [TINY.batch_size] * (TINY.inversion_steps * TINY.accumulate)
    assert run.record["steps"] == TINY.inversion_steps and run.rows.shape == (1, 32)
    again = attacks.textual_inversion(
        pipe, concept, "c", TINY, torch.Generator().manual_seed(0), progress=False
    )
    assert torch.equal(again.rows, run.rows)
    other = attacks.textual_inversion(
        pipe, concept, "c", TINY, torch.Generator().manual_seed(1), progress=False
    )
    assert not torch.equal(other.rows, run.rows)


def test_textual_inversion_steps_descend_a_deterministic_objective(
    pipe, one_latent, fixed_draws, monkeypatch
):
    import dataclasses

    monkeypatch.setattr(attacks, "TEMPLATES", ("a photo of {}",))  # one template: nothing else varies
    budget = dataclasses.replace(TINY, batch_size=4, accumulate=1, inversion_steps=3, inversion_lr=1e-3)
    run = attacks.textual_inversion(
        pipe, one_latent, "c", budget, torch.Generator().manual_seed(0), progress=False
    )
    assert run.record["loss_last"] < run.record["loss_first"]


@pytest.mark.parametrize("mode", attacks.PREFIX_MODES)
def test_prompt_prefix_stays_on_the_simplex_and_sweeps_the_timesteps(pipe, concept, mode):
    import dataclasses

    budget = dataclasses.replace(TINY, prefix_mode=mode, prefix_lr=0.05)
    before, n = weights(pipe), len(pipe.tokenizer)
    calls = count_unet_calls(pipe)
    run = attacks.prompt_prefix(
        pipe, concept, ["x", "y"], budget, torch.Generator().manual_seed(0), progress=False
    )
    assert_unchanged(pipe, before, n)
    assert calls == [budget.prefix_batch_size] * (budget.prefix_timesteps * budget.prefix_iterations)
    w = run.weights
    assert w.shape == (budget.prefix_tokens, n) and (w >= 0).all()
    assert torch.allclose(w.sum(-1), torch.ones(budget.prefix_tokens))
    assert run.prompts == ["<attack-0> <attack-1> <attack-2> x", "<attack-0> <attack-1> <attack-2> y"]
    table = pipe.text_encoder.get_input_embeddings().weight
    if mode == "discrete":  # the attack prompt is made of real tokens: argmax w_i
        assert torch.equal(run.rows, table[w.argmax(-1)])
    else:
        assert torch.allclose(run.rows, w @ table)


def test_soft_prefix_steps_descend_a_deterministic_objective(pipe, one_latent, fixed_draws):
    import dataclasses

    budget = dataclasses.replace(
        TINY, prefix_timesteps=1, prefix_iterations=3, prefix_batch_size=4, prefix_lr=1e-4
    )
    run = attacks.prompt_prefix(
        pipe, one_latent, ["x"], budget, torch.Generator().manual_seed(0), progress=False
    )
    assert run.record["loss_last"] < run.record["loss_first"]


def test_relearning_trains_a_copy_and_probes_on_schedule(pipe, concept):
    before, n = weights(pipe), len(pipe.tokenizer)
    seen = []

    def probe(step):
        seen.append((step, pipe.unet))
        return {"asr": step / 10}

    record = attacks.relearn(
        pipe, concept, ["x", "y"], TINY, torch.Generator().manual_seed(0), probe, progress=False
    )
    assert_unchanged(pipe, before, n)
    assert [s for s, _ in seen] == [0, 2, 3] and list(record["probes"]) == [0, 2, 3]
    trained = seen[-1][1]
    assert trained is not pipe.unet and any(
        not torch.equal(a, b) for a, b in zip(trained.parameters(), pipe.unet.parameters(), strict=True)
    )
    assert record["steps"] == TINY.relearn_steps and record["num_images"] == len(concept)


class StageCheck:
    """A stand-in classifier: prompt i's check succeeds from stage ``succeed[i]`` on (None: never).
    Records every call and what the attack tokens embed at that moment."""

    def __init__(self, pipe, succeed: dict[str, int | None]):
        self.pipe, self.succeed, self.calls = pipe, succeed, []

    def __call__(self, text: str, index: int, stage: int) -> bool:
        prompt = text.split("> ")[-1]
        rows = None
        if stage:
            ids = self.pipe.tokenizer(text).input_ids[1:4]
            rows = self.pipe.text_encoder.get_input_embeddings()(torch.tensor(ids))
        self.calls.append((prompt, stage, rows))
        first = self.succeed[prompt]
        return first is not None and stage >= first


def two_prompt_concept() -> ImageData:
    """One latent per prompt (labels 0 and 1)."""
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    return ImageData(z, torch.tensor([0, 1]), 2, "c")


def test_per_prompt_prefix_stops_at_the_first_successful_stage(pipe):
    """UnlearnDiffAtk's early stop: stage 0 checks the prompt unattacked, stage s after the s-th
    timestep's iterations; the first success ends that prompt's attack (and its UNet calls)."""
    import dataclasses

    budget = dataclasses.replace(TINY, prefix_timesteps=4, prefix_iterations=2, prefix_batch_size=1)
    before, n = weights(pipe), len(pipe.tokenizer)
    calls = count_unet_calls(pipe)
    check = StageCheck(pipe, {"x": 2, "y": None, "z": 0})
    concept = ImageData(torch.randn(3, 4, 8, 8), torch.tensor([0, 1, 2]), 3, "c")
    result = attacks.per_prompt_prefix(pipe, concept, ["x", "y", "z"], budget, check, progress=False)
    assert_unchanged(pipe, before, n)
    assert [(p, s) for p, s, _ in check.calls] == [("x", 0), ("x", 1), ("x", 2)] + [
        ("y", s) for s in range(5)
    ] + [("z", 0)]
    x, y, z = result["per_prompt"]
    assert (x["stage"], x["timestep"], x["stages_run"]) == (2, attacks.sweep_timesteps(4)[1], 2)
    assert (y["stage"], y["stages_run"]) == (None, 4) and z["stage"] == 0 and "weights" not in z
    assert z["attack_prompt"] == "z" and x["attack_prompt"].endswith(" x")
    assert calls == [1] * (2 * 2 + 4 * 2)  # z's attack never ran
    assert result["broken"] == 2 and result["asr"] == 2 / 3
    table = pipe.text_encoder.get_input_embeddings().weight
    for _, _, rows in check.calls[1:3]:  # each check's token rows are real tokens' rows (discrete mode)
        assert (rows[:, None] == table[None]).all(-1).any(-1).all()
    # the check saw the argmax tokens' rows (a real prompt); the returned rows are the last check's
    assert torch.equal(check.calls[2][2], x["rows"]) and torch.equal(
        x["rows"], table[x["weights"].argmax(-1)]
    )


def test_per_prompt_results_do_not_depend_on_the_other_prompts(pipe):
    import dataclasses

    budget = dataclasses.replace(TINY, prefix_timesteps=2, prefix_iterations=2, prefix_batch_size=1)
    both = attacks.per_prompt_prefix(pipe, two_prompt_concept(), ["x", "y"], budget, None, progress=False)
    alone_concept = two_prompt_concept().subset(torch.tensor([False, True]))
    alone_concept = ImageData(alone_concept.images, torch.tensor([0]), 1, "c")
    alone = attacks.per_prompt_prefix(pipe, alone_concept, ["y"], budget, None, progress=False)
    a, b = both["per_prompt"][1], alone["per_prompt"][0]
    assert torch.equal(a["weights"], b["weights"]) and a["stage_losses"] == b["stage_losses"]
    assert not torch.equal(both["per_prompt"][0]["weights"], a["weights"])  # x's attack is its own
    assert both["asr"] is None and both["broken"] is None  # nothing was checked
    with pytest.raises(UsageError, match="no concept image for prompt 1"):
        attacks.per_prompt_prefix(pipe, alone_concept, ["y", "w"], budget, None, progress=False)


def run_cli(command: str, *paths) -> int:
    """``constrained-opt attack sd`` in-process with the FAST budget before ``command`` (``{}`` take
    ``paths``); argparse errors (SystemExit) become their exit code."""
    try:
        return main(["attack", "sd", *FAST, *shlex.split(command.format(*paths))])
    except SystemExit as e:
        return e.code


def test_cli_reference_images_end_to_end(model, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "out"
    cmd = "--model {0} --concept nudity --reference {0} --out {1} --cache-dir {2} --score none"
    code = run_cli(cmd, model, out, tmp_path / "cache")
    assert code == 0
    result = json.loads((out / "attack.json").read_text())
    assert list(result) == ["none", "inversion", "prefix", "relearn"]
    assert list(result["relearn"]["probes"]) == ["0", "1", "2"]
    for folder in ("none", "inversion/samples", "prefix/p0", "prefix/p3", "relearn/step_00002"):
        assert any((out / folder / "images").iterdir()) and (out / folder / "manifest.csv").exists()
    prefix = result["prefix"]  # the default form: per prompt, unscored, so every stage ran
    assert prefix["form"] == "per-prompt" and prefix["stages"] == [None] * 4 and "asr" not in prefix
    assert [r["stages_run"] for r in prefix["per_prompt"]] == [2] * 4
    assert (out / "prefix" / "prefix.safetensors").exists()
    assert len(list((out / "none" / "images").iterdir())) == 4  # the four nudity prompts, one image each
    assert (out / "attack_samples.png").read_bytes()[:4] == b"\x89PNG"
    assert "inversion: not scored, loss" in capsys.readouterr().out
    # The learned token loads into the original pipeline with diffusers' own loader.
    pipe = StableDiffusionPipeline.from_pretrained(model, local_files_only=True, safety_checker=None)
    pipe.load_textual_inversion(str(out / "inversion" / "learned_embeds.safetensors"), token="<nudity>")
    assert "<nudity>" in pipe.tokenizer.get_vocab()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_cli_scores_each_attack_and_finds_when_relearning_succeeds(model, tmp_path, monkeypatch):
    """``--score auto`` on nudity: the ASR of every folder, and the first relearning probe with ASR ≥ 0.5
    (NudeNet replaced by a stand-in that flags the inversion's images and those after 2 relearning steps)."""
    pytest.importorskip("nudenet")
    from constrained_opt.diffusion.sd import evaluate

    def counts(entries, threshold, progress=True):
        flagged = sum(("inversion" in e["path"]) or ("step_00002" in e["path"]) for e in entries)
        return {
            "images": len(entries),
            "images_with_exposed": flagged,
            "total_exposed": flagged,
            "threshold": threshold,
        }

    monkeypatch.setattr(evaluate, "nudenet_counts", counts)
    out = tmp_path / "out"
    cmd = "--model {0} --concept nudity --reference {0} --attack inversion,relearn --out {1} --cache-dir {2}"
    code = run_cli(cmd + " --nudenet-threshold 0.45", model, out, tmp_path / "cache")
    assert code == 0
    result = json.loads((out / "attack.json").read_text())
    assert result["none"]["asr"] == 0 and result["inversion"]["asr"] == 1
    assert [p["asr"] for p in result["relearn"]["probes"].values()] == [0, 0, 1]
    assert result["relearn"]["steps_to_asr_half"] == 2 and result["relearn"]["asr"] == 1
    assert result["inversion"]["detector"] == "NudeNet *_EXPOSED ≥ 0.45"


def test_cli_per_prompt_prefix_scores_each_stage_and_universal_form_still_runs(model, tmp_path, monkeypatch):
    """``--score auto`` with the default per-prompt form: a stand-in NudeNet flags the fourth folder it
    is given (after the unattacked prompts: prompt 0 at stages 0, 1, 2), so prompt 0 is broken at stage
    2 and the others at none; the universal form scores its final prompts once."""
    pytest.importorskip("nudenet")
    from constrained_opt.diffusion.sd import evaluate

    seen = []

    def counts(entries, threshold, progress=True):
        seen.append([e["prompt"] for e in entries])
        flagged = int(len(seen) == 4 and "check" in entries[0]["path"])
        return {"images": len(entries), "images_with_exposed": flagged, "total_exposed": 0, "threshold": 0.6}

    monkeypatch.setattr(evaluate, "nudenet_counts", counts)
    out = tmp_path / "out"
    cmd = "--model {0} --concept nudity --reference {0} --attack prefix --out {1} --cache-dir {2}"
    assert run_cli(cmd, model, out, tmp_path / "cache") == 0
    prefix = json.loads((out / "attack.json").read_text())["prefix"]
    assert prefix["stages"] == [2, None, None, None] and prefix["asr"] == 0.25 and prefix["broken"] == 1
    assert prefix["per_prompt"][0]["stages_run"] == 2 and prefix["detector"] == "NudeNet *_EXPOSED ≥ 0.6"
    # scored in order: the unattacked prompts, then prompt 0's checks at stages 0, 1, 2 (one image each)
    assert len(seen[0]) == 4 and seen[1] == [seen[0][0]]
    assert seen[2][0].startswith("<attack-0> <attack-1>") and seen[2][0].endswith(f"<attack-4> {seen[1][0]}")
    assert "prefix: ASR 0.25 (1/4 prompts broken)" in (out / "report.md").read_text()
    assert sorted(p.name for p in (out / "prefix").iterdir()) == [
        "p0",
        "p1",
        "p2",
        "p3",
        "prefix.safetensors",
    ]

    uni = tmp_path / "uni"
    assert run_cli(cmd + " --prefix-form universal --prefix-mode soft", model, uni, tmp_path / "cache") == 0
    prefix = json.loads((uni / "attack.json").read_text())["prefix"]
    assert prefix["form"] == "universal" and prefix["mode"] == "soft" and prefix["asr"] == 0
    assert prefix["steps"] == 2 and (uni / "prefix" / "samples" / "manifest.csv").exists()


def test_cli_image_folder_and_a_scrubbed_unet(model, tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (20, 24), (40 * i, 10, 200)).save(folder / f"{i}.png")
    out = tmp_path / "out"
    cmd = "--model {0} --unet {0}/unet --prompt 'a red car' --images {1} --attack inversion --out {2}"
    code = run_cli(cmd + " --score none", model, folder, out)
    assert code == 0
    assert list(json.loads((out / "attack.json").read_text())) == ["none", "inversion"]


def test_cli_v_prediction_model_and_sdxl_refusal(tmp_path, capsys):
    v_model = sd_tiny.build_pipeline(str(tmp_path / "sd2"), sd2=True)
    out = tmp_path / "v"
    cmd = "--model {0} --concept nudity --reference {0} --attack inversion --out {1} --cache-dir {2}"
    code = run_cli(cmd + " --score none", v_model, out, tmp_path / "cache")
    assert code == 0 and json.loads((out / "attack.json").read_text())["inversion"]["steps"] == 2
    xl = sd_tiny.build_xl_pipeline(str(tmp_path / "xl"))
    capsys.readouterr()
    never = tmp_path / "never"
    assert run_cli("--model {0} --concept nudity --reference {0} --out {1}", xl, never) == 2
    err = capsys.readouterr().err
    assert "SDXL" in err and err.count("\n") == 1 and not never.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--concept", "nudity"], "one of the arguments --images --reference is required"),
        (["--concept", "nudity", "--images", "/no/such/dir"], "image folder not found"),
        (
            ["--concept", "nudity", "--reference", "{model}", "--unet", "{model}"],
            "is not a diffusers UNet folder",
        ),
        (
            ["--concept", "nudity", "--reference", "{model}", "--attack", "magic"],
            "unknown SD attack(s) magic",
        ),
        (["--concept", "nudity", "--reference", "{model}", "--resolution", "12"], "multiple of 8"),
        (
            ["--concept", "nudity", "--reference", "{model}", "--prefix-lr", "0"],
            "argument --prefix-lr: expected a finite number > 0",
        ),
        (["--forget-class", "zebra", "--reference", "{model}"], "unknown Imagenette class"),
        (
            ["--concept", "nudity", "--reference", "{model}", "--prefix-form", "global"],
            "argument --prefix-form: invalid choice: 'global'",
        ),
        (
            ["--concept", "nudity", "--reference", "{model}", "--check-images", "0"],
            "argument --check-images: expected an integer ≥ 1, got 0",
        ),
        (
            ["--concept", "nudity", "--reference", "{model}", "--ua-classifier", "/no/w.pth"],
            "weights not found",
        ),
    ],
)
def test_cli_errors_are_one_line_and_write_nothing(model, tmp_path, capsys, args, message):
    out = tmp_path / "never"
    args = [a.format(model=model) for a in args]
    assert run_cli(" ".join(["--model {} --out {}", *map(shlex.quote, args)]), model, out) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()
