"""Attention backends on CUDA agree within bf16 tolerance. Marked gpu."""

import importlib.util

import pytest
import torch

from pretrain.encoder import load_encoder

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("arch", ["vit_test16", "vit_test"])
def test_attention_backends_agree_in_bf16(arch: str) -> None:
    backends = ["sdpa", "math"] + (["xformers"] if importlib.util.find_spec("xformers") else [])
    size = 64 if arch == "vit_test16" else 56
    images = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0)).cuda()
    outputs = {
        backend: load_encoder("random", arch=arch, image_size=size, device="cuda", attn_backend=backend)(images).float()
        for backend in backends
    }
    for backend in backends[1:]:
        torch.testing.assert_close(outputs[backend], outputs["sdpa"], atol=5e-2, rtol=5e-2)
