"""Statistics of the comparison: intervals over seeds, bootstrap intervals, verdicts, run planning."""

import math

import pytest
import torch

pytest.importorskip("torchmetrics")

from constrained_opt.diffusion.evaluation.metrics import (
    SampleScores,
    bootstrap_ci95,
    mean_ci95,
    metrics_from_scores,
    real_split_floor,
)
from constrained_opt.diffusion.evaluation.statistics import aggregate, interval_verdict
from constrained_opt.diffusion.jobs.comparison import plan_runs
from constrained_opt.diffusion.runtime.errors import UsageError


def test_mean_ci95_is_the_student_t_interval():
    scipy_stats = pytest.importorskip("scipy.stats")
    for values in ([1.0, 2.0, 4.0], [0.3, 0.1, 0.2, 0.25, 0.22], list(range(40)), list(range(31))):
        mean, half = mean_ci95(values)
        n = len(values)
        sd = torch.tensor(values, dtype=torch.float64).std().item()
        assert mean == pytest.approx(sum(values) / n)
        assert half == pytest.approx(scipy_stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n), rel=1e-4)
    assert math.isnan(mean_ci95([1.0])[1])


def test_interval_verdicts_respect_direction_and_overlap():
    low = {"fid": 1.0, "remaining_accuracy": 0.5, "ci95": {"fid": 0.1, "remaining_accuracy": 0.1}}
    high = {"fid": 2.0, "remaining_accuracy": 0.9, "ci95": {"fid": 0.1, "remaining_accuracy": 0.1}}
    assert interval_verdict(low, high, "fid") == "better"  # lower FID is better
    assert interval_verdict(high, low, "fid") == "worse"
    assert interval_verdict(low, high, "remaining_accuracy") == "worse"  # higher accuracy is better
    wide = {"fid": 1.5, "ci95": {"fid": 0.6}}
    assert interval_verdict(low, wide, "fid") == "not distinguishable"
    assert interval_verdict(low, {"fid": 3.0}, "fid") == "no interval"
    assert interval_verdict(low, {"fid": 3.0, "ci95": {"fid": math.nan}}, "fid") == "no interval"


def scores(n_per_class=200, p_forget=0.3, seed=0):
    """Ten classes; the classifier gives class 0 probability ``p_forget`` on a random share of the
    forget-class samples (Bernoulli), features are Gaussian."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(10).repeat_interleave(n_per_class)
    probs = torch.eye(10)[labels]
    hit = torch.rand(n_per_class, generator=g) < p_forget
    probs[:n_per_class] = torch.where(hit[:, None], torch.eye(10)[0], torch.eye(10)[1])
    features = torch.randn(int((labels != 0).sum()), 4, generator=g)
    real = torch.randn(900, 4, generator=g)
    return SampleScores(probs, labels, features, real, 0)


def test_bootstrap_interval_of_a_proportion_matches_the_binomial_width():
    s = scores(n_per_class=100)
    half = bootstrap_ci95(s, rounds=150, seed=1)
    p = metrics_from_scores(s)["p_forget"]
    assert half["p_forget"] == pytest.approx(1.96 * math.sqrt(p * (1 - p) / 100), rel=0.25)
    assert half["remaining_accuracy"] == 0.0  # every remaining sample is classified right: no spread
    assert half["fid"] > 0 and half["precision"] >= 0


def test_resampled_metrics_use_the_features_of_the_drawn_samples():
    s = scores(n_per_class=20)
    identity = torch.arange(len(s.labels))
    assert metrics_from_scores(s, identity) == pytest.approx(metrics_from_scores(s))


def test_real_split_floor_of_one_gaussian_is_small_and_positive():
    real = torch.randn(2000, 4, generator=torch.Generator().manual_seed(0))
    floor = real_split_floor(real, rounds=4)
    assert 0 < floor["fid"]["mean"] < 0.05 and floor["fid"]["sd"] >= 0
    assert floor["precision"]["mean"] > 0.8


def test_aggregate_gaps_and_single_seed_bootstrap_halves():
    seed = {
        "base": {"p_forget": 1.0, "fid": 1.0, "remaining_accuracy": 1.0, "precision": 1, "recall": 1},
        "retrain": {"p_forget": 0.0, "fid": 2.0, "remaining_accuracy": 1.0, "precision": 1, "recall": 1},
        "erasediff": {"p_forget": 0.1, "fid": 1.5, "remaining_accuracy": 0.9, "precision": 1, "recall": 1},
    }
    for row in seed.values():
        row["forget_entropy"] = 0.0
        row["ci95"] = {k: 0.03 for k in ("p_forget", "fid", "remaining_accuracy", "precision", "recall")}
    out = aggregate([seed], {"erasediff": [[{"lam": 1.0}, {"lam": 0.0}]]})
    ed = out["erasediff"]
    assert ed["gap_to_retrain"]["p_forget"] == pytest.approx(0.1) and ed["gap_to_retrain"]["fid"] == 0.5
    assert ed["gap_ci95"]["fid"] == pytest.approx(math.hypot(0.03, 0.03))
    assert ed["lambda"]["mean"] == 0.5 and ed["lambda"]["active_fraction"] == 0.5
    assert "gap_to_retrain" not in out["base"] and out["base"]["n_seeds"] == 1


def test_plan_runs_budgets_targets_and_errors():
    runs = plan_runs(
        ("moo", "salun", "sa"),
        variants=("moo_w3=moo:forget_weight=3",),
        published=True,
        budgets=("sa=1000x128",),
        forget_target="noise",
    )
    by = {r.label: r for r in runs}
    assert list(by) == ["erasediff", "moo", "salun", "sa", "moo_w3"]
    assert (by["erasediff"].steps, by["erasediff"].batch_size) == (300, 128)
    assert (by["salun"].steps, by["sa"].steps) == (1000, 1000)
    assert by["moo_w3"].hparams == {"forget_target": "noise", "forget_weight": 3.0}
    assert "forget_target" not in by["salun"].hparams
    dotted = plan_runs((), variants=("sa_lam0.3=sa:lam=0.3",), hp=("sa_lam0.3.gamma=2",))
    assert dotted[1].label == "sa_lam0.3" and dotted[1].hparams == {"lam": 0.3, "gamma": 2.0}
    plain = plan_runs(("finetune",), steps=7, batch_size=3)
    assert all((r.steps, r.batch_size) == (7, 3) for r in plain)
    for kwargs, message in (
        ({"variants": ("x=nosuch",)}, "LABEL=METHOD"),
        ({"variants": ("moo=moo",)}, "already used"),
        ({"hp": ("ghost.eta=1",)}, "known method or variant"),
        ({"budgets": ("moo=3x0",)}, "positive integers"),
        ({"budgets": ("salun=3x3",)}, "not run"),
    ):
        with pytest.raises(UsageError, match=message):
            plan_runs(("moo",), **kwargs)
