"""The model-source registry: which source reads a model spec, and the one line when none does.

A source is one kind of place models come from (torchvision, ``example:``, a factory, a
TorchScript file). A spec ``PREFIX:REST`` whose prefix is a source's goes to that source;
otherwise the first source (in registration order) that claims the spec loads it. Adding a
source is one ``register_source`` call; no other source changes. Light to import (no torch).
"""

from __future__ import annotations

from typing import Callable, Protocol

from ..errors import UserError, did_you_mean
from .loaded import LoadedModel


class ModelSource(Protocol):
    """One kind of model spec: how to recognise it, list its names and load it."""

    name: str  # "torchvision", shown when listing models by source
    prefix: str | None  # explicit prefix ("example" reads "example:NAME"), or None
    hint: str  # how a spec of this source is written, for the unknown-model message
    # A source may also have ``aliases``, a tuple of further prefixes (``transformers`` for ``hf``).

    def claims(self, spec: str) -> bool:
        """Whether this source reads ``spec`` (written without a prefix): loads no model and,
        where it can, imports no torch (torchvision's must, to know its names)."""
        ...

    def names(self, pattern: str = "*", pretrained: bool = False) -> list[str]:
        """Loadable specs matching the glob ``pattern``, as a user types them (for listing and
        "did you mean"), only those with pretrained weights when ``pretrained``; empty where names
        cannot be enumerated (files). A source whose optional extra is missing raises its UserError."""
        ...

    def load(self, spec: str, weights: str, seed: int) -> LoadedModel:
        """Build the model ``spec`` (its prefix removed) in eval mode with ``weights``
        (``DEFAULT``, a weights name, ``none`` or a checkpoint path) and ``seed`` for random init."""
        ...


_SOURCES: list[ModelSource] = []


def _prefixes(source: ModelSource) -> tuple[str, ...]:
    """The prefixes a source reads: its ``prefix`` and ``aliases``."""
    return tuple(p for p in (source.prefix, *getattr(source, "aliases", ())) if p is not None)


def register_source(source: ModelSource) -> None:
    """Add a model source; specs it claims (and specs with its prefix) resolve to it from now on."""
    for known in _SOURCES:
        if known.name == source.name or set(_prefixes(known)) & set(_prefixes(source)):
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
            if prefix in _prefixes(source):
                return source, rest
    for source in _SOURCES:
        if source.claims(spec):
            return source, spec
    names = [name for source in _SOURCES for name in _listable(source)]
    if hint := did_you_mean(spec, names):  # a near miss: the names say enough
        raise UserError(f"unknown model {spec!r}{hint}; `transinv models` lists them")
    raise UserError(f"unknown model {spec!r}: use {'; '.join(s.hint for s in _SOURCES)}")


def _listable(source: ModelSource) -> list[str]:
    """A source's names for "did you mean"; none where its optional extra is missing."""
    try:
        return source.names()
    except UserError:
        return []


def find_sources(name: str | None = None) -> list[ModelSource]:
    """Every source, or the one called ``name`` (an unknown name is one line with "did you mean")."""
    if name is None:
        return list(_SOURCES)
    known = [s.name for s in _SOURCES]
    if name not in known:
        raise UserError(f"unknown model source {name!r}{did_you_mean(name, known)}: use one of {', '.join(known)}")
    return [s for s in _SOURCES if s.name == name]


def list_models(pattern: str = "*", source: str | None = None, pretrained: bool = False,
                skipped: Callable[[str], None] | None = None) -> list[tuple[str, str, bool]]:
    """(source, spec, has pretrained weights) for every name matching the glob ``pattern``.

    With ``source``, only that source, and its missing extra is an error; without, a source whose
    extra is missing is left out and its one line handed to ``skipped``.
    """
    rows = []
    for chosen in find_sources(source):
        try:
            names = chosen.names(pattern)
            with_weights = set(chosen.names(pattern, pretrained=True))
        except UserError as exc:
            if source is not None:
                raise
            if skipped is not None:
                skipped(str(exc))
            continue
        rows += [(chosen.name, n, n in with_weights) for n in names if n in with_weights or not pretrained]
    return rows


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
