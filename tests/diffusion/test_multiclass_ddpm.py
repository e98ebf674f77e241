"""Forgetting several DDPM classes at once: parsing, stratified forget batches, metrics and the CLI."""

import json

import pytest
import torch

pytest.importorskip("diffusers")

from constrained_opt.diffusion.cli import main
from constrained_opt.diffusion.data import BatchSampler, ImageData
from constrained_opt.diffusion.evaluation.multiclass import (
    StratifiedSampler,
    check_classes,
    evaluate_classes,
    forget_sampler,
    parse_classes,
    split_forget_classes,
)
from constrained_opt.diffusion.evaluation.report import metrics_table
from constrained_opt.diffusion.methods.salun import next_kept_class
from constrained_opt.diffusion.runtime.errors import UsageError

FAST = ["--quiet", "--per-class", "4", "--sampling-steps", "2", "--steps", "2", "--batch-size", "8"]


def toy_data(per_class: int = 7, num_classes: int = 10) -> ImageData:
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    images = torch.randn(len(labels), 1, 8, 8)
    return ImageData(images, labels, num_classes, "toy")


def test_parse_classes_keeps_order_and_rejects_bad_lists():
    assert parse_classes("0") == (0,) and parse_classes("3, 0") == (3, 0)
    for bad in ("0,0", "a", "0,,3", ""):
        with pytest.raises(UsageError, match="forget-class"):
            parse_classes(bad)
    with pytest.raises(UsageError, match="out of range"):
        check_classes((0, 10), 10)
    with pytest.raises(UsageError, match="nothing to retain"):
        check_classes(tuple(range(10)), 10)


def test_split_is_the_union_of_the_classes():
    data = toy_data()
    retain, forget = split_forget_classes(data, (0, 3))
    assert set(forget.labels.tolist()) == {0, 3} and len(forget) == 14
    assert not set(retain.labels.tolist()) & {0, 3} and len(retain) + len(forget) == len(data)


def test_stratified_batches_hold_every_class_and_resume_exactly():
    _, forget = split_forget_classes(toy_data(), (0, 3, 5))
    parts = [forget.subset(forget.labels == c) for c in (0, 3, 5)]
    sampler = StratifiedSampler(parts, batch_size=8, seed=1)
    for _ in range(5):  # several epochs of each 7-image class
        _, labels = sampler.next()
        assert [int((labels == c).sum()) for c in (0, 3, 5)] == [3, 3, 2]
    state = sampler.state_dict()
    ahead = [sampler.next()[0] for _ in range(3)]
    again = StratifiedSampler(parts, batch_size=8, seed=1)
    again.load_state_dict(state)
    assert all(torch.equal(a, again.next()[0]) for a in ahead)
    with pytest.raises(UsageError, match="smaller than the number of forget classes"):
        StratifiedSampler(parts, batch_size=2, seed=1)


def test_one_class_keeps_todays_sampler():
    _, forget = split_forget_classes(toy_data(), 4)
    a, b = forget_sampler(forget, 4, 5, seed=2), BatchSampler(forget, 5, seed=2)
    assert all(torch.equal(a.next()[0], b.next()[0]) for _ in range(4))


class OneHot(torch.nn.Module):
    """A 'classifier' that reads the class off the first pixel (features: the flattened image)."""

    num_features = 64

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def features(self, x):
        return x.flatten(1)

    def forward(self, x):
        return torch.nn.functional.one_hot(x[:, 0, 0, 0].long(), 10).float() * 50 * self.scale


def test_evaluate_classes_reports_each_forgotten_class():
    labels = torch.arange(10).repeat_interleave(6)
    samples = torch.randn(60, 1, 8, 8)
    samples[:, 0, 0, 0] = labels.float()  # every sample is classified as its own class ...
    samples[labels == 3, 0, 0, 0] = 7.0  # ... except class 3, which is forgotten
    real = samples[~torch.isin(labels, torch.tensor([0, 3]))]
    out = evaluate_classes(OneHot(), samples, labels, real, (0, 3))
    assert out["p_forget_c0"] == pytest.approx(1.0) and out["p_forget_c3"] == pytest.approx(0.0)
    assert out["p_forget"] == pytest.approx(0.5) and out["remaining_accuracy"] == 1.0


