"""The measuring loop: image batches outside, shifts inside, features reduced as they appear.

For each batch of canvases the reference view (shift 0) runs once and its captured feature maps
stay in memory; every shifted view is then run, compared with them inside the forward hooks,
and reduced to per-image numbers. Memory is one image batch of the chosen layers' maps,
whatever the number of images or shifts.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from typing import Callable, Collection, Iterator, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from . import metrics as M
from ..metric_registry import LAYER_METRICS, METRICS
from ..options import check_task
from .attribution import LieAttribution
from .data import Batch, CanvasDataset, ImageItem, Preprocess, collate
from ..errors import UserError
from .error_maps import ErrorMaps
from .gallery import Gallery
from .graphs import PassGraphs, PassResult
from .layers import FeatureTap, LayerInfo, to_nchw
from .margins import padding_margins
from ..reports.per_image import PerImage
from ..models.outputs import CLASSIFICATION, output_kind
from .shifts import Shift, ShiftPlan, is_fractional

ProgressHook = Callable[[int], None]


@dataclass
class RunState:
    """Counts of a run over one set of images: enough to report at any batch boundary."""

    images: int = 0
    skipped: list[str] = field(default_factory=list)
    partial: bool = False


def resolve_device(device: str, local_rank: int | None = None) -> torch.device:
    """``auto`` picks CUDA, then MPS, then the CPU; under torchrun CUDA means this rank's GPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here (use --device cpu or auto)")
    if device == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: MPS is not available here (use --device cpu or auto)")
    if device not in ("cpu", "cuda", "mps") and not device.startswith("cuda:"):
        raise UserError(f"unknown --device {device!r}: use auto, cpu, cuda or mps")
    if device == "cuda" and local_rank is not None:
        device = f"cuda:{local_rank}"
    resolved = torch.device(device)
    if resolved.type == "cuda" and resolved.index is not None:
        torch.cuda.set_device(resolved)
    return resolved


def metric_keys(
    layers: list[LayerInfo], shifts: Sequence[Shift], labelled: bool, by_correctness: bool = False,
    path: bool = False, pairs: bool = False, random: bool = False, task: str = CLASSIFICATION.name,
    layer_metrics: Collection[str] = LAYER_METRICS,
) -> list[M.Key]:
    """Every (layer, shift, metric) the run can fill, in output order (of the layers, the chosen
    ``layer_metrics`` only). Worst cases need a shift
    besides 0, jaggedness a path of two shifts or more; worst cases over the whole-pixel and the
    fractional shifts come apart when the set holds both kinds. Output and set metrics are those
    of the output kind ``task``; those read from random draws only with ``random``."""
    keys: list[M.Key] = []
    for layer in layers:
        for shift in shifts:
            if layer.aligned(shift):
                keys += [(layer.name, shift, M.EQUIVARIANCE_ERROR), (layer.name, shift, M.EQUIVARIANCE_ERROR_INTERIOR)]
            elif not layer.fixed:
                keys.append((layer.name, shift, M.EQUIVARIANCE_ERROR_RESAMPLED))
            keys += [(layer.name, shift, M.INPLACE_CHANGE), (layer.name, shift, M.POOLED_INVARIANCE_ERROR)]
    keys = [key for key in keys if key[2] in layer_metrics]
    for shift in shifts:
        for spec in METRICS.values():
            if (spec.scope == "output" and not spec.attribution and spec.task == task
                    and (labelled or not spec.needs_labels) and (by_correctness or not spec.by_correctness)):
                keys.append((M.OUTPUT_LAYER, shift, spec.name))
    whole: list[str] = []
    if task != CLASSIFICATION.name:
        sets = [s.name for s in METRICS.values() if s.scope == "set" and s.task == task
                and (s.random_draws and random or not s.random_draws and len(shifts) > 1)]
        return keys + [(M.OUTPUT_LAYER, None, metric) for metric in sets]
    if len(shifts) > 1:
        for agreement, accuracy, _ in worst_case_sets(shifts):
            whole += [agreement, accuracy] if labelled else [agreement]
    if path and len(shifts) > 1:
        whole += [M.JAGGEDNESS, M.PATH_PROB_CHANGE]
    if pairs:
        whole.append(M.CONSISTENCY)
        if by_correctness and labelled:
            whole += [M.CONSISTENCY_IF_CORRECT, M.CONSISTENCY_IF_WRONG]
    if random:
        whole += [M.RANDOM_WORST_CASE_AGREEMENT, M.RANDOM_WORST_CASE_ACCURACY] if labelled else [M.RANDOM_WORST_CASE_AGREEMENT]
    return keys + [(M.OUTPUT_LAYER, None, metric) for metric in whole]


