"""Attacks on a class-conditional DDPM (``constrained_opt.diffusion.attacks``) on tiny models, in seconds."""

import dataclasses
import json
import os
import shlex

import pytest
import torch

pytest.importorskip("diffusers")

from constrained_opt.diffusion.attacks import common as attack_common
from constrained_opt.diffusion.attacks import ddpm as ddpm_attacks
from constrained_opt.diffusion.attacks import report as attack_report
from constrained_opt.diffusion.attacks.common import Budget, project_simplex
from constrained_opt.diffusion.attacks.ddpm import attacked_embedding
from constrained_opt.diffusion.cli import main
from constrained_opt.diffusion.data import load_data, split_forget
from constrained_opt.diffusion.losses import denoising_loss, diffuse, unet_eps
from constrained_opt.diffusion.models import Classifier, build_unet, save_classifier, save_unet
from constrained_opt.diffusion.runtime.errors import UsageError
from constrained_opt.diffusion.sampling import make_scheduler

TINY = Budget(
    num_images=8,
    steps=12,
    batch_size=8,
    inversion_lr=0.1,
    mixture_lr=0.05,
    relearn_images=4,
    relearn_steps=4,
    relearn_lr=1e-3,
    benign_steps=3,
    probe_every=2,
    benign_probe_every=2,
    samples=6,
    sampling_steps=2,
    probe_samples=5,
    probe_sampling_steps=2,
)
FLAGS = shlex.split(
    "--num-images 8 --steps 4 --batch-size 8 --relearn-images 4 --relearn-steps 2 --benign-steps 2 "
    "--probe-every 1 --benign-probe-every 1 --samples 4 --sampling-steps 2 --probe-samples 4 "
    "--probe-sampling-steps 1 --quiet"
)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    return load_data("digits")


def tiny_unet(seed: int = 0):
    torch.manual_seed(seed)
    return build_unet("tiny", (1, 8, 8), 10).eval()


def tiny_classifier():
    torch.manual_seed(1)
    return Classifier(1, 8, 10, width=8).eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    (root / "models").mkdir()
    for name, seed in (("alpha", 0), ("beta", 1)):
        save_unet(str(root / "models" / f"{name}.safetensors"), tiny_unet(seed), {"seed": seed})
    save_classifier(str(root / "classifier.safetensors"), tiny_classifier(), {})
    return root


def snapshot(module) -> dict:
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_unchanged(unet, before: dict, flags: list[bool]) -> None:
    after = unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert [p.requires_grad for p in unet.parameters()] == flags
    assert isinstance(unet.class_embedding, torch.nn.Embedding)


def fixed_loss(unet, images, vector, seed=5) -> float:
    """Denoising loss of ``images`` conditioned on ``vector``, on a fixed (t, ε) draw."""
    generator = torch.Generator().manual_seed(seed)
    x0 = images.repeat(4, 1, 1, 1)
    with torch.no_grad(), attacked_embedding(unet, lambda: vector[None]) as label:
        b = diffuse(make_scheduler(), x0, torch.full((len(x0),), label), generator)
        return denoising_loss(unet_eps(unet), b).item()


class CallCounter:
    """Records (batch size, class labels) of every forward call of a module and of its deep copies
    (deepcopy shares a plain function hook, unlike a bound method, whose object it would copy)."""

    def __init__(self, module):
        calls = self.calls = []

        def hook(module, args, kwargs):
            calls.append((len(args[0]), kwargs["class_labels"].clone()))

        self.handle = module.register_forward_pre_hook(hook, with_kwargs=True)


# ------------------------------------------------------------------------------------------- mechanics
def test_project_simplex_is_the_euclidean_projection():
    generator = torch.Generator().manual_seed(0)
    v = torch.randn(50, 7, generator=generator, dtype=torch.float64) * 2
    w = project_simplex(v)
    assert (w >= 0).all() and torch.allclose(w.sum(-1), torch.ones(50, dtype=torch.float64))
    # No other simplex point is closer: compare with random points of the simplex.
    others = torch.distributions.Dirichlet(torch.ones(7, dtype=torch.float64)).sample((50, 200))
    assert ((v - w).norm(dim=-1)[:, None] <= (v[:, None] - others).norm(dim=-1) + 1e-12).all()
    assert torch.allclose(project_simplex(w), w)  # idempotent
    assert torch.equal(project_simplex(torch.tensor([[3.0, 0.0, 0.0]])), torch.tensor([[1.0, 0.0, 0.0]]))


