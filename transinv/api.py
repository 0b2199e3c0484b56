"""The library entry points a notebook or the CLI calls: ``measure`` and ``list_layers``."""

from __future__ import annotations

import functools
import sys
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Iterator, Sequence

import pandas as pd
import torch
from torch import nn

from . import distributed
from . import metrics as M
from .data import Batch, ImageItem, Preprocess, find_images, select_images
from .errors import UserError
from .fixes import apply_variant, parse_variant, recalibrate_batchnorm
from .fixes.report import CollapseCheck
from .layers import LayerInfo, Probe, probe_layers, select_layers
from .models import LoadedModel, default_preprocess, load_model
from .results import Result, born_at, make_rows
from .runner import PRECISIONS, Measurement, RunState, make_loader, resolve_device, run_batches
from .shifts import ShiftPlan, check_mode, check_shifts, make_shifts, parse_pair_offsets, parse_shift_values

Warn = Callable[[str], None]


def _stderr_warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


@dataclass(frozen=True)
class Overrides:
    """User overrides of the weights' preprocessing (``None`` keeps the weights' own value)."""

    size: int | None = None
    resize: int | None = None
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None

    def check(self) -> None:
        """Reject impossible values before any model is built."""
        for name, value in (("mean", self.mean), ("std", self.std)):
            if value is not None and len(value) != 3:
                raise UserError(f"--{name} takes three numbers (R,G,B), got {len(value)}")
        if self.std is not None and any(v <= 0 for v in self.std):
            raise UserError("--std values must be positive")
        for name, value in (("size", self.size), ("resize", self.resize)):
            if value is not None and value < 1:
                raise UserError(f"--{name} must be a positive number of pixels")

    def apply(self, pre: Preprocess) -> Preprocess:
        self.check()
        size = self.size or pre.size
        resize = self.resize or (max(pre.resize, size) if self.size else pre.resize)
        return replace(
            pre,
            size=size,
            resize=resize,
            mean=tuple(self.mean) if self.mean is not None else pre.mean,
            std=tuple(self.std) if self.std is not None else pre.std,
        )


def prepare_model(
    model: str | nn.Module, weights: str = "DEFAULT", seed: int = 0, overrides: Overrides = Overrides()
) -> LoadedModel:
    """Load a model spec (or wrap a module from a notebook) and settle its preprocessing."""
    if isinstance(model, nn.Module):
        loaded = LoadedModel(type(model).__name__, "given", model.eval(), default_preprocess())
    else:
        loaded = load_model(model, weights, seed)
    return replace(loaded, preprocess=overrides.apply(loaded.preprocess))


def list_layers(
    model: str | nn.Module,
    weights: str = "none",
    size: int | None = None,
    seed: int = 0,
    device: str = "cpu",
) -> pd.DataFrame:
    """The measurable layers in forward order: name, output shape, cumulative stride, default."""
    loaded = prepare_model(model, weights, seed, Overrides(size=size))
    dev = resolve_device(device)
    probe = probe_layers(loaded.module.to(dev), loaded.preprocess.size, dev)
    return pd.DataFrame(
        [
            {
                "layer": layer.name,
                "shape": f"{layer.channels}x{layer.height}x{layer.width}",
                "stride": layer.stride[1] if layer.stride[0] == layer.stride[1] else f"{layer.stride[0]}x{layer.stride[1]}",
                "channels_last": layer.channels_last,
                "default": layer.default,
            }
            for layer in probe.layers
        ],
        columns=["layer", "shape", "stride", "channels_last", "default"],
    )


def _explain_probe(loaded: LoadedModel, probe: Probe, layer_spec: str, warn: Warn) -> None:
    if loaded.scripted and layer_spec != "none":
        warn(f"{loaded.name} is TorchScript, which takes no forward hooks: measuring output metrics only")
    elif probe.token_layers and layer_spec != "none":
        warn(
            f"{loaded.name}: {len(probe.token_layers)} layers output token sequences with no spatial map "
            f"(e.g. {probe.token_layers[0]}); measuring output metrics and the 4-D maps only"
        )


@dataclass
class _Job:
    """One (model, variant) to measure, with its rows' identity and its metric state."""

    loaded: LoadedModel
    variant: str
    layers: list[LayerInfo]
    measurement: Measurement
    state: M.MetricState


