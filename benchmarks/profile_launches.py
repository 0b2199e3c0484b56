"""Count the operator calls (each a kernel launch on a GPU) that measuring adds to the forward passes.

    python benchmarks/profile_launches.py [--model resnet18] [--images 8] [--shift 0..8] [--label after] [--by-function]

On the CPU, ``torch.profiler`` records every ATen operator one image batch runs, once through
``Measurement.measure_batch`` (hooks, comparisons, output metrics, the state's flush) and once as the
bare forward passes of the same views. Operators that compute and call no other operator that does
(views, reshapes and empty allocations launch nothing) are what a GPU launches; operators that read a
value back to the host (``item``, ``nonzero``, ...) are host syncs. The figures per forward pass go
under ``--label`` in benchmarks/launches.json, so a change can be recorded before and after;
``--by-function`` splits the added launches by the metric function they come from (any version of
the code: run it with that version on ``PYTHONPATH``).
"""

from __future__ import annotations

import argparse
import functools
import json
from collections import Counter
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from transinv.engine import metrics as M
from transinv.api import prepare_jobs
from transinv.engine.distributed import Context
from transinv.options import MeasureOptions
from transinv.plan import make_plan
from transinv.engine.runner import make_loader

ROOT = Path(__file__).resolve().parent.parent
NO_LAUNCH = {
    "aten::view", "aten::_unsafe_view", "aten::reshape", "aten::slice", "aten::select", "aten::as_strided",
    "aten::chunk", "aten::split", "aten::narrow", "aten::unsqueeze", "aten::squeeze", "aten::expand",
    "aten::permute", "aten::transpose", "aten::t", "aten::flatten", "aten::detach", "aten::alias",
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::unbind", "aten::lift_fresh",
    "aten::resolve_conj", "aten::resolve_neg", "aten::view_as", "aten::contiguous", "aten::unflatten",
    "aten::to", "aten::scalar_tensor",  # a leaf "to" converts nothing; a CPU scalar for where() launches nothing
    "aten::result_type", "aten::resize_", "aten::as_strided_",  # a dtype, an allocation, metadata
}
COUNTER = 2  # 1 (labels before, after, merged): leaves only, bmm missed and result_type counted
OPAQUE = {"aten::scalar_tensor"}  # launches nothing, whatever it calls on the CPU (it fills a CPU scalar)
SYNCS = {"aten::item", "aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero", "aten::equal"}


TRACED = ("compare_pass", "compare_shift", "equivariance_error", "inplace_change", "pooled_invariance_error",
          "compare_outputs", "fourier_shift", "Reference.of", "ReferenceLogits.of", "MetricState.add",
          "MetricState.add_rows", "MetricState.flush")  # metric code whose launches --by-function splits out
RANGE = "metric::"


@contextmanager
def as_on_a_gpu() -> Iterator[None]:
    """Roll whole shifts by one index gather, as the comparisons do on a GPU (on the CPU they use
    block copies, four per shift), so the counts are a GPU's launches."""
    original = M.pass_geometry
    M.pass_geometry = functools.partial(original, gather=True)
    try:
        yield
    finally:
        M.pass_geometry = original


@contextmanager
def traced_metrics() -> Iterator[None]:
    """Wrap the ``TRACED`` functions of ``transinv.engine.metrics`` (those this version has) in
    profiler ranges named after them, so each launch can be charged to the innermost one."""
    saved = []
    for name in TRACED:
        owner_name, _, attr = name.rpartition(".")
        owner = getattr(M, owner_name) if owner_name else M
        raw = owner.__dict__.get(attr) if owner_name else getattr(owner, attr, None)
        if raw is None:
            continue
        function = raw.__func__ if isinstance(raw, classmethod) else raw

        def traced(*args, _function=function, _name=name, **kwargs):
            with record_function(RANGE + _name):
                return _function(*args, **kwargs)

        saved.append((owner, attr, raw))
        setattr(owner, attr, classmethod(traced) if isinstance(raw, classmethod) else traced)
    try:
        yield
    finally:
        for owner, attr, raw in saved:
            setattr(owner, attr, raw)


