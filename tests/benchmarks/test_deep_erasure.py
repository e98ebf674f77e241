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


def test_round_robin_ratios_cancel_a_load_change_between_rounds():
    """Fake clock: a step of row r costs cost[r] × the load, and the load changes from round to round
    (×1, ×4, ×0.5) and once within a round (a spike during one row). The per-round ratios are the cost
    ratio whatever the load, the spike moves one round only, and the median ignores it."""
    from benchmarks import deep_cost

    cost = {"erasediff": 1.0, "robust": 2.5, "cheap": 0.5}
    per_round, rows = 3, len(cost)
    loads = [1.0, 4.0, 0.5, 2.0, 1.0]  # one load per round
    now, calls, raw = [0.0], [0], {}

    def step(label):
        k = (calls[0] - rows) // (rows * per_round)  # the round (negative: warm-up)
        load = loads[max(k, 0)] * (10.0 if (k, label) == (3, "cheap") else 1.0)  # a spike in round 3
        now[0] += cost[label] * load
        calls[0] += 1
        if k >= 0:
            raw.setdefault(label, []).append(cost[label] * load)

    steps = {label: (lambda label=label: step(label)) for label in cost}
    ratios = deep_cost.round_robin(steps, rounds=len(loads), per_round=per_round, clock=lambda: now[0])
    assert calls[0] == rows + rows * per_round * len(loads)  # one warm-up step per row
    assert ratios["erasediff"] == [1.0] * 5
    assert ratios["robust"] == pytest.approx([2.5] * 5)
    assert ratios["cheap"] == pytest.approx([0.5, 0.5, 0.5, 5.0, 0.5])
    # the raw times move with the load: robust in round 2 (load 0.5) is faster than erasediff in round 1
    assert raw["robust"][2 * per_round] < raw["erasediff"][1 * per_round]
    figure = deep_cost.spread(ratios["cheap"])
    assert (figure["median"], figure["min"], figure["max"]) == pytest.approx((0.5, 0.5, 5.0))
    with pytest.raises(ValueError, match="'erasediff' row"):
        deep_cost.round_robin({"robust": steps["robust"]}, rounds=1, per_round=1)


def test_cost_figures_replace_per_seed_ratios_and_prep_is_a_note_not_in_the_ratio():
    metrics = {
        0: {
            "erasediff": {"time_s": 10.0, "peak_mem_mb": 100.0, "p_forget": 0.0},
            "salun": {"time_s": 20.0, "prep_s": 10.0, "peak_mem_mb": 50.0, "p_forget": 0.1},
        },
    }
    record = {"results": {"inversion": {"p_forget": 0.2}}}
    per_seed = deep_erasure.per_seed_figures(metrics, {"salun": {0: record}, "retrain": {0: record}}, None)
    assert per_seed["salun"]["0"] == {"p_forget": 0.1, "inversion_p_forget": 0.2}  # no demo-time ratios
    cost = {
        "time_ratio": {"erasediff": [1.0, 1.0, 1.0], "salun": [1.3, 1.1, 2.0]},
        "memory_ratio": {"erasediff": 1.0, "salun": 1.5},
        "prep_s": {"erasediff": {"0": 0.0}, "salun": {"0": 10.0}},
    }
    summary = deep_erasure.cost_figures(deep_erasure.summarise(per_seed), cost)
    assert summary["salun"]["time_ratio"] == {
        "median": 1.3,
        "min": 1.1,
        "max": 2.0,
        "values": [1.3, 1.1, 2.0],
    }
    assert summary["salun"]["memory_ratio"]["median"] == 1.5 and "time_ratio" not in summary["retrain"]
    assert summary["salun"]["inversion_p_forget"]["mean"] == 0.2
    result = {
        "config": "deep_erasure_digits",
        "summary": summary,
        "rows": {"salun": ["salun", {}]},
        "goal": {},
        "cost": cost,
        "retrain_files": {},
        "retrain_note": None,
    }
    text = deep_erasure.markdown(result)
    assert "| 1.30 (1.10–2.00) | 1.50 (1.50–1.50) |" in text
    assert "- One-off preparation (demo, mean over seeds; not in the time ratio): salun 10.0 s." in text
    fast = {**RETRAIN, "time_ratio": deep_cost_figure(2.9, 2.0, 4.0)}
    assert deep_erasure.goal({"retrain": RETRAIN, "fast": fast})["fast"]["fails"] == []  # the median counts
    slow = {**RETRAIN, "time_ratio": deep_cost_figure(3.1, 1.0, 3.2)}
    assert deep_erasure.goal({"retrain": RETRAIN, "slow": slow})["slow"]["fails"] == ["time > 3× EraseDiff's"]


def deep_cost_figure(median: float, lo: float, hi: float) -> dict:
    return {"median": median, "min": lo, "max": hi, "values": [lo, median, hi]}


def test_cost_is_measured_once_per_rows_and_settings(tmp_path, monkeypatch):
    pytest.importorskip("diffusers")
    from benchmarks import deep_cost

    calls = []
    monkeypatch.setattr(
        deep_cost, "step_times", lambda data, rows, *a, **k: calls.append("time") or {r: [1.0] for r in rows}
    )
    monkeypatch.setattr(deep_cost, "memory_mb", lambda *a: calls.append("memory") or 8.0)
    rows = {"erasediff": ("erasediff", {}), "robust": ("erasediff", {"robust": "relearn", "relearn_lr": 0.3})}
    path = str(tmp_path / "cost.json")
    kw = dict(forget_class=0, batch_size=8, device="cpu", rounds=1, per_round=1, cache=path)
    first = deep_cost.measure("digits", rows, **kw)
    assert calls == ["time", "memory", "memory"] and first["memory_ratio"] == {
        "erasediff": 1.0,
        "robust": 1.0,
    }
    assert deep_cost.measure("digits", rows, **kw) == first and len(calls) == 3  # reused from cost.json
    deep_cost.measure("digits", rows, **{**kw, "rounds": 2})  # other settings: measured again
    assert len(calls) == 6
    deep_cost.measure(
        "digits", {**rows, "robust": ("erasediff", {"robust": "relearn"})}, **{**kw, "rounds": 2}
    )
    assert len(calls) == 9