def test_appended_embedding_reads_the_table_or_the_extra_rows():
    table = torch.nn.Embedding(4, 3)
    extra = torch.randn(2, 3, requires_grad=True)
    module = attack_common.AppendedEmbedding(table, lambda: extra)
    out = module(torch.tensor([0, 3, 4, 5]))
    assert torch.equal(out[:2], table.weight[[0, 3]]) and torch.equal(out[2:], extra)
    out.sum().backward()
    assert torch.equal(extra.grad, torch.ones(2, 3)) and table.weight.grad is not None
    # A first id below the table size (a padded vocabulary) is redirected all the same.
    low = attack_common.AppendedEmbedding(table, lambda: extra, first=2)
    assert torch.equal(low(torch.tensor([1, 2, 3])), torch.cat([table.weight[1:2], extra]))


def test_attacked_embedding_restores_the_model_even_after_an_error():
    unet = tiny_unet()
    before, flags = snapshot(unet), [p.requires_grad for p in unet.parameters()]
    with pytest.raises(RuntimeError, match="boom"), attacked_embedding(unet, lambda: torch.zeros(1, 32)):
        assert not any(p.requires_grad for p in unet.parameters())
        raise RuntimeError("boom")
    assert_unchanged(unet, before, flags)


def test_budget_and_attack_names_are_validated():
    with pytest.raises(UsageError, match="steps must be positive"):
        Budget(steps=0)
    with pytest.raises(UsageError, match="guidance must be ≥ 0"):
        Budget(guidance=-1.0)
    with pytest.raises(UsageError, match="mixture_start must be one of best, uniform"):
        Budget(mixture_start="random")
    assert ddpm_attacks.parse_attacks("all") == ddpm_attacks.ATTACKS
    assert ddpm_attacks.parse_attacks("relearn, inversion,relearn") == ("relearn", "inversion")
    with pytest.raises(UsageError, match="unknown attack"):
        ddpm_attacks.parse_attacks("inversion,magic")


# ------------------------------------------------------------------------------------------- attacks
@pytest.mark.parametrize("name", ["inversion", "mixture", "mixture_uniform"])
def test_embedding_attacks_lower_the_loss_keep_the_model_and_spend_their_budget(data, name):
    unet, clf = tiny_unet(), tiny_classifier()
    _, forget = split_forget(data, 3)
    before, flags = snapshot(unet), [p.requires_grad for p in unet.parameters()]
    budget = dataclasses.replace(TINY, mixture_start="uniform") if name == "mixture_uniform" else TINY
    scorer = ddpm_attacks.Scorer(clf, 3, budget, progress=False)
    counter = CallCounter(unet)
    fn = ddpm_attacks.concept_inversion if name == "inversion" else ddpm_attacks.embedding_mixture
    run = fn(unet, forget, scorer, torch.Generator().manual_seed(0), progress=False)
    counter.handle.remove()
    assert_unchanged(unet, before, flags)
    table = unet.class_embedding.weight.detach()
    # Forward calls: the optimisation steps, one sampling pass (CFG in one batch), and for the mixture
    # the C + 2 candidate starts.
    starts = len(table) + 1 if name == "mixture" else 0  # the uniform start checks no candidate
    assert len(counter.calls) == starts + TINY.steps + TINY.sampling_steps
    train_calls = counter.calls[starts : starts + TINY.steps]
    assert all(n == TINY.batch_size and (c == len(table)).all() for n, c in train_calls)
    assert len(run.images) == TINY.samples and run.record["steps"] == TINY.steps
    # The attack lowers the denoising loss of its N images (fixed (t, ε) draw) from its start.
    generator = torch.Generator().manual_seed(0)
    images = ddpm_attacks.pick(forget, TINY.num_images, generator, "").images
    if name == "inversion":
        start, end = table[-1], torch.tensor(run.record["vector"])
    else:
        w = torch.tensor(run.record["weights"])
        assert w.min() >= 0 and abs(w.sum().item() - 1) < 1e-5
        kind = run.record["start"]
        assert (kind == "uniform") == (name == "mixture_uniform")
        start = table.mean(0) if kind == "uniform" else table[int(kind.split()[-1])]
        end = w @ table
    assert fixed_loss(unet, images, end) < fixed_loss(unet, images, start)
    assert 0 <= run.record["p_forget"] <= 1 and run.record["p_forget_ci"][0] <= run.record["p_forget_ci"][1]


def test_relearning_trains_a_copy_probes_on_schedule_and_lowers_the_loss(data):
    unet, clf = tiny_unet(), tiny_classifier()
    _, forget = split_forget(data, 3)
    before, flags = snapshot(unet), [p.requires_grad for p in unet.parameters()]
    budget = Budget(**{**TINY.__dict__, "relearn_steps": 30, "probe_every": 10})
    scorer = ddpm_attacks.Scorer(clf, 3, budget, progress=False)
    run = ddpm_attacks.relearn(unet, forget, scorer, torch.Generator().manual_seed(0), progress=False)
    assert_unchanged(unet, before, flags)
    r = run.record
    assert list(r["p_forget_at"]) == ["0", "10", "20", "30"] and r["num_images"] == budget.relearn_images
    assert r["loss_last"] < r["loss_first"]
    crossed = [int(s) for s, p in r["p_forget_at"].items() if p >= 0.5]
    assert r["steps_to_threshold"] == (crossed[0] if crossed else None)
    p = [r["p_forget_at"][s] for s in ("0", "10", "20", "30")]
    assert r["auc"] == pytest.approx((p[0] / 2 + p[1] + p[2] + p[3] / 2) / 3)  # 10 · trapezoid / 30


