"""The one exception type the CLI turns into a one-line message instead of a traceback, and the
"did you mean" every unknown name gets."""

from __future__ import annotations

import difflib


class UserError(Exception):
    """Bad input from the user: the message says what is wrong and what to do."""


class WeightsUnavailable(UserError):
    """Pretrained weights that are neither cached nor downloadable here (``--weights auto`` then
    falls back to random weights)."""


def did_you_mean(name: str, choices: list[str]) -> str:
    """`` (did you mean a, b?)`` for the choices close to a mistyped ``name``, else an empty string."""
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""
