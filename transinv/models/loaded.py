"""A loaded model: the module, its short label, weights and preprocessing, and the notes to print.

Light to import (no torch): the CLI lists sources and labels without loading a network.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable, Collection, Sequence

from .outputs import CLASSIFICATION

if TYPE_CHECKING:
    from torch import nn
    from torchvision.transforms import InterpolationMode

    from ..engine.data import Preprocess

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_SIZE = 224
DEFAULT_RESIZE = 256


def default_preprocess() -> Preprocess:
    """ImageNet's usual evaluation: shorter side to 256 (bilinear), centre 224, ImageNet mean and std."""
    from torchvision.transforms import InterpolationMode

    from ..engine.data import Preprocess

    return Preprocess(DEFAULT_RESIZE, DEFAULT_SIZE, IMAGENET_MEAN, IMAGENET_STD, InterpolationMode.BILINEAR)


# Resampling filters by the names timm uses and the numbers of PIL's ``Image.Resampling`` (transformers').
_FILTERS = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
_ON_TENSORS = ("nearest", "bilinear", "bicubic")  # what torchvision resizes a tensor with


def resize_for_crop(size: int, crop_pct: float) -> int:
    """The shorter side an image is resized to before its centre ``size`` crop keeps ``crop_pct``
    of it: ``floor(size / crop_pct)``, as timm's eval transform and transformers' ConvNeXt do."""
    return math.floor(size / crop_pct)


def interpolation(label: str, value: str | int) -> tuple[InterpolationMode, str | None]:
    """The resize filter named ``value`` (a name, or a PIL resampling number), with a note where
    transinv must use another: views are resized as tensors, which know only nearest, bilinear
    and bicubic (bicubic stands in for lanczos, box and hamming)."""
    from torchvision.transforms import InterpolationMode

    names = {number: name for name, number in _FILTERS.items()}
    name = names.get(value, "") if isinstance(value, int) else str(getattr(value, "value", value)).lower()
    if name in _ON_TENSORS:
        return InterpolationMode(name), None
    return InterpolationMode.BICUBIC, f"{label}: its images are resized with {name or value!r}, which transinv cannot use on tensors: using bicubic"


def _numbers(values: Sequence[float]) -> str:
    return ",".join(f"{v:g}" for v in values)


@dataclass
class LoadedModel:
    """A model ready to measure, with the preprocessing its weights expect.

    ``name`` is the spec as given; ``label`` the short name for rows and tables (the torchvision or
    example name, the factory name, a TorchScript file's stem); ``source`` the registry entry that
    loaded it. ``hooks`` is False where forward hooks cannot capture layers (TorchScript): output
    metrics only. ``set_size(module, side)`` rebuilds the module (or a copy) for square inputs of
    another side (timm's ``set_input_size``, for models built for one size); None: the module takes
    any size, or only its own. ``preprocess_guessed`` marks a user model whose preprocessing nobody told us:
    ``with_preprocess`` then adds a note saying so.
    """

    name: str
    weights: str
    module: nn.Module
    preprocess: Preprocess
    label: str = ""
    source: str = ""
    hooks: bool = True
    output: str = CLASSIFICATION.name  # the output kind (``transinv.models.outputs``)
    notes: list[str] = field(default_factory=list)
    preprocess_guessed: bool = False
    set_size: Callable[[nn.Module, int], None] | None = None

    def __post_init__(self) -> None:
        self.label = self.label or self.name

    def with_preprocess(self, pre: Preprocess, given: Collection[str] = ()) -> LoadedModel:
        """This model measured with ``pre`` after the user's overrides (``given`` names the
        fields they set: size, resize, mean, std); call once, when the preprocessing is settled."""
        note = guessed_preprocess_note(self.label, pre, given) if self.preprocess_guessed else None
        return replace(self, preprocess=pre, notes=[*self.notes, note] if note else list(self.notes))


def guessed_preprocess_note(label: str, pre: Preprocess, given: Collection[str] = ()) -> str | None:
    """The one-line note for a user model measured with guessed preprocessing, naming only the
    parts the user did not set; None when they set them all (mean, std, and size or resize)."""
    using, flags = [], []
    if not {"mean", "std"} <= set(given):
        defaults = tuple(pre.mean) == IMAGENET_MEAN and tuple(pre.std) == IMAGENET_STD
        using.append("ImageNet mean/std" if defaults else f"mean {_numbers(pre.mean)}, std {_numbers(pre.std)}")
        flags += ["--mean", "--std"]
    if not {"size", "resize"} & set(given):
        using.append(f"{pre.resize} -> {pre.size} {pre.interpolation.value}")
        flags.append("--size")
    if not using:
        return None
    return (
        f"{label}: no preprocessing known for a user model: using {', '.join(using)}; "
        f"pass {'/'.join(flags)} if it was trained otherwise"
    )


def wrap_module(module: nn.Module) -> LoadedModel:
    """A module handed over from a notebook: measured as given, with guessed preprocessing."""
    return LoadedModel(type(module).__name__, "given", module.eval(), default_preprocess(), source="module",
                       preprocess_guessed=True, set_size=resizer(module))


def resizer(module: nn.Module) -> Callable[[nn.Module, int], None] | None:
    """How to rebuild ``module`` for another input side, for models built for one size that have
    timm's ``set_input_size`` (ViT, Swin, MaxViT: position embeddings resampled, windows scaled
    with the patch grid); None for the others."""
    return _set_input_size if hasattr(module, "set_input_size") else None


def _set_input_size(module: nn.Module, side: int) -> None:
    module.set_input_size(img_size=(side, side))


def unique_labels(models: Sequence[LoadedModel]) -> list[str]:
    """Each model's label, or its full spec where two models share a label (``build`` from two
    files), with ``#k`` added where even the specs repeat."""
    counts = Counter(m.label for m in models)
    labels = [m.label if counts[m.label] == 1 else m.name for m in models]
    repeats, seen = Counter(labels), Counter[str]()
    result = []
    for label in labels:
        seen[label] += 1
        result.append(label if repeats[label] == 1 or seen[label] == 1 else f"{label}#{seen[label]}")
    return result
