"""The benchmark scripts keep working: tiny sizes, checked for complete and finite figures."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
ROOT = Path(__file__).resolve().parents[2]


def test_parameter_sizes_sum_to_n():
    from benchmarks.projection import parameter_sizes

    for n in (1000, 123_457, 35_700_000):
        sizes = parameter_sizes(n)
        assert sum(sizes) == n and min(sizes) >= 1 and len(sizes) == 300


@pytest.mark.slow
def test_smoke_run_writes_results_and_docs(tmp_path):
    cmd = [sys.executable, "-m", "benchmarks", "--only", "step_overhead", "projection", "memory", "--smoke"]
    subprocess.run([*cmd, "--out", str(tmp_path)], cwd=ROOT, check=True, capture_output=True, timeout=600)
    step = json.loads((tmp_path / "step_overhead.json").read_text())
    assert {r["K"] for r in step["rows"]} == {0, 1}
    for r in step["rows"]:
        assert math.isfinite(r["ratio"]) and r["ratio"] > 0
        assert set(r["seconds"]) == {"opt_step", "closures", "closures_plus_base_step"}
    proj = json.loads((tmp_path / "projection.json").read_text())
    assert all(r["seconds"]["flat"] > 0 and math.isfinite(r["flat_over_memcpy"]) for r in proj["rows"])
    mem = json.loads((tmp_path / "memory.json").read_text())
    assert all(r["param_bytes"] > 0 and r["peak_bytes"]["erasediff"] > 0 for r in mem["rows"])

    from benchmarks.report import write_docs

    docs = Path(write_docs(str(tmp_path), docs_dir=str(tmp_path / "docs"), include_smoke=True))
    text = docs.read_text()
    assert "## 1. step_overhead" in text and "## 2. projection" in text and "## 3. memory" in text
    assert (tmp_path / "docs" / "img" / "projection.png").stat().st_size > 0


@pytest.mark.slow
def test_unlearning_smoke_reports_time_to_forget(tmp_path):
    cmd = [sys.executable, "-m", "benchmarks", "--only", "unlearning", "--smoke", "--out", str(tmp_path)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=600)
    res = json.loads((tmp_path / "unlearning.json").read_text())
    run = res["runs"]["erasediff"]
    assert [p["step"] for p in run["probes"]] == [2, 4]
    assert all(0 <= p["p_forget"] <= 1 and p["time_s"] <= run["time_s"] for p in run["probes"])
    assert run["reached"] is None or run["reached"]["p_forget"] <= res["threshold"]

    from benchmarks.report import write_docs

    text = Path(write_docs(str(tmp_path), docs_dir=str(tmp_path / "docs"), include_smoke=True)).read_text()
    assert "time to forget" in text and "| erasediff | 4 |" in text
    assert "Targets:" in text
    assert (tmp_path / "docs" / "img" / "time_to_forget.png").stat().st_size > 0


@pytest.mark.slow
def test_comparison_smoke_reports_intervals_gaps_and_floors(tmp_path, cache_home):
    cmd = [sys.executable, "-m", "benchmarks", "--only", "comparison", "--smoke", "--out", str(tmp_path)]
    cmd += ["--work", str(tmp_path / "work")]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=900)
    res = json.loads((tmp_path / "comparison.json").read_text())
    metrics = res["metrics"]
    assert list(metrics)[:3] == ["base", "retrain", "erasediff"] and {"salun", "sa", "moo_matched"} <= set(
        metrics
    )
    assert all(m["n_seeds"] == 2 and math.isfinite(m["ci95"]["p_forget"]) for m in metrics.values())
    assert metrics["sa"]["gap_to_retrain"].keys() == metrics["sa"]["gap_ci95"].keys()
    assert res["noise_floor"]["real_halves"]["fid"]["mean"] > 0
    assert "--methods finetune,neggrad,moo,moo_matched,salun,sa" in res["demo_command"]
    assert (tmp_path / "work" / "comparison" / "seed1" / "models" / "salun.safetensors").exists()
    assert list((cache_home / "constrained_opt").glob("base-eval-*.safetensors"))  # not in ~/.cache

    from benchmarks.report import write_docs

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "results.md").write_text(
        "before\n<!-- BEGIN comparison -->\nold\n<!-- END comparison -->\nafter\n"
    )
    text = Path(write_docs(str(tmp_path), docs_dir=str(docs), include_smoke=True)).read_text()
    assert "## 11. comparison" in text and "Gap to Retrain" in text and "Interval verdicts" in text
    results = (docs / "results.md").read_text()
    assert results.startswith("before\n<!-- BEGIN comparison -->") and results.endswith(
        "<!-- END comparison -->\nafter\n"
    )
    assert "old" not in results and "EraseDiff vs salun:" in results


@pytest.mark.slow
def test_sa_budget_smoke_measures_both_methods_in_one_run(tmp_path):
    cmd = [sys.executable, "-m", "benchmarks", "--only", "sa_budget", "--smoke", "--out", str(tmp_path)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=600)
    res = json.loads((tmp_path / "sa_budget.json").read_text())
    runs = res["runs"]
    assert set(runs) == {"erasediff", "sa"} and runs["sa"]["prep_s"] > 0
    assert res["time_ratio_erasediff_over_sa"] == runs["erasediff"]["time_s"] / runs["sa"]["time_s"]

    from benchmarks.report import write_docs

    text = Path(write_docs(str(tmp_path), docs_dir=str(tmp_path / "docs"), include_smoke=True)).read_text()
    assert "## 4b. Selective Amnesia at its published budget" in text and "| sa | 4 | 2 |" in text
    assert "listed, not ranked" in text


@pytest.mark.slow
def test_multi_constraint_comparisons_authors_step_and_multiclass_items_smoke(tmp_path):
    """The multi-constraint benchmark items in one run: m constraints against their floor, the torchjd
    and cooper comparisons, the authors' step transcription (which must compute our update) and two
    digits forgotten at once."""
    items = ["multi_constraint", "torchjd_compare", "cooper_compare", "authors_step", "ddpm_multiclass"]
    cmd = [sys.executable, "-m", "benchmarks", "--only", *items, "--smoke", "--out", str(tmp_path)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=600)
    multi = json.loads((tmp_path / "multi_constraint.json").read_text())
    assert {(r["rule"], r["m"]) for r in multi["steps"]} == {
        (k, m) for k in ("grad_norm", "value") for m in (1, 2)
    }
    assert all(math.isfinite(r["ratio"]) and r["ratio"] > 0 for r in multi["steps"])
    assert [r["m"] for r in multi["gram"]] == [1, 2] and all(r["gram_over_copy"] > 0 for r in multi["gram"])
    jd = json.loads((tmp_path / "torchjd_compare.json").read_text())
    row = jd["rows"][0]
    assert (
        row["m"] == 3 and row["update_difference"] < 1e-3
    )  # one aggregation, up to torchjd's regularisation
    assert all(math.isfinite(t) and t > 0 for t in row["time_over_ours"].values())
    coop = json.loads((tmp_path / "cooper_compare.json").read_text())
    assert len(coop["table"]) == 5 and any(name.startswith("ours") for name in coop["table"])
    assert all(0 <= row["at_equal_passes"]["train_violation"] < 1 for row in coop["table"].values())
    authors = json.loads((tmp_path / "authors_step.json").read_text())
    for pair in authors["pairs"].values():
        assert pair["relative_update_difference"] < 1e-4  # same math, fp32 rounding only
        assert pair["time_median"] > 0 and math.isfinite(pair["time_fastest"])
    assert set(authors["pairs"]) == {"authors_k1_over_ours_k1"}  # smoke: the K = 1 pair, no memory workers
    ddpm = json.loads((tmp_path / "ddpm_multiclass.json").read_text())
    assert set(ddpm["runs"]) == {"base", "pooled", "per-class"}
    for run in ddpm["runs"]["per-class"]:
        assert {"lam_class_0", "lam_class_3"} <= run["mean_lams"].keys()
        low, high = run["ci"]["p_forget_c3"]
        assert 0 <= low <= run["p_forget_c3"] <= high <= 1

    from benchmarks.report import write_docs

    text = Path(write_docs(str(tmp_path), docs_dir=str(tmp_path / "docs"), include_smoke=True)).read_text()
    headings = (
        "6. multi_constraint",
        "7. torchjd_compare",
        "8. cooper_compare",
        "9. authors_step",
        "10. ddpm",
    )
    for heading in headings:
        assert f"## {heading}" in text
    assert "| authors_k1 vs ours_k1 |" in text and (tmp_path / "docs" / "img" / "cooper_compare.png").exists()


@pytest.mark.slow
def test_sa_fisher_smoke_compares_the_shipped_fisher_with_the_old_estimate(tmp_path):
    cmd = [sys.executable, "-m", "benchmarks", "--only", "sa_fisher", "--smoke", "--out", str(tmp_path)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=600)
    res = json.loads((tmp_path / "sa_fisher.json").read_text())
    assert res["released_samples"] == 180 and res["old_samples"] == 20
    assert res["ratio_of_totals"] == res["released_total"] / res["old_total"] and res["ratio_of_totals"] > 1


@pytest.mark.slow
def test_robustness_smoke_attacks_every_model_and_renders_the_table(tmp_path):
    cmd = [sys.executable, "-m", "benchmarks", "--only", "robustness", "--smoke", "--out", str(tmp_path)]
    subprocess.run(
        [*cmd, "--work", str(tmp_path / "work")], cwd=ROOT, check=True, capture_output=True, timeout=600
    )
    res = json.loads((tmp_path / "robustness.json").read_text())
    assert {"base", "erasediff", "moo"} <= set(res["summary"]) and res["seeds"] == [0]
    for figures in res["summary"].values():
        assert {"none_p_forget", "inversion_p_forget", "mixture_p_forget", "relearn_steps"} <= set(figures)
        assert all(0 <= f["mean"] <= 1 for k, f in figures.items() if k.endswith("p_forget"))
    assert len(list((tmp_path / "work" / "smoke").glob("*-seed0.json"))) == len(res["summary"])

    from benchmarks.robustness import markdown

    table = markdown(res)
    assert "| Unscrubbed (base) |" in table and "| EraseDiff (grad_norm) |" in table


@pytest.mark.slow
def test_deep_erasure_smoke_measures_rows_and_retrain_and_plots_the_frontier(tmp_path):
    """One seed, two rows at tiny budgets: the demo stage, the attacks on every model and on Retrain,
    the summary, the goal verdicts and the frontier plot; no doc is touched."""
    watched = [ROOT / "docs" / "robustness.md", ROOT / "docs" / "benchmarks.md"]
    before = [p.read_bytes() for p in watched]
    cmd = [
        sys.executable,
        "-m",
        "benchmarks",
        "--only",
        "deep_erasure_digits",
        "--smoke",
        "--out",
        str(tmp_path),
    ]
    subprocess.run(
        [*cmd, "--work", str(tmp_path / "work")], cwd=ROOT, check=True, capture_output=True, timeout=600
    )
    res = json.loads((tmp_path / "deep_erasure_digits.json").read_text())
    assert list(res["summary"]) == ["retrain", "erasediff", "erasediff_value"] and res["seeds"] == [0]
    assert "--variant erasediff_value=erasediff:rule=value" in res["demo_command"]
    assert res["retrain_files"] == {"0": "digits_retrain_c0.safetensors"} and res["attacks"] == [
        "inversion",
        "relearn",
        "benign",
    ]
    for label, figures in res["summary"].items():
        assert 0 <= figures["relearn_auc"]["mean"] <= 1 and figures["relearn_steps"]["mean"] >= 0
        assert {"inversion_p_forget", "benign_p_forget", "fid", "remaining_accuracy"} <= set(figures)
        assert ("time_ratio" in figures) == (label != "retrain")
    assert res["summary"]["erasediff"]["time_ratio"]["median"] == 1.0
    assert set(res["cost"]["time_ratio"]) == {"erasediff", "erasediff_value"} and all(
        len(r) == 1 for r in res["cost"]["time_ratio"].values()
    )  # --smoke: 1 round
    assert (
        res["cost"]["memory_mb"]["erasediff"] > 0
        and res["summary"]["erasediff"]["memory_ratio"]["median"] == 1.0
    )
    assert (tmp_path / "work" / "deep_erasure_digits_smoke" / "cost.json").is_file()
    assert set(res["goal"]) == {"erasediff", "erasediff_value"}
    assert list((tmp_path / "work" / "deep_erasure_digits_smoke" / "attacks").glob("*-seed0.json"))
    assert [p.read_bytes() for p in watched] == before

    from benchmarks.deep_erasure import frontier_plot, markdown

    text = markdown(res)  # one seed: the goal is computed but not printed (no interval to compare with)
    assert "- One seed: no goal verdict" in text and "as deep as Retrain" not in text
    frontier_plot(res, str(tmp_path / "frontier.png"))
    assert (tmp_path / "frontier.png").read_bytes()[:4] == b"\x89PNG"
