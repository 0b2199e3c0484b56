"""The compiled comparison kernels (``--compile-metrics``) against their floor: each kernel's time on
the map sizes of resnet18's default layers, as compiled in several ways, beside the same
functions eager and the time to read their inputs once at the device's copy bandwidth.

    python benchmarks/fused_kernels.py [--device cuda] [--variants eager,dynamic-tiny,...] [--out FILE]

Variants: ``eager`` (the functions uncompiled), ``dynamic-tiny`` (one kernel for every size, first
compiled on a tiny probe, as ``check_fused_kernels`` did), ``dynamic-large`` (the same, probed on a
large map), ``static`` (a kernel per map size). With dynamic shapes inductor sizes a reduction's
blocks from the shapes it first compiles for; this shows what that costs on other sizes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from transinv.engine import metrics as M

SHAPES = {"conv1 (64 x 112 x 112)": (64, 112, 112), "layer1 (64 x 56 x 56)": (64, 56, 56),
          "layer2 (128 x 28 x 28)": (128, 28, 28), "layer4 (512 x 7 x 7)": (512, 7, 7)}
KERNELS = ("errors", "change", "means")
VARIANTS = ("eager", "dynamic-tiny", "dynamic-large", "static")


def inputs(c: int, h: int, w: int, n: int, device: torch.device) -> dict[str, tuple]:
    """Each kernel's arguments for one pass of one whole shift (by one column) of ``n`` maps ``(c, h, w)``."""
    p = h * w
    stack, reference = torch.randn(1, n, c, p, device=device), torch.randn(n, c, p, device=device)
    index = ((torch.arange(w) - 1) % w + torch.arange(h)[:, None] * w).flatten().to(device)
    masks = torch.ones(1, p, 2, dtype=torch.float64, device=device)
    energy = torch.rand(n, 1, 2, dtype=torch.float64, device=device).transpose(0, 1) + 1
    return {"errors": (stack, reference, index, None, masks, energy), "change": (stack, reference), "means": (stack,)}


GRAPHED_CALLS = 10


def timed(fn: Callable, args: tuple, device: torch.device, repeats: int) -> float:
    """Median seconds of one call, after two warm-up calls (which compile). On a GPU: the GPU's
    time, ten calls captured in a CUDA graph and replayed, as a measuring run replays its passes
    (timing single calls between events counts the host's per-call overhead, which a graph hides:
    up to ~100 µs a compiled call, more than a small map's kernel). On the CPU: wall time."""
    for _ in range(2):
        fn(*args)
    times = []
    if device.type == "cuda":
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(GRAPHED_CALLS):
                fn(*args)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / GRAPHED_CALLS)
        return statistics.median(times)
    for _ in range(repeats):
        began = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def variant(name: str, device: torch.device, n: int) -> dict[str, Callable]:
    """The three kernels as ``name`` makes them (``metrics.fused_kernels``, compiled afresh)."""
    functions = {"errors": M._fused_errors, "change": M._fused_change, "means": M._fused_means}
    if name == "eager":
        return functions
    import torch._dynamo  # imported on first use only: it is slow to import

    torch._dynamo.reset()
    M.fused_kernels.cache_clear()
    compiled = M.fused_kernels(dynamic=name != "static")._asdict()
    if name.startswith("dynamic"):
        probe = inputs(5, 1, 7, 4, device) if name == "dynamic-tiny" else inputs(64, 64, 64, n, device)
        for kernel, fn in compiled.items():
            fn(*probe[kernel])
    return compiled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default="fused_kernels.json")
    args = parser.parse_args()
    if unknown := [v for v in args.variants.split(",") if v not in VARIANTS]:
        parser.error(f"--variants: no variant named {', '.join(unknown)} (variants: {','.join(VARIANTS)})")
    device = torch.device(args.device)
    report: dict[str, object] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                                 "torch": torch.__version__, "batch_size": args.batch_size, "seconds": {}}
    with torch.inference_mode():
        if device.type == "cuda":  # the floor: one read of the inputs at the copy bandwidth measured here
            block = torch.empty(2**28, device=device)
            copy = timed(lambda: block.clone(), (), device, 5)
            report["copy_bytes_per_s"] = 2 * block.numel() * 4 / copy
            del block
        cases = {shape: inputs(*dims, args.batch_size, device) for shape, dims in SHAPES.items()}
        for name in args.variants.split(","):
            began = time.perf_counter()
            kernels = variant(name, device, args.batch_size)
            for shape, by_kernel in cases.items():
                for kernel in KERNELS:
                    seconds = timed(kernels[kernel], by_kernel[kernel], device, args.repeats)
                    report["seconds"][f"{name} | {shape} | {kernel}"] = seconds
            report.setdefault("variant_wall_s", {})[name] = time.perf_counter() - began
            print(f"{name}: {report['variant_wall_s'][name]:.1f} s with compiling", flush=True)
    rate = report.get("copy_bytes_per_s")
    print(f"{'':<34}" + "".join(f"{v:>15}" for v in args.variants.split(",")) + ("        floor" if rate else ""))
    for shape, by_kernel in cases.items():
        for kernel in KERNELS:
            cells = "".join(f"{report['seconds'][f'{v} | {shape} | {kernel}'] * 1e6:13.1f}us"
                            for v in args.variants.split(","))
            read = sum(a.numel() * a.element_size() for a in by_kernel[kernel][:2] if a is not None)
            print(f"{shape + ' ' + kernel:<34}{cells}" + (f"{read / rate * 1e6:11.1f}us" if rate else ""))
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
