"""Benchmark transinv against the bare forward pass of the same model, in one process and run.

    python benchmarks/bench.py [--images 128] [--shift 0..8] [--device auto] [--out benchmarks/results.json]

For each model, in rounds: the bare forward pass on one batch of the images (already decoded and
on the device, inference mode, same threads, warm-up excluded) in images/s, timed before the first
row and after every row; ``measure`` with output metrics only, with the default per-layer
metrics and the other rows, in shifted views/s (every forward pass counted, the reference
included) in the steady state (the marginal rate between a run of two batches and the whole run)
and over the whole ``--images`` run (setup included). Each row's ratio is to the mean of the two
bare passes timed around it, so a shared machine's slow minutes slow both; each figure is the
median of the rounds. Then the peak memory (RSS, and CUDA peak where used) of a fresh process measuring 64 and
256 images, so a reader can check that memory does not grow with the image count; the cost of
``--attribution lie`` on resnet18 (the default run with and without it, the extra seconds per
image over its leaf layers, in bare forward passes per layer); and the start-up time of the light
commands (help, presets, a bad flag) beside ``import torch``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

import torch
import torchvision
from rich.console import Console
from rich.table import Table

import transinv
from transinv.metric_registry import LAYER_METRICS
from transinv.engine.attribution import leaf_calls
from transinv.engine.data import find_images, load_canvas, select_images
from transinv.engine.prefetch import core_to_spare
from transinv.models import load_model
from transinv.engine.runner import resolve_device
from transinv.engine.shifts import make_shifts, parse_shift_values

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "imagenet-sample"
MODELS = ("resnet18", "mobilenet_v3_small")
SIZE = 224


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def shifted_views(args: argparse.Namespace) -> int:
    """Views per image of the bench's shifts (the reference included): the forward passes per batch."""
    return len(make_shifts(parse_shift_values(args.shift), "x"))


def bare_forward(model: torch.nn.Module, images: torch.Tensor, device: torch.device, passes: int,
                 min_seconds: float = 1.0) -> float:
    """Images per second of the model alone (eager, as a user runs it) on one batch of
    already-decoded 224-px images, already on the device (warm-up excluded): ``passes`` forward
    passes (as many as ``measure`` makes per image batch), repeated for at least ``min_seconds``."""
    images = images.to(device)  # on the device already: the model's own time, no copies
    with torch.inference_mode():
        model(images)
        _sync(device)
        done, start = 0, time.perf_counter()
        while done < passes or time.perf_counter() - start < min_seconds:
            model(images)
            done += 1
        _sync(device)
    return done * len(images) / (time.perf_counter() - start)


def row_settings(args: argparse.Namespace) -> dict[str, dict]:
    """The measured rows: name -> ``measure`` keywords over the common settings.

    output and layers are the default run (``--workers`` as given, the default prefetch), then the
    latter with ``--compile-metrics`` (compiled in the warm-up run, as a long run would). On a GPU,
    the same two without CUDA graphs; on the CPU, both with the background prefetch turned the
    other way from this machine's default, and the default run with the other worker counts of
    0/1/2 (prefetch is for ``--workers 0`` only). Then the default run without each costly per-layer metric, and
    with ``equivariance_error`` and ``pooled_invariance_error`` only (``--layer-metrics``), so each
    metric's cost shows; ``--compile`` when asked; and every ``--extra-rows`` entry
    (``{"row": name, ...measure keywords}``, layers default unless given).
    """
    rows = {"output": dict(layers="none"), "layers": dict(layers="default"),
            "layers, compiled metrics": dict(layers="default", compile_metrics=True)}
    if resolve_device(args.device).type == "cuda":
        rows["output, no CUDA graphs"] = dict(layers="none", cuda_graphs=False)
        rows["layers, no CUDA graphs"] = dict(layers="default", cuda_graphs=False)
    else:
        other = not core_to_spare(resolve_device(args.device))  # the prefetch this machine does not use by default
        for row, layers in (("output", "none"), ("layers", "default")):
            rows[f"{row}, {'' if other else 'no '}prefetch"] = dict(layers=layers, workers=0, prefetch=other)
        for workers in (0, 1, 2):
            if workers != args.workers:  # the layers row already has --workers
                rows[f"layers, workers {workers}"] = dict(layers="default", workers=workers)
    if args.metric_rows:  # each per-layer metric's cost: the default run without it, and the two cheapest alone
        rows["layers, equivariance_error + pooled only"] = dict(
            layers="default", layer_metrics="equivariance_error,pooled_invariance_error")
        for metric in ("equivariance_error_resampled", "equivariance_error_interior", "inplace_change"):
            rows[f"layers, without {metric}"] = dict(
                layers="default", layer_metrics=",".join(m for m in LAYER_METRICS if m != metric))
    if args.compile:
        rows["output, compile"] = dict(layers="none", compile=True)
        rows["layers, compile"] = dict(layers="default", compile=True)
    for extra in json.loads(args.extra_rows):
        extra = dict(extra)
        name = str(extra.pop("row"))
        rows[name] = {"layers": "default", **extra}
    if args.rows:
        wanted = list(dict.fromkeys(row.strip() for row in args.rows.split(";") if row.strip()))
        if not wanted:
            sys.exit(f"--rows: name at least one row (rows: {'; '.join(rows)})")
        if unknown := [row for row in wanted if row not in rows]:
            sys.exit(f"--rows: no row named {', '.join(unknown)} (rows: {'; '.join(rows)})")
        rows = {row: rows[row] for row in wanted}
    return rows


