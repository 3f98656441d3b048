"""The objective and the frozen-feature stage: no leak of masked pixels, stored tokens give the loss of
encoded ones, and the loss falls when overfitting one batch."""

from __future__ import annotations

import pytest
import torch

from pretrain.config import Config
from pretrain.data import ClipBatch
from pretrain.encoder import load_encoder
from pretrain.features import FeatureSettings, frozen_features, num_visible, sample_visible_idx
from pretrain.model.predictor import FuturePredictor, spec_from_config
from pretrain.objective import evaluate_batches, masked_positions, objective_loss


def _encoder(cfg: Config):
    return load_encoder("random", arch="vit_test", image_size=56, device="cpu", seed=0)


def test_visible_tokens_do_not_see_masked_pixels(tiny_cfg: Config) -> None:
    encoder = _encoder(tiny_cfg)
    g = torch.Generator().manual_seed(0)
    frames_BKCHW = torch.randint(0, 256, (2, 1, 3, 56, 56), dtype=torch.uint8, generator=g)
    visible_BKV = sample_visible_idx(2, 1, encoder.num_tokens, 0.25, g)
    before = encoder.encode_subset(frames_BKCHW, visible_BKV)

    # Repaint every masked patch with new noise; visible patches keep their pixels.
    patch = encoder.arch.patch_size
    grid = encoder.grid
    changed = frames_BKCHW.clone()
    mask_BKN = masked_positions(visible_BKV, encoder.num_tokens, torch.ones(2, 1, dtype=torch.long)).bool()
    for b in range(2):
        for n in torch.nonzero(mask_BKN[b, 0]).flatten().tolist():
            r, c = divmod(n, grid)
            changed[b, 0, :, r * patch : (r + 1) * patch, c * patch : (c + 1) * patch] = torch.randint(
                0, 256, (3, patch, patch), dtype=torch.uint8, generator=g
            )
    assert not torch.equal(changed, frames_BKCHW)
    after = encoder.encode_subset(changed, visible_BKV)
    torch.testing.assert_close(after, before, rtol=0, atol=0)

    # Tokens of the same patches taken from a full-frame encoding DO change: the subset path matters.
    full_before = encoder.encode(frames_BKCHW)[:, 0]
    full_after = encoder.encode(changed)[:, 0]
    idx = visible_BKV[:, 0, :, None].expand(-1, -1, encoder.embed_dim)
    assert not torch.allclose(full_before.gather(1, idx), full_after.gather(1, idx))


def test_num_visible() -> None:
    assert num_visible(256, 0.05) == 13
    assert num_visible(16, 0.05) == 1
    assert num_visible(256, 0.0) == 0


def test_masked_positions_exclude_visible() -> None:
    visible = torch.tensor([[[0, 3]]])
    mask = masked_positions(visible, 5, torch.ones(1, 1, dtype=torch.long))
    assert mask.tolist() == [[[0.0, 1.0, 1.0, 0.0, 1.0]]]


SETTINGS = FeatureSettings(source_frames=4, visible_fraction=0.25)
"""The tiny config's source frames, with a visible fraction that shows 4 of 16 patches."""


def _fixed_batch(cfg: Config) -> ClipBatch:
    """Two clips of raw frames (S sources and 2 later frames) with targets at offsets 1 and 2."""
    g = torch.Generator().manual_seed(1)
    S = cfg.objective.source_frames
    frames = torch.randint(0, 256, (2, S + 2, 3, 56, 56), dtype=torch.uint8, generator=g)
    return ClipBatch(torch.tensor([[1], [2]]), ["a", "b"], frames_BTCHW=frames)


def _features(encoder, cfg: Config, seed: int):
    return frozen_features(encoder, _fixed_batch(cfg), SETTINGS, torch.Generator().manual_seed(seed))


def test_the_stage_encodes_sources_targets_and_visible_patches_of_raw_frames(tiny_cfg: Config) -> None:
    encoder = _encoder(tiny_cfg)
    batch = _fixed_batch(tiny_cfg)
    features = frozen_features(encoder, batch, SETTINGS, torch.Generator().manual_seed(3))
    frames = batch.frames_BTCHW
    torch.testing.assert_close(features.source_BSND, encoder.encode(frames[:, :4]), rtol=0, atol=0)
    # Targets at S - 1 + offset: frame 4 of clip 0, frame 5 of clip 1.
    targets = torch.stack([frames[0, 4:5], frames[1, 5:6]])
    torch.testing.assert_close(features.target_BKND, encoder.encode(targets), rtol=0, atol=0)
    visible = sample_visible_idx(2, 1, encoder.num_tokens, 0.25, torch.Generator().manual_seed(3))
    assert torch.equal(features.visible_idx_BKV, visible)
    torch.testing.assert_close(features.visible_BKVD, encoder.encode_subset(targets, visible), rtol=0, atol=0)
    assert features.source_layers_BSLND is None


