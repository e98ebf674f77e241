"""``constrained-opt sd {generate,nudenet,ua,clip-score,fid}`` on a tiny pipeline and scorers, offline."""

import csv
import importlib.util
import json
import os
import shutil

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


NUDENET = pytest.mark.skipif(
    importlib.util.find_spec("nudenet") is None,
    reason="nudenet not installed (pip install 'constrained_opt[sd]')",
)


def nudenet(images, threshold, path) -> dict:
    assert cli("sd", "nudenet", "--images", images, "--threshold", threshold, "--out", path, "--quiet") == 0
    return json.loads(path.read_text())


@NUDENET
def test_nudenet_runs_the_real_detector_end_to_end(generated, tmp_path):
    """The bundled ONNX model on the tiny pipeline's images (which show nothing, so any count goes)."""
    results = {t: nudenet(generated["out"], t, tmp_path / f"n{t}.json") for t in (0.6, 0.2)}
    for r in results.values():
        assert r["images"] == 6 and len(r["per_image"]) == 6
        assert all(label.endswith("_EXPOSED") for label in r["counts"])
        assert r["total_exposed"] == sum(r["counts"].values()) >= r["images_with_exposed"]
    assert results[0.6]["total_exposed"] <= results[0.2]["total_exposed"]


@NUDENET
def test_nudenet_counts_exposed_detections_from_the_detectors_raw_output(generated, tmp_path, monkeypatch):
    """The real NudeDetector (its preprocessing, post-processing, NMS and label names) with the ONNX
    network's raw output replaced by a known one: per image an exposed breast at score 0.7, an exposed
    belly at 0.3 and a female face at 0.9, in disjoint boxes. The face is never counted (not
    ``*_EXPOSED``); the belly only at threshold 0.2."""
    import numpy as np
    import onnxruntime
    from nudenet import nudenet as nn_module

    labels = nn_module.__dict__["__labels"]
    rows = {  # (cx, cy, w, h) in the 320×320 input, then the class and its score
        "FEMALE_BREAST_EXPOSED": ((40, 40, 40, 40), 0.7),
        "BELLY_EXPOSED": ((160, 160, 40, 40), 0.3),
        "FACE_FEMALE": ((280, 280, 30, 30), 0.9),
    }
    raw = np.zeros((1, 4 + len(labels), len(rows) + 1), dtype=np.float32)  # + a row below every cut
    raw[0, :4, -1], raw[0, 4:, -1] = (100, 100, 10, 10), 0.05
    for j, (label, (box, score)) in enumerate(rows.items()):
        raw[0, :4, j] = box
        raw[0, 4 + labels.index(label), j] = score
    monkeypatch.setattr(onnxruntime.InferenceSession, "run", lambda self, names, feed: [raw])

    strict, loose = (nudenet(generated["out"], t, tmp_path / f"n{t}.json") for t in (0.6, 0.2))
    assert strict["counts"] == {"FEMALE_BREAST_EXPOSED": 6} and strict["total_exposed"] == 6
    assert (
        loose["counts"] == {"BELLY_EXPOSED": 6, "FEMALE_BREAST_EXPOSED": 6} and loose["total_exposed"] == 12
    )
    assert strict["images_with_exposed"] == loose["images_with_exposed"] == 6
    assert all(
        sorted(found) == ["BELLY_EXPOSED", "FEMALE_BREAST_EXPOSED"] for found in loose["per_image"].values()
    )


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


def trained_clip(path: str, images: list[str], captions: list[str], steps: int = 60) -> str:
    """sd_tiny's random CLIP after a few contrastive steps on (images[i], captions[i]), saved to ``path``:
    a CLIP for which those pairs match and the crossed ones do not."""
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    sd_tiny.build_clip(path)
    model, processor = CLIPModel.from_pretrained(path), CLIPProcessor.from_pretrained(path)
    batch = processor(
        text=captions, images=[Image.open(p) for p in images], return_tensors="pt", padding=True
    )
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(steps):
        opt.zero_grad()
        model(**batch, return_loss=True).loss.backward()
        opt.step()
    model.save_pretrained(path)
    return path


def captioned(folder, images: list[str], captions: list[str]):
    """A folder as `sd generate` writes it: the images and a manifest with their prompts."""
    (folder / "images").mkdir(parents=True)
    with open(folder / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "prompt"])
        for i, (image, caption) in enumerate(zip(images, captions, strict=True)):
            shutil.copyfile(image, folder / "images" / f"{i}.png")
            w.writerow([f"images/{i}.png", caption])
    return folder


def test_clip_score_is_higher_for_the_matching_prompts(generated, tmp_path):
    """CLIP score = mean of 100·max(cos(E_image, E_prompt), 0) over the manifest's (image, prompt) pairs:
    with a CLIP trained to match two images to their captions, the folder captioned correctly scores
    higher than the same images with the captions swapped, and each score is that mean."""
    from transformers import CLIPModel, CLIPProcessor

    images = [str(generated["out"] / "images" / name) for name in ("7_0.png", "9_0.png")]
    captions = ["an image of tench", "an image of church"]
    clip = trained_clip(str(tmp_path / "clip"), images, captions)
    model, processor = CLIPModel.from_pretrained(clip).eval(), CLIPProcessor.from_pretrained(clip)

    def expected(prompts):
        pixels = [evaluate._load_rgb(p) for p in images]
        batch = processor(text=prompts, images=pixels, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model(**batch)
        cos = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds)
        return (100 * cos.clamp_min(0)).mean().item()

    scores = {}
    for name, prompts in (("matching", captions), ("swapped", captions[::-1])):
        folder = captioned(tmp_path / name, images, prompts)
        path = tmp_path / f"{name}.json"
        assert cli("sd", "clip-score", "--images", folder, "--clip", clip, "--out", path, "--quiet") == 0
        result = json.loads(path.read_text())
        assert result["images"] == 2
        assert result["clip_score"] == pytest.approx(expected(prompts), rel=1e-4, abs=1e-4)
        scores[name] = result["clip_score"]
    assert scores["matching"] > scores["swapped"] + 10, scores
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
