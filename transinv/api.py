"""The library entry points a notebook or the CLI calls: ``measure`` and ``list_layers``.

``measure`` reads as the run does: options -> plan -> jobs -> run -> merge -> rows.
"""

from __future__ import annotations

import sys
from contextlib import closing
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from .engine import distributed
from .engine import metrics as M
from .engine.attribution import LieAttribution, velocities
from .reports import per_image
from .engine.error_maps import save_error_maps
from .engine.gallery import Gallery
from .errors import UserError
from .engine.data import Batch
from .fixes import apply_variant, recalibrate_batchnorm
from .fixes.report import CollapseCheck
from .engine.layers import LayerInfo, Probe, probe_layers, select_layers
from .options import MeasureOptions, option_names
from .models.outputs import detect
from .plan import Group, Job, ModelSpec, Plan, make_plan, prepare_model
from .engine.prefetch import core_to_spare, prefetched
from .progress import ConsoleProgress, ProgressStart
from .reports.results import Result, born_at, born_at_lie, interval_warnings, job_records, make_rows
from .engine.runner import Measurement, RunState, make_loader, resolve_device, run_batches

Warn = Callable[[str], None]


def _stderr_warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def list_layers(
    model: ModelSpec, weights: str = "none", size: int | None = None, seed: int = 0, device: str = "cpu",
) -> pd.DataFrame:
    """The measurable layers in forward order: name, output shape, cumulative stride, default
    selection, and whether the layer is on the main path (not a parallel branch)."""
    options = MeasureOptions(weights=weights, size=size, seed=seed, device=device).validate()
    loaded = prepare_model(model, options)
    dev = resolve_device(device)
    probe = probe_layers(loaded.module.to(dev), loaded.preprocess.size, dev, loaded.set_size)
    return pd.DataFrame(
        [
            {
                "layer": layer.name,
                "shape": f"{layer.channels}x{layer.height}x{layer.width}",
                "stride": layer.stride[1] if layer.stride[0] == layer.stride[1] else f"{layer.stride[0]}x{layer.stride[1]}",
                "channels_last": layer.channels_last,
                "default": layer.default,
                "main_path": layer.main,
            }
            for layer in probe.layers
        ],
        columns=["layer", "shape", "stride", "channels_last", "default", "main_path"],
    )


@dataclass
class Measured:
    """A job made runnable: its transformed module, chosen layers, measurement and metric state."""

    job: Job
    layers: list[LayerInfo]
    measurement: Measurement
    state: M.MetricState


@dataclass
class Collapse:
    """A variant paired with its base model, to warn when the fix wrecks a trained model."""

    base: Measured
    variant: Measured
    check: CollapseCheck

    def add(self, batch: Batch) -> None:
        if self.base.measurement.prediction is None or self.variant.measurement.prediction is None:
            return  # embeddings and dense maps have no top-1 class to compare
        labels = batch.labels.to(self.check.counts.device, non_blocking=True)  # pinned on a GPU
        self.check.add(self.base.measurement.prediction, self.variant.measurement.prediction, labels)


def collapse_checks(measured: list[Measured], device: torch.device) -> list[Collapse]:
    """Each variant measured beside its base model (not for random weights: they have learned
    nothing a fix could wreck)."""
    bases = {m.job.label: m for m in measured if m.job.variant == "base" and m.job.model.weights.lower() != "none"}
    return [Collapse(bases[m.job.label], m, CollapseCheck(f"{m.job.variant} of {m.job.label}", device))
            for m in measured if m.job.variant != "base" and m.job.label in bases]


def _unshifted_views(plan: Plan, group: Group, options: MeasureOptions, device: torch.device) -> Iterator[torch.Tensor]:
    """The reference views (shift 0) of every image of the run (all processes see all of them, so
    recalibrated models stay identical across ranks), batch by batch, on ``device``."""
    loader = make_loader(plan.images, group.shifts.decoding(group.preprocess), group.shifts.canvas,
                         options.batch_size, options.workers)
    for batch in loader:
        yield group.shifts.view(batch.canvases.to(device), (0, 0))


