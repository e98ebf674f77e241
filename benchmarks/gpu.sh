#!/usr/bin/env bash
# Items 1-3 of the benchmarks on CUDA, in one run (a few minutes on an H100/H200).
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
