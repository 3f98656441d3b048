"""Trainable adapters that average several frozen-encoder blocks into one feature.

The paper feeds blocks 5, 11, 17 and 23 of ViT-L/16 through small trainable
adapters and averages them. The adapters belong to the trainable side (the
encoder stays frozen and returns the blocks, see
`VisionTransformer.forward_layers` / `FrozenEncoder.encode_layers`). Off by
default: with no layers configured nothing here is built.

Shape legend: L chosen blocks, D encoder width, `...` any leading dims
(e.g. B, T, N).
"""

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["LayerAdapters"]


class LayerAdapters(nn.Module):
    """One D -> D linear map per chosen block, then the mean over blocks.

    Each map starts as the identity with zero bias, so an untrained module is
    the plain average of the blocks' (final-normed) tokens, and training starts
    from a feature no worse than that average.
    """

    def __init__(self, layers: Sequence[int], dim: int) -> None:
        super().__init__()
        if not layers or len(set(layers)) != len(layers) or any(i < 0 for i in layers):
            raise ValueError(f"layers must be distinct block indices >= 0, got {list(layers)}")
        self.layers = tuple(int(i) for i in layers)
        self.adapters = nn.ModuleList(nn.Linear(dim, dim) for _ in self.layers)
        for adapter in self.adapters:
            nn.init.eye_(adapter.weight)
            nn.init.zeros_(adapter.bias)

    def forward(self, tokens_L: Sequence[torch.Tensor]) -> torch.Tensor:
        """L tensors (..., D), in the order of `layers` -> their adapted mean (..., D)."""
        if len(tokens_L) != len(self.adapters):
            raise ValueError(f"expected {len(self.adapters)} blocks {self.layers}, got {len(tokens_L)} tensors")
        adapted = [adapter(tokens) for adapter, tokens in zip(self.adapters, tokens_L, strict=True)]
        return torch.stack(adapted).mean(dim=0)
