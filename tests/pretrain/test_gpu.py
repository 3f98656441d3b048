"""CUDA paths of the spine: bf16 frozen encoder, bf16 autocast training step. Marked gpu."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pretrain.config import load_config
from pretrain.encoder import load_encoder
from pretrain.trainer import Trainer
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.gpu


def test_encoder_is_bf16_only_on_cuda_and_matches_fp32() -> None:
    cpu = load_encoder("random", arch="vit_test", image_size=56, device="cpu")
    gpu = load_encoder("random", arch="vit_test", image_size=56, device="cuda")
    assert all(p.dtype == torch.bfloat16 for p in gpu.parameters())
    assert gpu.weights_hash == cpu.weights_hash
    frames = torch.randint(0, 256, (2, 3, 3, 56, 56), dtype=torch.uint8)
    torch.testing.assert_close(gpu.encode(frames.cuda()).cpu(), cpu.encode(frames), atol=0.1, rtol=0.05)


def test_training_steps_on_cuda(tmp_path: Path) -> None:
    cfg = load_config("tiny-cpu", [*tiny_overrides(tmp_path), "--run.device=cuda"])
    trainer = Trainer(cfg)
    result = trainer.train()
    assert result.step == cfg.train.steps
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in trainer.state.history)
