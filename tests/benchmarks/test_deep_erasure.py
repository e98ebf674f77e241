"""The deep_erasure items' rows, their demo command and the goal verdict against Retrain."""

from __future__ import annotations

import pytest

from benchmarks import deep_erasure


def figure(mean: float, half: float | None = None) -> dict:
    return {"mean": mean, "ci95": half, "values": [mean]}


RETRAIN = {
    "relearn_steps": figure(50, 10),
    "inversion_p_forget": figure(0.5, 0.2),
    "benign_p_forget": figure(0.1, 0.05),
    "remaining_accuracy": figure(0.95, 0.02),
    "fid": figure(1.0, 0.1),
}


def test_rows_become_methods_and_variants_beside_plain_erasediff():
    rows = {
        "erasediff": ("erasediff", {}),
        "moo": ("moo", {}),
        "robust": ("erasediff", {"robust": "relearn+inversion", "relearn_lr": 1.0}),
        "plain_salun": ("salun", {}),
    }
    methods, variants = deep_erasure.demo_runs(rows)
    assert methods == ("moo",)
    assert variants == ("robust=erasediff:robust=relearn+inversion,relearn_lr=1.0", "plain_salun=salun")
    with pytest.raises(SystemExit, match="plain EraseDiff"):
        deep_erasure.demo_runs({"erasediff": ("erasediff", {"rule": "value"})})


def test_unregistered_methods_fail_at_run_time_naming_the_rows():
    pytest.importorskip("diffusers")
    deep_erasure.check_rows({"erasediff": ("erasediff", {}), "moo": ("moo", {})})
    with pytest.raises(SystemExit, match=r"rows later \(not_a_method\) use methods not registered"):
        deep_erasure.check_rows({"erasediff": ("erasediff", {}), "later": ("not_a_method", {})})


def test_goal_checks_each_criterion_against_retrains_interval():
    deep = {
        "relearn_steps": figure(41),  # not below 50 − 10
        "inversion_p_forget": figure(0.69),  # not above 0.5 + 0.2
        "benign_p_forget": figure(0.0),
        "remaining_accuracy": figure(0.94),
        "fid": figure(1.09),
        "time_ratio": figure(3.0),
    }
    shallow = deep | {
        "relearn_steps": figure(39),
        "remaining_accuracy": figure(0.99),  # better than Retrain, but outside its interval
        "time_ratio": figure(3.1),
    }
    verdict = deep_erasure.goal({"retrain": RETRAIN, "deep": deep, "shallow": shallow, "partial": {}})
    assert verdict["deep"] == {"as_deep_as_retrain": True, "fails": [], "missing": []}
    assert verdict["shallow"]["fails"] == [
        "relearn steps below Retrain's interval",
        "remaining accuracy outside Retrain's",
        "time > 3× EraseDiff's",
    ]
    assert not verdict["partial"]["as_deep_as_retrain"] and len(verdict["partial"]["missing"]) == 6
    assert deep_erasure.goal({"deep": deep}) == {}  # no Retrain row, no verdict
    text = deep_erasure.markdown(
        {
            "config": "deep_erasure_digits",
            "summary": {"retrain": RETRAIN, "deep": deep},
            "rows": {"deep": ["erasediff", {"robust": "relearn"}]},
            "goal": verdict | {"partial": verdict["partial"]},
            "retrain_files": {"0": "a.safetensors", "1": "a.safetensors"},
            "retrain_note": "Retrain: seeds 0, 1 share one Retrain model.",
        }
    )
    assert "| deep (erasediff {'robust': 'relearn'}) | – | 41 |" in text
    assert (
        "- deep: as deep as Retrain: yes." in text
        and "- shallow: as deep as Retrain: no (relearn steps" in text
    )
    assert "seeds 0, 1 share one Retrain model" in text


def test_cost_ratios_are_per_seed_against_erasediff_and_count_preparation():
    metrics = {
        0: {
            "erasediff": {"time_s": 10.0, "peak_mem_mb": 100.0, "p_forget": 0.0},
            "sa": {"time_s": 20.0, "prep_s": 10.0, "peak_mem_mb": 50.0, "p_forget": 0.1},
            "retrain": {"p_forget": 0.0},
        },
        1: {"erasediff": {"time_s": 20.0, "peak_mem_mb": 0.0}, "sa": {"time_s": 20.0, "peak_mem_mb": 5.0}},
    }
    record = {"results": {"inversion": {"p_forget": 0.2}}}
    attacked = {"sa": {0: record, 1: record}, "retrain": {0: record}}
    per_seed = deep_erasure.per_seed_figures(metrics, attacked, None)
    assert per_seed["sa"]["0"] == {
        "p_forget": 0.1,
        "inversion_p_forget": 0.2,
        "time_ratio": 3.0,
        "memory_ratio": 0.5,
    }
    assert per_seed["sa"]["1"]["time_ratio"] == 1.0 and "memory_ratio" not in per_seed["sa"]["1"]  # 0 MB
    assert "time_ratio" not in per_seed["retrain"]["0"]
    summary = deep_erasure.summarise(per_seed)
    assert summary["sa"]["time_ratio"]["mean"] == 2.0
    assert summary["sa"]["time_ratio"]["ci95"] == pytest.approx(12.706205)  # t₁ · sd/√2 with sd = √2


def test_items_are_registered_slow_and_write_their_block_and_plot(tmp_path):
    from benchmarks.__main__ import DEFAULT, ITEMS, MODULE
    from benchmarks.report import SECTIONS

    for item in ("deep_erasure_digits", "deep_erasure_mnist5k"):
        assert item in ITEMS and item not in DEFAULT and MODULE[item] == "deep_erasure" and item in SECTIONS
    doc = tmp_path / "robustness.md"
    doc.write_text("a\n<!-- deep_erasure_digits:begin -->\nold\n<!-- deep_erasure_digits:end -->\nb\n")
    deep = {"relearn_steps": figure(30, 5), "time_ratio": figure(2.0, 0.5)}
    result = {
        "config": "deep_erasure_digits",
        "data": "digits",
        "forget_class": 0,
        "demo_command": "constrained-opt demo --data digits",
        "summary": {"retrain": RETRAIN, "deep": deep},
        "rows": {"deep": ["erasediff", {}]},
        "goal": deep_erasure.goal({"retrain": RETRAIN, "deep": deep}),
        "retrain_files": {"0": "digits_retrain_c0.safetensors"},
        "retrain_note": None,
        "attack_budget": {"relearn_steps": 100, "probe_every": 2},
    }
    deep_erasure.update_doc(
        result, "python -m benchmarks --only deep_erasure_digits", "deep_erasure_digits", str(doc)
    )
    text = doc.read_text()
    assert text.startswith("a\n<!-- deep_erasure_digits:begin -->\n*Generated from") and text.endswith(
        ":end -->\nb\n"
    )
    assert "old" not in text and "![deep_erasure_digits frontier](img/deep_erasure_digits.png)" in text
    assert (tmp_path / "img" / "deep_erasure_digits.png").read_bytes()[:4] == b"\x89PNG"
    doc.write_text("no markers\n")
    (tmp_path / "img" / "deep_erasure_digits.png").unlink()
    with pytest.raises(SystemExit, match="no <!-- deep_erasure_digits:begin -->"):
        deep_erasure.update_doc(result, "c", "deep_erasure_digits", str(doc))
    assert doc.read_text() == "no markers\n" and not (tmp_path / "img" / "deep_erasure_digits.png").exists()
