"""Check the CUDA path against the CPU one and against known answers (run where a GPU exists).

    python benchmarks/cuda_check.py [--data FOLDER]

Prints one line per check and exits non-zero if any fails.
"""

from __future__ import annotations

import argparse
import sys
import traceback
import warnings
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
    errors = exact[exact["metric"].isin(["equivariance_error", "equivariance_error_interior", "pooled_invariance_error"])]
    layer_max = errors["value"].max()  # (inplace_change is not an error: maps do move when shifted)
    check("circular stride-1 network on CUDA", layer_max <= 1e-5, f"max layer error {layer_max:.2e}")
    aps = transinv.measure("resnet18", shift="0..5", mode="circular", layers="none", variants="aps+padding:circular",
                           device="cuda", **common).rows
    agreement = aps[aps["metric"] == "top1_agreement"]["value"].min()
    kl = aps[aps["metric"] == "kl_divergence"]["value"].max()
    check("resnet18 APS + circular padding on CUDA", agreement == 1 and kl <= 1e-5, f"agreement {agreement}, KL {kl:.2e}")
    half = transinv.measure("resnet18", shift="0..4", device="cuda", precision="bf16", channels_last=True, **common).rows
    check("bf16 + channels-last on CUDA runs", not half.empty, f"{len(half)} rows")
    graphs = dict(common, num_images=20, batch_size=4)  # 5 batches: eager, captured, 3 replays
    replays: dict[str, object] = {}  # label -> the rows of the replayed run
    for label, model, extra in (("resnet18, every layer", "resnet18", dict(layers="all", shift="0..5")),
                                ("mobilenet_v3_small, fractional shifts", "mobilenet_v3_small", dict(shift="0..2:0.5", mode="circular", subpixel="fourier")),
                                ("resnet18 bf16 channels-last", "resnet18", dict(shift="0..3", precision="bf16", channels_last=True)),
                                ("resnet18 as an embedding", "resnet18", dict(shift="0..3", task="embedding")),
                                ("resnet18 embedded on a black frame", "resnet18",
                                 dict(shift="0..3", mode="embed", embed_size=48, fill="black")),
                                ("resnet18, compiled comparisons", "resnet18",
                                 dict(layers="all", shift="0..5", compile_metrics=True))):
        notes: list[str] = []
        eager = transinv.measure(model, device="cuda", cuda_graphs=False, **extra, **graphs).rows.set_index(keys)
        replayed = transinv.measure(model, device="cuda", **extra, **dict(graphs, warn=notes.append)).rows.set_index(keys)
        diff = (eager["value"] - replayed["value"].reindex(eager.index)).abs().max()
        same = (eager.index.equals(replayed.index) and diff <= 1e-9 and (eager["n"] == replayed["n"]).all()
                and eager["value"].isna().equals(replayed["value"].isna()))
        fallbacks = [note for note in notes if note.startswith("--compile-metrics") or "CUDA graphs off" in note]
        check(f"CUDA graphs give the eager numbers: {label}", same and not fallbacks,
              f"{len(eager)} rows, max |difference| {diff:.2e}" + (f", fell back: {fallbacks}" if fallbacks else ""))
        replays[label] = replayed
    eager, fused = replays["resnet18, every layer"], replays["resnet18, compiled comparisons"]
    relative = ((eager["value"] - fused["value"].reindex(eager.index)).abs() / eager["value"].abs().clip(lower=1e-6)).max()
    same = eager.index.equals(fused.index) and eager["value"].isna().equals(fused["value"].isna())
    check("compiled comparisons give the eager numbers (float32 rounding)", same and relative <= 1e-5,
          f"{len(eager)} rows, max relative difference {relative:.2e}")
    for label, extra in (("output metrics", dict(layers="none")), ("default per-layer", {}),
                         ("padded views on a black fill", dict(mode="pad", fill="black")),
                         ("fractional circular shifts", dict(shift="0..2:0.5", mode="circular", subpixel="fourier")),
                         ("compiled comparisons", dict(compile_metrics=True))):
        syncs = host_syncs(dict(graphs, num_images=24, **extra))
        check(f"no host sync after the second batch: {label}", not syncs,
              "none" if not syncs else f"{sum(syncs.values())} at " + "; ".join(f"{k} x{n}" for k, n in syncs.items()))
    notes: list[str] = []
    synced = transinv.measure(HostSync(), device="cuda", shift="0..3", layers="all", **dict(graphs, warn=notes.append))
    plain = transinv.measure(HostSync(), device="cuda", shift="0..3", layers="all", cuda_graphs=False,
                             **graphs)
    diff = (synced.rows["value"] - plain.rows["value"]).abs().max()
    fell_back = any("CUDA graphs off" in note for note in notes)
    check("a model that reads a value back falls back to eager passes", fell_back and diff <= 1e-9,
          f"note {'given' if fell_back else 'missing'}, max |difference| {diff:.2e}")
    return 1 if failures else 0


def host_syncs(keywords: dict) -> dict[str, int]:
    """The synchronising CUDA calls (``torch.cuda.set_sync_debug_mode``) a resnet18 run makes from
    the end of its second batch to the end of its last, by the Python line that made them: a
    sync there stops the host from queueing the next batch while the GPU works."""
    found: dict[str, int] = {}
    batches = -(-keywords["num_images"] // keywords["batch_size"])
    seen = 0

    def progress(total: int, done: int):
        def advance(images: int) -> None:
            nonlocal seen
            seen += 1
            torch.cuda.set_sync_debug_mode("warn" if 2 <= seen < batches else "default")
        return advance

    def record(message, category, filename, lineno, file=None, line=None) -> None:
        if "synchroniz" in str(message):  # where: the innermost line of ours (or of any Python) on the stack
            stack = [frame for frame in traceback.extract_stack()[:-1] if not frame.filename.endswith("warnings.py")]
            ours = [frame for frame in stack if "/transinv/" in frame.filename] or stack
            where = (f"{Path(ours[-1].filename).name}:{ours[-1].lineno} (innermost: {Path(stack[-1].filename).name}:"
                     f"{stack[-1].lineno} in {stack[-1].name}; op called from {Path(filename).name}:{lineno})")
            found[where] = found.get(where, 0) + 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        try:
            transinv.measure("resnet18", device="cuda", progress=progress, **{"shift": "0..3", **keywords})
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return found


class HostSync(torch.nn.Module):
    """A small CNN whose forward pass reads a value back to the host (no CUDA graph can hold it)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                            torch.nn.Conv2d(8, 8, 3, stride=2, padding=1))
        self.head = torch.nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.features(x)
        scale = 1.0 if maps.abs().max().item() > 0 else 0.0  # a host sync
        return self.head(maps.mean(dim=(2, 3)) * scale)


if __name__ == "__main__":
    sys.exit(main())
