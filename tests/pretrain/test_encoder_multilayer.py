"""Multi-layer features: the frozen encoder returns chosen blocks, the adapters average them."""

import pytest
import torch

from pretrain.encoder import load_encoder
from pretrain.model.layer_adapters import LayerAdapters


def test_encode_layers_last_block_equals_encode() -> None:
    encoder = load_encoder("random", arch="vit_test16", image_size=32, chunk_frames=3)
    frames = torch.randint(0, 256, (2, 3, 3, 40, 40), dtype=torch.uint8)
    first, last = encoder.encode_layers(frames, [0, encoder.arch.depth - 1])
    assert first.shape == last.shape == (2, 3, 4, encoder.embed_dim)
    torch.testing.assert_close(last, encoder.encode(frames))
    assert not torch.allclose(first, last)


def test_adapters_start_as_the_plain_mean_and_train() -> None:
    adapters = LayerAdapters([5, 11, 17, 23], dim=8)
    tokens_L = [torch.randn(2, 3, 8) for _ in range(4)]
    torch.testing.assert_close(adapters(tokens_L), torch.stack(tokens_L).mean(0))
    adapters(tokens_L).square().sum().backward()
    assert all(p.grad is not None for p in adapters.parameters())
    with pytest.raises(ValueError, match="expected 4 blocks"):
        adapters(tokens_L[:3])
    with pytest.raises(ValueError, match="distinct"):
        LayerAdapters([1, 1], dim=8)