def leaf_ops(run, scopes: Counter | None = None) -> Counter:
    """The operators that run a kernel while ``run()`` runs: each operator counts once unless an
    operator it calls counts (so ``bmm``, whose only call is a no-op ``resolve_conj``, counts).
    ``scopes`` (if given) gets the count per innermost ``traced_metrics`` range."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    found: Counter = Counter()

    def count(event) -> bool:
        if event.name in OPAQUE:
            return False
        inner = [count(child) for child in event.cpu_children if child.name.startswith("aten::")]
        if any(inner):
            return True
        if event.name in NO_LAUNCH:
            return False
        found[event.name] += 1
        if scopes is not None:
            scope = event.cpu_parent
            while scope is not None and not scope.name.startswith(RANGE):
                scope = scope.cpu_parent
            scopes[scope.name[len(RANGE):] if scope is not None else "other"] += 1
        return True

    for event in prof.events():
        if event.name.startswith("aten::") and (event.cpu_parent is None or not event.cpu_parent.name.startswith("aten::")):
            count(event)
    return found


def launches(ops: Counter) -> int:
    return sum(n for name, n in ops.items() if name not in NO_LAUNCH)


def profile_model(model: str, layers: str, args: argparse.Namespace) -> dict[str, object]:
    """Operator counts of one batch of ``args.images`` images at every shift of ``args.shift``."""
    options = MeasureOptions(weights="none", size=args.size, resize=args.size + 32, shift=args.shift, layers=layers,
                             batch_size=args.images, num_images=args.images).validate()
    plan = make_plan([model], options, Context())
    measured = prepare_jobs(plan, options, torch.device("cpu"), lambda _: None)[0][0]
    group = plan.groups[0]
    batch = next(iter(make_loader(plan.items, group.shifts.decoding(group.preprocess), group.shifts.canvas,
                                  args.images, 0, plan.ids)))
    measurement, state = measured.measurement, measured.state
    weights = M.bootstrap_weights(batch.indices)

    def measure() -> None:
        state.begin_batch(weights)
        measurement.measure_batch(batch, state)
        state.flush()

    shifts = group.shifts.shifts
    passes = [[(0, 0)], *measurement._passes(len(batch.indices))]
    views = [torch.cat([group.shifts.view(batch.canvases, s) for s in shifts_]) for shifts_ in passes]

    def bare() -> None:
        for v in views:
            measurement.model(v)

    scopes: Counter = Counter()
    with torch.inference_mode(), as_on_a_gpu(), traced_metrics() if args.by_function else nullcontext():
        measure()  # warm-up
        total, model_only = leaf_ops(measure, scopes), leaf_ops(bare)
    added = total - model_only
    scopes["other"] -= launches(model_only)  # what is left: hooks, views, output metrics
    split = {"by_function_per_pass": {k: v / len(passes) for k, v in scopes.most_common()}} if args.by_function else {}
    return {
        "model": model, "layers": layers, "measured_layers": len(measured.layers), "shifts": len(shifts),
        "images": len(batch.indices), "passes": len(passes),
        "launches_per_pass": launches(total) / len(passes),
        "bare_launches_per_pass": launches(model_only) / len(passes),
        "added_launches_per_pass": launches(added) / len(passes),
        "host_syncs_per_batch": sum(n for name, n in added.items() if name in SYNCS),
        "top_added_ops": dict(Counter({k: v for k, v in added.items() if k not in NO_LAUNCH}).most_common(8)),
        **split,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="default: resnet18 and mobilenet_v3_small")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--shift", default="0..8")
    parser.add_argument("--label", default="current")
    parser.add_argument("--by-function", action="store_true",
                        help="also split the added launches by the metric function that made them")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "launches.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [profile_model(model, layers, args) for model in args.model or ["resnet18", "mobilenet_v3_small"]
            for layers in ("none", "default")]
    out = Path(args.out)
    report = json.loads(out.read_text()) if out.exists() else {}
    report[args.label] = {"settings": {"images": args.images, "size": args.size, "shift": args.shift,
                                       "torch": torch.__version__, "counter": COUNTER}, "rows": rows}
    out.write_text(json.dumps(report, indent=2) + "\n")
    for row in rows:
        print(f"{row['model']:>20} layers={row['layers']:<8} passes={row['passes']} "
              f"launches/pass {row['launches_per_pass']:.0f} (bare {row['bare_launches_per_pass']:.0f}, "
              f"added {row['added_launches_per_pass']:.0f}) host syncs/batch {row['host_syncs_per_batch']}")
        for name, n in row.get("by_function_per_pass", {}).items():
            print(f"{'':>22}{name:<28} {n:7.1f} per pass")


if __name__ == "__main__":
    main()
