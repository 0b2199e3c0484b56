"""Check the CUDA path against the CPU one and against known answers (run where a GPU exists).

    python benchmarks/cuda_check.py [--data FOLDER]

Prints one line per check and exits non-zero if any fails.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import transinv

DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "imagenet-sample"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 1
    torch.backends.cudnn.allow_tf32 = False  # compare fp32 with fp32
    torch.backends.cuda.matmul.allow_tf32 = False
    common = dict(weights="none", data=args.data, num_images=16, size=64, resize=80, warn=lambda _: None)
    failures = 0

    def check(name: str, ok: bool, detail: str) -> None:
        nonlocal failures
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}")

    keys = ["model", "variant", "layer", "shift_x", "shift_y", "metric"]
    cpu = transinv.measure("resnet18", shift="0..4", device="cpu", **common).rows.set_index(keys)["value"]
    gpu = transinv.measure("resnet18", shift="0..4", device="cuda", **common).rows.set_index(keys)["value"]
    diff = (cpu - gpu.reindex(cpu.index)).abs().max()
    check("resnet18 CPU vs CUDA, every row", diff < 1e-4, f"max |difference| {diff:.2e}")
    exact = transinv.measure("example:circular_gap", shift="-3..3", direction="grid", mode="circular",
                             layers="all", device="cuda", **common).rows
    layer_max = exact[exact["layer"] != "output"]["value"].max()
    check("circular stride-1 network on CUDA", layer_max <= 1e-5, f"max layer error {layer_max:.2e}")
    aps = transinv.measure("resnet18", shift="0..5", mode="circular", layers="none", variants="aps+padding:circular",
                           device="cuda", **common).rows
    agreement = aps[aps["metric"] == "top1_agreement"]["value"].min()
    kl = aps[aps["metric"] == "kl_divergence"]["value"].max()
    check("resnet18 APS + circular padding on CUDA", agreement == 1 and kl <= 1e-5, f"agreement {agreement}, KL {kl:.2e}")
    half = transinv.measure("resnet18", shift="0..4", device="cuda", precision="bf16", channels_last=True, **common).rows
    check("bf16 + channels-last on CUDA runs", not half.empty, f"{len(half)} rows")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