def _explain_probe(job: Job, probe: Probe, layers: list[LayerInfo], layer_spec: str, warn: Warn) -> None:
    """The notes a user needs about what is measured: the model's own, and the probe's about hooks,
    unmapped token sequences, dropped tokens (only when a token layer is measured) and the main path."""
    for note in job.model.notes:
        warn(note)
    if not job.model.hooks and layer_spec != "none":
        warn(f"{job.label} ({job.model.source}) takes no forward hooks: measuring output metrics only")
    elif probe.token_layers and layer_spec != "none":
        warn(
            f"{job.label}: {len(probe.token_layers)} layers output token sequences with no spatial map "
            f"(e.g. {probe.token_layers[0]}); measuring output metrics and the 4-D maps only"
        )
    if probe.token_note and any(layer.tokens is not None for layer in layers):
        warn(f"{job.label}: {probe.token_note}")
    if probe.path_note and layer_spec != "none":
        warn(f"{job.label}: {probe.path_note}")


def prepare_jobs(plan: Plan, options: MeasureOptions, device: torch.device, warn: Warn) -> list[list[Measured]]:
    """Per group: each job's variant module on the device, probed, its layers chosen."""
    explained: set[str] = set()  # one note per model, not one per variant
    out = []
    for group in plan.groups:
        if (note := group.shifts.wrap_note()) is not None:
            warn(note)
        measured = []
        for job in group.jobs:
            module = job.model.module if job.variant == "base" else apply_variant(
                job.model.module, job.variant, options.fix_globs(), group.preprocess.size, warn, job.label)
            module = module.to(device).eval()
            if options.recalibrate_bn and job.variant != "base":
                count = recalibrate_batchnorm(module, _unshifted_views(plan, group, options, device))
                warn(f"re-estimated {count} batch norms of {job.label} [{job.variant}] on {len(plan.images)} images")
            probe = probe_layers(module, group.preprocess.size, device, job.model.set_size)
            layers = select_layers(probe, options.layers)
            if job.label not in explained:
                explained.add(job.label)
                _explain_probe(job, probe, layers, options.layers, warn)
            task = options.task or detect(probe.output, job.model.output)
            if options.attribution == "lie" and task != "classification":
                raise UserError(f"attribution lie: {job.label} is a {task} model; the attribution reads class probabilities")
            lie = (LieAttribution(module, group.shifts, velocities(options.direction), probe.layers, device, job.label)
                   if options.attribution == "lie" else None)
            measurement = Measurement(
                module, group.shifts, layers, plan.labelled, device, options.batch_size, options.precision,
                options.channels_last, options.by_correctness, path=options.direction != "grid", seed=options.seed,
                task=task,
                attribution=lie,
                per_image=options.per_image is not None,
                error_maps=options.error_maps is not None,
                compile=options.compile,
                compile_metrics=options.compile_metrics,
                cuda_graphs=options.cuda_graphs,
                layer_metrics=options.layer_metrics,
                warn=warn,
            )
            rows_layers = layers + (lie.layers if lie is not None else [])  # strides of the attributed leaves
            measured.append(Measured(job, rows_layers, measurement, M.MetricState(measurement.keys, device)))
        out.append(measured)
    return out


def _batches(loader: DataLoader, options: MeasureOptions, device: torch.device) -> closing[Iterator[Batch]]:
    """The loader's batches, decoded ahead in a background thread (``--prefetch``, by default where
    a core is free for it) unless workers decode them."""
    ahead = options.prefetch if options.prefetch is not None else core_to_spare(device)
    return closing(prefetched(loader) if ahead and not options.workers else (b for b in loader))


