#!/usr/bin/env bash
# What one session on a lent GPU machine runs (its python3 holds torch; the package runs from the
# checkout), in steps that fit one call each (STEPS, default all): `check` the CUDA path
# (cuda_check.py), `b32` make bench's main rows at batch 32, `profile` where the time goes
# (gpu_profile.py: kernels against wall time, the host's Python by function), `b128` the main rows at
# batch 128. Results and logs under $OUT.
#     DATA=.benchdata/imagenet-sample OUT=/tmp/gpu STEPS="check b32 profile" bash benchmarks/gpu_session.sh
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
DATA=${DATA:-../shared/data/imagenet-sample}
OUT=${OUT:-benchmarks/gpu-out}
STEPS=${STEPS:-check b32 profile b128}
ROWS=${ROWS:-output; layers; layers, compiled metrics; layers, equivariance_error + pooled only}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv | tee -a "$OUT/gpu.txt"
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" | tee -a "$OUT/gpu.txt"
common=(--device cuda --shift 0..16 --workers 8 --rounds 1 --startup-repeats 0 --no-lie --memory-images "")
for step in $STEPS; do
    SECONDS=0
    case $step in
    check) timeout 120 python3 benchmarks/cuda_check.py --data "$DATA" 2>&1 | tee "$OUT/cuda_check.txt" ;;
    b32) timeout 180 python3 benchmarks/bench.py "${common[@]}" --images 500 --data "$DATA" --rows "$ROWS" \
             --out "$OUT/results-b32.json" 2>&1 | tee "$OUT/bench-b32.txt" ;;
    profile) timeout 120 python3 benchmarks/gpu_profile.py --data "$DATA" --images 160 --workers 8 \
                 --runs "output; output, no CUDA graphs; layers; layers, compiled metrics" --out "$OUT/profile.json" 2>&1 \
                 | grep -v "^USDT\|^ERROR:.*DeviceProperties" ;;
    b128)  # batch 128 needs more batches than 500 images make to reach a steady state: every image three times (links)
        many=/tmp/bench-x3; mkdir -p "$many"
        for f in "$DATA"/*; do for i in 1 2 3; do ln -sf "$(realpath "$f")" "$many/$i-$(basename "$f")"; done; done
        timeout 150 python3 benchmarks/bench.py "${common[@]}" --images 1500 --data "$many" --batch-size 128 \
            --rows "output; layers; layers, compiled metrics" --out "$OUT/results-b128.json" 2>&1 | tee "$OUT/bench-b128.txt" ;;
    *) echo "unknown step $step (steps: check b32 profile b128)"; exit 2 ;;
    esac
    echo "step $step: ${SECONDS} s" | tee -a "$OUT/gpu.txt"
done
