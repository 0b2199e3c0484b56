"""The measuring loop: image batches outside, shifts inside, features reduced as they appear.

For each batch of canvases the reference view (shift 0) runs once and its captured feature maps
stay in memory; every shifted view is then run, compared with them inside the forward hooks,
and reduced to per-image numbers. Memory is one image batch of the chosen layers' maps,
whatever the number of images or shifts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

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
    """What a run has accumulated so far: enough to write rows at any batch boundary."""

    state: M.MetricState
    images: int = 0
    skipped: list[str] = field(default_factory=list)
    partial: bool = False


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA, then MPS, then the CPU."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here (use --device cpu or auto)")
    if device == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: MPS is not available here (use --device cpu or auto)")
    if device not in ("cpu", "cuda", "mps") and not device.startswith("cuda:"):
        raise UserError(f"unknown --device {device!r}: use auto, cpu, cuda or mps")
    return torch.device(device)


def metric_keys(layers: list[LayerInfo], shifts: list[Shift], labelled: bool) -> list[M.Key]:
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
    if labelled:
        keys.append((M.OUTPUT_LAYER, None, M.WORST_CASE_ACCURACY))
    return keys


def _logits(output: object) -> torch.Tensor:
    """The logits tensor of a model's output (tensors, tuples and torchvision's named outputs)."""
    if isinstance(output, torch.Tensor):
        return output
    for attr in ("logits",):
        if hasattr(output, attr):
            return getattr(output, attr)
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise UserError(f"the model returned {type(output).__name__}; transinv needs logits of shape (N, classes)")


class _LayerComparer:
    """The tap callback: keeps reference maps, or compares a shifted view's maps with them."""

    def __init__(self, layers: list[LayerInfo], circular: bool) -> None:
        self.layers = {layer.name: layer for layer in layers}
        self.circular = circular
        self.reference: dict[str, torch.Tensor] = {}
        self.shift: Shift | None = None
        self.state: M.MetricState | None = None

    def __call__(self, name: str, feature: torch.Tensor) -> None:
        layer = self.layers[name]
        feature = to_nchw(feature, layer)
        if self.shift is None:
            self.reference[name] = feature.clone()  # in-place ops may change it after the hook
        else:
            self.compare(layer, self.reference[name], feature, self.shift)

    def compare(self, layer: LayerInfo, reference: torch.Tensor, feature: torch.Tensor, shift: Shift) -> None:
        assert self.state is not None
        if layer.aligned(shift):
            error = M.equivariance_error(reference, feature, layer.feature_shift(shift), self.circular)
            self.state.add((layer.name, shift, M.EQUIVARIANCE_ERROR), error)
        self.state.add((layer.name, shift, M.POOLED_INVARIANCE_ERROR), M.pooled_invariance_error(reference, feature))


class Measurement:
    """One model measured on one shift plan; ``run`` consumes batches and fills a ``RunState``."""

    def __init__(
        self,
        model: nn.Module,
        plan: ShiftPlan,
        layers: list[LayerInfo],
        labelled: bool,
        device: torch.device,
    ) -> None:
        self.model, self.plan, self.layers, self.device = model, plan, layers, device
        self.labelled = labelled
        self.comparer = _LayerComparer(layers, circular=plan.mode == "circular")
        self.keys = metric_keys(layers, plan.shifts, labelled)

    def _forward(self, tap: FeatureTap, views: torch.Tensor) -> torch.Tensor:
        tap.reset()
        return _logits(self.model(views))

    def measure_batch(self, tap: FeatureTap, batch: Batch, state: M.MetricState) -> None:
        """All shifts of one image batch; the reference maps are dropped at the end."""
        canvases = batch.canvases.to(self.device, non_blocking=True)
        labels = batch.labels.to(self.device)
        comparer = self.comparer
        comparer.state, comparer.shift = state, None
        reference = self._forward(tap, self.plan.view(canvases, (0, 0)))
        correct_everywhere = torch.ones_like(labels, dtype=torch.bool)
        for shift in self.plan.shifts:
            if shift == (0, 0):
                logits = reference
                for layer in self.layers:
                    ref = comparer.reference[layer.name]
                    comparer.compare(layer, ref, ref, shift)
            else:
                comparer.shift = shift
                logits = self._forward(tap, self.plan.view(canvases, shift))
            out = M.compare_outputs(reference, logits)
            state.add((M.OUTPUT_LAYER, shift, M.TOP1_AGREEMENT), out.agreement)
            state.add((M.OUTPUT_LAYER, shift, M.KL_DIVERGENCE), out.kl)
            state.add((M.OUTPUT_LAYER, shift, M.PROB_CHANGE), out.prob_change)
            if self.labelled:
                correct = out.prediction == labels
                known = labels >= 0
                state.add((M.OUTPUT_LAYER, shift, M.ACCURACY), torch.where(known, correct.double(), float("nan")))
                correct_everywhere &= correct
        if self.labelled:
            known = labels >= 0
            state.add(
                (M.OUTPUT_LAYER, None, M.WORST_CASE_ACCURACY),
                torch.where(known, correct_everywhere.double(), float("nan")),
            )
        comparer.reference.clear()

    def run(self, batches: Iterator[Batch], run: RunState, progress: ProgressHook | None = None) -> RunState:
        """Consume batches into ``run``; Ctrl-C keeps every finished batch and marks the run partial."""
        with FeatureTap(self.model, [layer.name for layer in self.layers], self.comparer) as tap:
            try:
                with torch.inference_mode():
                    for batch in batches:
                        run.skipped.extend(batch.skipped)
                        if len(batch.indices):
                            batch_state = run.state.empty_like()
                            self.measure_batch(tap, batch, batch_state)
                            run.state.merge(batch_state)
                            run.images += len(batch.indices)
                        if progress is not None:
                            progress(len(batch.indices) + len(batch.skipped))
            except KeyboardInterrupt:
                run.partial = True
        return run


def make_loader(items: list[ImageItem], pre: Preprocess, canvas: int, batch_size: int, workers: int) -> DataLoader:
    """Batches of decoded canvases, in order, decoded in ``workers`` processes."""
    if batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if workers < 0:
        raise UserError("--workers must be 0 or more")
    return DataLoader(
        CanvasDataset(items, pre, canvas),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        persistent_workers=False,
    )

