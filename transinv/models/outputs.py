"""What a model's output is, how the tensor the output metrics read is taken from it, and how a
shifted view's output is compared with the unshifted one.

Three kinds: ``classification`` (class logits (N, classes): top-1 agreement, KL divergence,
probability change, accuracy and the whole-set metrics, computed by the runner), ``embedding``
(a vector per image (N, D): cosine distance, relative L2 change, nearest-neighbour agreement) and
``segmentation`` (per-pixel class scores (N, K, H, W) at the input's resolution: pixel agreement
and pixel KL on the region present in both views). A model source says which kind its models give
(``LoadedModel.output``); ``--task`` overrides it. Light to import (torch only inside functions).
Nearest-neighbour retrieval over the whole set (``nn_agreement``) lives in ``engine/gallery.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

from ..errors import UserError, did_you_mean

if TYPE_CHECKING:
    import torch

Shift = tuple[int, int]
# (reference outputs, shifted outputs, input shift (dx, dy), circular) -> per-image values by metric name
Compare = Callable[["torch.Tensor", "torch.Tensor", Shift, bool], dict[str, "torch.Tensor"]]


@dataclass(frozen=True)
class OutputKind:
    """One kind of model output: its name, what it is, how to take its tensor from a forward pass,
    and (all kinds but classification, whose metrics the runner computes with labels) how one
    shift's outputs are compared: per-image values of the output metrics it names."""

    name: str
    description: str
    extract: Callable[[object], torch.Tensor]
    compare: Optional[Compare] = None
    metrics: tuple[str, ...] = ()  # the output-scope metrics ``compare`` fills
    retrieval: bool = False  # shifted outputs are also retrieved among the set's references (nn_agreement)
    graphs: bool = True  # passes may be kept as CUDA graphs (each keeps its outputs: not for dense maps)


def _first_tensor(output: object) -> torch.Tensor | None:
    """A tensor, ``.logits``, a dict's ``out`` (torchvision segmentation), or a tuple's first tensor."""
    import torch

    if isinstance(output, torch.Tensor):
        return output
    for value in (getattr(output, "logits", None), output.get("out") if isinstance(output, dict) else None):
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def _extractor(dims: int, what: str) -> Callable[[object], torch.Tensor]:
    def extract(output: object) -> torch.Tensor:
        tensor = _first_tensor(output)
        if tensor is None:
            raise UserError(f"the model returned {type(output).__name__}; transinv needs {what}")
        if tensor.ndim != dims:
            raise UserError(f"the model returned a tensor of shape {tuple(tensor.shape)}; transinv needs {what}")
        return tensor

    extract.__doc__ = f"The model output's tensor of {what}."
    return extract


class_logits = _extractor(2, "logits of shape (N, classes)")
embeddings = _extractor(2, "embeddings of shape (N, D)")
class_maps = _extractor(4, "class scores of shape (N, K, H, W)")


def compare_embeddings(reference: torch.Tensor, shifted: torch.Tensor, _shift: Shift, _circular: bool) -> dict[str, torch.Tensor]:
    """Per image: cosine distance and relative L2 change of the embedding. The distance is computed
    as ``||u - v||² / 2`` of the unit vectors (equal to ``1 - cos``): exactly 0 for equal
    embeddings and free of ``1 - cos``'s cancellation at small distances; NaN (not counted) where
    an embedding is zero and has no direction."""
    import torch

    ref, cur = reference.double(), shifted.double()
    unit = torch.nn.functional.normalize
    distance = (unit(cur, dim=1) - unit(ref, dim=1)).square().sum(dim=1) / 2
    norm = torch.linalg.vector_norm(ref, dim=1)
    distance = distance.masked_fill((norm == 0) | (torch.linalg.vector_norm(cur, dim=1) == 0), float("nan"))
    change = torch.linalg.vector_norm(cur - ref, dim=1) / norm
    return {"cosine_distance": distance, "embedding_change": change}


def compare_maps(reference: torch.Tensor, shifted: torch.Tensor, shift: Shift, circular: bool) -> dict[str, torch.Tensor]:
    """Per image, on the pixels present in both views (all of them, wrapped, under circular shifts):
    the share whose top class is the shifted reference's, and the mean KL(p_ref || p_shifted) in nats."""
    import torch

    from ..engine.metrics import _pieces  # the slice pairs equivariance_error compares: the same regions

    if reference.shape[-2:] != shifted.shape[-2:]:
        raise UserError(f"segmentation maps of sizes {tuple(reference.shape[-2:])} and {tuple(shifted.shape[-2:])}: "
                        "transinv compares maps at the input's resolution")
    if any(float(d) != int(d) for d in shift):
        raise UserError("segmentation maps are compared at whole-pixel shifts only: drop the fractional shifts")
    h, w = reference.shape[-2:]
    agree = torch.zeros(reference.shape[0], dtype=torch.float64, device=reference.device)
    kl, pixels = torch.zeros_like(agree), 0
    for sy, ry in _pieces(h, int(shift[1]), circular):
        for sx, rx in _pieces(w, int(shift[0]), circular):
            log_p = torch.log_softmax(reference[..., ry, rx].double(), dim=1)
            log_q = torch.log_softmax(shifted[..., sy, sx].double(), dim=1)
            agree += (log_p.argmax(dim=1) == log_q.argmax(dim=1)).flatten(1).sum(dim=1)
            kl += (log_p.exp() * (log_p - log_q)).sum(dim=1).clamp_min(0.0).flatten(1).sum(dim=1)
            pixels += log_p[0, 0].numel()
    if not pixels:
        nan = torch.full_like(agree, float("nan"))
        return {"pixel_agreement": nan, "pixel_kl_divergence": nan}
    return {"pixel_agreement": agree / pixels, "pixel_kl_divergence": kl / pixels}


CLASSIFICATION = OutputKind("classification", "class logits (N, classes)", class_logits)
EMBEDDING = OutputKind("embedding", "an embedding vector per image (N, D)", embeddings, compare_embeddings,
                       ("cosine_distance", "embedding_change"), retrieval=True)
SEGMENTATION = OutputKind("segmentation", "per-pixel class scores (N, K, H, W), or a dict's 'out'", class_maps,
                          compare_maps, ("pixel_agreement", "pixel_kl_divergence"), graphs=False)

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


def detect(output: object, declared: str) -> str:
    """The kind of a forward pass's ``output`` where its shape says it (4-D maps or a dict's ``out``:
    segmentation), else ``declared`` (the model source's word; a bare (N, D) is ambiguous)."""
    tensor = _first_tensor(output)
    return SEGMENTATION.name if tensor is not None and tensor.ndim == 4 else declared


for _kind in (CLASSIFICATION, EMBEDDING, SEGMENTATION):
    register_output_kind(_kind)