def _build_galleries(measured: list[Measured], loader: DataLoader, options: MeasureOptions,
                     context: distributed.Context) -> None:
    """Models whose outputs are retrieved among the whole set (embeddings' ``nn_agreement``): every
    image's reference output, one pass over the images before the shifted ones, on all processes."""
    retrieving = [m.measurement for m in measured if m.measurement.kind.retrieval]
    if not retrieving:
        return
    ids: list[torch.Tensor] = [torch.zeros(0, dtype=torch.long)]
    outputs: list[list[torch.Tensor]] = [[] for _ in retrieving]
    with torch.inference_mode(), _batches(loader, options, retrieving[0].device) as batches:
        for batch in batches:
            if len(batch.indices):
                ids.append(batch.indices)
                for kept, measurement in zip(outputs, retrieving):
                    kept.append(measurement.reference_outputs(batch.canvases).double().cpu())
    for kept, measurement in zip(outputs, retrieving):
        vectors = torch.cat(kept) if kept else torch.zeros(0, 1, dtype=torch.float64)
        measurement.gallery = Gallery.gather(torch.cat(ids), vectors, context, measurement.device)


def run_plan(plan: Plan, groups: list[list[Measured]], options: MeasureOptions, progress: ProgressStart | None,
             collapses: list[list[Collapse]], context: distributed.Context) -> RunState:
    """Every group over this process's images; stops at the first interrupted group."""
    run = RunState()
    advance = progress(len(plan.items) * len(plan.groups), 0) if progress is not None else None
    for group, measured, pairs in zip(plan.groups, groups, collapses):
        loader = make_loader(plan.items, group.shifts.decoding(group.preprocess), group.shifts.canvas,
                             options.batch_size, options.workers, plan.ids,
                             pin=any(m.measurement.device.type == "cuda" for m in measured))
        group_run = RunState()
        try:
            _build_galleries(measured, loader, options, context)
        except KeyboardInterrupt:  # nothing measured yet in this group
            run.partial = True
            break

        def after_batch(batch: Batch, pairs: list[Collapse] = pairs) -> None:
            for pair in pairs:
                pair.add(batch)

        with _batches(loader, options, measured[0].measurement.device) as batches:
            run_batches([m.measurement for m in measured], [m.state for m in measured], batches, group_run, advance,
                        after_batch)
        for m in measured:  # the group is done: its CUDA graphs' memory goes back before the next group's
            m.measurement.graphs = None
        run.images, run.skipped = group_run.images, group_run.skipped
        run.partial = run.partial or group_run.partial
        if run.partial:
            break
    return run


def merge(context: distributed.Context, run: RunState, groups: list[list[Measured]], device: torch.device) -> dict[str, Any]:
    """Add counts and metric states across processes (identity outside torchrun)."""
    counts = context.sum(torch.tensor([run.images, len(run.skipped), int(run.partial)], dtype=torch.float64, device=device))
    for measured in groups:
        for m in measured:
            for tensor in m.state.tensors():
                context.sum(tensor)
            for tensor in m.measurement.error_maps.tensors() if m.measurement.error_maps is not None else []:
                context.sum(tensor)
    images, skipped, partial = (int(v) for v in counts.tolist())
    return {"images": images, "skipped": skipped, "partial": partial > 0}


def _options(options: MeasureOptions | None, keywords: dict[str, Any]) -> MeasureOptions:
    """The options object, with notebook keywords applied (an unknown keyword names the closest option)."""
    base = options if options is not None else MeasureOptions()
    if not keywords:
        return base
    MeasureOptions.from_mapping(keywords, source="measure()")  # strict: unknown names fail here
    return base.updated(**keywords)


