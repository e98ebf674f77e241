"""The ``release_loop`` benchmark item: the authors' released EraseDiff loop at K = 1, 2, 4 over 3 seeds."""

import pytest

pytest.importorskip("diffusers")


def test_release_loop_runs_k_1_2_4_at_the_published_budget_over_three_seeds():
    from benchmarks.comparison import CONFIGS, command
    from constrained_opt.diffusion.jobs.comparison import plan_runs

    cfg = CONFIGS["release_loop"]
    runs = plan_runs(cfg["methods"], variants=cfg["variants"], published=cfg["published_budgets"])
    assert [r.label for r in runs] == ["erasediff", "release_k1", "release_k2", "release_k4"]
    assert [(r.method, r.hparams["inner_steps"], r.steps, r.batch_size) for r in runs[1:]] == [
        ("erasediff_release", k, 288, 128) for k in (1, 2, 4)
    ]
    line = command("release_loop", cfg, "runs/benchmarks")
    assert "--seeds 3 --methods none --variant release_k1=erasediff_release:inner_steps=1" in line
    assert "--published-budgets --per-class 200 --out runs/benchmarks/release_loop" in line
    assert "--bootstrap" not in line and "--seed " not in line


def test_release_loop_is_a_slow_comparison_item_with_its_report_section():
    from benchmarks.__main__ import DEFAULT, ITEMS, MODULE
    from benchmarks.report import COMPARISON_TITLES, SECTIONS, _comparison

    assert "release_loop" in ITEMS and "release_loop" not in DEFAULT
    assert MODULE["release_loop"] == "comparison" and SECTIONS["release_loop"] is _comparison
    assert "K = 1, 2, 4" in COMPARISON_TITLES["release_loop"]
