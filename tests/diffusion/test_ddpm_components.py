"""Data, checkpoints, sampling, atomic IO, report figures and the unlearning harness on tiny models."""

import json
import os
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("diffusers")

from constrained_opt.diffusion.data import BatchSampler, load_data, parse_data_spec, split_forget
from constrained_opt.diffusion.evaluation.report import metrics_table, save_cosine_plot, save_sample_grid
from constrained_opt.diffusion.methods.erasediff import EraseDiff
from constrained_opt.diffusion.methods.registry import METHODS, parse_hparams
from constrained_opt.diffusion.methods.unlearn import unlearn
from constrained_opt.diffusion.models import (
    SHIPPED_CLASSIFIER,
    SHIPPED_UNET,
    Classifier,
    build_unet,
    check_classifier_matches,
    check_unet_matches,
    load_classifier,
    load_unet,
    save_classifier,
    save_unet,
    shipped,
)
from constrained_opt.diffusion.runtime.errors import UsageError
from constrained_opt.diffusion.runtime.io import atomic_path, load_state, save_state
from constrained_opt.diffusion.sampling import sample


@pytest.fixture(scope="module")
def digits():
    return load_data("digits")


@pytest.fixture(scope="module")
def tiny_unet():
    torch.manual_seed(0)
    return build_unet("tiny", (1, 8, 8), 10)


def test_digits_are_real_8x8_images_in_signed_unit_range(digits):
    assert digits.images.shape == (1797, 1, 8, 8) and digits.num_classes == 10
    assert digits.images.min() == -1 and digits.images.max() == 1
    retain, forget = split_forget(digits, 3)
    assert (forget.labels == 3).all() and (retain.labels != 3).all()
    assert len(retain) + len(forget) == len(digits)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("mnist", "unknown dataset"),
        ("cifar10", "needs a path"),
        ("cifar10:/no/such/dir", "not found"),
        ("digits:/tmp", "no path"),
    ],
)
def test_bad_data_specs_are_usage_errors(spec, message):
    with pytest.raises(UsageError, match=message):
        parse_data_spec(spec)


def test_forget_class_out_of_range(digits):
    for bad in (-1, 10):
        with pytest.raises(UsageError, match="out of range"):
            split_forget(digits, bad)


def test_imagefolder_loads_resized_rgb(tmp_path):
    from PIL import Image

    for cls, colour in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.new("RGB", (20, 12), colour).save(tmp_path / cls / f"{i}.png")
    data = load_data(f"imagefolder:{tmp_path}", image_size=8)
    assert data.images.shape == (4, 3, 8, 8) and data.num_classes == 2
    assert data.labels.tolist() == [0, 0, 1, 1]
    assert data.images[0, 0].eq(1).all() and data.images[0, 2].eq(-1).all()


def test_batch_sampler_resumes_the_same_sequence(digits):
    a = BatchSampler(digits, 500, seed=0)
    a.next()
    state = a.state_dict()
    expected = [a.next()[1] for _ in range(5)]  # crosses an epoch boundary
    b = BatchSampler(digits, 500, seed=123)
    b.load_state_dict(state)
    assert all(torch.equal(b.next()[1], e) for e in expected)