def test_probe_auc_is_the_trapezoid_mean_of_the_probed_curve():
    # P: 0 at step 0, 0.2 at 2, 1 at 4, 1 at 5 (the last probe off the grid): area 0.2 + 1.2 + 1 = 2.4
    assert attack_common.probe_auc({0: 0.0, 2: 0.2, 4: 1.0, 5: 1.0}, 5) == pytest.approx(2.4 / 5)
    assert attack_common.probe_auc({"0": 0.3, "10": 0.3}, 10) == pytest.approx(0.3)  # flat: P itself
    assert attack_common.probe_auc({"4": 1.0, "0": 0.0}, 4) == pytest.approx(0.5)  # unordered text keys
    with pytest.raises(ValueError, match="span steps 0 to 6"):
        attack_common.probe_auc({0: 0.0, 4: 1.0}, 6)


def test_benign_fine_tuning_never_shows_the_forgotten_class(data):
    unet, clf = tiny_unet(), tiny_classifier()
    retain, _ = split_forget(data, 3)
    counter = CallCounter(unet)  # deepcopy copies the hook: the fine-tuned copy reports its calls too
    scorer = ddpm_attacks.Scorer(clf, 3, TINY, progress=False)
    ddpm_attacks.benign(unet, retain, scorer, torch.Generator().manual_seed(0), progress=False)
    train = [c for n, c in counter.calls if n == TINY.batch_size]
    assert len(train) == TINY.benign_steps and all((c != 3).all() for c in train)
    probes = [c for n, c in counter.calls if n == 2 * TINY.probe_samples]
    assert len(probes) == (1 + 2) * TINY.probe_sampling_steps  # steps 0, 2, 3 (end)
    assert all((c[: TINY.probe_samples] == 3).all() for c in probes)


def test_attack_unet_is_deterministic_per_seed(data):
    unet, clf = tiny_unet(), tiny_classifier()

    def run(seed, which=("inversion", "mixture", "relearn")):
        budget = Budget(**{**TINY.__dict__, "seed": seed})
        results, _ = ddpm_attacks.attack_unet(unet, clf, data, 3, which, budget, progress=False)
        return {a: {k: v for k, v in r.items() if k != "time_s"} for a, r in results.items()}

    first = run(0)
    assert run(0) == first
    other = run(1)
    assert other["inversion"]["vector"] != first["inversion"]["vector"]
    # Each attack has its own generator: a subset reproduces the same figures.
    assert run(0, ("mixture",))["mixture"] == first["mixture"]


def test_summary_and_table_carry_the_demo_keys():
    results = {
        "none": {"p_forget": 0.01},
        "inversion": {"p_forget": 0.9, "entropy": 0.1},
        "relearn": {"p_forget": 0.3, "entropy": 0.2, "steps_to_threshold": None, "steps": 8, "auc": 0.125},
    }
    flat = attack_report.summary(results)
    assert flat == {
        "attack_inversion_p_forget": 0.9,
        "attack_inversion_entropy": 0.1,
        "attack_relearn_p_forget": 0.3,
        "attack_relearn_entropy": 0.2,
        "attack_relearn_steps": None,
        "attack_relearn_auc": 0.125,
    }
    table = attack_report.attack_table({"erasediff": {"p_forget": 0.01, **flat}}, {"erasediff": "EraseDiff"})
    assert "| EraseDiff | 0.010 | 0.900 | 0.300 | > budget | 0.125 |" in table
    assert (
        attack_report.report_line("m", results)
        == "m: P(y=c_f) none 0.010, inversion 0.900, relearn 0.300 (P < 0.5 for 8 steps)"
    )


# ------------------------------------------------------------------------------------------- CLI
def cli(*words) -> int:
    """``constrained-opt attack ddpm`` in-process; argparse errors (SystemExit) become their exit code."""
    try:
        return main(["attack", "ddpm", *FLAGS, *map(str, words)])
    except SystemExit as e:
        return e.code


