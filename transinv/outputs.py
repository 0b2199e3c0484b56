"""What a model's output is, and how the tensor the output metrics read is taken from it.

One kind today, ``classification``: class logits of shape (N, classes), read by top-1 agreement,
KL divergence, probability change and accuracy. Another kind (embeddings, dense maps) is one more
``register_output_kind`` with its extractor; a model source says which kind its models give
(``LoadedModel.output``). Light to import (no torch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from .errors import UserError, did_you_mean

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class OutputKind:
    """One kind of model output: its name, what it is, and how to take its tensor from a forward pass."""

    name: str
    description: str
    extract: Callable[[object], torch.Tensor]


def class_logits(output: object) -> torch.Tensor:
    """The logits of a classifier's output (a tensor, ``.logits``, or a tuple's first tensor), shape (N, classes)."""
    import torch

    if isinstance(output, torch.Tensor):
        logits = output
    elif isinstance(getattr(output, "logits", None), torch.Tensor):
        logits = output.logits
    elif isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        logits = output[0]
    else:
        raise UserError(f"the model returned {type(output).__name__}; transinv needs logits of shape (N, classes)")
    if logits.ndim != 2:
        raise UserError(f"the model returned a tensor of shape {tuple(logits.shape)}; transinv needs logits of shape (N, classes)")
    return logits


CLASSIFICATION = OutputKind("classification", "class logits (N, classes)", class_logits)

_KINDS: dict[str, OutputKind] = {}


def register_output_kind(kind: OutputKind) -> None:
    """Add an output kind; models whose source names it are measured through its extractor."""
    if kind.name in _KINDS:
        raise ValueError(f"output kind {kind.name!r} is already registered")
    _KINDS[kind.name] = kind


def output_kinds() -> list[str]:
    """The registered output kinds' names."""
    return list(_KINDS)


def output_kind(name: str) -> OutputKind:
    """The output kind called ``name``; an unknown name is one line with "did you mean"."""
    if name not in _KINDS:
        raise UserError(f"unknown output kind {name!r}{did_you_mean(name, list(_KINDS))}: use one of {', '.join(_KINDS)}")
    return _KINDS[name]


register_output_kind(CLASSIFICATION)