def worst_case_sets(shifts: Sequence[Shift]) -> list[tuple[str, str, list[Shift]]]:
    """The worst cases a shift set gets, as (agreement metric, accuracy metric, shifts covered):
    over the whole set, and, when it holds both kinds, over its whole-pixel shifts and over its
    fractional shifts apart (as Michaeli et al. report them). Shift 0 is in every set."""
    whole = [s for s in shifts if not is_fractional(s)]
    fractional = [s for s in shifts if is_fractional(s)]
    sets = [(M.WORST_CASE_AGREEMENT, M.WORST_CASE_ACCURACY, list(shifts))]
    if fractional and len(whole) > 1:
        sets += [(M.WORST_CASE_AGREEMENT_INTEGER, M.WORST_CASE_ACCURACY_INTEGER, whole),
                 (M.WORST_CASE_AGREEMENT_FRACTIONAL, M.WORST_CASE_ACCURACY_FRACTIONAL, [(0, 0), *fractional])]
    return sets


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# a batch's output metrics are compared this many passes at a time: a few kernels per chunk instead
# of per pass, and memory bounded whatever the number of shifts (grids of 1,923 views)
OUTPUT_CHUNK = 8


def _compiles(device: torch.device, warn: Callable[[str], None]) -> bool:
    """Whether torch.compile works here (``M.check_fused_kernels``); if not, one note that the
    comparisons run eagerly (the same definitions)."""
    try:
        M.check_fused_kernels(device)
    except Exception as exc:  # whatever stops the compiler (missing, broken, too old) means: compare eagerly
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        warn(f"--compile-metrics: torch.compile failed ({reason}); the layers are compared without it")
        return False
    return True