def test_cli_single_model_writes_json_png_and_report(files, tmp_path, capsys):
    out = tmp_path / "one"
    model, clf = files / "models" / "alpha.safetensors", files / "classifier.safetensors"
    assert cli("--model", model, "--classifier", clf, "--forget-class", 2, "--out", out) == 0
    record = json.loads((out / "attack.json").read_text())
    assert list(record) == ["none", *ddpm_attacks.ATTACKS]
    for r in record.values():
        assert 0 <= r["p_forget"] <= 1 and r["entropy"] >= 0
    assert record["relearn"]["num_images"] == 4 and list(record["relearn"]["p_forget_at"]) == ["0", "1", "2"]
    assert (out / "attack_samples.png").read_bytes()[:4] == b"\x89PNG"
    assert "Relearn steps to P ≥ 0.5" in (out / "report.md").read_text()
    assert "alpha: P(y=c_f) none" in capsys.readouterr().out
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_cli_folder_attacks_every_model(files, tmp_path):
    out = tmp_path / "all"
    args = (
        "--model",
        files / "models",
        "--classifier",
        files / "classifier.safetensors",
        "--forget-class",
        1,
    )
    args += ("--attack", "mixture", "--out", out)
    assert cli(*args) == 0
    everything = json.loads((out / "attacks.json").read_text())
    assert list(everything) == ["alpha", "beta"] and all(
        list(r) == ["none", "mixture"] for r in everything.values()
    )
    for name in everything:
        assert json.loads((out / name / "attack.json").read_text()) == everything[name]
        assert (out / name / "attack_samples.png").exists()
    # --resume skips the models already attacked with this budget, and redoes them under another.
    states = {p.name: p.stat().st_mtime_ns for p in (out / "state").iterdir()}
    assert sorted(states) == ["alpha.json", "beta.json"]
    assert cli(*args, "--resume") == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "state").iterdir()} == states
    assert json.loads((out / "attacks.json").read_text()) == everything
    assert cli(*args, "--resume", "--seed", "1") == 0
    assert json.loads((out / "attacks.json").read_text()) != everything


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--forget-class", "10"], "forget class 10 out of range"),
        (["--model", "/no/such.safetensors"], "model not found"),
        (["--model", "{empty}"], "no .safetensors models in"),
        (["--attack", "inversion,magic"], "unknown attack(s) magic"),
        (["--classifier", "{unet}"], "is not a classifier checkpoint"),
        (["--num-images", "5000"], "attack budget asks for 5000"),
        (["--steps", "0"], "argument --steps: expected an integer ≥ 1, got 0"),
        (["--inversion-lr", "inf"], "argument --inversion-lr: expected a finite number > 0"),
        (["--mixture-start", "random"], "argument --mixture-start: invalid choice"),
        (["--model", "{unet}", "--model", "{unet}"], "two models are named 'alpha'"),
        (["--data", "cifar10:/no/such/dir"], "--classifier is required"),
    ],
)
def test_cli_errors_are_one_line_and_write_nothing(files, tmp_path, capsys, args, message):
    empty = tmp_path / "empty"
    empty.mkdir()
    unet = files / "models" / "alpha.safetensors"
    args = [a.format(empty=empty, unet=unet) for a in args]
    if "--model" not in args:
        args += ["--model", str(unet)]
    if "--classifier" not in args and "--data" not in args:
        args += ["--classifier", str(files / "classifier.safetensors")]
    if "--forget-class" not in args:
        args += ["--forget-class", "0"]
    out = tmp_path / "never"
    assert cli(*args, "--out", out) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()


def test_demo_attacks_adds_the_under_attack_block(files, tmp_path, monkeypatch, capsys):
    import functools

    monkeypatch.setattr(
        ddpm_attacks, "demo_attacks", functools.partial(ddpm_attacks.demo_attacks, budget=TINY)
    )
    out = tmp_path / "demo"
    unet, clf = files / "models" / "alpha.safetensors", files / "classifier.safetensors"
    demo = (
        f"demo --checkpoint {unet} --classifier {clf} --methods none --steps 2 --batch-size 8 --per-class 4 "
        f"--sampling-steps 2 --quiet --attacks --out {out} --cache-dir {tmp_path / 'cache'}"
    )
    assert main(demo.split()) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for name in ("base", "erasediff"):
        assert {f"attack_{a}_p_forget" for a in ddpm_attacks.ATTACKS} <= set(metrics[name])
        assert "attack_relearn_steps" in metrics[name]
        assert (out / "state" / f"attack_{name}.json").exists()
    table = (out / "table.md").read_text()
    assert "### Under attack" in table and "| EraseDiff |" in table.split("### Under attack")[1]
    # --resume reuses the attack results.
    before = (out / "state" / "attack_erasediff.json").stat().st_mtime_ns
    assert main([*demo.split(), "--resume"]) == 0
    assert (out / "state" / "attack_erasediff.json").stat().st_mtime_ns == before
    assert json.loads((out / "metrics.json").read_text()) == metrics
