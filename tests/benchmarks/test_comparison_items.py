"""The comparison items' configuration: SA's λ selection rule and the commands they record."""

from __future__ import annotations

import pytest

from benchmarks import comparison


def rows(p_and_acc: dict[str, tuple[float, float]]) -> dict[str, dict]:
    """Demo metrics with the base row and one row per ``label: (P(y=c_f|x_f), remaining accuracy)``."""
    out = {label: {"p_forget": p, "remaining_accuracy": acc} for label, (p, acc) in p_and_acc.items()}
    return out | {"base": {"p_forget": 1.0, "remaining_accuracy": 1.0}}


def test_select_sa_lambda_takes_the_largest_lambda_that_forgets_and_keeps_accuracy():
    metrics = rows(
        {"sa_lam10": (1.0, 1.0), "sa_lam1": (0.04, 0.97), "sa_lam0.3": (0.03, 0.99), "sa_lam0.1": (0.01, 1.0)}
    )
    # λ = 10 does not forget, λ = 1 loses accuracy; 0.3 and 0.1 both qualify: the larger wins.
    assert comparison.select_sa_lambda(metrics) == 0.3


def test_select_sa_lambda_falls_back_to_the_lowest_p_forget():
    metrics = rows({"sa_lam10": (1.0, 1.0), "sa_lam1": (0.6, 1.0), "sa_lam0.1": (0.3, 0.5)})
    assert comparison.select_sa_lambda(metrics) == 0.1


def test_select_sa_lambda_needs_sweep_rows():
    with pytest.raises(ValueError, match="sa_tuning"):
        comparison.select_sa_lambda(rows({}))


def test_sweep_and_report_items_record_their_seeds_and_budgets():
    sweep = comparison.command("sa_tuning", comparison.CONFIGS["sa_tuning"], "w")
    assert "--seeds 1" in sweep and "--seed " not in sweep  # seed 0 selects
    assert "sa_lam10=" not in sweep  # the release's λ, measured by the comparison item
    for lam in comparison.SA_SWEPT:
        assert f"--variant sa_lam{lam}=sa:lam={lam}" in sweep and f"--budget sa_lam{lam}=1000x128" in sweep
    tuned = dict(comparison.CONFIGS["sa_tuned"], variants=("sa_tuned=sa:lam=0.1",))
    assert "--seed 1 --seeds 2" in comparison.command("sa_tuned", tuned, "w")
    salun = comparison.command("salun_transferred", comparison.CONFIGS["salun_transferred"], "w")
    assert "salun:alpha=0.048" in salun  # α·d = 3.072 with d = 64 pixels


def test_smoke_settings_reach_every_label_that_runs_sa_and_no_other():
    """``--hp`` for a label that is not run is refused, so smoke settings go to SA's labels only."""
    assert comparison.smoke_hp(comparison.CONFIGS["ablation"]) == ()
    sweep = comparison.smoke_hp(comparison.CONFIGS["sa_tuning"])
    assert {h.split("=")[0].rpartition(".")[0] for h in sweep} == {
        f"sa_lam{lam}" for lam in comparison.SA_SWEPT
    }
    assert "sa.fisher_stride=250" in comparison.smoke_hp(comparison.CONFIGS["comparison"])