def test_loss_falls_when_overfitting_one_batch(tiny_cfg: Config) -> None:
    torch.manual_seed(0)
    encoder = _encoder(tiny_cfg)
    model = FuturePredictor(spec_from_config(tiny_cfg, encoder.embed_dim, encoder.grid, encoder.grid))
    # Same masks every step: a fixed batch to memorize.
    features = _features(encoder, tiny_cfg, seed=7)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        out = objective_loss(model, features)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_untrained_residual_model_is_copy_last(tiny_cfg: Config) -> None:
    encoder = _encoder(tiny_cfg)
    model = FuturePredictor(spec_from_config(tiny_cfg, encoder.embed_dim, encoder.grid, encoder.grid))
    f = _features(encoder, tiny_cfg, seed=0)
    pred = model(f.source_BSND, f.offsets_BK, f.visible_idx_BKV, f.visible_BKVD)
    last = torch.nn.functional.layer_norm(f.source_BSND[:, -1], (encoder.embed_dim,))
    torch.testing.assert_close(pred[:, 0], last)


def test_every_trainable_parameter_gets_a_gradient(tiny_cfg: Config) -> None:
    encoder = _encoder(tiny_cfg)
    model = FuturePredictor(spec_from_config(tiny_cfg, encoder.embed_dim, encoder.grid, encoder.grid))
    # A non-zero head so gradients flow past it on the first step.
    torch.nn.init.normal_(model.head.weight, std=0.02)
    objective_loss(model, _features(encoder, tiny_cfg, seed=0)).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert all(p.grad is None for p in encoder.parameters())


def test_stored_tokens_and_visible_sets_give_the_loss_of_encoding_on_the_fly(tiny_cfg: Config) -> None:
    """A batch of stored tokens and visible sets (feature shards) goes through the stage without the encoder
    or the generator, to the loss of the same clips encoded from pixels with the same visible patches."""
    encoder = _encoder(tiny_cfg)
    model = FuturePredictor(spec_from_config(tiny_cfg, encoder.embed_dim, encoder.grid, encoder.grid))
    torch.nn.init.normal_(model.head.weight, std=0.02)
    batch = _fixed_batch(tiny_cfg)
    reference = objective_loss(model, frozen_features(encoder, batch, SETTINGS, torch.Generator().manual_seed(3)))

    # What an encode pass stores: bf16 tokens of every frame, one visible set per frame.
    frames = batch.frames_BTCHW
    B, T = frames.shape[:2]
    visible_BTV = sample_visible_idx(B, T, encoder.num_tokens, 0.25, torch.Generator().manual_seed(3))
    # The targets' frames (4 and 5) get the sets the on-the-fly draw gives them.
    drawn_BKV = sample_visible_idx(B, 1, encoder.num_tokens, 0.25, torch.Generator().manual_seed(3))
    visible_BTV[0, 4], visible_BTV[1, 5] = drawn_BKV[0, 0], drawn_BKV[1, 0]
    stored = ClipBatch(
        batch.offsets_BK,
        batch.keys,
        tokens_BTND=encoder.encode(frames).to(torch.bfloat16),
        visible_idx_BTV=visible_BTV.int(),
        visible_tokens_BTVD=encoder.encode_subset(frames, visible_BTV).to(torch.bfloat16),
    )
    untouched = torch.Generator().manual_seed(99)
    state = untouched.get_state()
    features = frozen_features(None, stored, SETTINGS, untouched)  # no encoder: nothing is encoded
    assert torch.equal(untouched.get_state(), state)
    # The stored positions are the ones the loss masks: the same masked tokens as the on-the-fly draw.
    assert torch.equal(features.visible_idx_BKV, drawn_BKV)
    torch.testing.assert_close(objective_loss(model, features).loss, reference.loss, rtol=0, atol=1e-2)

    [result] = evaluate_batches(model, encoder, {1: [stored.rows(0, 1)]}, SETTINGS)
    assert result.windows == 1 and result.model_l1 > 0


def test_a_batch_without_visible_sets_or_pixels_is_refused(tiny_cfg: Config) -> None:
    encoder = _encoder(tiny_cfg)
    tokens = encoder.encode(_fixed_batch(tiny_cfg).frames_BTCHW)
    stored = ClipBatch(torch.tensor([[1], [2]]), tokens_BTND=tokens)
    with pytest.raises(ValueError, match="visible_fraction"):
        frozen_features(encoder, stored, SETTINGS, torch.Generator())
    # Pure forecasting needs neither.
    pure = frozen_features(encoder, stored, FeatureSettings(source_frames=4, visible_fraction=0.0), torch.Generator())
    assert pure.visible_idx_BKV.shape == (2, 1, 0) and pure.visible_BKVD.shape == (2, 1, 0, encoder.embed_dim)
