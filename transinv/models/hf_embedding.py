"""A transformers image encoder as a module with one embedding per image (imports torch, so the
Hugging Face source loads it only when it builds an encoder)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import UserError


class ImageEmbedding(nn.Module):
    """A transformers image encoder as a module returning one embedding per image, (N, D): the
    field ``field`` of its output (``pooler_output``, or a multimodal tower's ``image_embeds``)."""

    def __init__(self, encoder: nn.Module, field: str) -> None:
        super().__init__()
        self.encoder, self.field = encoder, field

    def forward(self, pixels: Any) -> Any:
        embedding = getattr(self.encoder(pixel_values=pixels), self.field, None)
        if embedding is None:
            raise UserError(f"{type(self.encoder).__name__} returns no {self.field}: transinv takes it as the embedding")
        return embedding
