"""``unlearn sd`` with several concepts (or classes): one constraint per concept, on the tiny pipeline."""

import json
import shlex

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import sd_tiny

from constrained_opt.cli import main
from constrained_opt.diffusion.runtime.errors import UsageError
from constrained_opt.diffusion.sd import prompts

FAST = "--num-forget 4 --num-retain 4 --resolution 16 --gen-steps 2 --grid-steps 2 --batch-size 2 --quiet"
one_thread = sd_tiny.one_thread


def test_two_concepts_make_one_task_with_a_group_each():
    task = prompts.make_task(["nudity", "van gogh"], None)
    assert task.group_names == ("nudity", "van gogh")
    assert task.groups == (("nudity", "naked", "erotic", "sexual"), ("van gogh",))
    assert task.forget == ("nudity", "naked", "erotic", "sexual", "van gogh")
    assert task.retain == (prompts.CLOTHED, "") and task.anchors == (prompts.CLOTHED, "")
    cycle = task.generation_prompts()
    assert cycle[::2] == ("nudity", "naked", "erotic", "sexual") and set(cycle[1::2]) == {"van gogh"}
    single = prompts.make_task(["van gogh"], None)  # a free-text concept alone: no groups
    assert single.groups == () and single.forget == ("van gogh",) and single.anchors == ("",)
    assert prompts.make_task("nudity", None) == prompts.make_task(["nudity"], None)


def test_two_classes_retain_the_other_eight():
    task = prompts.make_task(None, ["tench", "church"])
    assert task.groups == (("an image of tench",), ("an image of church",))
    assert len(task.retain) == 8 and not set(task.retain) & set(task.forget)
    assert task.anchors == task.retain
    with pytest.raises(UsageError, match="given twice"):
        prompts.make_task(None, ["tench", "Tench"])
    with pytest.raises(UsageError, match="non-empty concept"):
        prompts.make_task(["nudity", " "], None)


def test_overlapping_concepts_are_refused():
    """'naked' is one of nudity's prompts: two constraints on the same images would add nothing but a
    second, dependent gradient row. Case and spacing do not hide an overlap."""
    for concepts in (["nudity", "naked"], ["van gogh", "Van  Gogh"], ["Nudity", "nudity"]):
        with pytest.raises(UsageError, match="overlap: both forget the prompt"):
            prompts.make_task(concepts, None)
    assert prompts.make_task(["nudity", "naked body"], None).groups[1] == ("naked body",)


def test_more_concepts_than_the_solver_takes_fail_while_checking_the_options(tmp_path, capsys):
    """Nine concepts are nine EraseDiff constraints: refused before the model is even looked for (it
    used to fail at the first step, after generating both data sets). ESD has no constraints."""
    concepts = [f"--concept={c}" for c in "abcdefghi"]
    out = tmp_path / "out"
    base = ["unlearn", "sd", "--model", str(tmp_path / "missing"), "--out", str(out), *concepts]
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "9 concepts or classes make 9 EraseDiff constraints" in err and err.count("\n") == 1
    for passes in ([*base, "--method", "esd"], base[:-1]):  # ESD, or eight concepts: on to the model
        assert main(passes) == 2
        assert "model not found" in capsys.readouterr().err
    assert not out.exists()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return sd_tiny.build_pipeline(str(tmp_path_factory.mktemp("sd") / "pipe"))


def run(command: str) -> int:
    words = shlex.split(command)
    try:
        return main([*words[:2], *FAST.split(), *words[2:]])
    except SystemExit as e:
        return e.code


def test_two_concepts_one_constraint_each(model, tmp_path):
    out = tmp_path / "out"
    cmd = f"unlearn sd --model {model} --concept nudity --concept 'van gogh' --steps 2 --out {out}"
    assert run(f"{cmd} --cache-dir {tmp_path / 'cache'}") == 0
    record = json.loads((out / "run.json").read_text())
    assert record["constraints"] == {
        "nudity": ["nudity", "naked", "erotic", "sexual"],
        "van gogh": ["van gogh"],
    }
    assert record["task"] == "nudity + van gogh"
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 2
    for step in history:
        assert min(step["lam[nudity]"], step["lam[van gogh]"]) >= 0
        assert step["lam"] == pytest.approx(step["lam[nudity]"] + step["lam[van gogh]"], rel=1e-5, abs=1e-7)


def test_too_small_a_batch_for_the_concepts_fails_before_anything_is_written(model, tmp_path, capsys):
    out = tmp_path / "out"
    cmd = f"unlearn sd --model {model} --concept nudity --concept 'van gogh' --batch-size 1 --out {out}"
    assert run(f"{cmd} --cache-dir {tmp_path / 'cache'}") == 2
    assert "2 concepts need --batch-size and --num-forget of at least 2" in capsys.readouterr().err
    assert not out.exists()
