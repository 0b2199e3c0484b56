"""transinv: measure the translation equivariance and invariance of convolutional networks.

The names below load on first use, so ``import transinv`` (and the CLI's help) stays fast.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "measure": "api",
    "list_layers": "api",
    "Result": "reports.results",
    "MeasureOptions": "options",
    "UserError": "errors",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        from importlib import import_module

        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'transinv' has no attribute {name!r}")
