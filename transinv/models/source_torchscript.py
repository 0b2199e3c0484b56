"""A TorchScript archive (``torch.jit.save``): weights included, no forward hooks, so output metrics only."""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path

from ..errors import UserError
from .checkpoints import checkpoint_path, no_such_file
from .loaded import LoadedModel, default_preprocess

SUFFIXES = (".pt", ".pth", ".ts", ".jit", ".ptl")
SCRIPTED = "scripted"


def is_torchscript(path: Path) -> bool:
    """A zip archive holding TorchScript code or constants (what ``torch.jit.save`` writes)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


class TorchScriptSource:
    """A ``.pt`` (or ``.pth``, ``.ts``, ``.jit``, ``.ptl``) path, or any file that is a TorchScript
    archive; the label is the file's stem."""

    name = "torchscript"
    prefix = None
    hint = f"a TorchScript file ({', '.join(SUFFIXES)})"

    def claims(self, spec: str) -> bool:
        path = Path(spec).expanduser()
        return path.suffix.lower() in SUFFIXES or (path.is_file() and is_torchscript(path))

    def names(self, pattern: str = "*", pretrained: bool = False) -> list[str]:
        return []  # files: not enumerable

    def load(self, spec: str, weights: str, seed: int) -> LoadedModel:
        import torch

        path = Path(spec).expanduser()
        if not path.is_file():
            raise no_such_file("TorchScript file", path, SUFFIXES)
        if not is_torchscript(path):
            raise UserError(
                f"{spec} is not a TorchScript archive: for a Python model pass FILE.py:FACTORY, "
                "for a state dict pass the architecture as MODEL and the file as --weights"
            )
        if checkpoint_path(weights) is not None:
            raise UserError("a TorchScript model carries its own weights: drop --weights")
        with warnings.catch_warnings():  # TorchScript is deprecated upstream but still what users have
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(path), map_location="cpu")
        return LoadedModel(
            spec, SCRIPTED, module, default_preprocess(), label=path.stem, hooks=False, preprocess_guessed=True
        )
