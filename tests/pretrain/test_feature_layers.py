"""encoder.feature_layers wired through training: adapters are trainable, saved, exported and used by eval.

Shape legend: B clips, S source frames, K target frames, L chosen blocks, N patches, D encoder width.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from data_shards import sample_video_path
from eval.features import build_feature_path, encode_frames, load_checked_encoder, read_export
from eval.run import main as run_main
from eval.selfsup import future_prediction_eval, source_and_target_tokens
from pretrain.config import Config, ConfigError, load_config
from pretrain.data import ClipBatch
from pretrain.encoder import FrozenEncoder, load_encoder
from pretrain.export import load_export
from pretrain.features import Features, FeatureSettings, frozen_features
from pretrain.model.predictor import FuturePredictor, spec_from_config
from pretrain.objective import objective_loss
from pretrain.trainer import Trainer
from tests.conftest import tiny_overrides

LAYERS = [0, 1]
"""Both blocks of the 2-block vit_test encoder of the tiny overrides."""


def _cfg(tmp_path: Path, *extra: str) -> Config:
    return load_config("tiny-cpu", tiny_overrides(tmp_path, f"--encoder.feature_layers={LAYERS}", *extra))


def _encoder(cfg: Config) -> FrozenEncoder:
    return load_encoder("random", arch="vit_test", image_size=56, chunk_frames=5)


def _features(encoder: FrozenEncoder, cfg: Config) -> Features:
    """The stage's output for two clips of raw frames, targets at offsets 1 and 2, 4 of 16 patches visible."""
    g = torch.Generator().manual_seed(3)
    S = cfg.objective.source_frames
    frames_BTCHW = torch.randint(0, 256, (2, S + 2, 3, 56, 56), dtype=torch.uint8, generator=g)
    batch = ClipBatch(torch.tensor([[1], [2]]), frames_BTCHW=frames_BTCHW)
    settings = FeatureSettings.from_config(cfg)
    settings = FeatureSettings(settings.source_frames, 0.25, settings.feature_layers)
    return frozen_features(encoder, batch, settings, torch.Generator().manual_seed(0))


def test_encode_with_layers_is_one_pass_of_encode_layers(tmp_path: Path) -> None:
    encoder = _encoder(_cfg(tmp_path))
    frames = torch.randint(0, 256, (2, 3, 3, 56, 56), dtype=torch.uint8)
    final_BTND, layers_BTLND = encoder.encode_with_layers(frames, [1, 0])
    assert layers_BTLND.shape == (2, 3, 2, encoder.num_tokens, encoder.embed_dim)
    torch.testing.assert_close(final_BTND, encoder.encode(frames))
    block1, block0 = encoder.encode_layers(frames, [1, 0])
    torch.testing.assert_close(layers_BTLND[:, :, 0], block1)
    torch.testing.assert_close(layers_BTLND[:, :, 1], block0)