def variant_specs(variants: Sequence[str] | str | None, antialias: str | None, aps: bool, padding: str | None) -> list[str]:
    """The variants to measure: ``--variants`` (default ``base``), each with the fix flags added."""
    names = [v.strip() for v in (variants.split(",") if isinstance(variants, str) else variants or ["base"]) if v.strip()]
    extra = [part for part in (antialias, "aps" if aps else None, f"padding:{padding}" if padding else None) if part]
    specs = []
    for name in names or ["base"]:
        parts = [p for p in name.split("+") if p != "base"] + [p for p in extra if p not in name.split("+")]
        spec = "+".join(parts) or "base"
        parse_variant(spec)
        specs.append(spec)
    return list(dict.fromkeys(specs))


def _collapse_checks(jobs: list[_Job], device: torch.device) -> list[tuple[_Job, _Job, CollapseCheck]]:
    """Each variant measured beside its base model, paired with it for ``CollapseCheck`` (not for
    random weights: they have learned nothing a fix could wreck)."""
    bases = {id(job.loaded): job for job in jobs if job.variant == "base" and job.loaded.weights.lower() != "none"}
    return [(bases[id(job.loaded)], job, CollapseCheck(f"{job.variant} of {job.loaded.name}", device))
            for job in jobs if job.variant != "base" and id(job.loaded) in bases]


def _compare_with_base(pairs: list[tuple[_Job, _Job, CollapseCheck]], batch: Batch) -> None:
    for base, job, check in pairs:
        check.add(base.measurement.prediction, job.measurement.prediction, batch.labels.to(check.counts.device))


def _unshifted_views(
    items: list[ImageItem], pre: Preprocess, plan: ShiftPlan, batch_size: int, workers: int, device: torch.device
) -> Iterator[torch.Tensor]:
    """The reference views (shift 0) of ``items``, batch by batch, on ``device``."""
    for batch in make_loader(items, pre, plan.canvas, batch_size, workers):
        yield plan.view(batch.canvases.to(device), (0, 0))


