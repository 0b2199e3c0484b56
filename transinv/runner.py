"""The measuring loop: image batches outside, shifts inside, features reduced as they appear.

For each batch of canvases the reference view (shift 0) runs once and its captured feature maps
stay in memory; every shifted view is then run, compared with them inside the forward hooks,
and reduced to per-image numbers. Memory is one image batch of the chosen layers' maps,
whatever the number of images or shifts.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from . import metrics as M
from .data import Batch, CanvasDataset, ImageItem, Preprocess, collate
from .errors import UserError
from .layers import FeatureTap, LayerInfo, to_nchw
from .shifts import Shift, ShiftPlan

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
    path: bool = False, pairs: bool = False,
) -> list[M.Key]:
    """Every (layer, shift, metric) the run can fill, in output order."""
    keys: list[M.Key] = []
    for layer in layers:
        for shift in shifts:
            if layer.aligned(shift):
                keys.append((layer.name, shift, M.EQUIVARIANCE_ERROR))
            keys.append((layer.name, shift, M.POOLED_INVARIANCE_ERROR))
    for shift in shifts:
        for metric in M.OUTPUT_METRICS:
            if metric != M.ACCURACY or labelled:
                keys.append((M.OUTPUT_LAYER, shift, metric))
        if by_correctness and labelled:
            keys += [(M.OUTPUT_LAYER, shift, M.TOP1_AGREEMENT_IF_CORRECT), (M.OUTPUT_LAYER, shift, M.TOP1_AGREEMENT_IF_WRONG)]
    keys.append((M.OUTPUT_LAYER, None, M.WORST_CASE_AGREEMENT))
    if labelled:
        keys.append((M.OUTPUT_LAYER, None, M.WORST_CASE_ACCURACY))
    if path and len(shifts) > 1:
        keys.append((M.OUTPUT_LAYER, None, M.JAGGEDNESS))
    if pairs:
        keys.append((M.OUTPUT_LAYER, None, M.CONSISTENCY))
        if by_correctness and labelled:
            keys += [(M.OUTPUT_LAYER, None, M.CONSISTENCY_IF_CORRECT), (M.OUTPUT_LAYER, None, M.CONSISTENCY_IF_WRONG)]
    return keys


def _logits(output: object) -> torch.Tensor:
    """The logits tensor of a model's output (tensors, tuples and torchvision's named outputs)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(getattr(output, "logits", None), torch.Tensor):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise UserError(f"the model returned {type(output).__name__}; transinv needs logits of shape (N, classes)")


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class _LayerComparer:
    """The tap callback: keeps reference maps, or compares the maps of a pass of shifted views.

    A pass may hold several shifts of the same images, stacked shift-major along the batch.
    """

    def __init__(self, layers: list[LayerInfo], circular: bool) -> None:
        self.layers = {layer.name: layer for layer in layers}
        self.circular = circular
        self.reference: dict[str, M.Reference] = {}
        self.shifts: list[Shift] | None = []  # empty: the pass is the reference; None: not measured
        self.state: M.MetricState | None = None

    def __call__(self, name: str, feature: torch.Tensor) -> None:
        if self.shifts is None:
            return
        layer = self.layers[name]
        feature = to_nchw(feature, layer)
        reduced = feature.dtype not in (torch.float32, torch.float64)
        if reduced:
            feature = feature.float()  # reduced-precision maps are compared in float32 (a copy)
        if not self.shifts:  # keep a copy: in-place ops later in the forward pass may change it
            self.reference[name] = M.Reference.of(feature if reduced else feature.clone())
            return
        for shift, part in zip(self.shifts, feature.chunk(len(self.shifts))):
            self.compare(layer, self.reference[name], part, shift)

    def compare(self, layer: LayerInfo, reference: M.Reference, feature: torch.Tensor, shift: Shift) -> None:
        assert self.state is not None
        if layer.aligned(shift):
            error = M.equivariance_error(reference, feature, layer.feature_shift(shift), self.circular)
            self.state.add((layer.name, shift, M.EQUIVARIANCE_ERROR), error)
        self.state.add((layer.name, shift, M.POOLED_INVARIANCE_ERROR), M.pooled_invariance_error(reference, feature))


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
    ) -> None:
        self.model, self.plan, self.layers, self.device = model, plan, layers, device
        self.labelled, self.views_per_pass = labelled, views_per_pass
        self.dtype = PRECISIONS[precision]
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.comparer = _LayerComparer(layers, circular=plan.mode == "circular")
        self.by_correctness, self.path = by_correctness and labelled, path and len(plan.shifts) > 1
        self.seed = seed
        self.keys = metric_keys(layers, plan.shifts, labelled, by_correctness, path, plan.pair_offsets is not None)
        self.prediction: torch.Tensor | None = None  # the last batch's top-1 classes on the unshifted views

    def _forward(self, tap: FeatureTap, views: torch.Tensor) -> torch.Tensor:
        tap.reset()
        views = views.contiguous(memory_format=self.memory_format)
        if self.dtype == torch.float32:
            return _logits(self.model(views)).float()
        with torch.autocast(self.device.type, dtype=self.dtype):
            return _logits(self.model(views)).float()

    def _passes(self, images: int) -> list[list[Shift]]:
        """The non-zero shifts grouped so each pass holds about ``views_per_pass`` views."""
        per_pass = max(1, self.views_per_pass // images)
        moved = [shift for shift in self.plan.shifts if shift != (0, 0)]
        return [moved[i : i + per_pass] for i in range(0, len(moved), per_pass)]

    def measure_batch(self, batch: Batch, state: M.MetricState) -> None:
        """All shifts of one image batch into ``state``; hooks and reference maps last only the batch."""
        with FeatureTap(self.model, [layer.name for layer in self.layers], self.comparer) as tap:
            try:
                self._measure_batch(tap, batch, state)
            finally:
                self.comparer.reference.clear()

    def _measure_batch(self, tap: FeatureTap, batch: Batch, state: M.MetricState) -> None:
        canvases = batch.canvases.to(self.device, non_blocking=True)
        labels = batch.labels.to(self.device)
        comparer = self.comparer
        comparer.state, comparer.shifts = state, []
        reference = self._forward(tap, self.plan.view(canvases, (0, 0)))
        for layer in self.layers:  # shift 0 through the same code: exactly 0 by construction
            ref = comparer.reference[layer.name]
            comparer.compare(layer, ref, ref.maps, (0, 0))
        self.prediction = reference.argmax(dim=1)
        ref_correct = self.prediction == labels
        predictions = {(0, 0): self._add_outputs(state, (0, 0), reference, reference, labels, ref_correct)}
        for group in self._passes(len(labels)):
            comparer.shifts = group
            logits = self._forward(tap, torch.cat([self.plan.view(canvases, shift) for shift in group]))
            for shift, shifted in zip(group, logits.chunk(len(group))):
                predictions[shift] = self._add_outputs(state, shift, reference, shifted, labels, ref_correct)
        stacked = torch.stack(list(predictions.values()))
        state.add((M.OUTPUT_LAYER, None, M.WORST_CASE_AGREEMENT), (stacked == stacked[0]).all(dim=0).double())
        if self.plan.pair_offsets is not None:
            comparer.shifts = None  # the random pairs are compared at the output only
            first, second = self.plan.pair_views(canvases, batch.indices, self.seed)
            both = self._forward(tap, torch.cat([first, second])).argmax(dim=1)
            consistent = both.chunk(2)[0].eq(both.chunk(2)[1]).double()
            state.add((M.OUTPUT_LAYER, None, M.CONSISTENCY), consistent)
            self._add_by_correctness(state, None, (M.CONSISTENCY_IF_CORRECT, M.CONSISTENCY_IF_WRONG),
                                     consistent, labels, ref_correct)
        if self.labelled:
            correct_everywhere = (stacked == labels).all(dim=0)
            state.add((M.OUTPUT_LAYER, None, M.WORST_CASE_ACCURACY), _where_known(labels, correct_everywhere))
        if self.path:  # the share of consecutive steps along the path where the top-1 class changes
            ordered = torch.stack([predictions[s] for s in sorted(predictions, key=lambda s: s[0] + s[1])])
            state.add((M.OUTPUT_LAYER, None, M.JAGGEDNESS), (ordered[1:] != ordered[:-1]).double().mean(dim=0))

    def _add_outputs(
        self, state: M.MetricState, shift: Shift, reference: torch.Tensor, shifted: torch.Tensor,
        labels: torch.Tensor, ref_correct: torch.Tensor,
    ) -> torch.Tensor:
        """Add one shift's output metrics; return the shifted view's predicted classes."""
        out = M.compare_outputs(reference, shifted)
        state.add((M.OUTPUT_LAYER, shift, M.TOP1_AGREEMENT), out.agreement)
        state.add((M.OUTPUT_LAYER, shift, M.KL_DIVERGENCE), out.kl)
        state.add((M.OUTPUT_LAYER, shift, M.PROB_CHANGE), out.prob_change)
        if self.labelled:
            state.add((M.OUTPUT_LAYER, shift, M.ACCURACY), _where_known(labels, out.prediction == labels))
        self._add_by_correctness(state, shift, (M.TOP1_AGREEMENT_IF_CORRECT, M.TOP1_AGREEMENT_IF_WRONG),
                                 out.agreement, labels, ref_correct)
        return out.prediction

    def _add_by_correctness(
        self, state: M.MetricState, shift: Shift | None, metrics: tuple[str, str], values: torch.Tensor,
        labels: torch.Tensor, ref_correct: torch.Tensor,
    ) -> None:
        """With ``--by-correctness``: ``values`` again, split by whether the unshifted prediction
        of each labelled image was right (first metric) or wrong (second)."""
        if not self.by_correctness:
            return
        known = labels >= 0
        for metric, group in zip(metrics, (known & ref_correct, known & ~ref_correct)):
            state.add((M.OUTPUT_LAYER, shift, metric), torch.where(group, values, float("nan")))


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
                    weights = M.bootstrap_weights(batch.indices)
                    for measurement, state in zip(measurements, states):
                        state.begin_batch(weights)
                        measurement.measure_batch(batch, state)
                    for state in states:  # only now: an interruption above leaves no half batch
                        state.flush()
                    if after_batch is not None:
                        after_batch(batch)
                    run.images += len(batch.indices)
                    heap.release()
                if progress is not None:
                    progress(len(batch.indices) + len(batch.skipped))
    except KeyboardInterrupt:
        run.partial = True


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
    items: list[ImageItem], pre: Preprocess, canvas: int, batch_size: int, workers: int, ids: Sequence[int] | None = None
) -> DataLoader:
    """Batches of decoded canvases, in order, decoded in ``workers`` processes (``ids``: see CanvasDataset)."""
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
        persistent_workers=False,
    )

