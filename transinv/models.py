"""Models and weights: torchvision names, a user's factory or TorchScript file, and checkpoints.

A user's Python file is executed only when the model spec names it (``file.py:factory``).
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.transforms import InterpolationMode

from .data import Preprocess
from .errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_SIZE = 224
DEFAULT_RESIZE = 256
OFFLINE_ENV = "TRANSINV_OFFLINE"
EXAMPLE_PREFIX = "example:"


def torchvision_models() -> list[str]:
    """Every classification model torchvision offers, by name."""
    return torchvision.models.list_models(module=torchvision.models)


@dataclass
class LoadedModel:
    """A model ready to measure, with the preprocessing its weights expect."""

    name: str
    weights: str
    module: nn.Module
    preprocess: Preprocess
    scripted: bool = False


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _weights_enum(name: str) -> Any:
    return torchvision.models.get_model_weights(name)


def _pretrained(name: str, weights: str) -> Any:
    """The torchvision weights entry for ``weights`` (``DEFAULT``, ``IMAGENET1K_V1``, or ``Enum.NAME``)."""
    enum = _weights_enum(name)
    key = weights.split(".")[-1]
    if key not in enum.__members__:
        raise UserError(
            f"{name} has no weights {weights!r}: use one of {', '.join(enum.__members__)}, none, or a checkpoint path"
        )
    return enum[key]


def _cached_weights_path(entry: Any) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(entry.url)


def _load_pretrained_state(name: str, entry: Any) -> dict[str, torch.Tensor]:
    """Load a torchvision weights file from the hub cache, downloading only when allowed."""
    path = _cached_weights_path(entry)
    missing = (
        f"pretrained weights for {name} ({entry}) are not in the torch hub cache and cannot be downloaded: "
        f"put the file at {path} ($TORCH_HOME/hub/checkpoints/), or measure with --weights none"
    )
    if not path.exists() and os.environ.get(OFFLINE_ENV):
        raise UserError(missing)
    try:
        return entry.get_state_dict(progress=False)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError; a truncated file a RuntimeError
        if path.exists():
            raise UserError(f"cannot read cached weights {path}: {exc}; delete it or use --weights none") from exc
        raise UserError(missing) from exc


def _preprocess_from_entry(entry: Any) -> Preprocess:
    """The resize, crop size and normalisation the pretrained weights were evaluated with."""
    t = entry.transforms()
    return Preprocess(
        resize=int(t.resize_size[0]),
        size=int(t.crop_size[0]),
        mean=tuple(t.mean),
        std=tuple(t.std),
        interpolation=t.interpolation,
    )


def default_preprocess() -> Preprocess:
    return Preprocess(DEFAULT_RESIZE, DEFAULT_SIZE, IMAGENET_MEAN, IMAGENET_STD, InterpolationMode.BILINEAR)


def load_checkpoint(module: nn.Module, path: Path) -> None:
    """Load a state dict (bare, or under ``state_dict``/``model``) safely, with a one-line mismatch report."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a bad or unsafe file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load checkpoint {path} (weights_only=True): {first}") from exc
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"checkpoint {path} holds no state dict (expected tensors, or a dict with 'state_dict'/'model')")
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing[:3])}" + (f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""))
    if unexpected:
        problems.append(f"unexpected {', '.join(unexpected[:3])}" + (f" (+{len(unexpected) - 3} more)" if len(unexpected) > 3 else ""))
    if shapes:
        problems.append(f"shape mismatch {'; '.join(shapes[:3])}" + (f" (+{len(shapes) - 3} more)" if len(shapes) > 3 else ""))
    if problems:
        raise UserError(f"checkpoint {path} does not fit the model: {'; '.join(problems)}")
    module.load_state_dict(state)


