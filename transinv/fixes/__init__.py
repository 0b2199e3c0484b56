"""Model transformations that apply the known remedies for broken shift invariance to any network.

* ``antialias``: BlurPool (Zhang 2019) placed as in his released models (``blurpool.py``).
* ``adaptive_polyphase``: APS (Chaman & Dokmanic 2021), placed and shared between parallel
  branches as in the authors' code (``aps.py``).
* ``set_padding``: one padding mode for every conv and padded pool (``padding.py``).
* ``apply_variant`` / ``build_variant``: the copy a variant spec names, with a report per fix
  (``variants.py``); ``recalibrate_batchnorm`` re-estimates batch-norm statistics (``batchnorm.py``).

Every transform works on a deep copy (the caller's model is never changed) and keeps every
learnable parameter and state-dict key, so original checkpoints still load. Strided layers are
found on a torch.fx graph of the model (``graph.py``); rebuilt layers keep their module names.
"""

from .batchnorm import recalibrate_batchnorm
from .blurpool import BLUR_KERNELS, DEFAULT_KERNEL
from .downsample import Blur, PolyphaseDown, binomial_kernel
from .padding import PADDING_MODES
from .rebuilt import RestridedConv2d, ShiftPool2d
from .report import FixError, FixReport, collapse_message
from .variants import (
    VARIANT_PARTS,
    Variant,
    adaptive_polyphase,
    antialias,
    apply_variant,
    build_variant,
    parse_variant,
    set_padding,
)

__all__ = [
    "BLUR_KERNELS", "DEFAULT_KERNEL", "PADDING_MODES", "VARIANT_PARTS",
    "Blur", "PolyphaseDown", "RestridedConv2d", "ShiftPool2d", "Variant", "FixError", "FixReport",
    "adaptive_polyphase", "antialias", "apply_variant", "binomial_kernel", "build_variant",
    "collapse_message", "parse_variant", "recalibrate_batchnorm", "set_padding",
]
