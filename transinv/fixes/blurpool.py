"""BlurPool (Zhang 2019, "Making convolutional networks shift-invariant again"), placed as in the
released ``antialiased-cnns`` models.

The paper's rule: a strided layer runs at stride 1 and the blur-and-subsample comes after the
non-linearity that follows it. Concretely, for each strided layer in forward order:

* a strided convolution runs at stride 1 (a stride-4 one at stride 2, as in Zhang's AlexNet); the
  blur goes after the activation reached through its batch norm (conv -> BN -> ReLU -> blur);
  with no activation, a 1x1 unpadded convolution (a residual shortcut) is blurred *before*
  (blur -> conv1x1 -> BN, as Zhang's ``downsample``), any other right after the convolution;
* a strided max-pool runs at stride 1, then the blur (Zhang's ResNets also turn the 3x3 padded
  max-pool into an unpadded 2x2 one; his DenseNet and AlexNet keep their 3x3 windows);
* a strided average pool becomes the blur alone (Zhang's DenseNet transitions);
* the first strided layer, when it is a convolution (the stem), is kept as it is: Zhang's
  ``pool_only=True``, the released default, except for AlexNet, whose release blurs it too.
  ``stem=True`` (the ``blurpool-all`` variant) blurs it in every family.

The blur is the K x K binomial filter (K = 4 by default, the released weights), padded by
reflection, or circularly in a circular network.
"""

from __future__ import annotations

import fnmatch
from typing import Sequence

import torchvision
from torch import nn

from .downsample import Blur
from .graph import Insertion, Site, analyse, child_name, insert_after, replace_modules
from .rebuilt import RestridedConv2d, conv_mode, network_mode, pool_parts, stride1_pool
from .report import FixError, FixReport, where

BLUR_KERNELS = range(2, 8)
DEFAULT_KERNEL = 4


def check_kernel(kernel: object) -> int:
    if not isinstance(kernel, int) or kernel not in BLUR_KERNELS:
        raise FixError(f"blur kernel {kernel!r} is not supported: use a size from 2 to 7")
    return kernel


def resnet_pool(model: nn.Module) -> int | None:
    """The max-pool window Zhang's released ResNets use at stride 1 (2x2), None for other families."""
    return 2 if isinstance(model, torchvision.models.ResNet) else None


def selected(path: str, layers: Sequence[str] | None) -> bool:
    """True when ``layers`` (glob patterns of layer paths) is empty or one of them matches ``path``."""
    return not layers or any(fnmatch.fnmatchcase(path, pattern) for pattern in layers)


def _circular(site: Site, network: str) -> bool:
    if site.kind == "conv":
        return conv_mode(site.module, network) == "circular"
    _, _, mode = pool_parts(site.module)
    return (mode or network) == "circular"


def antialias_in_place(
    model: nn.Module, kernel: int = DEFAULT_KERNEL, stem: bool = False, layers: Sequence[str] | None = None
) -> tuple[nn.Module, FixReport]:
    """BlurPool on ``model`` itself (see the module docstring); returns it and what was replaced."""
    check_kernel(kernel)
    analysis = analyse(model, conv_strides=(2, 4))
    network = network_mode(model)
    report = FixReport(f"blurpool{'-all' if stem else ''}:{kernel}")
    kept_stem = None if stem or isinstance(model, torchvision.models.AlexNet) else analysis.stem
    replacements: dict[str, nn.Module] = {}
    insertions: list[Insertion] = []
    for site in analysis.sites:
        if site is kept_stem:
            why = "the stem, as Zhang's pool_only (blurpool-all blurs it)"
            report.kept.append((where(site.path, site.module), why))
            continue
        if not selected(site.path, layers):
            report.kept.append((where(site.path, site.module), "not in the chosen layers"))
            continue
        blur = Blur(kernel, _circular(site, network))
        if site.kind == "conv":
            stride = site.stride[0] // 2
            if site.after is not None:
                replacements[site.path] = RestridedConv2d(site.module, stride, blur.circular)
                insertions.append(Insertion(site.after, blur, child_name(site.after, "blurpool")))
            elif site.pointwise:
                replacements[site.path] = RestridedConv2d(site.module, stride, blur.circular, pre=blur)
            else:
                replacements[site.path] = RestridedConv2d(site.module, stride, blur.circular, post=blur)
        elif site.kind == "max":
            replacements[site.path] = stride1_pool(site.module, network, blur, kernel=resnet_pool(model))
        else:
            replacements[site.path] = blur
        report.replaced.append(site.path)
    report.kept += [(layer, f"cannot: {why}") for layer, why in analysis.unsupported]
    model = replace_modules(model, replacements)
    return insert_after(model, analysis.graph, insertions), report