def test_p_forget_set_sees_a_swap_between_forgotten_classes():
    """Class 0 drawn as a 3 and class 3 as a 0: P(y = own class) says forgotten, P(y ∈ C_f) does not."""
    labels = torch.arange(10).repeat_interleave(6)
    samples = torch.randn(60, 1, 8, 8)
    samples[:, 0, 0, 0] = labels.float()
    samples[labels == 0, 0, 0, 0], samples[labels == 3, 0, 0, 0] = 3.0, 0.0
    real = samples[~torch.isin(labels, torch.tensor([0, 3]))]
    out = evaluate_classes(OneHot(), samples, labels, real, (0, 3))
    assert out["p_forget"] == pytest.approx(0.0, abs=1e-6)
    assert out["p_forget_set"] == pytest.approx(1.0)
    table = metrics_table({"erasediff": out})
    assert "P(y∈C_f|x_f)" in table and "| 1.000 |" in table


def test_salun_relabels_to_the_next_class_not_forgotten():
    assert next_kept_class(torch.tensor([0, 1]), 10, (0, 1)).tolist() == [2, 2]
    assert next_kept_class(torch.tensor([9, 8]), 10, (9, 0, 8)).tolist() == [1, 1]
    assert next_kept_class(torch.tensor([4]), 10, (4,)).tolist() == [5]  # the release's (c + 1) mod C


def test_salun_step_never_targets_a_forgotten_class():
    from constrained_opt.diffusion.methods.base import Setup
    from constrained_opt.diffusion.methods.salun import SalUn
    from constrained_opt.diffusion.models import build_unet

    torch.manual_seed(0)
    unet = build_unet("tiny", (1, 8, 8), 10)
    method = SalUn(Setup(unet, 10, (0, 1), 1e-4, torch.Generator().manual_seed(0)), label_dropout=0.0)
    method.mask = {n: torch.ones_like(p) for n, p in unet.named_parameters()}
    conditions = []
    eps = method.eps
    method.eps = lambda x_t, t, c: conditions.append(c.clone()) or eps(x_t, t, c)
    forget = (torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 0, 1]))
    method.step((torch.randn(4, 1, 8, 8), torch.tensor([2, 5, 7, 9])), forget)
    assert conditions[-1].tolist() == [2, 2, 2, 2]  # the pseudo labels, the last prediction taken


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    assert main(f"train-base --preset tiny --steps 3 --classifier-steps 3 --out {out} --quiet".split()) == 0
    return f"--checkpoint {out / 'unet.safetensors'} --classifier {out / 'classifier.safetensors'}"


def test_unlearn_two_classes_pooled_writes_per_class_metrics(base, tmp_path):
    out = tmp_path / "pooled"
    args = f"unlearn ddpm --method erasediff --forget-class 0,3 {base} --out {out}".split()
    assert main([*args, *FAST]) == 0
    metrics = json.loads((out / "metrics.json").read_text())["erasediff"]
    assert {"p_forget_c0", "p_forget_c3"} <= metrics.keys()
    assert metrics["p_forget"] == pytest.approx((metrics["p_forget_c0"] + metrics["p_forget_c3"]) / 2)
    assert max(metrics["p_forget_c0"], metrics["p_forget_c3"]) <= metrics["p_forget_set"] <= 1
    provenance = json.loads((out / "history.json").read_text())
    assert len(provenance) == 2


def test_per_class_constraints_give_each_class_its_multiplier(base, tmp_path):
    out = tmp_path / "per-class"
    args = f"unlearn ddpm --method erasediff --forget-class 3,0 --per-class-constraints {base} --out {out}"
    assert main([*args.split(), *FAST]) == 0
    history = json.loads((out / "history.json").read_text())
    for step in history:  # one λ and one forget loss per class, and the pooled λ their sum
        assert {"lam_class_3", "lam_class_0", "forget_loss_class_3", "forget_loss_class_0"} <= step.keys()
        assert min(step["lam_class_3"], step["lam_class_0"]) >= 0
        assert step["lam"] == pytest.approx(step["lam_class_3"] + step["lam_class_0"], rel=1e-5, abs=1e-7)
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"p_forget_c0", "p_forget_c3"} <= metrics["erasediff_per_class"].keys()


def test_per_class_constraints_need_erasediff_and_two_classes(base, tmp_path, capsys):
    for method, classes in (("erasediff", "0"), ("finetune", "0,3")):
        args = f"unlearn ddpm --method {method} --forget-class {classes} --per-class-constraints {base}"
        assert main([*args.split(), "--out", str(tmp_path / method), *FAST]) == 2
        assert "--per-class-constraints needs --method erasediff" in capsys.readouterr().err
    assert not (tmp_path / "erasediff").exists() and not (tmp_path / "finetune").exists()