class _LayerComparer:
    """The tap callback: keeps reference maps, or compares the maps of a pass of shifted views.

    A pass may hold several shifts of the same images, stacked shift-major along the batch.
    """

    def __init__(self, layers: list[LayerInfo], shifts: Sequence[Shift], circular: bool,
                 margins: dict[str, tuple[int, int]] | None = None, error_maps: torch.device | None = None,
                 metrics: Collection[str] = LAYER_METRICS, fused: bool = False) -> None:
        """``error_maps``: the device to keep spatial error maps on (None: none kept), one per
        layer and shift that a chosen equivariance metric compares. ``fused``: compare in compiled
        kernels (``M.compare_pass``; they make no error maps)."""
        self.fused = fused
        self.layers = {layer.name: layer for layer in layers}
        self.metrics = frozenset(metrics)
        self.resampled: dict[str, tuple[int, ...]] = {}  # layers compared at fractional feature shifts: their Fourier axes
        for layer in layers:
            ks = [k for k in (self.compared_shift(layer, shift) for shift in shifts) if k is not None and not M.is_whole(k)]
            if ks:
                self.resampled[layer.name] = M.fourier_axes(ks)
        self.circular = circular
        self.margins = margins or {}  # layers without a measured margin get no interior error
        self.error_maps = None if error_maps is None else ErrorMaps(
            [(layer, shift) for layer in layers for shift in shifts if self.compared_shift(layer, shift) is not None],
            error_maps)
        self.reference: dict[str, M.Reference] = {}
        self.shifts: list[Shift] | None = []  # empty: the pass is the reference; None: not measured
        self._plans: dict[tuple[str, tuple[Shift, ...]], _PassPlan] = {}  # per (layer, shifts of a pass)
        self.pending: list[tuple[tuple[M.Key, ...], list[torch.Tensor]]] = []  # this pass's keys and values

    def __call__(self, name: str, feature: torch.Tensor) -> None:
        if self.shifts is None:
            return
        layer = self.layers[name]
        feature = to_nchw(feature, layer)
        reduced = feature.dtype not in (torch.float32, torch.float64)
        if reduced:
            feature = feature.float()  # reduced-precision maps are compared in float32 (a copy)
        if not self.shifts:  # keep a copy: in-place ops later in the forward pass may change it
            self.reference[name] = M.Reference.of(feature if reduced else feature.clone(), self.resampled.get(name),
                                                  self.fused)
            return
        self.compare(layer, self.reference[name], feature, tuple(self.shifts))

    def compare(self, layer: LayerInfo, reference: M.Reference, feature: torch.Tensor, shifts: tuple[Shift, ...]) -> None:
        """Every per-layer metric of a pass of ``shifts`` (stacked shift-major in ``feature``), in a few
        operations per layer whatever the number of shifts; ``collect`` hands them over."""
        plan = self._plans.get((layer.name, shifts))
        if plan is None:
            plan = self._plans[(layer.name, shifts)] = self._plan(layer, shifts, reference)
        spatial = self.error_maps is not None and not layer.fixed
        out = M.compare_pass(reference, feature, plan.groups, spatial, plan.inplace, plan.pooled, self.fused)
        values = [e[..., 0] for e, kept in zip(out.errors, plan.errors) if kept]
        values += [e[..., 1] for e, g in zip(out.errors, plan.groups) if plan.interior and not g.resampled]
        self.pending.append((plan.keys, values + [v for v in (out.inplace, out.pooled) if v is not None]))
        if spatial:
            for group, sums in zip(plan.groups, out.error_sums):
                for i, error_sum in zip(group.positions, sums):
                    self.error_maps.add(layer.name, shifts[i], error_sum)

    def compare_reference(self) -> None:
        """Shift 0 of every layer through the same code as the shifted passes: exactly 0 by construction."""
        for layer in self.layers.values():
            reference = self.reference[layer.name]
            self.compare(layer, reference, reference.maps, (M.REFERENCE,))

    def collect(self) -> tuple[tuple[M.Key, ...], torch.Tensor | None]:
        """The keys and values (one row per key) of every layer compared since the last collect (a
        pass), as one tensor: one concatenation and one copy into the state per pass, not per layer."""
        keys = tuple(key for layer_keys, _ in self.pending for key in layer_keys)
        rows = [row for _, values in self.pending for row in values]
        values = torch.cat(rows) if rows else None
        self.pending = []
        return keys, values

    def compared_shift(self, layer: LayerInfo, shift: Shift) -> tuple[float, float] | None:
        """The feature shift ``layer`` is compared at for ``shift`` (``LayerInfo.compared_shift``),
        None where no chosen metric compares it (a fractional one without the resampled error)."""
        k = layer.compared_shift(shift)
        if k is None:
            return None
        wanted = {M.EQUIVARIANCE_ERROR, M.EQUIVARIANCE_ERROR_INTERIOR} if M.is_whole(k) else {M.EQUIVARIANCE_ERROR_RESAMPLED}
        return k if wanted & self.metrics else None

    def _plan(self, layer: LayerInfo, shifts: tuple[Shift, ...], reference: M.Reference) -> "_PassPlan":
        """The geometry of a layer's pass and its keys, in the order ``compare`` stacks the values:
        errors (whole shifts, then resampled), interior errors, in-place changes, pooled errors,
        each where chosen (``--layer-metrics``).

        Aligned shifts get ``equivariance_error`` (and the interior one where the layer has a
        margin), the others ``equivariance_error_resampled``; a fixed-size map only the first, at shift 0.
        """
        chosen = self.metrics
        margin = None if layer.fixed or M.EQUIVARIANCE_ERROR_INTERIOR not in chosen else self.margins.get(layer.name)
        ks = [self.compared_shift(layer, shift) for shift in shifts]
        h, w = reference.maps.shape[-2:]
        groups = M.pass_geometry(h, w, ks, self.circular, margin, reference.maps.dtype, reference.maps.device,
                                 axes=self.resampled.get(layer.name))
        errors = tuple((M.EQUIVARIANCE_ERROR_RESAMPLED if g.resampled else M.EQUIVARIANCE_ERROR) in chosen for g in groups)
        keys = [(layer.name, shifts[i], M.EQUIVARIANCE_ERROR_RESAMPLED if g.resampled else M.EQUIVARIANCE_ERROR)
                for g, kept in zip(groups, errors) if kept for i in g.positions]
        if margin is not None:
            keys += [(layer.name, shifts[i], M.EQUIVARIANCE_ERROR_INTERIOR)
                     for g in groups if not g.resampled for i in g.positions]
        inplace, pooled = M.INPLACE_CHANGE in chosen, M.POOLED_INVARIANCE_ERROR in chosen
        keys += [(layer.name, shift, metric) for metric, kept in ((M.INPLACE_CHANGE, inplace),
                                                                   (M.POOLED_INVARIANCE_ERROR, pooled))
                 if kept for shift in shifts]
        return _PassPlan(groups, tuple(keys), errors, margin is not None, inplace, pooled)


