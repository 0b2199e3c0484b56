#!/usr/bin/env bash
# What one session on a lent GPU machine runs (its python3 holds torch; the package runs from the
# checkout): the CUDA checks, then `make bench` at batch 32 (every row) and 128 (the default rows),
# within about five minutes. Results and logs under $OUT. (benchmarks/gpu_profile.py is the next
# step where time is left: kernel time against wall time.)
#     DATA=.benchdata/imagenet-sample OUT=/tmp/gpu bash benchmarks/gpu_session.sh
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
DATA=${DATA:-../shared/data/imagenet-sample}
OUT=${OUT:-benchmarks/gpu-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" | tee -a "$OUT/gpu.txt"
timeout 160 python3 benchmarks/cuda_check.py --data "$DATA" 2>&1 | tee "$OUT/cuda_check.txt"
common=(--device cuda --shift 0..16 --workers 8 --rounds 1)
timeout 230 python3 benchmarks/bench.py "${common[@]}" --images 500 --data "$DATA" --startup-repeats 1 \
    --out "$OUT/results-b32.json" 2>&1 | tee "$OUT/bench-b32.txt"
# batch 128 needs more batches than 500 images make to reach a steady state: every image three times (links)
many=/tmp/bench-x3; mkdir -p "$many"
for f in "$DATA"/*; do for i in 1 2 3; do ln -sf "$(realpath "$f")" "$many/$i-$(basename "$f")"; done; done
timeout 90 python3 benchmarks/bench.py "${common[@]}" --images 1500 --data "$many" --batch-size 128 --memory-images "" \
    --startup-repeats 0 --no-lie --no-metric-rows --out "$OUT/results-b128.json" 2>&1 | tee "$OUT/bench-b128.txt"
