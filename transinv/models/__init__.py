"""Models and weights: one registry of model sources (torchvision, ``example:``, a user's factory, a
TorchScript file; timm, Hugging Face transformers and ONNX files through optional extras), each in
its own module with its own "did you mean".

``load_model(spec, weights, seed)`` resolves a spec through the registry; a new source is one
``register_source`` call. Importing this package loads no torch: sources import it when they load.
"""

from __future__ import annotations

from .checkpoints import load_checkpoint
from .loaded import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LoadedModel,
    default_preprocess,
    guessed_preprocess_note,
    unique_labels,
    wrap_module,
)
from .registry import ModelSource, find_source, list_models, load_model, register_source, sources
from .source_example import ExampleSource
from .source_factory import FactorySource
from .source_hf import HuggingFaceSource
from .source_onnx import OnnxSource
from .source_timm import TimmSource
from .source_torchscript import TorchScriptSource
from .source_torchvision import TorchvisionSource

# The claims do not overlap (a known torchvision name, X:FACTORY or *.py, a .pt path or TorchScript
# archive, hf-hub:ID, a .onnx path; examples, timm and hf also by prefix), so this order is only
# that of the hints in the unknown-model line.
for _source in (TorchvisionSource(), ExampleSource(), FactorySource(), TorchScriptSource(), TimmSource(),
                HuggingFaceSource(), OnnxSource()):
    register_source(_source)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LoadedModel",
    "ModelSource",
    "default_preprocess",
    "find_source",
    "guessed_preprocess_note",
    "list_models",
    "load_checkpoint",
    "load_model",
    "register_source",
    "sources",
    "unique_labels",
    "wrap_module",
]
