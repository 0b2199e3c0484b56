"""The model-source registry: which source reads a model spec, and the one line when none does.

A source is one kind of place models come from (torchvision, ``example:``, a factory, a
TorchScript file). A spec ``PREFIX:REST`` whose prefix is a source's goes to that source;
otherwise the first source (in registration order) that claims the spec loads it. Adding a
source is one ``register_source`` call; no other source changes. Light to import (no torch).
"""

from __future__ import annotations

from typing import Protocol

from ..errors import UserError, did_you_mean
from .loaded import LoadedModel


class ModelSource(Protocol):
    """One kind of model spec: how to recognise it, list its names and load it."""

    name: str  # "torchvision", shown when listing models by source
    prefix: str | None  # explicit prefix ("example" reads "example:NAME"), or None
    hint: str  # how a spec of this source is written, for the unknown-model message

    def claims(self, spec: str) -> bool:
        """Whether this source reads ``spec`` (written without a prefix): loads no model and,
        where it can, imports no torch (torchvision's must, to know its names)."""
        ...

    def names(self, pattern: str = "*") -> list[str]:
        """Loadable specs matching the glob ``pattern``, as a user types them (for listing and
        "did you mean"); empty where names cannot be enumerated (files)."""
        ...

    def load(self, spec: str, weights: str, seed: int) -> LoadedModel:
        """Build the model ``spec`` (its prefix removed) in eval mode with ``weights``
        (``DEFAULT``, a weights name, ``none`` or a checkpoint path) and ``seed`` for random init."""
        ...


_SOURCES: list[ModelSource] = []


def register_source(source: ModelSource) -> None:
    """Add a model source; specs it claims (and specs with its prefix) resolve to it from now on."""
    for known in _SOURCES:
        if known.name == source.name or (source.prefix is not None and known.prefix == source.prefix):
            raise ValueError(f"a model source named {known.name!r} (prefix {known.prefix!r}) is already registered")
    _SOURCES.append(source)


def sources() -> list[ModelSource]:
    """The registered sources, in resolution order."""
    return list(_SOURCES)


def find_source(spec: str) -> tuple[ModelSource, str]:
    """The source that reads ``spec`` and the spec as that source names it (its prefix removed)."""
    prefix, colon, rest = spec.partition(":")
    if colon:
        for source in _SOURCES:
            if source.prefix == prefix:
                return source, rest
    for source in _SOURCES:
        if source.claims(spec):
            return source, spec
    names = [name for source in _SOURCES for name in source.names()]
    raise UserError(f"unknown model {spec!r}{did_you_mean(spec, names)}: use {'; '.join(s.hint for s in _SOURCES)}")


def load_model(spec: str, weights: str = "DEFAULT", seed: int = 0) -> LoadedModel:
    """Resolve a model spec and weights choice into an eval-mode module and its preprocessing.

    ``weights``: ``DEFAULT`` or a weights name (torchvision models), ``none`` (seeded random
    initialisation) or a checkpoint path (loaded with ``weights_only=True``).
    """
    source, local = find_source(spec)
    loaded = source.load(local, weights, seed)
    loaded.module.eval()
    loaded.name, loaded.source = spec, source.name
    return loaded