def measure(
    model: ModelSpec | Sequence[ModelSpec] = "resnet18",
    options: MeasureOptions | None = None,
    *,
    progress: bool | ProgressStart | None = None,
    warn: Warn = _stderr_warn,
    **keywords: Any,
) -> Result:
    """Measure how models' layers and outputs respond to shifting their input images.

    ``model``: one model or several (names, specs or ``nn.Module``s, which are never changed).
    Options come as a ``MeasureOptions`` or as keywords (``shift="0..8"``, ``variants="base,aps"``;
    see ``transinv.options`` or the README's flag table). All models and variants are measured on
    the same images and shifts. Returns a ``Result`` with tidy rows (one per model, variant, layer,
    shift and metric). Under torchrun each process measures its share of the images and every
    process returns the combined result. ``progress``: True for a bar on stderr, or a callable
    ``progress(total, done)`` returning a per-batch callback that receives the images finished.
    """
    opts = _options(options, keywords).validate()
    specs = [model] if isinstance(model, (str, nn.Module)) else list(model)
    context = distributed.from_env()
    device = resolve_device(opts.device, context.local_rank if context.active else None)
    with distributed.session(context, device):
        plan = make_plan(specs, opts, context)
        groups = prepare_jobs(plan, opts, device, warn)
        collapses = [collapse_checks(measured, device) for measured in groups]
        bar = ConsoleProgress() if progress is True and context.is_main else None
        try:
            run = run_plan(plan, groups, opts, bar or (progress if callable(progress) and context.is_main else None),
                           collapses, context)
        finally:
            if bar is not None:
                bar.close()
        for message in run.skipped:
            warn(f"skipped unreadable image {message}")
        summary = merge(context, run, groups, device)
        for pair in (pair for pairs in collapses for pair in pairs):
            context.sum(pair.check.counts)
            if context.is_main and (message := pair.check.message()) is not None:
                warn(message)
        if opts.per_image is not None:  # a collective under torchrun; rank 0 writes every rank's rows
            per_image.write(opts.per_image, [(m.job, m.measurement.per_image) for measured in groups for m in measured],
                            plan, opts.mode, context)
    if summary["images"] == 0 and not summary["partial"]:
        raise UserError("no readable images: every file was skipped (see the warnings above)")
    states = [m for measured in groups for m in measured]
    if opts.error_maps is not None and context.is_main:
        save_error_maps(opts.error_maps, [(m.job.label, m.job.variant, m.measurement.error_maps) for m in states
                                          if m.measurement.error_maps is not None])
    records = job_records([(m.job, m.layers, m.state) for m in states], opts, summary["partial"])
    rows = make_rows(records)
    main = {(m.job.label, m.job.variant): [layer.name for layer in m.layers if layer.main] for m in states}
    summary["born_at"] = born_at(rows, main)
    if opts.attribution == "lie":
        summary["born_at_lie"] = born_at_lie(rows)
    summary["interval_warnings"] = interval_warnings(records, warn if context.is_main else None)
    replicates = np.concatenate([m.state.replicate_means().numpy() for m in states])
    comparing = [m.measurement for m in states if m.measurement.layers]  # those that compare layers at all
    compiled = bool(comparing) and all(measurement.comparer.fused for measurement in comparing)
    return Result(rows=rows, settings=_settings(plan, opts, specs, device, context, compiled), summary=summary,
                  replicates=replicates)


def _settings(plan: Plan, options: MeasureOptions, specs: list[ModelSpec], device: torch.device,
              context: distributed.Context, metrics_compiled: bool) -> dict[str, Any]:
    """Everything that decided the numbers, as recorded in result files; ``metrics_compiled``: whether
    every measured model's layers were compared in the compiled kernels (``compile_metrics`` asks;
    this says what ran)."""
    return {
        "models": [spec if isinstance(spec, str) else type(spec).__name__ for spec in specs],
        "labels": list(dict.fromkeys(job.label for job in plan.jobs)),
        **options.settings(),
        "metrics_compiled": metrics_compiled,
        "variants": options.variant_specs(),
        "data": list(options.data or ["builtin"]),
        "device": str(device),
        "processes": context.world,
        "per_model": {job.label: {"weights": job.model.weights, "preprocess": job.model.preprocess.describe(),
                                  "parameters": sum(p.numel() for p in job.model.module.parameters())}
                      for job in plan.jobs},
    }


__all__ = ["measure", "list_layers", "MeasureOptions", "option_names"]