def test_unet_checkpoint_round_trip_and_mismatch_errors(tmp_path, tiny_unet):
    path = str(tmp_path / "u.safetensors")
    save_unet(path, tiny_unet, {"seed": 0})
    loaded, provenance = load_unet(path)
    assert provenance == {"seed": 0}
    x, t, c = torch.randn(2, 1, 8, 8), torch.tensor([5, 900]), torch.tensor([1, 10])
    torch.testing.assert_close(loaded(x, t, class_labels=c).sample, tiny_unet(x, t, class_labels=c).sample)
    with pytest.raises(UsageError, match="does not match the data"):
        check_unet_matches(loaded, (3, 8, 8), 10, path)
    with pytest.raises(UsageError, match="does not match the data"):
        check_unet_matches(loaded, (1, 8, 8), 5, path)
    clf_path = str(tmp_path / "c.safetensors")
    save_classifier(clf_path, Classifier(1, 8, 10, width=8), {})
    with pytest.raises(UsageError, match="not a unet checkpoint"):
        load_unet(clf_path)
    with pytest.raises(UsageError, match="file not found"):
        load_unet(str(tmp_path / "missing.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(UsageError, match="not a readable"):
        load_unet(str(tmp_path / "junk.safetensors"))


def test_checkpoint_whose_weights_disagree_with_its_config(tmp_path, tiny_unet):
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = str(tmp_path / "u.safetensors")
    save_unet(path, tiny_unet, {})
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    config = json.loads(meta["config"])
    config["block_out_channels"] = [16, 32]
    save_file(tensors, path, metadata={**meta, "config": json.dumps(config)})
    with pytest.raises(UsageError, match="does not match its model configuration"):
        load_unet(path)


def test_shipped_checkpoints_load_and_match_digits(digits):
    unet, provenance = load_unet(SHIPPED_UNET)
    check_unet_matches(unet, digits.image_shape, 10, SHIPPED_UNET)
    assert {"seed", "steps"} <= provenance.keys()
    _, provenance = load_classifier(SHIPPED_CLASSIFIER)
    assert provenance["val_accuracy"] > 0.95
    retrain, record = load_unet(shipped("digits", "retrain", 0))
    check_unet_matches(retrain, digits.image_shape, 10, "retrain")
    same_recipe = ("preset", "seed", "steps", "batch_size", "lr", "ema_decay")
    assert record["exclude_class"] == 0 and record["images"] == int((digits.labels != 0).sum())
    assert {k: record[k] for k in same_recipe} == {k: load_unet(SHIPPED_UNET)[1][k] for k in same_recipe}
    assert shipped("digits", "retrain", 7) is None and shipped("cifar10", "unet") is None


def test_shipped_mnist5k_checkpoints_share_one_recipe_and_the_retrain_lacks_class_0():
    data = load_data("mnist5k")
    unet, base = load_unet(shipped("mnist5k", "unet"))
    check_unet_matches(unet, data.image_shape, 10, "mnist5k unet")
    classifier, record = load_classifier(shipped("mnist5k", "classifier"))
    check_classifier_matches(classifier, data.image_shape, 10, "mnist5k classifier")
    assert record["data"] == "mnist5k" and record["val_accuracy"] > 0.95
    retrain, record = load_unet(shipped("mnist5k", "retrain", 0))
    check_unet_matches(retrain, data.image_shape, 10, "mnist5k retrain")
    same_recipe = ("preset", "seed", "steps", "batch_size", "lr", "ema_decay")
    assert record["exclude_class"] == 0 and record["images"] == int((data.labels != 0).sum())
    assert {k: record[k] for k in same_recipe} == {k: base[k] for k in same_recipe}


def test_mnist5k_is_the_embedded_28x28_set_with_500_images_per_class():
    data = load_data("mnist5k")
    assert data.images.shape == (5000, 1, 28, 28) and data.num_classes == 10
    assert data.labels.bincount().tolist() == [500] * 10
    assert data.images.min() == -1 and data.images.max() == 1
    assert build_unet("mnist", data.image_shape, 10).config.sample_size == 28
    with pytest.raises(UsageError, match="takes no path"):
        parse_data_spec("mnist5k:/tmp")


def test_cifar10_preset_is_the_papers_35_7m_unet():
    unet = build_unet("cifar10", (3, 32, 32), 10)
    n = sum(p.numel() for p in unet.parameters())
    assert 35e6 < n < 37e6
    assert unet.config.block_out_channels == (128, 256, 256, 256) and unet.config.layers_per_block == 2


def test_sampling_is_seeded_bounded_and_pairs_initial_noise(tiny_unet):
    labels = torch.tensor([0, 1, 2, 3])
    a = sample(tiny_unet, labels, num_steps=3, seed=7, progress=False)
    b = sample(tiny_unet, labels, num_steps=3, seed=7, progress=False, batch_size=3)
    assert a.shape == (4, 1, 8, 8) and a.abs().max() <= 1
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, sample(tiny_unet, labels, num_steps=3, seed=8, progress=False))


class StubEps(torch.nn.Module):
    """ε(x, t, c) = 0.1·x + 0.05·c, or with ``guided`` = w the CFG combination of that, built in."""

    def __init__(self, guided: float | None = None):
        super().__init__()
        self.w, self.guided = torch.nn.Parameter(torch.zeros(())), guided
        self.config = SimpleNamespace(in_channels=1, sample_size=4, num_class_embeds=4)

    def eps(self, x, c):
        return 0.1 * x + 0.05 * c.view(-1, 1, 1, 1).float()

    def forward(self, x, t, class_labels):
        if self.guided is None:
            return SimpleNamespace(sample=self.eps(x, class_labels))
        w, null = self.guided, torch.full_like(class_labels, 3)
        return SimpleNamespace(sample=(1 + w) * self.eps(x, class_labels) - w * self.eps(x, null))


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_guidance_is_one_plus_w_cond_minus_w_null(sampler):
    labels = torch.tensor([0, 2, 1])
    guided = sample(StubEps(), labels, sampler=sampler, num_steps=10, guidance=2.0, seed=3, progress=False)
    built_in = sample(
        StubEps(2.0), labels, sampler=sampler, num_steps=10, guidance=0.0, seed=3, progress=False
    )
    torch.testing.assert_close(guided, built_in)
    plain = sample(StubEps(), labels, sampler=sampler, num_steps=10, guidance=0.0, seed=3, progress=False)
    assert not torch.allclose(guided, plain)


def test_atomic_path_replaces_whole_files_only(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["out.txt"]
    with atomic_path(target) as tmp, open(tmp, "w") as f:
        f.write("new")
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["out.txt"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_nested_state_round_trip(tmp_path):
    state = {
        "step": 3,
        "opt": {"state": {0: {"exp_avg": torch.ones(2)}}, "groups": [{"lr": 1e-4}]},
        "x": None,
    }
    save_state(tmp_path / "s.safetensors", state)
    back = load_state(tmp_path / "s.safetensors")
    assert back["step"] == 3 and back["x"] is None and back["opt"]["groups"] == [{"lr": 1e-4}]
    assert torch.equal(back["opt"]["state"][0]["exp_avg"], torch.ones(2))


def test_report_table_and_figures(tmp_path):
    metrics = {
        "base": {"p_forget": 0.95, "fid": 1.0, "time_s": 0.0},
        "erasediff": {"p_forget": 0.01, "fid": 1.1},
    }
    table = metrics_table(metrics)
    assert "Unscrubbed" in table and "EraseDiff" in table and "FID (classifier features)" in table
    assert "Precision" not in table and table.count("\n") == 4
    images, labels = torch.rand(20, 1, 8, 8) * 2 - 1, torch.arange(10).repeat(2)
    save_sample_grid(str(tmp_path / "g.png"), {"base": (images, labels), "erasediff": (images, labels)})
    history = [{"cos_update_retain": 0.5, "cos_update_forget": -0.1}] * 3
    save_cosine_plot(str(tmp_path / "c.png"), {"erasediff": history, "moo": history})
    for name in ("g.png", "c.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_changes_a_copy_of_the_model(method, digits, tiny_unet):
    retain, forget = split_forget(digits, 0)
    before = {k: v.clone() for k, v in tiny_unet.state_dict().items()}
    hp = {"samples_per_class": 2, "sampler": "ddim", "fisher_stride": 250} if method == "sa" else {}
    result = unlearn(
        method,
        tiny_unet,
        retain,
        forget,
        0,
        steps=2,
        batch_size=8,
        lr=1e-3,
        seed=0,
        hparams=hp,
        progress=False,
    )
    assert all(torch.equal(v, tiny_unet.state_dict()[k]) for k, v in before.items())
    changed = [not torch.equal(v, result.unet.state_dict()[k]) for k, v in before.items()]
    assert any(changed) and len(result.history) == 2
    assert result.time_s > 0 and result.peak_mem_mb >= 0
    if method == "salun":  # only the unmasked half of the weights may move
        moved = sum(int((v != result.unet.state_dict()[k]).sum()) for k, v in before.items())
        assert moved <= 0.5 * sum(v.numel() for v in before.values()) + 1


def test_hyperparameters_are_typed_and_validated():
    parsed = parse_hparams("erasediff", ["eta=0.5", "forget_target=noise", "inner_steps=2"])
    assert parsed == {"eta": 0.5, "forget_target": "noise", "inner_steps": 2}
    bad = {
        "erasediff": (["alpha=1"], ["eta"], ["eta=big"], ["forget_target=blue"], ["inner_steps=-1"]),
        "moo": (["forget_target=blue"], ["forget_weight=-2"]),
        "salun": (["keep=0"], ["keep=1.5"], ["label_dropout=2"]),
        "sa": (["fisher_input=pixels"], ["sampler=euler"], ["n_chunks=0"], ["fisher_stride=0"]),
        "erasediff_shared_adam": (["inner_steps=-1"],),
    }
    for method, cases in bad.items():
        for pairs in cases:
            with pytest.raises(UsageError):
                parse_hparams(method, pairs)
    with pytest.raises(UsageError, match="unknown method"):
        parse_hparams("ablate", [])


def test_interrupted_unlearning_resumes_to_the_same_model(tmp_path, digits, tiny_unet, monkeypatch):
    retain, forget = split_forget(digits, 0)
    kwargs = dict(steps=6, batch_size=8, lr=1e-3, seed=0, progress=False)
    straight = unlearn("erasediff", tiny_unet, retain, forget, 0, **kwargs)
    ckpt = str(tmp_path / "ckpt.safetensors")
    real_step, calls = EraseDiff.step, {"n": 0}

    def flaky_step(self, r, f):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real_step(self, r, f)

    monkeypatch.setattr(EraseDiff, "step", flaky_step)
    with pytest.raises(KeyboardInterrupt):
        unlearn("erasediff", tiny_unet, retain, forget, 0, checkpoint=ckpt, checkpoint_every=2, **kwargs)
    assert load_state(ckpt)["step"] == 4
    monkeypatch.setattr(EraseDiff, "step", real_step)
    resumed = unlearn("erasediff", tiny_unet, retain, forget, 0, checkpoint=ckpt, resume=True, **kwargs)
    assert len(resumed.history) == 6
    for k, v in straight.unet.state_dict().items():
        torch.testing.assert_close(resumed.unet.state_dict()[k], v, rtol=0, atol=0)
    with pytest.raises(UsageError, match=r"--method erasediff \(now moo\)"):
        unlearn("moo", tiny_unet, retain, forget, 0, checkpoint=ckpt, resume=True, **kwargs)


def test_probes_record_progress_without_changing_the_run(digits, tiny_unet):
    retain, forget = split_forget(digits, 0)
    kwargs = dict(steps=6, batch_size=8, lr=1e-3, seed=0, progress=False)
    plain = unlearn("erasediff", tiny_unet, retain, forget, 0, **kwargs)
    seen = []

    def probe(unet):
        seen.append(unet.training)
        images = sample(unet, torch.tensor([0, 1]), num_steps=2, progress=False)
        return {"mean": float(images.mean())}

    probed = unlearn("erasediff", tiny_unet, retain, forget, 0, probe=probe, probe_every=2, **kwargs)
    assert [p["step"] for p in probed.probes] == [2, 4, 6]
    times = [p["time_s"] for p in probed.probes]
    assert times == sorted(times) and 0 < times[-1] <= probed.time_s
    assert all(isinstance(p["mean"], float) for p in probed.probes)
    assert seen == [True, True, True] and probed.unet.training is False
    for k, v in plain.unet.state_dict().items():
        torch.testing.assert_close(probed.unet.state_dict()[k], v, rtol=0, atol=0)
    with pytest.raises(UsageError, match="probe_every"):
        unlearn("erasediff", tiny_unet, retain, forget, 0, probe=probe, **kwargs)