def measure(
    model: str | nn.Module | Sequence[str | nn.Module] = "resnet18",
    *,
    weights: str = "DEFAULT",
    data: Sequence[str] | str | None = None,
    shift: str = "0..16",
    direction: str = "x",
    mode: str = "crop",
    fill: float = 0.0,
    subpixel: str | None = None,
    consistency: str | None = None,
    layers: str = "default",
    variants: Sequence[str] | str | None = None,
    antialias: str | None = None,
    aps: bool = False,
    padding: str | None = None,
    fix_layers: Sequence[str] | str | None = None,
    recalibrate_bn: bool = False,
    size: int | None = None,
    resize: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    num_images: int | None = None,
    batch_size: int = 32,
    seed: int = 0,
    workers: int = 0,
    device: str = "cpu",
    precision: str = "fp32",
    channels_last: bool = False,
    by_correctness: bool = False,
    progress: Callable[[int, int], Callable[[int], None]] | None = None,
    warn: Warn = _stderr_warn,
) -> Result:
    """Measure how models' layers and outputs respond to shifting their input images.

    ``model`` is one model or several (a list); ``variants`` (e.g. ``"base,blurpool,aps"``) and the
    fix flags transform each (see ``transinv.fixes``; ``fix_layers``: glob patterns of the strided
    layers BlurPool and APS may change; ``recalibrate_bn``: re-estimate each variant's batch-norm
    statistics on the measured images). All are measured on the same images and
    shifts. Returns a ``Result`` whose ``rows`` are tidy (one row per model, variant, layer, shift
    and metric); the README defines every metric. Under torchrun, each process measures its share
    of the images and every process returns the combined result. ``progress(total, start)`` may
    return a per-batch callback that receives the number of images just finished.
    """
    specs = [model] if isinstance(model, (str, nn.Module)) else list(model)
    if not specs:
        raise UserError("name at least one model")
    shifts = make_shifts(parse_shift_values(shift), direction)
    overrides = Overrides(size, resize, mean, std)
    overrides.check()
    check_mode(mode)
    if precision not in PRECISIONS:
        raise UserError(f"unknown --precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    chosen_variants = variant_specs(variants, antialias, aps, padding)
    globs = fix_layers.split(",") if isinstance(fix_layers, str) else fix_layers or []
    fix_globs = [g.strip() for g in globs if g.strip()]
    pairs = parse_pair_offsets(consistency) if consistency else None
    context = distributed.from_env()
    dev = resolve_device(device, context.local_rank if context.active else None)
    distributed.init(context, dev)
    all_items = select_images(find_images(data), num_images, seed)
    labelled = any(item.label >= 0 for item in all_items)
    items, ids = context.shard(all_items), context.shard(range(len(all_items)))
    groups: dict[tuple[Preprocess, ShiftPlan], list[_Job]] = {}
    explained: set[str] = set()  # one note per model, not one per variant
    for spec in specs:
        loaded = prepare_model(spec, weights, seed, overrides)
        pre = loaded.preprocess
        plan = ShiftPlan(tuple(shifts), pre.size, mode, fill, subpixel, pairs)
        check_shifts(plan.extent, pre.size, mode, pre.resize, subpixel)
        for variant in chosen_variants:
            module = loaded.module if variant == "base" else apply_variant(
                loaded.module, variant, fix_globs, pre.size, warn, loaded.name
            )
            module = module.to(dev).eval()
            if recalibrate_bn and variant != "base":
                views = _unshifted_views(all_items, pre, plan, batch_size, workers, dev)
                count = recalibrate_batchnorm(module, views)
                warn(f"re-estimated {count} batch norms of {loaded.name} [{variant}] on {len(all_items)} images")
            probe = probe_layers(module, pre.size, dev)
            if loaded.name not in explained:
                explained.add(loaded.name)
                _explain_probe(loaded, probe, layers, warn)
            chosen = select_layers(probe, layers)
            job = Measurement(module, plan, chosen, labelled, dev, batch_size, precision, channels_last,
                              by_correctness, path=direction != "grid", seed=seed)
            groups.setdefault((pre, plan), []).append(
                _Job(loaded, variant, chosen, job, M.MetricState(job.keys, dev))
            )
    run = RunState()
    advance = progress(len(items) * len(groups), 0) if progress is not None and context.is_main else None
    checks = {key: _collapse_checks(jobs, dev) for key, jobs in groups.items()}
    for (pre, plan), jobs in groups.items():
        loader = make_loader(items, pre, plan.canvas, batch_size, workers, ids)
        group_run = RunState()
        compare = functools.partial(_compare_with_base, checks[(pre, plan)])
        run_batches([j.measurement for j in jobs], [j.state for j in jobs], iter(loader), group_run, advance, compare)
        run.images = group_run.images
        run.skipped = group_run.skipped
        run.partial = run.partial or group_run.partial
        if run.partial:
            break
    for message in run.skipped:
        warn(f"skipped unreadable image {message}")
    for check in (check for pairs in checks.values() for _, _, check in pairs):
        context.sum(check.counts)
        if (message := check.message()) is not None:
            warn(message)
    counts = context.sum(torch.tensor([run.images, len(run.skipped), int(run.partial)], dtype=torch.float64, device=dev))
    for jobs in groups.values():
        for job in jobs:
            for tensor in job.state.tensors():
                context.sum(tensor)
    images, skipped, partial = (int(v) for v in counts.tolist())
    if images == 0 and not partial:
        raise UserError("no readable images: every file was skipped (see the warnings above)")
    settings = {
        "models": [spec if isinstance(spec, str) else type(spec).__name__ for spec in specs],
        "weights": weights,
        "variants": chosen_variants,
        "fix_layers": fix_globs,
        "recalibrate_bn": recalibrate_bn,
        "data": [str(d) for d in ([data] if isinstance(data, str) else (data or ["builtin"]))],
        "shift": shift,
        "direction": direction,
        "mode": mode,
        "fill": fill,
        "subpixel": subpixel,
        "consistency": consistency,
        "layers": layers,
        "num_images": num_images,
        "batch_size": batch_size,
        "seed": seed,
        "workers": workers,
        "device": str(dev),
        "precision": precision,
        "channels_last": channels_last,
        "by_correctness": by_correctness,
        "processes": context.world,
        "preprocess": {
            job.loaded.name: {**asdict(pre), "interpolation": str(pre.interpolation.value)}
            for (pre, _), jobs in groups.items() for job in jobs
        },
    }
    records = [row for jobs in groups.values() for job in jobs for row in _records(job, mode, partial > 0)]
    rows = make_rows(records)
    summary = {"images": images, "skipped": skipped, "partial": partial > 0, "born_at": born_at(rows)}
    return Result(rows=rows, settings=settings, summary=summary)


def _records(job: _Job, mode: str, partial: bool) -> list[dict[str, Any]]:
    """The job's state as row dicts, with model, variant, stride and alignment filled in."""
    by_name = {layer.name: layer for layer in job.layers}
    records = []
    for row in job.state.rows():
        layer = by_name.get(row["layer"])
        shift = (row["shift_x"], row["shift_y"])
        records.append(
            {
                "model": job.loaded.name,
                "variant": job.variant,
                "weights": job.loaded.weights,
                "mode": mode,
                "stride": None if layer is None else layer.stride[1],
                "aligned": None if layer is None else layer.aligned(shift),
                "partial": partial,
                **row,
            }
        )
    return records
