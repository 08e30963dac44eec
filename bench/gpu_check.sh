#!/usr/bin/env bash
# The GPU checks in one run, for a lent device machine (see BENCHMARKS.md, "GPU"): the `gpu`-marked embed test
# and bench/gpu_embed.py (ViT-B-32, ViT-L-14, bf16). The machine has torch but not our pure-Python
# dependencies: they travel as wheels in .whl/ (fetched beforehand with `pip download`, see the header of
# BENCHMARKS.md's GPU section). Logs and the JSON go to $OUT (or ./gpu-out).
set -u
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc;
  python3 -c "import sys, torch, open_clip; print(sys.version.split()[0], 'torch', torch.__version__, 'open_clip', open_clip.__version__, 'cuda', torch.cuda.is_available())"; } 2>&1 | tee "$OUT/env.txt"
# test_dedup's gpu test needs a faiss GPU build; none fits the device's transfer limit (see BENCHMARKS.md).
timeout 240 python3 -m pytest -p no:cacheprovider -q -m gpu "tests/test_embed.py::test_gpu_matches_cpu" 2>&1 | tee "$OUT/gpu_tests.log"
timeout "${GPU_BENCH_TIMEOUT:-420}" python3 bench/gpu_embed.py --out /tmp/gpu-bench "$@" 2>&1 | tee "$OUT/gpu_embed.log"
cp /tmp/gpu-bench/gpu_embed.json "$OUT/" 2>/dev/null || true
