"""Published protocols as YAML presets (``configs/``): loading, validation and listing.

A preset names every ``measure`` setting it fixes; flags given on the command line override it.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs"
DESCRIPTIVE = ("description", "paper")
_NOT_SETTINGS = {"model", "progress", "warn"}


def _settings() -> set[str]:
    from .api import measure

    return set(inspect.signature(measure).parameters) - _NOT_SETTINGS


def preset_path(name: str) -> Path:
    """A preset by file path, or by name (``zhang2019-consistency``) from ``configs/``."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    named = PRESET_DIR / f"{name.removesuffix('.yaml')}.yaml"
    if named.is_file():
        return named
    known = ", ".join(p.stem for p in sorted(PRESET_DIR.glob("*.yaml"))) or "none found"
    raise UserError(f"--config {name}: no such file or preset (presets: {known})")


def load_preset(name: str) -> dict[str, Any]:
    """The settings a preset fixes, checked against ``measure``'s parameters."""
    path = preset_path(name)
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    if not isinstance(document, dict):
        raise UserError(f"{path}: a preset is a mapping of setting: value")
    settings = {k: v for k, v in document.items() if k not in DESCRIPTIVE}
    unknown = sorted(set(settings) - _settings())
    if unknown:
        raise UserError(f"{path}: unknown settings {', '.join(unknown)} (see `transinv measure --help`)")
    return {k: str(v) if k in ("shift", "consistency") else v for k, v in settings.items()}


def list_presets() -> list[dict[str, str]]:
    """Name, description and paper of every preset in ``configs/``."""
    out = []
    for path in sorted(PRESET_DIR.glob("*.yaml")):
        document = yaml.safe_load(path.read_text()) or {}
        out.append({"name": path.stem, "description": document.get("description", ""), "paper": document.get("paper", "")})
    return out
