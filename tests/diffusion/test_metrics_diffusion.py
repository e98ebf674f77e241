"""Unit tests of the unlearning metrics: FID on an analytic case, precision/recall on constructed sets."""

import math
import os
import sys

import pytest
import torch

pytest.importorskip("torchmetrics")

from constrained_opt.diffusion.evaluation.metrics import (
    FeatureExtractor,
    PeakMemory,
    accuracy,
    evaluate_generated,
    fid,
    forget_scores,
    precision_recall,
)
from constrained_opt.diffusion.models import Classifier


def identity_features(d):
    return FeatureExtractor(lambda x: x.flatten(1), d)


def test_fid_of_two_gaussians_matches_the_closed_form():
    """N(0, I_d) vs N(μ, σ²I_d): FD = ‖μ‖² + d(1 − σ)²."""
    g = torch.Generator().manual_seed(0)
    d, n = 4, 40_000
    mu, sigma = torch.tensor([1.0, -0.5, 0.0, 2.0]), 2.0
    real = torch.randn((n, d, 1, 1), generator=g, dtype=torch.float64)
    fake = mu.view(1, d, 1, 1) + sigma * torch.randn((n, d, 1, 1), generator=g, dtype=torch.float64)
    expected = mu.pow(2).sum().item() + d * (1 - sigma) ** 2
    assert fid(real, fake, identity_features(d)) == pytest.approx(expected, rel=0.03)


def test_fid_is_near_zero_for_one_distribution_and_grows_with_the_shift():
    g = torch.Generator().manual_seed(1)
    a, b = (torch.randn((20_000, 3, 1, 1), generator=g) for _ in range(2))
    same = fid(a, b, identity_features(3))
    shifted = [fid(a, b + s, identity_features(3)) for s in (0.5, 1.0)]
    assert same < 0.01 and same < shifted[0] < shifted[1]
    assert shifted[1] == pytest.approx(3.0, rel=0.05)  # ‖(1,1,1)‖²


def test_precision_recall_on_constructed_sets():
    g = torch.Generator().manual_seed(0)
    cluster_a = torch.randn((200, 2), generator=g) * 0.1
    cluster_b = torch.randn((200, 2), generator=g) * 0.1 + 10
    real = torch.cat([cluster_a, cluster_b])
    assert precision_recall(real, real.clone()) == (1.0, 1.0)
    assert precision_recall(real, real + 100) == (0.0, 0.0)
    # Mode collapse onto cluster a: every fake is realistic, half the real data is not covered.
    fake = torch.randn((200, 2), generator=g) * 0.1
    precision, recall = precision_recall(real, fake)
    assert precision > 0.95 and recall == pytest.approx(0.5, abs=0.03)


def test_precision_recall_uses_the_kth_neighbour_radius():
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0], [4.0]])
    fake = torch.tensor([[5.5], [5.5], [5.5], [4.9], [4.9], [4.9]])
    # k = 1: every real radius is 1, so 5.5 is outside and 4.9 inside.
    assert precision_recall(real, fake, k=1)[0] == 0.5
    # k = 3: the point 4's radius is 3 (its 3rd neighbour is 1), so 5.5 is inside too.
    assert precision_recall(real, fake, k=3)[0] == 1.0
    with pytest.raises(ValueError, match="more than k"):
        precision_recall(real[:3], fake, k=3)


def test_forget_scores_and_accuracy():
    one_hot = torch.eye(4)[[0, 0, 0]]
    assert forget_scores(one_hot, 0) == (1.0, pytest.approx(0.0, abs=1e-9))
    uniform = torch.full((5, 4), 0.25)
    p, h = forget_scores(uniform, 2)
    assert p == pytest.approx(0.25) and h == pytest.approx(math.log(4))
    probs = torch.eye(3)[[0, 1, 2, 2]]
    assert accuracy(probs, torch.tensor([0, 1, 2, 0])) == 0.75


def test_evaluate_generated_reports_every_metric():
    torch.manual_seed(0)
    clf = Classifier(1, 8, 3, width=8).eval()
    samples = torch.rand(30, 1, 8, 8) * 2 - 1
    labels = torch.arange(3).repeat_interleave(10)
    out = evaluate_generated(clf, samples, labels, torch.rand(40, 1, 8, 8) * 2 - 1, forget_class=1)
    assert set(out) == {"p_forget", "forget_entropy", "remaining_accuracy", "fid", "precision", "recall"}
    assert 0 <= out["p_forget"] <= 1 and 0 <= out["forget_entropy"] <= math.log(3) + 1e-6
    assert all(math.isfinite(v) for v in out.values())


def test_peak_memory_sees_a_large_cpu_allocation():
    with PeakMemory("cpu") as meter:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        block += 1
        del block
    assert meter.peak_mb > 40


LINUX_HWM = pytest.mark.skipif(
    not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's resettable VmHWM"
)


def touched(mib: int) -> bytes:
    return b"\x01" * (mib * 2**20)  # memset with the GIL held: every page resident


@LINUX_HWM
def test_peak_memory_sees_a_peak_that_no_sampling_thread_could_see():
    """64 MiB allocated and freed while the GIL is held throughout (a 1000 s switch interval and no
    blocking call), so no other Python thread runs in between: a sampler would read the RSS only after
    the block is gone. The kernel's high-water mark records it."""
    with PeakMemory("cpu") as meter:
        interval = sys.getswitchinterval()
        sys.setswitchinterval(1000)
        try:
            block = touched(64)
            del block
        finally:
            sys.setswitchinterval(interval)
    assert meter.peak_mb > 60


@LINUX_HWM
def test_nested_peak_memory_meters_each_see_their_own_peak():
    """The inner meter resets the high-water mark; the outer keeps its own earlier, larger peak."""
    with PeakMemory("cpu") as outer:
        block = touched(96)
        del block
        with PeakMemory("cpu") as inner:
            block = touched(32)
            assert inner.peak_mb > 30  # live, inside the block
            del block
    assert 30 < inner.peak_mb < 60 and outer.peak_mb > 90
