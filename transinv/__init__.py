"""transinv: measure the translation equivariance and invariance of convolutional networks."""

__version__ = "0.1.0"

from .api import list_layers, measure  # noqa: E402
from .errors import UserError  # noqa: E402
from .results import Result  # noqa: E402

__all__ = ["measure", "list_layers", "Result", "UserError", "__version__"]
