"""An ONNX file (``model.onnx``) run with ONNX Runtime on the CPU: weights included, no forward
hooks, so output metrics only. ONNX Runtime is an optional extra (``pip install 'transinv[onnx]'``)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from .checkpoints import checkpoint_path, no_such_file
from .extras import require
from .loaded import DEFAULT_RESIZE, DEFAULT_SIZE, LoadedModel, default_preprocess, resize_for_crop

if TYPE_CHECKING:
    import torch

SUFFIX = ".onnx"
EXPORTED = "onnx"
_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64"}


def _module(session: Any, name: str) -> torch.nn.Module:
    """An ``nn.Module`` whose forward runs ``session`` on a batch of views (NCHW) and returns its
    first output as a float32 tensor on the views' device; a fixed batch size runs the views that
    many at a time (the last group padded with zeros, whose outputs are dropped)."""
    import numpy as np
    import torch

    (given,) = session.get_inputs()
    batch, _, height, width = given.shape
    dtype = np.dtype(_DTYPES[given.type])

    class OnnxModule(torch.nn.Module):
        def forward(self, views: torch.Tensor) -> torch.Tensor:
            if isinstance(height, int) and tuple(views.shape[-2:]) != (height, width):
                raise UserError(f"{name} takes {height}x{width} inputs, not {views.shape[-2]}x{views.shape[-1]}: "
                                "drop --size/--resize, or export it with dynamic height and width")
            array = views.detach().cpu().contiguous().numpy().astype(dtype, copy=False)
            step = batch if isinstance(batch, int) else len(array)
            outputs = []
            for start in range(0, len(array), step):
                chunk = array[start:start + step]
                padded = np.concatenate([chunk, np.zeros((step - len(chunk), *chunk.shape[1:]), dtype)]) if len(chunk) < step else chunk
                outputs.append(session.run(None, {given.name: padded})[0][: len(chunk)])
            return torch.from_numpy(np.concatenate(outputs)).float().to(views.device)

        def __deepcopy__(self, memo: dict) -> OnnxModule:  # fixes copy a model to transform it
            raise UserError(f"{name}: an ONNX model cannot be transformed: fixes and --variants need a PyTorch model")

    return OnnxModule()


class OnnxSource:
    """A ``.onnx`` file with one image input (N, 3, H, W); the label is the file's stem."""

    name = "onnx"
    prefix = None
    hint = "an ONNX file (model.onnx; pip install 'transinv[onnx]')"

    def claims(self, spec: str) -> bool:
        return Path(spec).suffix.lower() == SUFFIX

    def names(self, pattern: str = "*", pretrained: bool = False) -> list[str]:
        return []  # files: not enumerable

    def load(self, spec: str, weights: str, seed: int) -> LoadedModel:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise no_such_file("ONNX file", path, (SUFFIX,))
        if checkpoint_path(weights) is not None:
            raise UserError("an ONNX model carries its own weights: drop --weights")
        ort = require("onnxruntime", "onnx", "ONNX models")
        try:
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as exc:  # ONNX Runtime raises its own types for an invalid or unsupported graph
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"ONNX Runtime cannot load {path}: {first}") from exc
        inputs = session.get_inputs()
        shape = inputs[0].shape if len(inputs) == 1 else []
        if len(shape) != 4 or shape[1] != 3 or inputs[0].type not in _DTYPES:
            described = ", ".join(f"{i.name} {i.type} {i.shape}" for i in inputs)
            raise UserError(f"{path} must take one float image input of shape (N, 3, H, W); it takes {described}")
        notes = []
        preprocess = default_preprocess()
        height, width = shape[2:]
        if isinstance(height, int) and isinstance(width, int):
            if height != width:
                raise UserError(f"{path} takes {height}x{width} inputs; transinv's views are square")
            if height != DEFAULT_SIZE:
                preprocess = replace(preprocess, resize=resize_for_crop(height, DEFAULT_SIZE / DEFAULT_RESIZE), size=height)
        if isinstance(shape[0], int):
            notes.append(f"{path.stem}: the ONNX file has a fixed batch size of {shape[0]}: views run {shape[0]} at a time")
        return LoadedModel(spec, EXPORTED, _module(session, path.name), preprocess, label=path.stem, hooks=False,
                           notes=notes, preprocess_guessed=True)
