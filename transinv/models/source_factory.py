"""A user's factory: ``FILE.py:FACTORY`` or ``package.module:FACTORY``, a callable returning an ``nn.Module``.

This runs the user's Python code, and only because the spec names it; suggestions for a
mistyped factory in a file read the file's top-level names without running it.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

from ..errors import UserError, did_you_mean
from .checkpoints import AS_BUILT, built_weights, load_checkpoint, no_such_file
from .loaded import LoadedModel, default_preprocess


def _is_file(target: str) -> bool:
    return target.endswith(".py") or "/" in target or os.sep in target


def _unnamed_factory(spec: str) -> UserError:
    """A ``.py`` file named without ``:FACTORY``: say how, listing its top-level functions and
    classes (read with ``ast``, not run)."""
    path = Path(spec).expanduser()
    if not path.is_file():
        return no_such_file("model file", path, (".py",))
    try:
        tree = ast.parse(path.read_text())
    except (SyntaxError, UnicodeDecodeError):
        tree = ast.Module(body=[], type_ignores=[])
    defined = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and not n.name.startswith("_")]
    listed = f" (it defines {', '.join(defined)})" if defined else ""
    return UserError(f"{spec}: name the function that builds the model, as {spec}:FACTORY{listed}")


def _import_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise no_such_file("model file", path, (".py",))
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
    return module


def _import_module(target: str) -> ModuleType:
    try:
        return importlib.import_module(target)
    except ImportError as exc:
        raise UserError(f"cannot import module {target!r}: {exc}") from exc


class FactorySource:
    """``FILE.py:FACTORY`` and ``package.module:FACTORY``; the label is the factory's name."""

    name = "factory"
    prefix = None
    hint = "FILE.py:FACTORY or package.module:FACTORY"

    def claims(self, spec: str) -> bool:
        target, colon, attr = spec.rpartition(":")
        if not colon:
            return spec.endswith(".py")  # a file without its factory: say how to name it
        return attr.isidentifier() and bool(target) and (_is_file(target) or all(p.isidentifier() for p in target.split(".")))

    def names(self, pattern: str = "*", pretrained: bool = False) -> list[str]:
        return []  # any importable callable: not enumerable

    def load(self, spec: str, weights: str, seed: int) -> LoadedModel:
        import torch
        from torch import nn

        target, colon, attr = spec.rpartition(":")
        if not colon:
            raise _unnamed_factory(spec)
        checkpoint = built_weights(spec, weights)
        torch.manual_seed(seed)
        module = _import_file(Path(target).expanduser()) if _is_file(target) else _import_module(target)
        factory = getattr(module, attr, None)
        if not callable(factory):
            callables = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
            raise UserError(f"{target} has no callable {attr!r}{did_you_mean(attr, callables)}")
        model = factory()
        if not isinstance(model, nn.Module):
            raise UserError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
        if checkpoint is not None:
            load_checkpoint(model, checkpoint)
        return LoadedModel(
            spec, weights if checkpoint else AS_BUILT, model, default_preprocess(), label=attr, preprocess_guessed=True
        )