def _fallback_note(note: str) -> None:
    """Print the notes that say a row did not run what its name says (a compiler or CUDA graphs
    fell back to eager); drop the rest (interval warnings of short runs)."""
    if note.startswith("--compile-metrics") or "CUDA graphs off" in note:
        print(f"note: {note}", file=sys.stderr)


def timed_measure(model: torch.nn.Module, settings: dict, args: argparse.Namespace) -> tuple[float, float | None]:
    """Shifted views per second through ``transinv.measure`` (decoding included): over the whole
    run of ``--images`` images (setup included), and in the steady state, the marginal rate between
    a run of two batches and the whole run (what a long run approaches: setup, the layer probe, the
    first batches and, on a GPU, the capture of CUDA graphs left out); None with fewer than four
    batches. Both runs start with nothing decoded ahead and end with everything measured, so
    decoding ahead (prefetch, workers) cannot move work out of the difference. A row that compiles
    warms up with a whole run, so no compiling falls in the timed ones.

    Only the shift grid's views are counted: the extra passes of a metric such as ``consistency``
    show as its cost, a lower rate.
    """
    common = {**dict(data=args.data, shift=args.shift, size=SIZE, resize=256, batch_size=args.batch_size,
                     device=args.device, workers=args.workers, warn=_fallback_note), **settings}
    device = resolve_device(args.device)
    views = shifted_views(args)

    def seconds(images: int) -> float:
        _sync(device)
        start = time.perf_counter()
        transinv.measure(model, num_images=images, **common)
        _sync(device)
        return time.perf_counter() - start

    compiles = settings.get("compile") or settings.get("compile_metrics")
    seconds(args.images if compiles else args.batch_size)  # warm-up: allocator, kernels (every shape compiled)
    short = 2 * args.batch_size
    for _ in range(3):  # a pair whose short run took longer (a stall on a busy machine) is timed again
        full = seconds(args.images)
        if args.images < 2 * short:
            return args.images * views / full, None
        marginal = full - seconds(short)
        if marginal > 0:
            return args.images * views / full, (args.images - short) * views / marginal
    print(f"note: {settings}: no steady state (the two-batch run took longer three times)", file=sys.stderr)
    return args.images * views / full, None


LIE_MODEL = "resnet18"


def lie_cost(model: torch.nn.Module, bare: float, per_layer: float, args: argparse.Namespace) -> dict[str, float]:
    """``--attribution lie`` on the default run: its views per second, and the extra seconds per
    image it adds, per attributed leaf layer, in units of one bare forward pass of an image."""
    whole, steady = timed_measure(model, {"layers": "default", "attribution": "lie"}, args)
    with_lie = steady or whole
    views = shifted_views(args)
    extra = views / with_lie - views / per_layer  # seconds per image
    layers = len(leaf_calls(model, SIZE, next(model.parameters()).device))
    return {"lie_views_per_s": with_lie, "lie_layers": layers, "lie_extra_s_per_image": extra,
            "lie_forwards_per_image": extra * bare, "lie_forwards_per_layer": extra * bare / layers}


