"""Published protocols as YAML presets shipped inside the package (``transinv/configs/``).

A preset fixes some ``MeasureOptions``; flags given on the command line override it. The loader
is strict: an unknown key is an error naming the closest valid option.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError
from .options import MeasureOptions

DESCRIPTIVE = ("description", "paper", "headline")  # not options: what the preset is for


def _preset_dir() -> Path:
    return Path(str(resources.files("transinv") / "configs"))


def preset_path(name: str) -> Path:
    """A preset by file path, or by name (``zhang2019-consistency``) from the shipped presets."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    named = _preset_dir() / f"{name.removesuffix('.yaml')}.yaml"
    if named.is_file():
        return named
    known = ", ".join(p.stem for p in sorted(_preset_dir().glob("*.yaml"))) or "none found"
    raise UserError(f"config {name}: no such file or preset (presets: {known})")


def _document(path: Path) -> dict[str, Any]:
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    if not isinstance(document, dict):
        raise UserError(f"{path}: a preset is a mapping of setting: value")
    return document


def load_preset(name: str) -> dict[str, Any]:
    """The options a preset fixes, checked strictly against ``MeasureOptions``."""
    path = preset_path(name)
    settings = {k: v for k, v in _document(path).items() if k not in DESCRIPTIVE}
    MeasureOptions.from_mapping(settings, source=str(path)).validate()
    return settings


def list_presets() -> list[dict[str, str]]:
    """Name, description and paper of every shipped preset."""
    out = []
    for path in sorted(_preset_dir().glob("*.yaml")):
        document = _document(path)
        out.append({"name": path.stem, "description": document.get("description", ""), "paper": document.get("paper", "")})
    return out


def preset_headline(name: str) -> str | None:
    """The metric a preset is about (its ``headline`` key: what a leaderboard ranks by), or None."""
    from .metric_registry import METRICS

    path = preset_path(name)
    headline = _document(path).get("headline")
    if headline is not None and (headline not in METRICS or METRICS[headline].scope == "layer"):
        raise UserError(f"{path}: headline {headline!r} is not an output or whole-set metric")
    return headline
