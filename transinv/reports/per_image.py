"""Per-image answers (``--per-image FILE``): each image's top-1 class and probability at the
reference view and at every shift, one CSV row per (model, variant, image, shift).

The runner hands each shift's logits to ``PerImage.add`` (kept on the device), moves a finished
batch to the host in one copy (``end_batch``) and keeps it once the batch counts (``commit``,
after the metric states are flushed), so the rows hold exactly the images the metrics hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import pandas as pd
import torch

from ..engine.data import ImageItem, class_names
from ..engine.distributed import Context
from .results import whole_or_float, write_atomic

if TYPE_CHECKING:
    from ..plan import Job, Plan

Shift = tuple[int, int]

COLUMNS = [
    "model", "variant", "image", "label", "label_name", "shift_x", "shift_y",
    "reference_class", "reference_class_name", "reference_prob",
    "shifted_class", "shifted_class_name", "shifted_prob", "prob_of_reference_class_shifted", "flipped",
    "mode", "size", "resize",
]
_ORDER = ["_job", "_image", "_shift"]  # sort keys: job order, image position in the run, shift order


def top1(reference: torch.Tensor, shifted: torch.Tensor) -> torch.Tensor:
    """Per image ``(N, 5)`` float64: the reference class and its probability, the shifted class and
    its probability, and the shifted view's probability of the reference class. Classes are the
    logits' argmax, as ``top1_agreement`` takes them."""
    p = torch.softmax(reference.double(), dim=1)
    q = torch.softmax(shifted.double(), dim=1)
    ref_class, shifted_class = reference.argmax(dim=1), shifted.argmax(dim=1)
    columns = [ref_class.double(), p.gather(1, ref_class[:, None])[:, 0], shifted_class.double(),
               q.gather(1, shifted_class[:, None])[:, 0], q.gather(1, ref_class[:, None])[:, 0]]
    return torch.stack(columns, dim=1)


@dataclass
class PerImage:
    """One measurement's per-image predictions, batch by batch: ``(image ids, shifts, values)``
    with ``values`` a ``(shifts, images, 5)`` array of ``top1`` columns; ``classes`` the logits' width."""

    batches: list[tuple[list[int], list[Shift], np.ndarray]] = field(default_factory=list)
    classes: int = 0
    _pending: list[tuple[Shift, torch.Tensor]] = field(default_factory=list)
    _finished: tuple[list[int], list[Shift], np.ndarray] | None = None

    def begin_batch(self) -> None:
        """Drop what an interrupted batch left."""
        self._pending, self._finished = [], None

    def add(self, shift: Shift, reference: torch.Tensor, shifted: torch.Tensor) -> None:
        self.classes = reference.shape[1]
        self._pending.append((shift, top1(reference, shifted)))

    def end_batch(self, image_ids: torch.Tensor) -> None:
        """The batch's values to the host, in one copy."""
        if self._pending:
            values = torch.stack([v for _, v in self._pending]).cpu().numpy()
            self._finished = (image_ids.tolist(), [s for s, _ in self._pending], values)
        self._pending = []

    def commit(self) -> None:
        """Keep the finished batch (called once the batch counts in the metric states)."""
        if self._finished is not None:
            self.batches.append(self._finished)
        self._finished = None


def job_frame(position: int, job: Job, per_image: PerImage, items: dict[int, ImageItem], mode: str) -> pd.DataFrame:
    """One job's rows (with the sort keys of ``_ORDER``)."""
    names = class_names(per_image.classes)
    pre = job.model.preprocess
    records: list[dict[str, Any]] = []
    for ids, shifts, values in per_image.batches:
        for s, shift in enumerate(shifts):
            for i, image in enumerate(ids):
                ref_class, ref_prob, cls, prob, prob_ref = values[s, i]
                item = items[image]
                records.append({
                    "model": job.label, "variant": job.variant, "image": str(item.path), "label": item.label,
                    "label_name": item.label_name, "shift_x": shift[0], "shift_y": shift[1],
                    "reference_class": int(ref_class), "reference_class_name": names[int(ref_class)],
                    "reference_prob": ref_prob, "shifted_class": int(cls), "shifted_class_name": names[int(cls)],
                    "shifted_prob": prob, "prob_of_reference_class_shifted": prob_ref,
                    "flipped": int(cls) != int(ref_class), "mode": mode, "size": pre.size, "resize": pre.resize,
                    "_job": position, "_image": image, "_shift": s,
                })
    return pd.DataFrame.from_records(records, columns=COLUMNS + _ORDER)


def write(path: str, jobs: Sequence[tuple[Job, PerImage]], plan: Plan, mode: str, context: Context) -> pd.DataFrame:
    """Gather every process's rows and write them (rank 0) atomically as CSV; every rank returns
    the combined frame, in job, image and shift order."""
    items = dict(zip(plan.ids, plan.items))
    frames = [job_frame(i, job, per_image, items, mode) for i, (job, per_image) in enumerate(jobs)]
    mine = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS + _ORDER)
    everything = pd.concat(context.gather(mine), ignore_index=True)
    frame = everything.sort_values(_ORDER, kind="stable").drop(columns=_ORDER).reset_index(drop=True)
    for column in ("shift_x", "shift_y"):
        frame[column] = whole_or_float(frame[column])
    frame["flipped"] = frame["flipped"].astype(bool)
    if context.is_main:
        write_atomic(path, frame.to_csv(index=False))
    return frame
