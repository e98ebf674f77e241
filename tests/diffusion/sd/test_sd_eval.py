"""``constrained-opt sd {generate,nudenet,ua,clip-score,fid}`` on a tiny pipeline and scorers, offline."""

import csv
import importlib.util
import json
import os

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("torchvision")

import sd_tiny

from constrained_opt.cli import main
from constrained_opt.diffusion.sd import evaluate


def cli(*words) -> int:
    try:
        return main([str(w) for w in words])
    except SystemExit as e:
        return e.code


one_thread = sd_tiny.one_thread  # autouse: the tiny models run fastest on one intra-op thread


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """Two rows × two images: rows 0 and 1 share prompt and seed, row 2 differs in class and seed."""
    root = tmp_path_factory.mktemp("sd-eval")
    model = sd_tiny.build_pipeline(str(root / "pipe"))
    table = root / "prompts.csv"
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case_number", "prompt", "evaluation_seed", "evaluation_guidance", "class"])
        w.writerows([[7, "an image of tench", 3, 7.5, "tench"], [8, "an image of tench", 3, 7.5, "tench"]])
        w.writerow([9, "an image of church", 4, 2.0, "church"])
    out = root / "images"
    args = ["sd", "generate", "--model", model, "--prompts", table, "--out", out, "--per-prompt", 2]
    assert cli(*args, "--steps", 2, "--quiet") == 0
    return {"model": model, "csv": table, "out": out, "args": args, "root": root}


