#!/usr/bin/env bash
# What one session on a lent GPU machine runs (its python3 holds torch; the package runs from the
# checkout): the CUDA checks, `make bench` at batch 32 and 128, and a kernel-time profile.
#     DATA=.benchdata/imagenet-sample OUT=/tmp/gpu bash benchmarks/gpu_session.sh
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
DATA=${DATA:-../shared/data/imagenet-sample}
OUT=${OUT:-benchmarks/gpu-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" | tee -a "$OUT/gpu.txt"
timeout 120 python3 benchmarks/cuda_check.py --data "$DATA" 2>&1 | tee "$OUT/cuda_check.txt"
common=(--device cuda --images 500 --shift 0..16 --workers 8 --rounds 2 --data "$DATA")
timeout 210 python3 benchmarks/bench.py "${common[@]}" --startup-repeats 1 --out "$OUT/results-b32.json" 2>&1 \
    | tee "$OUT/bench-b32.txt"
# batch 128 needs more batches than 500 images make to reach replays: every image three times (links)
many=/tmp/bench-x3; mkdir -p "$many"
for f in "$DATA"/*; do for i in 1 2 3; do ln -sf "$(realpath "$f")" "$many/$i-$(basename "$f")"; done; done
timeout 150 python3 benchmarks/bench.py "${common[@]/$DATA/$many}" --images 1500 --batch-size 128 --memory-images "" --startup-repeats 0 --no-lie \
    --out "$OUT/results-b128.json" 2>&1 | tee "$OUT/bench-b128.txt"
timeout 90 python3 benchmarks/gpu_profile.py --data "$DATA" --out "$OUT/gpu_profile.json" 2>&1 | tee "$OUT/profile.txt"