@dataclass(frozen=True)
class _PassPlan:
    """How one layer compares one pass of shifts: the geometry (``M.pass_geometry``), the keys of
    the values in stacking order, and which values are among them: each group's errors, the
    interior errors, the in-place changes, the pooled errors."""

    groups: tuple[M.ShiftGroup, ...]
    keys: tuple[M.Key, ...]
    errors: tuple[bool, ...]
    interior: bool
    inplace: bool
    pooled: bool


class Measurement:
    """One model measured on one shift plan; ``measure_batch`` adds one image batch to a state.

    Each forward pass holds up to ``views_per_pass`` views: when an image batch is smaller (the
    last one, or few images), several shifts share a pass so every pass stays full.
    """

    def __init__(
        self,
        model: nn.Module,
        plan: ShiftPlan,
        layers: list[LayerInfo],
        labelled: bool,
        device: torch.device,
        views_per_pass: int = 32,
        precision: str = "fp32",
        channels_last: bool = False,
        by_correctness: bool = False,
        path: bool = False,
        seed: int = 0,
        attribution: LieAttribution | None = None,
        per_image: bool = False,
        error_maps: bool = False,
        task: str = CLASSIFICATION.name,
        compile: bool = False,
        compile_metrics: bool = False,
        cuda_graphs: bool = True,
        warn: Callable[[str], None] = lambda _: None,
        layer_metrics: Sequence[str] | None = None,
    ) -> None:
        self.kind = output_kind(task)
        check_task(task, plan.random_shifts, plan.pair_offsets is not None, plan.subpixel is not None)
        self.model, self.plan, self.layers, self.device = model, plan, layers, device
        self.labelled, self.views_per_pass = labelled, views_per_pass
        self.dtype = PRECISIONS[precision]
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.layer_metrics = tuple(layer_metrics or LAYER_METRICS)
        margins = padding_margins(model, layers, plan.size, device) if M.EQUIVARIANCE_ERROR_INTERIOR in self.layer_metrics else {}
        if compile_metrics and error_maps:
            warn("--compile-metrics: not with --error-maps (the compiled kernels make no error maps); "
                 "the layers are compared without it")
        fused = compile_metrics and bool(layers) and not error_maps and _compiles(device, warn)
        self.comparer = _LayerComparer(layers, plan.shifts, plan.mode == "circular", margins,
                                       device if error_maps else None, self.layer_metrics, fused)
        # hooks stay on ``model``'s modules (their names); the passes go through the compiled wrapper
        self.forward_model = _compiled(model, [layer.name for layer in layers]) if compile else model
        self.compiled = compile
        # on a GPU, full batches replay captured passes; error maps are added per shift, outside a pass's
        # graph; a graph keeps its pass's outputs, which for some kinds (dense maps) would be one set per pass
        graphs = cuda_graphs and device.type == "cuda" and not compile and not error_maps and self.kind.graphs
        self.graphs = PassGraphs(warn) if graphs else None
        self.by_correctness, self.path = by_correctness and labelled, path and len(plan.shifts) > 1
        self.seed = seed
        self.per_image = PerImage() if per_image else None  # per-image predictions (--per-image)
        self.keys = metric_keys(layers, plan.shifts, labelled, by_correctness, path, plan.pair_offsets is not None,
                                plan.random_shifts > 0, task, self.layer_metrics) + (attribution.keys if attribution else [])
        self.attribution = attribution
        self.prediction: torch.Tensor | None = None  # the last batch's top-1 classes on the unshifted views
        self.gallery: Gallery | None = None  # the whole set's reference embeddings (output kinds with retrieval)
        self.tap: FeatureTap | None = None  # the hooks of the batch being measured
        self._copy_stream: torch.cuda.Stream | None = None  # a GPU's copies of canvases (``_upload``)

    @property
    def error_maps(self) -> ErrorMaps | None:
        """The spatial error maps the hooks add to (``--error-maps``), else None."""
        return self.comparer.error_maps

    def _forward(self, views: torch.Tensor) -> torch.Tensor:
        """One forward pass of ``views``; within a batch the hooks compare its maps, ``collect`` takes their values."""
        if self.tap is not None:
            self.tap.reset()
        self.comparer.pending = []  # what an interrupted pass left is dropped
        views = views.contiguous(memory_format=self.memory_format)
        if self.dtype == torch.float32:
            return self.kind.extract(self.forward_model(views)).float()
        with torch.autocast(self.device.type, dtype=self.dtype, cache_enabled=False):  # no cache: graphs capture casts
            return self.kind.extract(self.forward_model(views)).float()

    def _pass(self, state: M.MetricState, canvases: torch.Tensor, shifts: list[Shift]) -> torch.Tensor:
        """The model's outputs on the views of ``canvases`` at ``shifts``, stacked shift-major, the
        layers compared in the hooks and their values written to ``state``. ``[(0, 0)]`` is the
        reference pass: the layers' maps are kept, and compared with themselves. With CUDA graphs,
        a full batch's passes are replayed (``PassGraphs``)."""
        reference = shifts == [M.REFERENCE]
        comparer = self.comparer
        comparer.shifts = [] if reference else shifts

        def run() -> PassResult:
            views = [self.plan.view(canvases, shift) for shift in shifts]
            output = self._forward(views[0] if reference else torch.cat(views))
            if reference:
                comparer.compare_reference()
            return PassResult(output, *comparer.collect(), dict(comparer.reference))

        result = run() if self.graphs is None else self.graphs.run((tuple(canvases.shape), tuple(shifts)), run)
        comparer.reference = dict(result.references)  # a replay ran no hooks: the captured maps are the reference
        if result.values is not None:
            state.add_rows(result.keys, result.values)
        return result.output

    def release_graphs(self) -> None:
        """Let go of the captured CUDA graphs and their memory pool (the run is done with this model)."""
        self.graphs = None

    def reference_outputs(self, canvases: torch.Tensor) -> torch.Tensor:
        """The model's outputs on the reference views (shift 0) of ``canvases``, with no layer hooks."""
        return self._forward(self.plan.view(canvases.to(self.device), (0, 0)))

    def _passes(self, images: int) -> list[list[Shift]]:
        """The non-zero shifts grouped so each pass holds about ``views_per_pass`` views."""
        per_pass = max(1, self.views_per_pass // images)
        moved = [shift for shift in self.plan.shifts if shift != (0, 0)]
        return [moved[i : i + per_pass] for i in range(0, len(moved), per_pass)]

    def measure_batch(self, batch: Batch, state: M.MetricState) -> None:
        """All shifts of one image batch into ``state``; hooks and reference maps last only the batch."""
        if self.per_image is not None:
            self.per_image.begin_batch()
        with FeatureTap(self.model, [layer.name for layer in self.layers], self.comparer, self.compiled) as self.tap:
            try:
                self._measure_batch(batch, state)
            finally:
                self.comparer.reference.clear()
                self.tap = None
        if self.per_image is not None:
            self.per_image.end_batch(batch.indices)

    def _upload(self, canvases: torch.Tensor) -> torch.Tensor:
        """The batch's canvases on the device. To a GPU they are copied on a stream of their own, so
        the copy overlaps the passes still queued for the batch before; this batch's work waits for it."""
        if self.device.type != "cuda":
            return canvases.to(self.device, non_blocking=True)
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(self._copy_stream):
            uploaded = canvases.to(self.device, non_blocking=True)
        torch.cuda.current_stream(self.device).wait_stream(self._copy_stream)
        uploaded.record_stream(torch.cuda.current_stream(self.device))  # freed only once the passes read it
        return uploaded

    def _measure_batch(self, batch: Batch, state: M.MetricState) -> None:
        canvases = self._upload(batch.canvases)
        if self.graphs is not None:
            canvases = self.graphs.stage(canvases)
        labels = batch.labels.to(self.device, non_blocking=True)
        comparer = self.comparer
        if self.error_maps is not None:
            self.error_maps.images += len(labels)
        reference = self._pass(state, canvases, [M.REFERENCE])
        if self.kind.compare is not None:
            self._measure_other_kind(canvases, batch.indices, state, reference)
            return
        self.prediction = reference.argmax(dim=1)
        ref_correct = self.prediction == labels
        ref_logits = M.ReferenceLogits.of(reference)  # the reference's softmax terms, once per batch
        predictions: dict[Shift, torch.Tensor] = {}
        path: dict[Shift, torch.Tensor] = {}  # logits, kept only for the path metrics
        passes = self._passes(len(labels))
        shifts, logits = [M.REFERENCE], [reference]
        for start in range(0, max(len(passes), 1), OUTPUT_CHUNK):  # outputs compared OUTPUT_CHUNK passes at a time
            for group in passes[start : start + OUTPUT_CHUNK]:
                shifts += group
                logits.append(self._pass(state, canvases, group))
            shifted = torch.cat(logits).unflatten(0, (len(shifts), -1))  # (shifts, images, classes)
            predictions.update(zip(shifts, self._add_outputs(state, shifts, ref_logits, reference, shifted, labels,
                                                             ref_correct)))
            if self.path:
                path.update(zip(shifts, shifted))
            shifts, logits = [], []
        comparer.shifts = None  # random views (pairs, worst of k) are compared at the output only
        if len(predictions) > 1:
            self._add_worst_cases(state, predictions, labels)
        if self.path:
            self._add_path(state, path)
        if self.plan.pair_offsets is not None:
            self._add_consistency(state, canvases, batch.indices, labels, ref_correct)
        if self.plan.random_shifts:
            self._add_random_worst_case(state, canvases, batch.indices, labels, predictions[(0, 0)])
        if self.attribution is not None:
            self.attribution.add(canvases, state)

    def _measure_other_kind(self, canvases: torch.Tensor, ids: torch.Tensor, state: M.MetricState,
                            reference: torch.Tensor) -> None:
        """The shifted passes of a model whose output is not class logits: its kind's metrics per
        shift, retrieval among the whole set's references (``nn_agreement``), the mean pixel
        agreement over the non-zero shifts (segmentation consistency) and, with random shifts, over
        each image's random draws (Rojas-Gomez et al.'s mASSC)."""
        circular, agreements = self.plan.mode == "circular", []
        for group in [[(0, 0)], *self._passes(len(reference))]:
            outputs = reference if group == [M.REFERENCE] else self._pass(state, canvases, group)
            for shift, shifted in zip(group, outputs.chunk(len(group))):
                for metric, values in self.kind.compare(reference, shifted, shift, circular).items():
                    state.add((M.OUTPUT_LAYER, shift, metric), values)
                    if metric == M.PIXEL_AGREEMENT and shift != (0, 0):
                        agreements.append(values)
                if self.kind.retrieval:
                    if self.gallery is None:
                        raise RuntimeError("nn_agreement needs the set's reference embeddings: build_gallery first")
                    state.add((M.OUTPUT_LAYER, shift, M.NN_AGREEMENT), self.gallery.own_is_nearest(shifted, ids))
        self.comparer.shifts = None
        if agreements:
            state.add((M.OUTPUT_LAYER, None, M.SEGMENTATION_CONSISTENCY), torch.stack(agreements).mean(dim=0))
        if self.plan.random_shifts:
            self._add_random_segmentation(canvases, ids, state, reference)

    def _add_random_segmentation(self, canvases: torch.Tensor, indices: torch.Tensor,
                                 state: M.MetricState, reference: torch.Tensor) -> None:
        """Per image: its pixel agreement at each of its ``random_shifts`` random shifts, averaged
        (each view compared with its own image's reference map at its own shift)."""
        assert self.kind.compare is not None
        draws = self.plan.random_draws(indices, self.seed)
        jobs = [(i, shift) for i, shifts in enumerate(draws) for shift in shifts]
        agreement = torch.empty(len(jobs), dtype=torch.float64, device=reference.device)
        for start, outputs in self._job_outputs(canvases, jobs):
            for j, output in enumerate(outputs, start):
                image, shift = jobs[j]
                compared = self.kind.compare(reference[image : image + 1], output[None], shift,
                                             self.plan.mode == "circular")
                agreement[j] = compared[M.PIXEL_AGREEMENT][0]
        state.add((M.OUTPUT_LAYER, None, M.RANDOM_SEGMENTATION_CONSISTENCY),
                  agreement.reshape(len(draws), self.plan.random_shifts).mean(dim=1))

    def _add_worst_cases(self, state: M.MetricState, predictions: dict[Shift, torch.Tensor], labels: torch.Tensor) -> None:
        """Per image: the same class as unshifted (agreement) or the label (accuracy) at every
        shift of each worst-case set."""
        for agreement, accuracy, shifts in worst_case_sets(list(predictions)):
            stacked = torch.stack([predictions[shift] for shift in shifts])
            state.add((M.OUTPUT_LAYER, None, agreement), (stacked == predictions[(0, 0)]).all(dim=0).double())
            if self.labelled:
                state.add((M.OUTPUT_LAYER, None, accuracy), _where_known(labels, (stacked == labels).all(dim=0)))

    def _add_path(self, state: M.MetricState, logits: dict[Shift, torch.Tensor]) -> None:
        """Along the path (shifts sorted by ``dx + dy``), each step against the step before it: the
        share of steps where the top-1 class changes (jaggedness) and the mean change of the
        probability of the previous step's class (Azulay & Weiss's mean absolute change)."""
        ordered = torch.stack([logits[s] for s in sorted(logits, key=lambda s: s[0] + s[1])])
        steps, images, classes = ordered[1:].shape
        out = M.compare_outputs(ordered[:-1].reshape(-1, classes), ordered[1:].reshape(-1, classes))
        state.add((M.OUTPUT_LAYER, None, M.JAGGEDNESS), (1 - out.agreement).reshape(steps, images).mean(dim=0))
        state.add((M.OUTPUT_LAYER, None, M.PATH_PROB_CHANGE), out.prob_change.reshape(steps, images).mean(dim=0))

    def _job_outputs(self, canvases: torch.Tensor,
                     jobs: Sequence[tuple[int, Shift]]) -> Iterator[tuple[int, torch.Tensor]]:
        """The outputs of the views ``(image index, shift)``, in passes of ``views_per_pass``: each
        pass's outputs with the index of its first job (so a pass's maps are let go before the next)."""
        step = self.views_per_pass
        for i in range(0, len(jobs), step):
            yield i, self._forward(self.plan.views_at(canvases, jobs[i : i + step]))

    def _classes(self, canvases: torch.Tensor, jobs: Sequence[tuple[int, Shift]]) -> torch.Tensor:
        """Top-1 classes of the views ``(image index, shift)``, in passes of ``views_per_pass``."""
        return torch.cat([outputs.argmax(dim=1) for _, outputs in self._job_outputs(canvases, jobs)])

    def _add_consistency(
        self, state: M.MetricState, canvases: torch.Tensor, indices: torch.Tensor,
        labels: torch.Tensor, ref_correct: torch.Tensor,
    ) -> None:
        """Per image: the share of its random pairs of views whose top-1 classes agree."""
        pairs = self.plan.pair_shifts(indices, self.seed)
        jobs = [(i, (dx, dy)) for i, draws in enumerate(pairs.tolist()) for draw in draws for dx, dy in draw]
        classes = self._classes(canvases, jobs).reshape(*pairs.shape[:2], 2)
        consistent = (classes[..., 0] == classes[..., 1]).double().mean(dim=1)
        state.add((M.OUTPUT_LAYER, None, M.CONSISTENCY), consistent)
        for metric, values in self._by_correctness((M.CONSISTENCY_IF_CORRECT, M.CONSISTENCY_IF_WRONG), consistent,
                                                   labels, ref_correct):
            state.add((M.OUTPUT_LAYER, None, metric), values)

    def _add_random_worst_case(
        self, state: M.MetricState, canvases: torch.Tensor, indices: torch.Tensor,
        labels: torch.Tensor, reference: torch.Tensor,
    ) -> None:
        """Per image: the unshifted class (agreement) or the label (accuracy, unshifted included)
        at every one of its ``random_shifts`` random shifts (Engstrom et al.'s worst of k)."""
        draws = self.plan.random_draws(indices, self.seed)
        jobs = [(i, shift) for i, shifts in enumerate(draws) for shift in shifts]
        classes = self._classes(canvases, jobs).reshape(len(draws), self.plan.random_shifts)
        state.add((M.OUTPUT_LAYER, None, M.RANDOM_WORST_CASE_AGREEMENT), (classes == reference[:, None]).all(dim=1).double())
        if self.labelled:
            correct = (classes == labels[:, None]).all(dim=1) & (reference == labels)
            state.add((M.OUTPUT_LAYER, None, M.RANDOM_WORST_CASE_ACCURACY), _where_known(labels, correct))

    def _add_outputs(
        self, state: M.MetricState, shifts: list[Shift], ref_logits: M.ReferenceLogits, reference: torch.Tensor,
        shifted: torch.Tensor, labels: torch.Tensor, ref_correct: torch.Tensor,
    ) -> torch.Tensor:
        """Add the output metrics of several shifts at once (``shifted``: their logits ``(shifts,
        images, classes)``; ``reference``: the unshifted logits, ``ref_logits`` their softmax terms),
        in a few kernels and one copy into the state; return the predicted classes ``(shifts, images)``."""
        out = M.compare_outputs(ref_logits, shifted)
        values = [(M.TOP1_AGREEMENT, out.agreement), (M.KL_DIVERGENCE, out.kl), (M.PROB_CHANGE, out.prob_change)]
        if self.labelled:
            values.append((M.ACCURACY, _where_known(labels, out.prediction == labels)))
        values += self._by_correctness((M.TOP1_AGREEMENT_IF_CORRECT, M.TOP1_AGREEMENT_IF_WRONG), out.agreement,
                                       labels, ref_correct)
        state.add_rows(tuple((M.OUTPUT_LAYER, shift, metric) for metric, _ in values for shift in shifts),
                       torch.cat([rows for _, rows in values]))
        if self.per_image is not None:
            for shift, views in zip(shifts, shifted):
                self.per_image.add(shift, reference, views)
        return out.prediction

    def _by_correctness(
        self, metrics: tuple[str, str], values: torch.Tensor, labels: torch.Tensor, ref_correct: torch.Tensor,
    ) -> list[tuple[str, torch.Tensor]]:
        """With ``--by-correctness``: ``values`` (per image, last axis) again, split by whether the
        unshifted prediction of each labelled image was right (first metric) or wrong (second); else none."""
        if not self.by_correctness:
            return []
        known = labels >= 0
        return [(metric, torch.where(group, values, float("nan")))
                for metric, group in zip(metrics, (known & ref_correct, known & ~ref_correct))]


_HOOKED_WHEN_COMPILED: dict[type, frozenset[str]] = {}  # model class -> the layers hooked when it was last compiled


def _compiled(model: nn.Module, hooked: list[str]) -> nn.Module:
    """``torch.compile(model)`` for passes whose hooks sit on the ``hooked`` layers. Torch neither
    guards compiled code on a module's hooks nor compiles per instance (the code of a class's
    forward serves every instance shaped alike, each run's copy of the model too), so a model of the
    same class compiled earlier in the process with other layers hooked (none, for output metrics)
    would skip the new hooks: the compiled code is then dropped (``torch._dynamo.reset``;
    everything recompiles on first use)."""
    import torch._dynamo  # imported on first use only: it is slow to import

    before = _HOOKED_WHEN_COMPILED.get(type(model))
    if before is not None and before != frozenset(hooked):
        torch._dynamo.reset()
    _HOOKED_WHEN_COMPILED[type(model)] = frozenset(hooked)
    return torch.compile(model)


def run_batches(
    measurements: list[Measurement], states: list[M.MetricState], batches: Iterator[Batch], run: RunState,
    progress: ProgressHook | None = None, after_batch: Callable[[Batch], None] | None = None,
) -> None:
    """Measure every batch with each measurement (all on the same decoded images).

    A batch's per-image values are reduced into the states only once every measurement has
    finished it, so Ctrl-C leaves whole batches in every state and marks the run partial.
    ``after_batch`` sees each batch once every measurement has measured it (their ``prediction``).
    """
    heap = _Heap()
    try:
        with torch.inference_mode():
            for batch in batches:
                run.skipped.extend(batch.skipped)
                if len(batch.indices):
                    weights = _to_device(M.bootstrap_weights(batch.indices), measurements[0].device)
                    for measurement, state in zip(measurements, states):
                        state.begin_batch(weights)
                        measurement.measure_batch(batch, state)
                    for state in states:  # only now: an interruption above leaves no half batch
                        state.flush()
                    if after_batch is not None:
                        after_batch(batch)
                    for measurement in measurements:  # per-image rows count when the states do
                        if measurement.per_image is not None:
                            measurement.per_image.commit()
                    run.images += len(batch.indices)
                    heap.release()
                if progress is not None:
                    progress(len(batch.indices) + len(batch.skipped))
    except KeyboardInterrupt:
        run.partial = True


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` (on the host) on ``device``; to a GPU through page-locked memory, so the copy is
    queued behind the GPU's work instead of waiting for all of it (as a copy from pageable memory does)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


class _Heap:
    """glibc's malloc, to hand freed feature maps back to the system after each batch."""

    def __init__(self) -> None:
        try:
            self.trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc: nothing to do
            self.trim = None

    def release(self) -> None:
        """Return the heap's free memory to the system, so fragmentation cannot grow the peak
        batch after batch (glibc keeps freed blocks of a few MiB in its heap)."""
        if self.trim is not None:
            self.trim(0)


def _where_known(labels: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """1/0 per labelled image, NaN (not counted) where the label is unknown."""
    return torch.where(labels >= 0, correct.double(), float("nan"))


def make_loader(
    items: list[ImageItem], pre: Preprocess, canvas: int, batch_size: int, workers: int, ids: Sequence[int] | None = None,
    pin: bool = False,
) -> DataLoader:
    """Batches of decoded canvases, in order, decoded in ``workers`` processes (``ids``: see
    CanvasDataset); ``pin``: in page-locked memory, for an asynchronous copy to a GPU."""
    if batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if workers < 0:
        raise UserError("--workers must be 0 or more")
    return DataLoader(
        CanvasDataset(items, pre, canvas, ids),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin,
        persistent_workers=False,
    )

