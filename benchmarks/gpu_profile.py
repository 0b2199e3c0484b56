"""Where a GPU run's steady state goes (from the end of its second batch): wall time against the
time the GPU spends in kernels, the kernels that take it, and the host's Python time by function
(cProfile), for the output metrics and the default per-layer run with and without CUDA graphs,
and with ``--compile-metrics``.

    python benchmarks/gpu_profile.py [--data FOLDER] [--images 640] [--shift 0..16] [--out FILE]

A run whose kernel time is close to its wall time is bound by the GPU's arithmetic; one far
below it is bound by the host (Python, kernel launches, decoding), and the host profile says
which. Writes JSON to ``--out`` and the host profiles as text beside it (``.txt``).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time
from pathlib import Path
from typing import Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import transinv
from transinv.engine.shifts import make_shifts, parse_shift_values
from transinv.models import load_model

DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "imagenet-sample"


RUNS = {"output": dict(layers="none"), "output, no CUDA graphs": dict(layers="none", cuda_graphs=False),
        "layers": dict(layers="default"), "layers, no CUDA graphs": dict(layers="default", cuda_graphs=False),
        "layers, compiled metrics": dict(layers="default", compile_metrics=True)}


def profiled(model: torch.nn.Module, args: argparse.Namespace, **settings: object) -> dict[str, object]:
    """Where the steady state of a measurement goes, from the end of its second batch to its end
    (after a warm-up run): wall and kernel seconds and the ten costliest kernels in one run, and
    the host's costliest functions (cProfile, ``host`` as text) in another."""
    common = dict(data=args.data, shift=args.shift, size=224, resize=256, batch_size=args.batch_size, device="cuda",
                  workers=args.workers, warn=lambda _: None, **settings)
    transinv.measure(model, num_images=args.images if settings.get("compile_metrics") else args.batch_size, **common)
    torch.cuda.synchronize()

    def window(start: Callable[[], None], stop: Callable[[], None]) -> float:
        """Seconds of a run's window (it starts after the second batch, the GPU drained), run between
        ``start`` and ``stop``."""
        began: list[float] = []

        def progress(total: int, done: int) -> Callable[[int], None]:
            batches = 0

            def advance(images: int) -> None:
                nonlocal batches
                batches += 1
                if batches == 2:
                    torch.cuda.synchronize()
                    start()
                    began.append(time.perf_counter())
            return advance

        transinv.measure(model, num_images=args.images, progress=progress, **common)
        torch.cuda.synchronize()
        stop()
        return time.perf_counter() - began[0]

    kernels = profile(activities=[ProfilerActivity.CUDA])
    wall = window(kernels.start, kernels.stop)
    on_gpu = [e for e in kernels.key_averages() if e.device_type == DeviceType.CUDA]
    busy = sum(e.self_device_time_total for e in on_gpu) / 1e6
    top = sorted(on_gpu, key=lambda e: e.self_device_time_total, reverse=True)[:10]
    host = cProfile.Profile()
    host_wall = window(host.enable, host.disable)
    text = io.StringIO()
    pstats.Stats(host, stream=text).sort_stats("tottime").print_stats(25)
    pstats.Stats(host, stream=text).sort_stats("cumulative").print_stats("transinv", 25)
    views = (args.images - 2 * args.batch_size) * len(make_shifts(parse_shift_values(args.shift), "x"))
    return {"settings": {k: v for k, v in settings.items()}, "window_views": views, "wall_s": wall, "kernel_s": busy,
            "busy": busy / wall, "top_kernels": {e.key[:90]: e.self_device_time_total / 1e6 for e in top},
            "host_wall_s": host_wall, "host": text.getvalue()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--images", type=int, default=640)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shift", default="0..16")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--models", default="resnet18,mobilenet_v3_small", help="comma-separated torchvision names")
    parser.add_argument("--runs", default="", help=f"semicolon-separated runs to profile (default: all of {'; '.join(RUNS)})")
    parser.add_argument("--out", default="gpu_profile.json")
    args = parser.parse_args()
    wanted = [r.strip() for r in args.runs.split(";") if r.strip()] or list(RUNS)
    if unknown := [r for r in wanted if r not in RUNS]:
        parser.error(f"--runs: no run named {', '.join(unknown)} (runs: {'; '.join(RUNS)})")
    runs = {label: RUNS[label] for label in wanted}
    if args.images < 3 * args.batch_size:
        parser.error("--images: at least three batches (the profiled window starts after the second)")
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "images": args.images,
              "shift": args.shift, "batch_size": args.batch_size, "runs": {}}
    for name in args.models.split(","):
        model = load_model(name, "none").module.cuda()
        with torch.inference_mode():  # the bare forward passes of the window's number of views, for scale
            views = torch.randn(args.batch_size, 3, 224, 224, device="cuda")
            model(views)
            torch.cuda.synchronize()
            start = time.perf_counter()
            passes = (args.images - 2 * args.batch_size) * len(make_shifts(parse_shift_values(args.shift), "x")) // args.batch_size
            for _ in range(passes):
                model(views)
            torch.cuda.synchronize()
            bare = time.perf_counter() - start
        for label, settings in runs.items():
            run = profiled(model, args, **settings)
            run["bare_forward_s"] = bare
            report["runs"][f"{name}: {label}"] = run
            with open(Path(args.out).with_suffix(".txt"), "a") as host:
                host.write(f"=== {name}: {label} (wall {run['wall_s']:.2f} s; under cProfile {run['host_wall_s']:.2f} s)\n")
                host.write(run.pop("host"))
            print(f"{name:>20} {label:<24} wall {run['wall_s']:.2f} s, kernels {run['kernel_s']:.2f} s "
                  f"({run['busy']:.0%} busy), bare forward {bare:.2f} s", flush=True)
            for kernel, seconds in list(run["top_kernels"].items())[:5]:
                print(f"{'':>24}{seconds:7.3f} s  {kernel}")
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")  # each model's runs as they are done


if __name__ == "__main__":
    main()
