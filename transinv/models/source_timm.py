"""timm models by name (``timm:convnext_tiny.fb_in1k``) or Hugging Face hub id
(``hf-hub:timm/convnext_tiny.fb_in1k``, also ``timm:hf-hub:...``), with the preprocessing of
their pretrained config. timm is an optional extra (``pip install 'transinv[timm]'``)."""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from ..errors import UserError, did_you_mean, WeightsUnavailable
from .checkpoints import checkpoint_path, load_checkpoint
from .extras import hf_cache_dir, hf_repo_dir, honour_offline, offline, require
from .loaded import LoadedModel, interpolation, resize_for_crop, resizer

if TYPE_CHECKING:
    from torch import nn

    from ..engine.data import Preprocess

PREFIX = "timm"
HUB = "hf-hub:"


def _timm() -> ModuleType:
    return require("timm", "timm", "timm models")


def _strip(pattern: str) -> str:
    return pattern.removeprefix(f"{PREFIX}:")


def _hub_repo(timm: ModuleType, name: str) -> str | None:
    """The hub repository ``name``'s config or pretrained weights come from, or None (a URL)."""
    if name.startswith(HUB):
        return name.removeprefix(HUB).split("@")[0]
    cfg = timm.models.get_pretrained_cfg(name)
    return cfg.hf_hub_id.split("@")[0] if cfg is not None and cfg.hf_hub_id else None


def _where(timm: ModuleType, name: str) -> Path:
    """Where timm looks for the files of ``name``: its repository in the Hugging Face cache,
    else its weights file in the torch hub cache."""
    repo = _hub_repo(timm, name)
    if repo is not None:
        return hf_repo_dir(repo)
    import torch

    cfg = timm.models.get_pretrained_cfg(name)
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url if cfg is not None else "")


def _create(timm: ModuleType, shown: str, name: str, pretrained: bool) -> nn.Module:
    """``timm.create_model``; a file it must fetch (pretrained weights, a hub id's config) and
    cannot is one line naming the cache folder it was looked for in."""
    fetches = pretrained or name.startswith(HUB)
    if not fetches:
        return timm.create_model(name, pretrained=False)
    kwargs: dict[str, Any] = {"cache_dir": str(hf_cache_dir())} if _hub_repo(timm, name) else {}
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except OSError as exc:  # the hub's missing-file and offline errors, and urllib's, are OSErrors
        what = "its pretrained weights are" if pretrained else "its config is"
        why = "cannot be downloaded (offline)" if offline() else f"could not be downloaded ({type(exc).__name__})"
        hint = "download once online, or measure with --weights none" if not name.startswith(HUB) else "download once online"
        raise WeightsUnavailable(f"{shown}: {what} not in the local cache ({_where(timm, name)}) and {why}: {hint}") from exc


def _preprocess(timm: ModuleType, label: str, model: nn.Module) -> tuple[Preprocess, list[str]]:
    """The model's eval preprocessing from ``timm.data.resolve_data_config``, and notes where
    transinv's differs (crop modes other than centre, non-square inputs, filters tensors lack)."""
    from ..engine.data import Preprocess

    cfg = timm.data.resolve_data_config({}, model=model)
    _, height, width = cfg["input_size"]
    notes = []
    if height != width:
        notes.append(f"{label}: timm evaluates it on {height}x{width} inputs; transinv's views are square: using {height}")
    if cfg["crop_mode"] != "center":
        notes.append(f"{label}: timm evaluates it with crop_mode={cfg['crop_mode']}; transinv resizes the shorter side and centre-crops")
    mode, note = interpolation(label, cfg["interpolation"])
    notes += [note] if note else []
    pre = Preprocess(resize_for_crop(height, cfg["crop_pct"]), height, tuple(cfg["mean"]), tuple(cfg["std"]), mode)
    return pre, notes


class TimmSource:
    """timm's models: ``timm:ARCH`` (random or its default pretrained tag), ``timm:ARCH.TAG``, and
    ``hf-hub:ORG/NAME`` ids; the label is the name without ``timm:`` (the repository's name for hub ids)."""

    name = "timm"
    prefix = PREFIX
    hint = "timm:NAME or hf-hub:ORG/NAME (pip install 'transinv[timm]')"

    def claims(self, spec: str) -> bool:
        return spec.startswith(HUB)

    def names(self, pattern: str = "*", pretrained: bool = False) -> list[str]:
        timm = _timm()
        tagged = timm.list_pretrained()
        archs = sorted({t.split(".")[0] for t in tagged}) if pretrained else timm.list_models()
        found = sorted({*archs, *tagged})
        return [f"{PREFIX}:{n}" for n in found if fnmatch.fnmatchcase(n, _strip(pattern)) or fnmatch.fnmatchcase(f"{PREFIX}:{n}", pattern)]

    def load(self, spec: str, weights: str, seed: int) -> LoadedModel:
        import torch

        timm = _timm()
        honour_offline()
        hub = spec.startswith(HUB)
        shown = spec if hub else f"{PREFIX}:{spec}"
        if not hub:
            known = timm.list_pretrained() if "." in spec else timm.list_models()
            if spec not in known:
                raise UserError(f"unknown timm model {spec!r}{did_you_mean(spec, known)}: see transinv models --source timm")
        checkpoint = checkpoint_path(weights)
        if checkpoint is None and weights.lower() not in ("none", "default"):
            raise UserError(f"--weights {weights}: timm models take DEFAULT, none or a checkpoint path; choose pretrained weights by tag ({PREFIX}:ARCH.TAG)")
        pretrained = checkpoint is None and weights.lower() == "default"
        if pretrained and not hub and not timm.models.is_model_pretrained(spec):
            raise UserError(f"{shown} has no pretrained weights in timm: measure it with --weights none")
        torch.manual_seed(seed)
        module = _create(timm, shown, spec, pretrained)
        if checkpoint is not None:
            load_checkpoint(module, checkpoint)
        label = spec.rsplit("/", 1)[-1] if hub else spec
        preprocess, notes = _preprocess(timm, label, module)
        resolved = weights if not pretrained else module.pretrained_cfg.get("tag") or "hub"
        output = "embedding" if getattr(module, "num_classes", None) == 0 else "classification"  # an encoder
        return LoadedModel(spec, resolved, module, preprocess, label=label, notes=notes,
                           preprocess_guessed=checkpoint is not None, output=output,
                           set_size=resizer(module))
