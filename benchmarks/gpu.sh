#!/usr/bin/env bash
# Items 1-3 of the benchmarks on CUDA, in one run (a few minutes on an H100/H200), then a short robust SD job.
# Usage (from the repo root, with the package installed): bash benchmarks/gpu.sh [OUT_DIR]
# Results go to OUT_DIR (default benchmarks/results) as *_cuda.json; with the default folder,
# docs/benchmarks.md is regenerated.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results}"
python - <<'PY'
import torch
assert torch.cuda.is_available(), "benchmarks/gpu.sh needs a CUDA device"
print(torch.cuda.get_device_name(), torch.__version__)
PY
# docs/benchmarks.md is rebuilt from one results folder: only when that folder holds the CPU results too.
docs=()
[ "$out" = "benchmarks/results" ] || docs=(--no-docs)
timeout 480 python -m benchmarks --only step_overhead projection memory --device cuda --out "$out" "${docs[@]}"
# A short robust SD job (docs/sd.md, "Robust rows on SD"): plain EraseDiff and EraseDiff with the three
# robust rows (inversion k = 5), same settings and seed; their times, peak memory and commands go to
# $out/sd_robust_cuda.json, next to the step-time factor estimated from pass counts (4.8×). SD_MODEL: a
# local SD 1.x/2.x diffusers folder (the machine may have no network); without it, the tests' tiny
# pipeline, built in code (its times say nothing about SD's factor beyond that the job runs on CUDA).
OUT="$out" timeout 900 python - <<'PY'
import json, os, shutil, subprocess, sys, tempfile
sys.path.insert(0, "tests")
import torch
from constrained_opt.diffusion.runtime.io import write_json

out, model = os.environ["OUT"], os.environ.get("SD_MODEL")
work = tempfile.mkdtemp(prefix="sd_robust_")
size = []
if model is None:
    import sd_tiny
    model, size = sd_tiny.build_pipeline(os.path.join(work, "tiny")), ["--resolution", "16"]
common = ["constrained-opt", "unlearn", "sd", "--model", model, "--concept", "nudity", "--steps", "10",
          "--num-forget", "16", "--num-retain", "16", "--batch-size", "4", "--gen-steps", "10",
          "--grid-steps", "2", "--grid-images", "1", "--device", "cuda", "--quiet",
          "--cache-dir", os.path.join(work, "cache"), *size]
robust = ["--robust", "relearn,sharpness,inversion", "--inversion-steps", "5"]
result = {"device": torch.cuda.get_device_name(), "model": os.environ.get("SD_MODEL", "tests/sd_tiny.py"),
          "estimate_from_pass_counts": 4.8}
for name, extra in (("plain", []), ("robust", robust)):
    cmd = [*common, *extra, "--out", os.path.join(work, name)]
    subprocess.run(cmd, check=True)
    with open(os.path.join(work, name, "run.json")) as f:
        run = json.load(f)
    result[name] = {"command": " ".join(cmd), "time_s": run["time_s"], "peak_mem_mb": run["peak_mem_mb"],
                    "final": run["final"]}
result["time_ratio"] = result["robust"]["time_s"] / result["plain"]["time_s"]
write_json(os.path.join(out, "sd_robust_cuda.json"), result)
shutil.rmtree(work)  # the two scrubbed UNets and the generated sets
print(f"robust / plain step time: {result['time_ratio']:.2f} (pass-count estimate 4.8)")
PY
