"""Encoder speed options: static-shape padding, torch.compile, chunk size from free memory."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from pretrain.config import ConfigError, load_config
from pretrain.encoder import (
    AUTO_CHUNK_MAX,
    CPU_CHUNK_FRAMES,
    activation_bytes_per_frame,
    auto_chunk_frames,
    choose_chunk_frames,
    load_encoder,
)
from pretrain.model.vit import VIT_ARCHS

GiB = 2**30


def _frames(B: int, T: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, T, 3, size, size), dtype=torch.uint8, generator=g)


def test_padded_chunks_equal_unpadded_chunks() -> None:
    """B*T = 7 frames in chunks of 3: the last chunk of 1 is padded to 3, then sliced off."""
    plain = load_encoder("random", arch="vit_test16", image_size=32, chunk_frames=3)
    padded = load_encoder("random", arch="vit_test16", image_size=32, chunk_frames=3)
    padded.static_shapes = True
    frames = _frames(1, 7)
    torch.testing.assert_close(padded.encode(frames), plain.encode(frames), rtol=1e-5, atol=1e-5)
    for got, want in zip(padded.encode_layers(frames, [0, 2]), plain.encode_layers(frames, [0, 2]), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    keep = torch.stack([torch.randperm(4)[:2].sort().values for _ in range(7)]).view(1, 7, 2)
    torch.testing.assert_close(
        padded.encode_subset(frames, keep), plain.encode_subset(frames, keep), rtol=1e-5, atol=1e-5
    )


def test_every_padded_call_has_one_shape() -> None:
    encoder = load_encoder("random", arch="vit_test", image_size=28, chunk_frames=4)
    encoder.static_shapes = True
    seen: list[int] = []

    def record(images_BCHW: torch.Tensor) -> torch.Tensor:
        seen.append(images_BCHW.shape[0])
        return encoder.vit.forward(images_BCHW)

    encoder._vit_forward = record
    out = encoder.encode(_frames(2, 5, size=28))
    assert out.shape == (2, 5, encoder.num_tokens, encoder.embed_dim)
    assert seen == [4, 4, 4]
    # A call smaller than a chunk runs at its own (per call site, constant) size, unpadded.
    seen.clear()
    assert encoder.encode(_frames(1, 3, size=28)).shape[1] == 3
    assert seen == [3]


@pytest.mark.slow
def test_compiled_encoder_matches_eager(tmp_path: Path) -> None:
    eager = load_encoder("random", arch="vit_test", image_size=28, chunk_frames=4)
    compiled = load_encoder(
        "random", arch="vit_test", image_size=28, chunk_frames=4, compile=True, compile_cache_dir=str(tmp_path)
    )
    assert compiled.compiled and compiled.static_shapes
    frames = _frames(1, 6, size=28)
    torch.testing.assert_close(compiled.encode(frames), eager.encode(frames), rtol=1e-4, atol=1e-4)
    assert (tmp_path / "inductor").is_dir()


def test_auto_chunk_scales_with_free_memory_and_is_bounded() -> None:
    vitl = VIT_ARCHS["vitl16"]
    per_frame = activation_bytes_per_frame(vitl, 224)
    # 196 patches + CLS + 4 registers of width 1024, MLP 4096: 201 * 14336 bf16 elements
    # (5.8 MB) plus the float32 image (0.6 MB) and output tokens (0.8 MB).
    assert per_frame == 201 * (6 * 1024 + 2 * 4096) * 2 + 3 * 224 * 224 * 4 + 196 * 1024 * 4
    small = auto_chunk_frames(8 * GiB, vitl, 224)
    large = auto_chunk_frames(80 * GiB, vitl, 224)
    assert small % 8 == 0 and large % 8 == 0 and 8 <= small < large <= AUTO_CHUNK_MAX
    assert small == (int(0.5 * 8 * GiB) // per_frame) // 8 * 8
    assert auto_chunk_frames(10**12, vitl, 224) == AUTO_CHUNK_MAX
    assert auto_chunk_frames(1, vitl, 224) == 1
    # The math backend holds the attention scores: fewer frames fit.
    assert auto_chunk_frames(8 * GiB, vitl, 224, attn_backend="math") < small
    # Higher resolution, fewer frames.
    assert auto_chunk_frames(8 * GiB, vitl, 512) < small


def test_chunk_frames_zero_is_auto(caplog: pytest.LogCaptureFixture) -> None:
    assert choose_chunk_frames(VIT_ARCHS["vit_test"], 28, torch.device("cpu"), "sdpa")[0] == CPU_CHUNK_FRAMES
    with caplog.at_level(logging.INFO, logger="pretrain.encoder"):
        encoder = load_encoder("random", arch="vit_test", image_size=28, chunk_frames=0)
    assert encoder.chunk_frames == CPU_CHUNK_FRAMES
    assert "chunk 64 frames (auto" in caplog.text and "torch.compile off" in caplog.text
    assert "attention backend sdpa" in caplog.text


def test_encoder_speed_config_keys() -> None:
    cfg = load_config(
        "tiny-cpu", ["--encoder.chunk_frames=0", "--encoder.compile=true", "--encoder.compile_cache_dir=/tmp/c"]
    )
    assert cfg.encoder.chunk_frames == 0 and cfg.encoder.compile and cfg.encoder.compile_cache_dir == "/tmp/c"
    with pytest.raises(ConfigError, match=r"encoder\.chunk_frames"):
        load_config("tiny-cpu", ["--encoder.chunk_frames=-1"])
    assert load_config("tiny-cpu", ["--encoder.compile_mode=reduce-overhead"]).encoder.compile_mode == "reduce-overhead"
    with pytest.raises(ConfigError, match=r"encoder\.compile_mode"):
        load_config("tiny-cpu", ["--encoder.compile_mode=fastest"])


def test_compiled_outputs_are_copies(caplog: pytest.LogCaptureFixture) -> None:
    """Compiled, each chunk's tokens are copied out at once: a CUDA-graph replay rewrites one static
    output buffer, which here a stand-in forward does on every call."""
    with caplog.at_level(logging.INFO, logger="pretrain.encoder"):
        encoder = load_encoder("random", arch="vit_test16", image_size=32, chunk_frames=2, compile=True)
    assert "torch.compile on (mode default" in caplog.text
    static: list[torch.Tensor] = []

    def replay(images_BCHW: torch.Tensor) -> torch.Tensor:
        out = encoder.vit(images_BCHW)
        if not static:
            static.append(torch.empty_like(out))
        return static[0].copy_(out)

    encoder._vit_forward = replay  # eager math, graph-like output memory, no compile time
    frames = _frames(1, 4, size=32)
    tokens = encoder.encode(frames)
    eager = load_encoder("random", arch="vit_test16", image_size=32, chunk_frames=2)
    torch.testing.assert_close(tokens, eager.encode(frames), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_training_with_a_compiled_encoder_matches_eager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """encoder.compile=true through the trainer: the cache dir fills, and losses match the eager run's."""
    from pretrain.trainer import Trainer
    from tests.conftest import tiny_overrides

    # The cache dir is set through the environment; undo that for the tests that follow.
    for var in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.delenv(var, raising=False)

    cache = tmp_path / "compile-cache"
    histories = []
    for name, extra in (
        ("eager", ()),
        ("compiled", ("--encoder.compile=true", f"--encoder.compile_cache_dir={cache}")),
    ):
        cfg = load_config("tiny-cpu", tiny_overrides(tmp_path / name, "--train.steps=3", *extra))
        trainer = Trainer(cfg)
        assert trainer.encoder.compiled == (name == "compiled")
        trainer.train(finalize=False)
        histories.append([loss for _, loss in trainer.state.history])
    eager, compiled = histories
    assert len(eager) == len(compiled) == 3
    assert compiled == pytest.approx(eager, rel=1e-3, abs=1e-4)
    assert any((cache / "inductor").rglob("*")), "inductor wrote nothing to encoder.compile_cache_dir"