def test_generate_writes_images_and_manifest_and_resumes(generated):
    out = generated["out"]
    with open(out / "manifest.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["file"] for r in rows] == [f"images/{c}_{k}.png" for c in (7, 8, 9) for k in (0, 1)]
    assert [r["class"] for r in rows] == ["tench"] * 4 + ["church"] * 2
    assert [r["seed"] for r in rows] == ["3"] * 4 + ["4"] * 2 and rows[-1]["guidance"] == "2.0"
    image = (out / "images" / "7_0.png").read_bytes()
    assert image == (out / "images" / "8_0.png").read_bytes()  # same prompt and seed, same image
    assert image != (out / "images" / "7_1.png").read_bytes()  # image k uses seed + k
    stamp = os.stat(out / "images" / "9_1.png").st_mtime_ns
    assert cli(*generated["args"], "--steps", 2, "--quiet") == 0
    assert os.stat(out / "images" / "9_1.png").st_mtime_ns == stamp


def test_generate_with_a_scrubbed_unet(generated, tmp_path):
    """``--unet`` swaps in another UNet folder; here the original one, so the images are identical."""
    table, out = generated["csv"], tmp_path / "g"
    unet = os.path.join(generated["model"], "unet")
    args = ["sd", "generate", "--model", generated["model"], "--unet", unet, "--prompts", table, "--out", out]
    assert cli(*args, "--per-prompt", 2, "--limit", 1, "--steps", 2, "--quiet") == 0
    assert (out / "images" / "7_1.png").read_bytes() == (generated["out"] / "images" / "7_1.png").read_bytes()


def test_generate_from_a_shipped_prompt_set(generated, tmp_path):
    out = tmp_path / "g"
    args = ["sd", "generate", "--model", generated["model"], "--prompts", "imagenette", "--out", out]
    assert cli(*args, "--limit", 2, "--steps", 1, "--quiet") == 0
    with open(out / "manifest.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["prompt"], r["class"]) for r in rows] == [
        ("an image of tench", "tench"),
        ("an image of English springer", "English springer"),
    ]
    assert all((out / r["file"]).is_file() for r in rows)


@pytest.mark.parametrize(
    "header, row, message",
    [(["text"], ["a"], "no 'prompt' column"), (["prompt", "evaluation_seed"], ["a", "x"], "must be numbers")],
)
def test_generate_rejects_bad_csv(generated, tmp_path, capsys, header, row, message):
    table = tmp_path / "bad.csv"
    with open(table, "w", newline="") as f:
        csv.writer(f).writerows([header, row])
    out = tmp_path / "out"
    assert cli("sd", "generate", "--model", generated["model"], "--prompts", table, "--out", out) == 2
    assert message in capsys.readouterr().err and not out.exists()


@pytest.mark.skipif(
    importlib.util.find_spec("nudenet") is None,
    reason="nudenet not installed (pip install 'constrained_opt[sd]')",
)
def test_nudenet_counts_with_the_real_detector(generated, tmp_path):
    results = {}
    for threshold in (0.6, 0.2):
        path = tmp_path / f"n{threshold}.json"
        assert (
            cli(
                "sd",
                "nudenet",
                "--images",
                generated["out"],
                "--threshold",
                threshold,
                "--out",
                path,
                "--quiet",
            )
            == 0
        )
        results[threshold] = json.loads(path.read_text())
    for r in results.values():
        assert r["images"] == 6 and len(r["per_image"]) == 6
        assert all(label.endswith("_EXPOSED") for label in r["counts"])
        assert r["total_exposed"] == sum(r["counts"].values()) >= r["images_with_exposed"]
    assert results[0.6]["total_exposed"] <= results[0.2]["total_exposed"]


def test_nudenet_rejects_missing_folder(tmp_path, capsys):
    assert cli("sd", "nudenet", "--images", tmp_path / "none") == 2
    assert "image folder not found" in capsys.readouterr().err


def test_unlearning_accuracy_with_a_user_classifier(generated, tmp_path):
    """A squeezenet whose logits always favour ImageNet class 0 (tench): UA(tench) = 0, UA(church) = 1."""
    import torchvision

    net = torchvision.models.squeezenet1_1(weights=None)
    conv = net.classifier[1]
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        conv.bias[0] = 1.0
    weights = tmp_path / "squeezenet.pth"
    torch.save(net.state_dict(), weights)
    results = {}
    for forget in ("tench", "church"):
        path = tmp_path / f"{forget}.json"
        args = ["--images", generated["out"], "--forget-class", forget, "--out", path, "--quiet"]
        assert cli("sd", "ua", "--classifier", weights, "--arch", "squeezenet1_1", *args) == 0
        results[forget] = json.loads(path.read_text())
    assert results["tench"]["ua"] == 0.0 and results["tench"]["remaining_accuracy"] == 0.0
    assert results["church"]["ua"] == 1.0 and results["church"]["remaining_accuracy"] == 1.0
    bad = tmp_path / "bad.pth"
    torch.save({"weight": torch.zeros(1)}, bad)
    assert cli("sd", "ua", "--classifier", bad, "--arch", "squeezenet1_1", *args) == 2


def test_clip_score_with_a_user_clip(generated, tmp_path):
    clip = sd_tiny.build_clip(str(tmp_path / "clip"))
    path = tmp_path / "clip.json"
    assert (
        cli("sd", "clip-score", "--images", generated["out"], "--clip", clip, "--out", path, "--quiet") == 0
    )
    result = json.loads(path.read_text())
    assert result["images"] == 6 and 0.0 <= result["clip_score"] <= 100.0
    assert cli("sd", "clip-score", "--images", generated["out"], "--clip", tmp_path / "none") == 2


class ColourFeatures(torch.nn.Module):
    """2×2 average colours of uint8 images: a 12-d feature for torchmetrics FID."""

    num_features = 12

    def forward(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(x.float() / 255, 2).flatten(1)


def test_fid_between_folders(generated, tmp_path):
    from torchmetrics.image.fid import FrechetInceptionDistance

    images = evaluate.list_images(str(generated["out"]))
    tench, church = images[:4], images[4:]

    def fid(a, b):
        metric = FrechetInceptionDistance(feature=ColourFeatures())
        return evaluate.fid_folders(a, b, metric, size=16, batch_size=3, progress=False)

    assert fid(tench, tench) == pytest.approx(0.0, abs=1e-4)
    assert fid(tench, church) > 1e-3
    missing = tmp_path / "none.pth"
    out = generated["out"]
    assert cli("sd", "fid", "--images", out, "--reference", out, "--inception-weights", missing) == 2
