"""APS (Chaman & Dokmanic 2021, "Truly shift-invariant convolutional neural networks"), placed and
shared as in the authors' code (achaman2/truly_shift_invariant_cnns, ``models/aps_models``).

Every strided layer runs at stride 1 and is followed by a ``PolyphaseDown`` at the place BlurPool
would put its blur (after the activation that follows a convolution; before a 1x1 shortcut
convolution; after a max-pool, whose window becomes 2x2 in ResNets as in the authors' ResNet).
All strided layers count, the stem included (the authors' ``pool_only=False``). With a blur
kernel (``blurpool+aps``) the map is low-pass filtered, padding circularly as the authors'
``ApsPool`` does, before the component is chosen; an average pool is then replaced by the
filter alone, otherwise it runs at stride 1.

Sharing. Two branches that split and merge again (a residual block's main path and shortcut,
ShuffleNet's two strided branches) must keep the same polyphase component, or their sum moves
by different amounts. Each tensor of the graph carries the sequence of downsamplings applied on
its way from the input; where tensors merge (an addition, a concatenation) their sequences are
matched position by position and the downsamplers at each position share one choice. The first
of them to run chooses (the main path of torchvision's ResNet blocks, as in the authors' code;
the shortcut in RegNet, whose blocks run it first) and the others reuse its choice. A merge of
tensors downsampled a different number of times cannot be paired: the model is refused.
"""

from __future__ import annotations

from typing import Sequence

import torch.fx as fx
from torch import nn

from .blurpool import check_kernel, resnet_pool, selected
from .downsample import Blur, PhaseGroup, PolyphaseDown
from .graph import Analysis, Insertion, Site, analyse, child_name, insert_after, owner, replace_modules, tensor_ranks
from .rebuilt import RestridedConv2d, conv_mode, network_mode, stride1_pool
from .report import FixError, FixReport, where

DEFAULT_PROBE = 224


class _Sets:
    """Union-find over downsampling points."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, item: int) -> int:
        self.parent.setdefault(item, item)
        while self.parent[item] != item:
            self.parent[item] = self.parent[self.parent[item]]
            item = self.parent[item]
        return item

    def union(self, a: int, b: int) -> None:
        self.parent[self.find(a)] = self.find(b)


def _point(site: Site) -> fx.Node:
    """The node whose output a site's downsampler takes (a 1x1 shortcut's input commutes to its output)."""
    return site.after if site.after is not None else site.node


def _merge_name(node: fx.Node, analysis: Analysis) -> str:
    path, _ = owner(node)
    return f"{node.name} in {where(path, analysis.model.get_submodule(path))}"


def share_choices(analysis: Analysis, points: list[tuple[fx.Node, str]], size: int) -> list[int]:
    """For each downsampling point (node, layer): the index of the point whose choice it uses,
    itself when it chooses (alone, or first to run in its group). FixError when branches that
    merge were downsampled a different number of times."""
    ranks = tensor_ranks(analysis, size)
    index_of = {node: i for i, (node, _) in enumerate(points)}
    sets = _Sets()
    trail: dict[fx.Node, tuple[int, ...] | None] = {}
    for node in analysis.graph.nodes:
        inputs = [trail[n] for n in node.all_input_nodes if trail.get(n) is not None]
        lengths = {len(t) for t in inputs}
        if len(lengths) > 1:
            layers = sorted({points[i][1] for t in inputs for i in t})
            raise FixError(
                f"aps: cannot pair the branches that merge at {_merge_name(node, analysis)}: they were downsampled "
                f"{' and '.join(str(n) for n in sorted(lengths))} times (strided layers {', '.join(layers) or 'none'})"
            )
        for position in zip(*inputs):
            for item in position[1:]:
                sets.union(item, position[0])
        current = inputs[0] if inputs else (() if node.op == "placeholder" else None)
        if node in index_of:
            current = (current or ()) + (index_of[node],)
        trail[node] = current if ranks.get(node, 0) >= 3 else None
    chooser: dict[int, int] = {}
    for node in analysis.graph.nodes:  # the first point of each group to run chooses
        if node in index_of:
            chooser.setdefault(sets.find(index_of[node]), index_of[node])
    return [chooser[sets.find(i)] for i in range(len(points))]


def adaptive_polyphase_in_place(
    model: nn.Module, kernel: int | None = None, layers: Sequence[str] | None = None, size: int = DEFAULT_PROBE
) -> tuple[nn.Module, FixReport]:
    """APS on ``model`` itself (see the module docstring); returns it and what was replaced.

    ``size``: the side of the blank image of the probe pass that tells tensors from other values.
    """
    if kernel is not None:
        check_kernel(kernel)
    analysis = analyse(model)
    if analysis.unsupported:
        layer, why = analysis.unsupported[0]
        raise FixError(f"aps: cannot rebuild {layer}: {why}; APS must replace every strided layer to be exact")
    network = network_mode(model)
    report = FixReport("aps" if kernel is None else f"blurpool:{kernel}+aps")
    points = [(_point(site), site.path) for site in analysis.sites]
    leaders = share_choices(analysis, points, size) if len(points) > 1 else [0] * len(points)
    in_use = {site.path for site in analysis.sites if selected(site.path, layers)}
    for i, leader in enumerate(leaders):
        if (points[i][1] in in_use) != (points[leader][1] in in_use):
            raise FixError(f"aps: layers {points[leader][1]} and {points[i][1]} must share a polyphase choice; "
                           "choose both or neither")
    groups = {i: PhaseGroup(leaders.count(i) - 1) for i in set(leaders) if leaders.count(i) > 1}
    replacements: dict[str, nn.Module] = {}
    insertions: list[Insertion] = []
    for i, site in enumerate(analysis.sites):
        if site.path not in in_use:
            report.kept.append((where(site.path, site.module), "not in the chosen layers"))
            continue
        group = groups.get(leaders[i])
        role = None if group is None else "leader" if leaders[i] == i else "follower"
        down = PolyphaseDown(Blur(kernel, circular=True) if kernel else None, group, role)
        if site.kind == "conv":
            circular = conv_mode(site.module, network) == "circular"
            if site.after is not None:
                replacements[site.path] = RestridedConv2d(site.module, 1, circular)
                insertions.append(Insertion(site.after, down, child_name(site.after, "aps")))
            elif site.pointwise:
                replacements[site.path] = RestridedConv2d(site.module, 1, circular, pre=down)
            else:
                replacements[site.path] = RestridedConv2d(site.module, 1, circular, post=down)
        elif site.kind == "avg" and kernel:
            replacements[site.path] = down
        else:
            replacements[site.path] = stride1_pool(site.module, network, down, kernel=resnet_pool(model))
        report.replaced.append(site.path)
    model = replace_modules(model, replacements)
    return insert_after(model, analysis.graph, insertions), report