def _import_factory(spec: str) -> nn.Module:
    """Build a model from ``file.py:factory`` or ``package.module:factory`` (runs the user's code)."""
    target, _, attr = spec.rpartition(":")
    if target.endswith(".py") or os.sep in target:
        path = Path(target).expanduser()
        if not path.is_file():
            raise UserError(f"model file {path} not found")
        mod_name = f"transinv_user_{path.stem}"
        module_spec = importlib.util.spec_from_file_location(mod_name, path)
        if module_spec is None or module_spec.loader is None:
            raise UserError(f"cannot import {path} as Python")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[mod_name] = module
        sys.path.insert(0, str(path.parent))
        try:
            module_spec.loader.exec_module(module)
        finally:
            sys.path.remove(str(path.parent))
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise UserError(f"cannot import module {target!r}: {exc}") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UserError(f"{target} has no callable {attr!r}")
    model = factory()
    if not isinstance(model, nn.Module):
        raise UserError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _example(name: str) -> nn.Module:
    """A constructed network from ``transinv.examples`` by name."""
    from .examples import EXAMPLES

    if name not in EXAMPLES:
        raise UserError(f"unknown example {name!r}{_suggest(name, list(EXAMPLES))}: use one of {', '.join(EXAMPLES)}")
    return EXAMPLES[name]()


def _is_torchscript(path: Path) -> bool:
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


def _checkpoint_path(weights: str) -> Path | None:
    """The checkpoint file ``--weights`` names, or None when it names pretrained weights or none."""
    if weights.lower() in ("none", "default"):
        return None
    path = Path(weights).expanduser()
    if path.is_file():
        return path
    if "/" in weights or path.suffix:
        raise UserError(f"--weights {weights}: no such checkpoint file")
    return None


def load_model(spec: str, weights: str = "DEFAULT", seed: int = 0) -> LoadedModel:
    """Resolve a model spec and weights choice into an eval-mode module and its preprocessing.

    ``weights``: ``DEFAULT`` or a weights enum name (torchvision models), ``none`` (seeded random
    initialisation) or a checkpoint path (loaded with ``weights_only=True``).
    """
    torch.manual_seed(seed)
    checkpoint = _checkpoint_path(weights)
    preprocess = default_preprocess()
    scripted = False
    if spec.startswith(EXAMPLE_PREFIX):
        module = _example(spec.removeprefix(EXAMPLE_PREFIX))
    elif ":" in spec:
        module = _import_factory(spec)
    elif Path(spec).is_file():
        if not _is_torchscript(Path(spec)):
            raise UserError(
                f"{spec} is not a TorchScript archive: for a Python model pass FILE.py:FACTORY, "
                "for a state dict pass the architecture as MODEL and the file as --weights"
            )
        with warnings.catch_warnings():  # TorchScript is deprecated upstream but still what users have
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(spec, map_location="cpu")
        scripted = True
        weights = "scripted"
    else:
        names = torchvision_models()
        if spec not in names:
            raise UserError(
                f"unknown model {spec!r}{_suggest(spec, names)}: use a torchvision classification model "
                "(python -c 'import torchvision; print(torchvision.models.list_models())'), FILE.py:FACTORY, "
                "package.module:FACTORY or a TorchScript file"
            )
        entry = None if (checkpoint is not None or weights.lower() == "none") else _pretrained(spec, weights)
        with warnings.catch_warnings():  # inception/googlenet warn about a future init change
            warnings.simplefilter("ignore", FutureWarning)
            module = torchvision.models.get_model(spec, weights=None)
        if entry is not None:
            module.load_state_dict(_load_pretrained_state(spec, entry))
            preprocess = _preprocess_from_entry(entry)
            weights = str(entry).split(".")[-1] if weights == "DEFAULT" else weights
    if ":" in spec and checkpoint is None:
        if weights.lower() not in ("none", "default"):
            raise UserError(f"--weights {weights}: a model from a factory takes DEFAULT (as built), none or a checkpoint path")
        weights = "as-built"
    if checkpoint is not None:
        if scripted:
            raise UserError("a TorchScript model carries its own weights: drop --weights")
        load_checkpoint(module, checkpoint)
    module.eval()
    return LoadedModel(name=spec, weights=weights, module=module, preprocess=preprocess, scripted=scripted)
