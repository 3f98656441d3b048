"""The objective: no leak of masked pixels, and the loss falls when overfitting one batch."""

from __future__ import annotations

import torch

from pretrain.config import Config
from pretrain.data import ClipBatch
from pretrain.encoder import load_encoder
from pretrain.model.predictor import FuturePredictor, spec_from_config
from pretrain.objective import (
    evaluate_batches,
    masked_positions,
    num_visible,
    objective_loss,
    sample_visible_idx,
    visible_tokens,
)


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
    mask_BKN = masked_positions(visible_BKV, encoder.num_tokens).bool()
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
    mask = masked_positions(visible, 5)
    assert mask.tolist() == [[[0.0, 1.0, 1.0, 0.0, 1.0]]]


def _fixed_batch(encoder, cfg: Config) -> ClipBatch:
    g = torch.Generator().manual_seed(1)
    S, K = cfg.objective.source_frames, 1
    frames = torch.randint(0, 256, (2, S + K, 3, 56, 56), dtype=torch.uint8, generator=g)
    tokens = encoder.encode(frames)
    return ClipBatch(tokens[:, :S], tokens[:, S:], frames[:, S:], torch.tensor([[1], [2]]))


def test_loss_falls_when_overfitting_one_batch(tiny_cfg: Config) -> None:
    torch.manual_seed(0)
    encoder = _encoder(tiny_cfg)
    model = FuturePredictor(spec_from_config(tiny_cfg, encoder.embed_dim, encoder.grid, encoder.grid))
    batch = _fixed_batch(encoder, tiny_cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        # Same masks every step: a fixed batch to memorize.
        out = objective_loss(model, encoder, batch, 0.25, torch.Generator().manual_seed(7))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_untrained_residual_model_is_copy_last(tiny_cfg: Config) -> None:
    encoder = _encoder(tiny_cfg)
    model = FuturePredictor(spec_from_config(tiny_cfg, encoder.embed_dim, encoder.grid, encoder.grid))
    batch = _fixed_batch(encoder, tiny_cfg)
    visible = sample_visible_idx(2, 1, encoder.num_tokens, 0.25, torch.Generator().manual_seed(0))
    pred = model(
        batch.source_BSND, batch.offsets_BK, visible, encoder.encode_subset(batch.target_frames_BKCHW, visible)
    )
    last = torch.nn.functional.layer_norm(batch.source_BSND[:, -1], (encoder.embed_dim,))
    torch.testing.assert_close(pred[:, 0], last)


def test_every_trainable_parameter_gets_a_gradient(tiny_cfg: Config) -> None:
    encoder = _encoder(tiny_cfg)
    model = FuturePredictor(spec_from_config(tiny_cfg, encoder.embed_dim, encoder.grid, encoder.grid))
    # A non-zero head so gradients flow past it on the first step.
    torch.nn.init.normal_(model.head.weight, std=0.02)
    batch = _fixed_batch(encoder, tiny_cfg)
    objective_loss(model, encoder, batch, 0.25, torch.Generator().manual_seed(0)).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert all(p.grad is None for p in encoder.parameters())


def test_precomputed_visible_tokens_replace_sampling_and_encoding(tiny_cfg: Config) -> None:
    """A batch carrying visible tokens (feature shards) gives the loss of those same tokens encoded on the fly."""
    encoder = _encoder(tiny_cfg)
    model = FuturePredictor(spec_from_config(tiny_cfg, encoder.embed_dim, encoder.grid, encoder.grid))
    torch.nn.init.normal_(model.head.weight, std=0.02)
    batch = _fixed_batch(encoder, tiny_cfg)
    visible_BKV = sample_visible_idx(2, 1, encoder.num_tokens, 0.25, torch.Generator().manual_seed(3))
    reference = objective_loss(model, encoder, batch, 0.25, torch.Generator().manual_seed(3))

    stored = ClipBatch(
        batch.source_BSND,
        batch.target_tokens_BKND,
        torch.zeros(2, 1, 3, 0, 0, dtype=torch.uint8),
        batch.offsets_BK,
        visible_BKV.int(),
        encoder.encode_subset(batch.target_frames_BKCHW, visible_BKV).to(torch.bfloat16).float(),
    )
    # No pixels and a generator that is never drawn from: the stored tokens are all it has.
    untouched = torch.Generator().manual_seed(99)
    state = untouched.get_state()
    out = objective_loss(model, encoder, stored, 0.25, untouched)
    assert torch.equal(untouched.get_state(), state)
    # The stored positions are the ones the loss masks: the same masked tokens as the on-the-fly draw.
    stored_idx, _ = visible_tokens(encoder, stored, 0.25, untouched)
    assert torch.equal(stored_idx, visible_BKV)
    torch.testing.assert_close(out.loss, reference.loss, rtol=0, atol=1e-2)

    [result] = evaluate_batches(model, encoder, {1: [stored]}, 0.25)
    assert result.windows == 2 and result.model_l1 > 0