def test_untrained_adapters_feed_the_core_the_plain_block_mean(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    encoder = _encoder(cfg)
    model = FuturePredictor(spec_from_config(cfg, encoder.embed_dim, encoder.grid, encoder.grid))
    f = _features(encoder, cfg)
    mixed_BSND = model.source_features(f.source_BSND, f.source_layers_BSLND)
    torch.testing.assert_close(mixed_BSND, f.source_layers_BSLND.mean(dim=2))
    # The residual base (copy-last) stays the final block: an untrained model is still copy-last.
    pred = model(f.source_BSND, f.offsets_BK, f.visible_idx_BKV, f.visible_BKVD, f.source_layers_BSLND)
    last = torch.nn.functional.layer_norm(f.source_BSND[:, -1], (encoder.embed_dim,))
    torch.testing.assert_close(pred[:, 0], last)


def test_adapters_get_gradients_and_blocks_are_required(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    encoder = _encoder(cfg)
    model = FuturePredictor(spec_from_config(cfg, encoder.embed_dim, encoder.grid, encoder.grid))
    torch.nn.init.normal_(model.head.weight, std=0.02)
    features = _features(encoder, cfg)
    objective_loss(model, features).loss.backward()
    adapter_grads = {n: p.grad for n, p in model.named_parameters() if n.startswith("layer_adapters.")}
    assert len(adapter_grads) == 2 * len(LAYERS)
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in adapter_grads.values())
    assert all(p.grad is None for p in encoder.parameters())
    with pytest.raises(ValueError, match=r"feature_layers=\[0, 1\] needs source blocks"):
        model.memory(features.source_BSND)


def test_clip_shard_batches_carry_the_source_blocks(tmp_path: Path) -> None:
    """The stage encodes the chosen blocks of raw source frames, and only when feature_layers asks for them."""
    cfg = _cfg(tmp_path)
    encoder = _encoder(cfg)
    S = cfg.objective.source_frames
    frames_BTCHW = torch.randint(0, 256, (2, cfg.objective.clip_frames, 3, 56, 56), dtype=torch.uint8)
    batch = ClipBatch(torch.tensor([[1], [4]]), frames_BTCHW=frames_BTCHW)
    features = frozen_features(encoder, batch, FeatureSettings.from_config(cfg), torch.Generator())
    assert features.source_layers_BSLND is not None
    assert features.source_layers_BSLND.shape == (2, S, len(LAYERS), encoder.num_tokens, encoder.embed_dim)
    torch.testing.assert_close(features.source_layers_BSLND[:, :, -1], features.source_BSND)
    off = FeatureSettings.from_config(load_config("tiny-cpu", tiny_overrides(tmp_path)))
    assert frozen_features(encoder, batch, off, torch.Generator()).source_layers_BSLND is None


def test_train_export_and_eval_features_with_feature_layers(tmp_path: Path) -> None:
    trainer = Trainer(_cfg(tmp_path, "--train.steps=4"))
    result = trainer.train()
    assert result.export_dir is not None
    # Adapters moved away from the identity: the optimizer trains them.
    weight = trainer.model.layer_adapters.adapters[0].weight.detach()
    assert not torch.equal(weight, torch.eye(weight.shape[0]))
    # Untrained (identity adapters, zero head) is exactly copy-last on the held-out windows.
    for r in result.heldout_untrained:
        assert r.model_l1 == pytest.approx(r.copy_last_l1, rel=1e-5)

    model, meta = load_export(result.export_dir)
    assert meta["model_spec"]["feature_layers"] == LAYERS
    assert meta["config"]["encoder"]["feature_layers"] == LAYERS
    exported = model.state_dict()
    assert any(k.startswith("layer_adapters.") for k in exported)
    for key, value in trainer.model.state_dict().items():
        torch.testing.assert_close(exported[key], value.cpu(), rtol=0, atol=0)

    export = read_export(result.export_dir)
    encoder = load_checked_encoder(export)
    assert encoder.feature_adapters is not None and encoder.feature_adapters.layers == tuple(LAYERS)
    # Token caches must not mix plain and adapted tokens of the same encoder.
    assert encoder.weights_hash != export.encoder_hash
    frames = torch.randint(0, 256, (1, 3, 3, 56, 56), dtype=torch.uint8)
    tokens_BTND = encode_frames(encoder, frames)
    blocks = encoder.encode_layers(frames, LAYERS)
    torch.testing.assert_close(tokens_BTND, model.layer_adapters(blocks))
    path = build_feature_path(export, "pretrained", "streaming", "frozen", seed=0)
    assert path(tokens_BTND).shape == (1, 3, encoder.num_tokens, export.spec.dim)
    # The eval CLI end to end on this export: procedural clips encoded through the adapters.
    out = tmp_path / "eval"
    args = ["--export", str(result.export_dir), "--out", str(out), "--steps=2", "--task", "classification"]
    data = [f"--cache={tmp_path / 'eval-cache'}", "--train-videos=4", "--test-videos=2", "--frames=6", "--size=32"]
    assert run_main([*args, *data, "--no-mlflow"]) == 0
    assert (out / "classification" / "pretrained" / "report.json").is_file()
    # Future prediction on a video folder: sources through the blocks, targets final-block.
    videos = tmp_path / "videos"
    videos.mkdir()
    shutil.copy(sample_video_path("carphone"), videos / "carphone.mp4")
    results, _ = future_prediction_eval(export, encoder, videos, max_frames=40)
    assert [r.offset for r in results] == sorted(meta["config"]["objective"]["target_offsets"])
    plain = load_encoder("random", arch="vit_test", image_size=56)
    frames_TCHW = torch.randint(0, 256, (4, 3, 56, 56), dtype=torch.uint8)
    tokens_TND, blocks_TLND = source_and_target_tokens(encoder, frames_TCHW, LAYERS)
    torch.testing.assert_close(tokens_TND, plain.encode(frames_TCHW[None])[0])
    assert blocks_TLND is not None and blocks_TLND.shape[1] == len(LAYERS)
    for r in results:
        assert 0 < r.model_l1 < 10 and 0 < r.copy_last_l1 < 10


def test_feature_layers_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"encoder\.feature_layers.*distinct"):
        _cfg(tmp_path, "--encoder.feature_layers=[1, 1]")
    with pytest.raises(ConfigError, match=r"encoder\.feature_layers.*>= 0"):
        _cfg(tmp_path, "--encoder.feature_layers=[-1]")
    with pytest.raises(ConfigError, match=r"encoder\.feature_layers.*\[0, 2\)"):
        _cfg(tmp_path, "--encoder.feature_layers=[0, 2]")
    # Feature shards are checked against feature_layers when training starts:
    # tests/pretrain/test_shard_training.py::test_train_from_feature_shards_with_encoder_blocks.


def test_feature_layers_beyond_the_loaded_encoder_are_refused_at_build(tmp_path: Path) -> None:
    # No encoder.arch in the config: the depth is only known once the weights are loaded.
    cfg = _cfg(tmp_path, "--encoder.arch=", "--encoder.feature_layers=[3, 40]")
    with pytest.raises(ConfigError, match=r"encoder\.feature_layers.*\[0, 12\)"):
        Trainer(cfg)
