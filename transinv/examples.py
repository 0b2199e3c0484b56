"""Small constructed networks whose translation behaviour is known exactly.

They serve the known-answer tests and let users check the tool themselves:
``transinv measure example:circular_gap --weights none --mode circular``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def _conv(cin: int, cout: int, stride: int = 1, padding_mode: str = "zeros", padding: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=padding, padding_mode=padding_mode)


def circular_gap(classes: int = 10) -> nn.Module:
    """Stride-1 circular convolutions, global average pooling, linear head: exactly equivariant
    at every layer and exactly invariant at the output under circular shifts."""
    return nn.Sequential(
        _conv(3, 16, padding_mode="circular"),
        nn.ReLU(),
        _conv(16, 32, padding_mode="circular"),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, classes),
    )


def strided_circular(classes: int = 10) -> nn.Module:
    """A stride-1 circular convolution, then a stride-2 one: after it, even shifts are aligned and
    exactly equivariant under circular shifts; odd shifts are not aligned."""
    return nn.Sequential(
        _conv(3, 16, padding_mode="circular"),
        nn.ReLU(),
        _conv(16, 32, stride=2, padding_mode="circular"),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, classes),
    )


def valid_conv(classes: int = 10) -> nn.Module:
    """Unpadded ('valid') stride-1 convolutions: exactly equivariant on the overlap in crop mode."""
    return nn.Sequential(
        _conv(3, 16, padding=0),
        nn.ReLU(),
        _conv(16, 16, padding=0),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, classes),
    )


class Constant(nn.Module):
    """Ignores its input: the output distribution never changes (``prob_change = 0``)."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.randn(classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(x.shape[0], -1)


def constant(classes: int = 10) -> nn.Module:
    """A model whose output does not depend on its input."""
    return Constant(classes)


class TokenMixer(nn.Module):
    """A small vision transformer without position embeddings: a patch embedding (stride ``patch``),
    a class token, blocks of attention and per-token MLPs, a head on the class token. Attention
    without positions is permutation-equivariant and the MLPs act per token, so under circular
    shifts by multiples of ``patch`` every block's patch grid rolls exactly and the output is invariant."""

    def __init__(self, classes: int = 10, patch: int = 4, width: int = 32, depth: int = 2) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, width, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, width))
        self.blocks = nn.Sequential(*(_TokenBlock(width) for _ in range(depth)))
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = self.blocks(torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], dim=1))
        return self.head(tokens[:, 0])


class _TokenBlock(nn.Module):
    """Pre-norm attention and MLP with residuals, as in ViT."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, 4, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


def token_mixer(classes: int = 10) -> nn.Module:
    """See ``TokenMixer``: exactly equivariant at multiples of its patch size (4) under circular shifts."""
    return TokenMixer(classes)


class WindowMixer(nn.Module):
    """A small Swin without positions or shifted windows: a stride-4 patch embedding, two stages of
    window-attention blocks on channels-last ``(N, H, W, C)`` maps (windows of ``window`` x ``window``
    feature pixels; the second stage after a 2x2 patch merge, at stride 8), a head on the mean.
    Attention inside a window is permutation-equivariant, so a circular shift by a multiple of
    ``4 * window`` px moves every first-stage window whole and those blocks' maps roll exactly; the
    second stage's need multiples of ``8 * window``. Its attention scores ``(N * windows, heads,
    window², window²)`` are no feature maps."""

    def __init__(self, classes: int = 10, window: int = 4, width: int = 16) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, width, 4, stride=4)
        self.stage1 = nn.Sequential(_WindowBlock(width, window), _WindowBlock(width, window))
        self.merge = nn.Linear(4 * width, 2 * width)
        self.stage2 = nn.Sequential(_WindowBlock(2 * width, window), _WindowBlock(2 * width, window))
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage1(self.patch_embed(x).permute(0, 2, 3, 1))
        x = torch.cat([x[:, i::2, j::2] for i in (0, 1) for j in (0, 1)], dim=-1)  # 2x2 patches side by side
        return self.head(self.stage2(self.merge(x)).mean(dim=(1, 2)))


class _WindowBlock(nn.Module):
    """Window attention, then a per-token MLP, with residuals; (N, H, W, C) in and out."""

    def __init__(self, width: int, window: int) -> None:
        super().__init__()
        self.attn = _WindowAttention(width, window)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.mlp(x)


class _WindowAttention(nn.Module):
    """Multi-head attention within non-overlapping ``window`` x ``window`` windows of an (N, H, W, C) map."""

    def __init__(self, width: int, window: int, heads: int = 2) -> None:
        super().__init__()
        self.window, self.heads = window, heads
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.softmax = nn.Softmax(dim=-1)  # a module, so its scores are captured like Swin's ``attn.softmax``

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, h, w, c = x.shape
        k = self.window
        windows = x.reshape(n, h // k, k, w // k, k, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, k * k, c)
        q, key, v = self.qkv(windows).reshape(len(windows), k * k, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        scores = self.softmax(q @ key.transpose(-2, -1) / (c // self.heads) ** 0.5)
        mixed = self.proj((scores @ v).transpose(1, 2).reshape(len(windows), k * k, c))
        return mixed.reshape(n, h // k, w // k, k, k, c).permute(0, 1, 3, 2, 4, 5).reshape(n, h, w, c)


def window_mixer(classes: int = 10) -> nn.Module:
    """See ``WindowMixer``: under circular shifts, its first stage's blocks are exactly equivariant at
    multiples of 16 px, its second stage's at multiples of 32 px."""
    return WindowMixer(classes)


def circular_encoder(dims: int = 16) -> nn.Module:
    """Stride-1 circular convolutions and global average pooling, returning the pooled vector:
    an embedding exactly invariant under circular shifts (cosine distance 0, nn_agreement 1)."""
    return nn.Sequential(_conv(3, 16, padding_mode="circular"), nn.ReLU(), _conv(16, dims, padding_mode="circular"),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())


def circular_segmenter(classes: int = 5) -> nn.Module:
    """Stride-1 circular convolutions returning (N, classes, H, W) scores: its maps move exactly with
    the input under circular shifts (pixel_agreement 1, pixel_kl_divergence 0)."""
    return nn.Sequential(_conv(3, 16, padding_mode="circular"), nn.ReLU(), _conv(16, classes, padding_mode="circular"))


class FixedMap(nn.Module):
    """Ignores its input and returns the same (classes, size, size) score map: a segmenter whose
    output does not move with the input, so its pixel agreement at shift ``d`` is the share of
    pixels whose top class equals that ``d`` pixels away in its own map."""

    def __init__(self, classes: int = 5, size: int = 32) -> None:
        super().__init__()
        self.scores = nn.Parameter(torch.randn(classes, size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scores.expand(x.shape[0], -1, -1, -1)


EXAMPLES: dict[str, Callable[[], nn.Module]] = {
    "token_mixer": token_mixer,
    "window_mixer": window_mixer,
    "circular_encoder": circular_encoder,
    "circular_segmenter": circular_segmenter,
    "circular_gap": circular_gap,
    "strided_circular": strided_circular,
    "valid_conv": valid_conv,
    "constant": constant,
}
OUTPUTS: dict[str, str] = {"circular_encoder": "embedding"}  # the examples whose output is not class logits
