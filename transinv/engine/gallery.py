"""The retrieval view of invariance: every image's unshifted embedding, for `nn_agreement`.

A shifted view counts as retrieved when its nearest unshifted embedding (cosine) in the whole
measured set is its own image's. The set's embeddings come from a first pass over the reference
views (one forward pass per image, a 1/shifts share of the run); under torchrun each process
embeds its own images and all processes then hold the whole set. Memory: one vector per image.
"""

from __future__ import annotations

import torch

from .distributed import Context


class Gallery:
    """The unit-length reference embeddings of the run's readable images, by image id."""

    def __init__(self, ids: torch.Tensor, embeddings: torch.Tensor) -> None:
        self.embeddings = torch.nn.functional.normalize(embeddings.double(), dim=1)
        self.rows = torch.full((int(ids.max()) + 1 if len(ids) else 0,), -1, dtype=torch.long,
                               device=embeddings.device)
        self.rows[ids.to(embeddings.device)] = torch.arange(len(ids), device=embeddings.device)

    @classmethod
    def gather(cls, ids: torch.Tensor, embeddings: torch.Tensor, context: Context, device: torch.device) -> Gallery:
        """The gallery of every process's images: this process's ``ids`` and their reference
        ``embeddings`` (N, D), gathered from all processes, in image-id order, on ``device``."""
        parts = [part for part in context.gather((ids.cpu(), embeddings.double().cpu())) if len(part[0])]
        if not parts:
            return cls(torch.zeros(0, dtype=torch.long), torch.zeros(0, 1, dtype=torch.float64, device=device))
        all_ids = torch.cat([p[0] for p in parts])
        order = all_ids.argsort()
        return cls(all_ids[order], torch.cat([p[1] for p in parts])[order].to(device))

    def __len__(self) -> int:
        return len(self.embeddings)

    def own_is_nearest(self, shifted: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Per shifted embedding: 1 when its own image's reference is strictly the most similar of
        the whole set (a tie with another image fails), else 0."""
        rows = self.rows[ids.to(self.rows.device)]
        similarity = torch.nn.functional.normalize(shifted.double(), dim=1) @ self.embeddings.T
        own = similarity.gather(1, rows[:, None])
        return ((similarity < own).sum(dim=1) == len(self) - 1).double()
