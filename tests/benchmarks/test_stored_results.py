"""Every stored benchmark result names a command that writes that very file, the robustness items write
their own file and doc block and nothing else, and the doc blocks show their stored results."""

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
STORED = sorted(RESULTS.glob("*.json"))


def only_items(command: str) -> list[str]:
    """The items ``python -m benchmarks`` runs for ``command`` (its ``--only`` list, else the default)."""
    from benchmarks.__main__ import DEFAULT

    words = command.split()
    assert words[:3] == ["python", "-m", "benchmarks"], command
    if "--only" not in words:
        return list(DEFAULT)
    rest = words[words.index("--only") + 1 :]
    return rest[: next((i for i, w in enumerate(rest) if w.startswith("--")), len(rest))]


def test_there_are_stored_results():
    assert len(STORED) >= 10


@pytest.mark.parametrize("path", STORED, ids=[p.name for p in STORED])
def test_each_stored_command_writes_its_own_file(path):
    """File ``<item>[_<device>].json`` ← a full (not smoke) run whose ``--only`` names ``item``."""
    from benchmarks.__main__ import ITEMS

    result = json.loads(path.read_text())
    items = only_items(result["command"])
    assert set(items) <= set(ITEMS) and not result["smoke"] and "--smoke" not in result["command"]
    device = result["device"].split(":")[0]
    item = path.stem.removesuffix(f"_{device}") if device != "cpu" else path.stem
    assert item in items, f"{path.name}: its command runs {items}, which write other files"


def doc_block(item: str) -> str:
    text = (ROOT / "docs" / "robustness.md").read_text()
    match = re.search(f"<!-- {item}:begin -->\n(.*?)<!-- {item}:end -->", text, re.S)
    assert match, f"no {item} block in docs/robustness.md"
    return match.group(1)


@pytest.mark.parametrize("item", ["robustness", "robustness_published"])
def test_robustness_doc_blocks_show_their_stored_results(item):
    from benchmarks.robustness import markdown

    result = json.loads((RESULTS / f"{item}.json").read_text())
    source = f"*Generated from `benchmarks/results/{item}.json`, written by `{result['command']}`.*"
    assert doc_block(item) == f"{source}\n\n{markdown(result)}"


def test_published_robustness_records_the_models_budgets_not_its_own():
    """robustness_published attacked the comparison item's models: its unlearning budgets are theirs."""
    published = json.loads((RESULTS / "robustness_published.json").read_text())
    comparison = json.loads((RESULTS / "comparison.json").read_text())
    assert published["models_from"] == [comparison["work"]]
    for label, budget in published["unlearning"].items():
        m = comparison["metrics"][label]
        assert budget == {"steps": m["steps"], "batch_size": m["batch_size"], "lr": m["lr"]}
    assert set(published["unlearning"]) == set(published["summary"]) - {"base", "retrain"}


def fake_run(device, smoke, work, models):
    from benchmarks.robustness import FIGURES

    figure = {"mean": 0.5, "ci95": 0.1, "n": 3}
    return {"summary": {"erasediff": {k: figure for k, _ in FIGURES}}, "verdicts": {}, "work": work}


@pytest.mark.parametrize("no_docs", [True, False])
def test_no_docs_keeps_the_item_page_untouched(tmp_path, monkeypatch, no_docs):
    """``--no-docs`` skips the item's own doc block as well as docs/benchmarks.md; without it the block
    written is the item's own."""
    import benchmarks.report
    import benchmarks.robustness
    from benchmarks.__main__ import main

    calls = []
    monkeypatch.setattr(benchmarks.robustness, "run", fake_run)
    monkeypatch.setattr(benchmarks.robustness, "update_doc", lambda r, c, item: calls.append(item))
    monkeypatch.setattr(benchmarks.report, "write_docs", lambda out: calls.append("benchmarks.md") or out)
    argv = ["--only", "robustness_published", "--device", "cpu", "--out", str(tmp_path), "--models", "m"]
    main(argv + ["--no-docs"] * no_docs)
    assert calls == ([] if no_docs else ["robustness_published", "benchmarks.md"])
    assert os.listdir(tmp_path) == ["robustness_published.json"]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_published_smoke_writes_only_its_own_file(tmp_path):
    """``python -m benchmarks --only robustness_published --smoke --no-docs`` on a demo folder: it writes
    robustness_published.json, records the model's own unlearning budget, and leaves the docs and
    robustness.json alone."""
    pytest.importorskip("diffusers")
    from constrained_opt.diffusion.models import SHIPPED_UNET, load_unet, save_unet

    unet, _ = load_unet(SHIPPED_UNET)
    save_unet(
        str(tmp_path / "demo" / "models" / "erasediff.safetensors"),
        unet,
        {"steps": 7, "batch_size": 5, "lr": 0.001},
    )
    watched = [ROOT / "docs" / "robustness.md", ROOT / "docs" / "benchmarks.md", RESULTS / "robustness.json"]
    before = [digest(p) for p in watched]
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "benchmarks", "--only", "robustness_published", "--smoke", "--no-docs"]
    cmd += ["--out", str(out), "--work", str(tmp_path / "work"), "--models", str(tmp_path / "demo")]
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=900, env=env)
    assert os.listdir(out) == ["robustness_published.json"]
    result = json.loads((out / "robustness_published.json").read_text())
    assert result["unlearning"] == {"erasediff": {"steps": 7, "batch_size": 5, "lr": 0.001}}
    assert "erasediff" in result["summary"] and result["command"].split()[3:5] == [
        "--only",
        "robustness_published",
    ]
    assert [digest(p) for p in watched] == before