def test_items_are_registered_slow_and_write_their_block_and_plot(tmp_path):
    from benchmarks.__main__ import DEFAULT, ITEMS, MODULE
    from benchmarks.report import SECTIONS

    for item in ("deep_erasure_digits", "deep_erasure_mnist5k"):
        assert item in ITEMS and item not in DEFAULT and MODULE[item] == "deep_erasure" and item in SECTIONS
    doc = tmp_path / "robustness.md"
    doc.write_text("a\n<!-- deep_erasure_digits:begin -->\nold\n<!-- deep_erasure_digits:end -->\nb\n")
    deep = {"relearn_steps": figure(30, 5), "time_ratio": deep_cost_figure(2.0, 1.5, 2.5)}
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


def test_choose_defaults_applies_the_sweep_rule():
    """Per form, weak to strong: the weakest deep-and-useful row; else the deepest useful; else the weak."""
    from benchmarks.deep_erasure import choose_defaults

    def row(steps, acc=1.0, fid=0.3):
        return {
            "relearn_steps": {"mean": steps},
            "remaining_accuracy": {"mean": acc},
            "fid": {"mean": fid},
        }

    summary = {
        "retrain": row(38),
        "erasediff": row(24, fid=0.3),
        "inv_weak": row(38, acc=0.99, fid=0.31),
        "inv_strong": row(40),
        "sharp_weak": row(20),
        "sharp_strong": row(12, fid=0.2),
        "rel_weak": row(42, acc=0.24, fid=17.9),
        "rel_strong": row(8, acc=0.93, fid=1.5),
    }
    rows = {"erasediff": ("erasediff", {}), "retrain": ("retrain", {})}
    for label, form in (("inv", "inversion"), ("sharp", "sharpness"), ("rel", "relearn")):
        for strength in ("weak", "strong"):
            rows[f"{label}_{strength}"] = ("erasediff", {"robust": form})
    chosen = choose_defaults({"summary": summary, "rows": rows})
    assert {form: c["row"] for form, c in chosen.items()} == {
        "inversion": "inv_weak",
        "sharpness": "sharp_weak",
        "relearn": "rel_weak",
    }
    assert "utility" in chosen["relearn"]["why"] and "most steps" in chosen["sharpness"]["why"]


def test_a_warm_up_phase_is_weighted_by_the_run(monkeypatch):
    """A method whose first w steps are cheaper (AdvUnlearn's unattacked warm-up) gets the run's mean
    ratio (w·ρ_warm-up + (S − w)·ρ_after)/S, each phase timed round-robin like the other rows."""
    from benchmarks import deep_cost

    class Fake:
        def __init__(self, warmup):
            self.hp = type("Hp", (), {"warmup_steps": warmup})()
            self.taken = 0

        def step(self, *batches):
            pass

    made = iter([Fake(0), Fake(100), Fake(100)])
    monkeypatch.setattr(deep_cost, "_problem", lambda *a: (None, None, None, (None, None)))
    monkeypatch.setattr(deep_cost, "_method", lambda *a: next(made))
    seen = {}

    def fake_round_robin(steps, rounds, per_round):
        seen["labels"] = list(steps)
        return {"erasediff": [1.0, 1.0], "adv": [0.5, 0.6], "adv@after_warmup": [3.5, 3.0]}

    monkeypatch.setattr(deep_cost, "round_robin", fake_round_robin)
    rows = {"erasediff": ("erasediff", {}), "adv": ("advunlearn", {})}
    ratios = deep_cost.step_times("digits", rows, 0, 8, "cpu", 300, rounds=2, per_round=1)
    assert seen["labels"] == ["erasediff", "adv", "adv@after_warmup"]
    assert ratios["adv"] == pytest.approx([(100 * 0.5 + 200 * 3.5) / 300, (100 * 0.6 + 200 * 3.0) / 300])
    assert set(ratios) == {"erasediff", "adv"}


def test_peak_step_memory_covers_the_phase_after_a_warm_up(monkeypatch):
    """For a method with a warm-up phase the step peak is the larger of the two phases' peaks, the
    second measured on steps past the warm-up."""
    from benchmarks import deep_cost

    class Fake:
        hp = type("Hp", (), {"warmup_steps": 200})()

        def __init__(self):
            self.taken, self.measured = 0, []

        def step(self, *batches):
            self.taken += 1
            if meters and not meters[-1].done:
                self.measured.append((len(meters), self.taken))

    fake, meters = Fake(), []

    class Meter:
        def __init__(self, device):
            self.done, self.peak_mb = False, [0.5, 2.0][len(meters)]
            meters.append(self)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.done = True

    import constrained_opt.diffusion.evaluation.metrics as metrics

    monkeypatch.setattr(deep_cost, "_problem", lambda *a: (None, None, None, (None, None)))
    monkeypatch.setattr(deep_cost, "_method", lambda *a: fake)
    monkeypatch.setattr(metrics, "PeakMemory", Meter)
    assert deep_cost.peak_step_mb("digits", 0, 8, "cpu", "advunlearn", {}) == 2.0
    assert fake.measured == [(1, 2), (1, 3), (2, 202), (2, 203)]
