"""Optional dependencies (timm, transformers, ONNX Runtime): importing one with the one-line
"how to get it", and the Hugging Face cache and offline switch that timm and transformers share."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType

from ..errors import UserError
from .source_torchvision import OFFLINE_ENV


def require(module: str, extra: str, users: str) -> ModuleType:
    """Import ``module``; when it is not installed, one line naming the extra that installs it
    (``users``: what needs it, "timm models")."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module:
            raise UserError(f"cannot import {module} ({exc}): reinstall it with pip install 'transinv[{extra}]'") from exc
        raise UserError(f"{module} is not installed ({users} need it): pip install 'transinv[{extra}]'") from exc


def offline() -> bool:
    """Whether transinv must not download (``TRANSINV_OFFLINE``, or the hub's own ``HF_HUB_OFFLINE``)."""
    return any(os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")
               for name in (OFFLINE_ENV, "HF_HUB_OFFLINE"))


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache as the environment names it now: ``$HF_HUB_CACHE``, else
    ``$HF_HOME/hub`` (default ``~/.cache/huggingface/hub``). Passed to every hub call, so the
    folder a message names is the one searched, even if the variables changed after import."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def hf_repo_dir(repo_id: str) -> Path:
    """Where the hub cache keeps the files of the model repository ``org/name``."""
    return hf_cache_dir() / f"models--{repo_id.replace('/', '--')}"


def honour_offline() -> None:
    """Under ``TRANSINV_OFFLINE``, switch the Hugging Face hub to offline mode, also when it was
    imported before (it reads ``HF_HUB_OFFLINE`` once, at import, into this constant)."""
    if not offline():
        return
    import huggingface_hub.constants

    huggingface_hub.constants.HF_HUB_OFFLINE = True