def peak_memory(name: str, images: int, args: argparse.Namespace) -> dict[str, float]:
    """Peak RSS (MiB) and CUDA peak (MiB) of a fresh process measuring ``images`` images."""
    cmd = [sys.executable, __file__, "--child", name, "--images", str(images), "--shift", args.shift, "--data", args.data,
           "--device", args.device, "--workers", str(args.workers), "--batch-size", str(args.batch_size),
           "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _status_mib(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def child(args: argparse.Namespace) -> None:
    """Run one default per-layer measurement; print RSS before it and its peak, as JSON.

    The peak is reset after imports and model construction (``clear_refs``), so the figure is
    the run's own, not the import of CUDA libraries.
    """
    model = load_model(args.child, "none").module
    device = resolve_device(args.device)
    before = _status_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    transinv.measure(model, data=args.data, shift=args.shift, size=SIZE, resize=256, batch_size=args.batch_size,
                     num_images=args.images, device=args.device, workers=args.workers, warn=lambda _: None)
    cuda = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    print(json.dumps({"rss_before_mib": before, "rss_peak_mib": _status_mib("VmHWM"), "cuda_mib": cuda}))


STARTUP_COMMANDS = {
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
    "transinv --help": [sys.executable, "-m", "transinv", "--help"],
    "transinv presets": [sys.executable, "-m", "transinv", "presets"],
    "transinv measure --help": [sys.executable, "-m", "transinv", "measure", "--help"],
    "transinv measure --bogus (error)": [sys.executable, "-m", "transinv", "measure", "x", "--bogus"],
}


def startup_times(repeats: int = 3) -> dict[str, float]:
    """Best wall time in seconds of each light command in a fresh process, beside importing torch."""
    times = {}
    for label, command in STARTUP_COMMANDS.items():
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            subprocess.run(command, capture_output=True, cwd=ROOT, check=False)
            best = min(best, time.perf_counter() - start)
        times[label] = best
    return times


def machine(device: torch.device) -> dict[str, object]:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _revision() -> str | None:
    """The checkout's commit (with ``+changes`` when its files differ from it), None outside git."""
    def git(*words: str) -> str:
        return subprocess.run(["git", *words], capture_output=True, text=True, cwd=ROOT, check=True).stdout.strip()
    try:
        return git("rev-parse", "--short", "HEAD") + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def _threads(text: str) -> int:
    """``--threads``: 0 (torch's default) or a positive count, refused in one line otherwise."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected 0 or a positive whole number, got {text!r}")
    return int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=128, help="images per run (four batches at least for a steady state; "
                                                                  "at most the folder's; rounded down to whole batches)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch and views per forward pass")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated torchvision names")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="folder of ImageNet validation images")
    parser.add_argument("--shift", default="0..8")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--threads", type=_threads, default=0,
                        help="torch's intra-op threads for the whole bench (0: torch's default); fewer than the "
                             "cores leaves a core free, as on a larger machine (the default prefetch turns on)")
    parser.add_argument("--rows", default="", help="semicolon-separated row names to time, e.g. 'output; output, "
                                                     "no prefetch' (default: every row)")
    parser.add_argument("--rounds", type=int, default=2, help="timing rounds; each figure is the median of its rounds")
    parser.add_argument("--memory-images", default="64,256", help="image counts of the peak-memory runs ('' for none)")
    parser.add_argument("--startup-repeats", type=int, default=3, help="runs of each light command (0: skip)")
    parser.add_argument("--compile", action="store_true", help="add rows with --compile (minutes to compile on a CPU)")
    parser.add_argument("--extra-rows", default="[]", metavar="JSON",
                        help='more rows: a JSON list of measure keywords, each with a "row" name, '
                             'e.g. [{"row": "consistency", "consistency": "-8..8"}]')
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results.json"))
    parser.add_argument("--no-lie", action="store_true", help="skip the cost of --attribution lie")
    parser.add_argument("--no-metric-rows", dest="metric_rows", action="store_false",
                        help="skip the rows that price each per-layer metric")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return child(args)
    if not Path(args.data).is_dir():
        sys.exit(f"benchmark images not found at {args.data}")
    device = resolve_device(args.device)
    items = select_images(find_images(args.data), args.images, 0)
    # a smaller folder: every figure counts the images it has; whole batches only, so no run ends with a
    # smaller batch, which is measured eagerly (a shape seen once is never captured as a CUDA graph)
    args.images = len(items) // args.batch_size * args.batch_size if len(items) >= args.batch_size else len(items)
    pre = load_model("resnet18", "none").preprocess
    memory_counts = [n for n in args.memory_images.split(",") if n]
    decoded = torch.stack([load_canvas(item.path, pre, SIZE) for item in items[:args.batch_size]])
    results: list[dict] = []
    report = {
        "machine": machine(device),
        "versions": {"transinv": transinv.__version__, "commit": _revision(), "torch": torch.__version__,
                     "torchvision": torchvision.__version__, "python": platform.python_version()},
        "settings": {"size": SIZE, "batch_size": args.batch_size, "images": args.images, "shift": args.shift, "rounds": args.rounds,
                     "workers": args.workers, "data": args.data, "weights": "none", "precision": "fp32",
                     "rows": row_settings(args)},
        "results": results,
        "startup_s": {},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    views, settings = shifted_views(args), row_settings(args)
    for name in args.models.split(","):
        model = load_model(name, "none").module.to(device)
        bares, runs = [bare_forward(model, decoded, device, views)], {row: [] for row in settings}
        for _ in range(args.rounds):  # each row timed between two bare passes: its ratio is to theirs
            for row, keywords in settings.items():
                whole, steady = timed_measure(model, keywords, args)
                bares.append(bare_forward(model, decoded, device, views))
                bare_now = (bares[-2] + bares[-1]) / 2
                runs[row].append({"views_per_s": steady or whole, "ratio": (steady or whole) / bare_now,
                                  "run_views_per_s": whole, "run_ratio": whole / bare_now, "bare_images_per_s": bare_now,
                                  "steady_state": steady is not None})
        bare = median(bares)
        rows = {row: {**{k: median(r[k] for r in rounds) for k in ("views_per_s", "ratio", "run_views_per_s", "run_ratio")},
                      "rounds": rounds} for row, rounds in runs.items()}
        memory = {n: peak_memory(name, int(n), args) for n in memory_counts}
        results.append({
            "model": name, "bare_images_per_s": bare,
            **{f"{row}_{key}": rows[row][key] for row in ("output", "layers") if row in rows
               for key in ("views_per_s", "ratio")},
            "rows": rows, "peak_memory": memory,
            **(lie_cost(model, bare, rows["layers"]["views_per_s"], args)
               if name == LIE_MODEL and not args.no_lie and "layers" in rows else {}),  # its cost is over that row
        })
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")  # each model's figures as soon as they exist
        print(f"{name}: bare {bare:.1f} img/s; " + "; ".join(f"{row} {v['views_per_s']:.1f} ({v['ratio']:.2f})"
                                                              for row, v in rows.items()), flush=True)
    if args.startup_repeats:
        report["startup_s"] = startup_times(args.startup_repeats)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    table = Table(title=f"transinv vs bare forward ({device}, {args.images} images, shifts {args.shift}, batch {args.batch_size})")
    for column in ("model", "bare img/s", "output views/s", "ratio", "layers views/s", "ratio", *(
            f"peak RSS {n} img (MiB)" for n in memory_counts)):
        table.add_column(column, justify="right")
    for r in results:
        figures = [f"{r[f'{row}_{key}']:{spec}}" if f"{row}_{key}" in r else "" for row in ("output", "layers")
                   for key, spec in (("views_per_s", ".1f"), ("ratio", ".2f"))]
        table.add_row(r["model"], f"{r['bare_images_per_s']:.1f}", *figures,
                      *(f"{m['rss_peak_mib']:.0f}" + (f" (cuda {m['cuda_mib']:.0f})" if m["cuda_mib"] else "")
                        for m in r["peak_memory"].values()))
    Console().print(table)
    detail = Table(title="every row: shifted views/s in the steady state (ratio to the bare forward pass), and the ratio "
                         "over the whole run, setup included (median of rounds)")
    detail.add_column("row")
    for r in results:
        detail.add_column(r["model"], justify="right")
    for row in results[0]["rows"]:
        detail.add_row(row, *(f"{r['rows'][row]['views_per_s']:.1f} ({r['rows'][row]['ratio']:.2f}); run "
                              f"{r['rows'][row]['run_ratio']:.2f}" for r in results))
    Console().print(detail)
    for r in results:
        if "lie_layers" in r:
            print(f"{r['model']} --attribution lie: {r['lie_views_per_s']:.1f} views/s; +{r['lie_extra_s_per_image']:.3f} "
                  f"s per image = {r['lie_forwards_per_image']:.1f} bare forward passes, "
                  f"{r['lie_forwards_per_layer']:.2f} per attributed layer ({r['lie_layers']} leaf layers)")
    if report["startup_s"]:
        startup = Table(title=f"start-up time of light commands (best of {args.startup_repeats}, fresh process)")
        startup.add_column("command")
        startup.add_column("seconds", justify="right")
        for label, seconds in report["startup_s"].items():
            startup.add_row(label, f"{seconds:.2f}")
        Console().print(startup)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
