#!/usr/bin/env bash
# What a GPU machine runs (its python3 holds torch; the package runs from the checkout), in steps
# (STEPS, default all) so that a short loan of a GPU can run some: `check` the CUDA path
# (cuda_check.py), `kernels` the compiled comparison kernels against their floor (fused_kernels.py),
# `b32` and `b128` make bench's main rows at batch 32 and 128, `profile` and `profile128` where
# resnet18's steady state goes (gpu_profile.py: kernels against wall time, the host's Python by
# function). Everything printed goes to $OUT/log.txt too; results as JSON under $OUT (eight files).
#     DATA=.benchdata/imagenet-sample OUT=/tmp/gpu STEPS="check b32" bash benchmarks/gpu_session.sh
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
DATA=${DATA:-../shared/data/imagenet-sample}
OUT=${OUT:-benchmarks/gpu-out}
STEPS=${STEPS:-check b32 b128 kernels profile profile128}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
common=(--device cuda --shift 0..16 --workers 8 --rounds 1 --startup-repeats 0 --no-lie --memory-images "")
# a steady state needs runs of many batches (a GPU measures 500 images in a second or two, and the
# marginal rate between a whole and a two-batch run is noisy there): every image ten times (links)
many=/tmp/bench-x10; mkdir -p "$many"
for f in "$DATA"/*; do for i in $(seq 10); do ln -sf "$(realpath "$f")" "$many/$i-$(basename "$f")"; done; done
quiet() { grep --line-buffered -v "^USDT\|^ERROR:.*DeviceProperties"; }
for step in $STEPS; do
    SECONDS=0
    case $step in
    check) timeout 80 python3 benchmarks/cuda_check.py --data "$DATA" ;;
    kernels) timeout 80 python3 benchmarks/fused_kernels.py --out "$OUT/fused_kernels.json" ;;
    b32) timeout 100 python3 benchmarks/bench.py "${common[@]}" --images 1920 --data "$many" \
             --rows "output; layers; layers, compiled metrics" --out "$OUT/results-b32.json" ;;
    b128) timeout 60 python3 benchmarks/bench.py "${common[@]}" --images 2560 --data "$many" --batch-size 128 \
              --extra-rows '[{"row": "output, 14 workers", "layers": "none", "workers": 14}]' \
              --rows "output; output, 14 workers; layers" --out "$OUT/results-b128.json" ;;
    profile) timeout 90 python3 benchmarks/gpu_profile.py --data "$DATA" --images 480 --models resnet18 \
                 --runs "output; layers; layers, compiled metrics" --out "$OUT/profile.json" 2>&1 | quiet ;;
    profile128) timeout 50 python3 benchmarks/gpu_profile.py --data "$many" --images 1536 --batch-size 128 \
                    --models resnet18 --runs "output" --out "$OUT/profile-b128.json" 2>&1 | quiet ;;
    *) echo "unknown step $step (steps: check kernels b32 b128 profile profile128)"; exit 2 ;;
    esac
    echo "step $step: ${SECONDS} s"
done
