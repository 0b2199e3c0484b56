"""torchvision classification and semantic segmentation models by name (``resnet18``,
``fcn_resnet50``, or explicitly ``torchvision:resnet18``), with their pretrained weights from the
torch hub cache and the preprocessing those weights expect."""

from __future__ import annotations

import fnmatch
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UserError, did_you_mean, WeightsUnavailable
from .checkpoints import checkpoint_path, load_checkpoint
from .loaded import LoadedModel, default_preprocess

if TYPE_CHECKING:
    import torch

    from ..engine.data import Preprocess

OFFLINE_ENV = "TRANSINV_OFFLINE"


def _pretrained(name: str, weights: str) -> Any:
    """The torchvision weights entry for ``weights`` (``DEFAULT``, ``IMAGENET1K_V1``, or ``Enum.NAME``)."""
    import torchvision

    enum = torchvision.models.get_model_weights(name)
    key = weights.split(".")[-1]
    if key not in enum.__members__:
        raise UserError(
            f"{name} has no weights {weights!r}: use one of {', '.join(enum.__members__)}, none, or a checkpoint path"
        )
    return enum[key]


def _load_pretrained_state(name: str, entry: Any) -> dict[str, torch.Tensor]:
    """Load a torchvision weights file from the hub cache, downloading only when allowed."""
    import torch

    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(entry.url)
    missing = (
        f"pretrained weights for {name} ({entry}) are not in the torch hub cache and cannot be downloaded: "
        f"put the file at {path} ($TORCH_HOME/hub/checkpoints/), or measure with --weights none"
    )
    if not path.exists() and os.environ.get(OFFLINE_ENV):
        raise WeightsUnavailable(missing)
    try:
        return entry.get_state_dict(progress=False)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError; a truncated file a RuntimeError
        if path.exists():
            raise UserError(f"cannot read cached weights {path}: {exc}; delete it or use --weights none") from exc
        raise WeightsUnavailable(missing) from exc


def _preprocess_from_entry(entry: Any) -> Preprocess:
    """The resize, crop size and normalisation the pretrained weights were evaluated with."""
    from ..engine.data import Preprocess

    t = entry.transforms()
    crop = getattr(t, "crop_size", None) or t.resize_size  # segmentation weights resize only
    return Preprocess(
        resize=int(t.resize_size[0]),
        size=int(crop[0]),
        mean=tuple(t.mean),
        std=tuple(t.std),
        interpolation=t.interpolation,
    )


def _segmentation_names() -> list[str]:
    """torchvision's semantic segmentation models (FCN, DeepLabV3, LR-ASPP): output "segmentation"."""
    import torchvision

    return torchvision.models.list_models(module=torchvision.models.segmentation)


def _detection_names() -> list[str]:
    """torchvision's detection models (Faster/Mask/Keypoint R-CNN, RetinaNet, SSD, FCOS): named
    only to say they are not supported."""
    import torchvision

    return torchvision.models.list_models(module=torchvision.models.detection)


class TorchvisionSource:
    """Every model of ``torchvision.models.list_models(module=torchvision.models)``."""

    name = "torchvision"
    prefix = "torchvision"
    hint = "a torchvision classification or segmentation model (resnet18, fcn_resnet50, or torchvision:NAME)"

    def claims(self, spec: str) -> bool:
        return spec.isidentifier() and (spec in self.names() or spec in _detection_names())

    def names(self, pattern: str = "*", pretrained: bool = False) -> list[str]:
        import torchvision

        every = torchvision.models.list_models(module=torchvision.models) + _segmentation_names()
        names = fnmatch.filter(every, pattern)
        return [n for n in names if len(torchvision.models.get_model_weights(n))] if pretrained else names

    def load(self, spec: str, weights: str, seed: int) -> LoadedModel:
        import torch
        import torchvision

        if spec in _detection_names():
            raise UserError(f"{spec}: detection models are not supported yet (transinv measures classifiers, "
                            "encoders and segmentation models)")
        names = self.names()
        if spec not in names:
            raise UserError(f"unknown torchvision model {spec!r}{did_you_mean(spec, names)}: see torchvision.models.list_models()")
        checkpoint = checkpoint_path(weights)
        entry = None if checkpoint is not None or weights.lower() == "none" else _pretrained(spec, weights)
        torch.manual_seed(seed)
        segmentation = spec in _segmentation_names()
        extra = {"weights_backbone": None} if segmentation else {}  # no ImageNet backbone download
        with warnings.catch_warnings():  # inception/googlenet warn about a future init change
            warnings.simplefilter("ignore", FutureWarning)
            module = torchvision.models.get_model(spec, weights=None, **extra)
        preprocess = default_preprocess()
        if entry is not None:
            module.load_state_dict(_load_pretrained_state(spec, entry))
            preprocess = _preprocess_from_entry(entry)
            weights = str(entry).split(".")[-1] if weights == "DEFAULT" else weights
        if checkpoint is not None:
            load_checkpoint(module, checkpoint)
        return LoadedModel(spec, weights, module, preprocess, label=spec, preprocess_guessed=checkpoint is not None,
                           output="segmentation" if segmentation else "classification")
