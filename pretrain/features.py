"""The frozen-feature stage: what a batch source read -> the model's inputs, the one place the ViT runs in a step.

Shape legend: B clips, T = S + max offset strided frames of a clip, S source
frames, K target frames, V visible patches per target frame, L chosen encoder
blocks (encoder.feature_layers), N patches, D encoder width, C=3, H=W=image_size.

A batch source hands over only what it read (``pretrain.data.ClipBatch``):
the uint8 frames of each clip (clip shards), or the tokens an encode pass
stored for them (feature shards), with the drawn target offsets.
``frozen_features`` turns either into ``Features``, tensors only: the
source tokens (and the chosen blocks of the source frames), the targets'
final-block tokens, and each target's visible patches with their tokens.
The rule is one for every source: what the batch carries is used as it is,
what it lacks is encoded from its pixels. So clip batches are encoded here
(sources, targets, then the visible patches of the targets from those
patches only: tokens of a full frame would leak the masked content through
attention), and feature batches are only split (their visible sets were
encoded from visible patches by the encode pass). The trainer calls it once
per micro-batch under ``torch.no_grad``; the held-out evaluation
(``pretrain.objective.evaluate_batches``) calls it too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pretrain.config import Config
from pretrain.data import ClipBatch
from pretrain.encoder import FrozenEncoder


@dataclass(frozen=True, slots=True)
class FeatureSettings:
    """What the stage needs of a run's config."""

    source_frames: int
    """S: the first S frames of a clip are the sources (objective.source_frames)."""
    visible_fraction: float
    """Fraction of each target frame's patches shown to the predictor (objective.visible_fraction)."""
    feature_layers: tuple[int, ...] = ()
    """Blocks of the source frames the core reads (encoder.feature_layers); () = the final block only."""

    @classmethod
    def from_config(cls, cfg: Config) -> FeatureSettings:
        return cls(
            source_frames=cfg.objective.source_frames,
            visible_fraction=cfg.objective.visible_fraction,
            feature_layers=tuple(cfg.encoder.feature_layers),
        )


@dataclass(slots=True)
class Features:
    """The model's inputs for B clips, float32 tokens on the batch's device."""

    source_BSND: Tensor
    """Final-block tokens of the source frames."""
    target_BKND: Tensor
    """Final-block tokens of the target frames (the loss's targets, layer-normed there)."""
    offsets_BK: Tensor
    """int64 target offsets in strided frames after the last source frame (negative: recall of a source frame)."""
    visible_idx_BKV: Tensor
    """int64 sorted visible patch indices of each target frame (V = 0: pure forecasting)."""
    visible_BKVD: Tensor
    """Tokens of those patches, encoded from those patches only."""
    source_layers_BSLND: Tensor | None = None
    """The encoder.feature_layers blocks of the source frames, or None when the core reads the final block."""


def num_visible(num_tokens: int, fraction: float) -> int:
    """Visible patches per target frame: round(fraction*N), at least one when fraction > 0."""
    if fraction <= 0:
        return 0
    return max(1, round(fraction * num_tokens))


def sample_visible_idx(B: int, K: int, N: int, fraction: float, generator: torch.Generator) -> Tensor:
    """Random sorted visible patch indices, (B, K, V) int64 on CPU."""
    V = num_visible(N, fraction)
    noise_BKN = torch.rand(B, K, N, generator=generator)
    return noise_BKN.argsort(dim=-1)[..., :V].sort(dim=-1).values


def target_index(settings: FeatureSettings, offsets_BK: Tensor) -> Tensor:
    """Frame index of each target within its clip, (B, K) int64: S - 1 + offset."""
    return settings.source_frames - 1 + offsets_BK


@torch.no_grad()
def frozen_features(
    encoder: FrozenEncoder, batch: ClipBatch, settings: FeatureSettings, generator: torch.Generator
) -> Features:
    """The model's inputs for ``batch``: stored tokens where it carries them, encoded from its pixels otherwise.

    ``generator`` draws the visible patches of batches that carry no stored
    visible sets (it is not drawn from otherwise). Raises ValueError when the
    batch has neither what the model needs nor pixels to encode it from.
    """
    S = settings.source_frames
    offsets_BK = batch.offsets_BK
    index_BK = target_index(settings, offsets_BK)
    B, K = offsets_BK.shape
    target_frames_BKCHW = None if batch.frames_BTCHW is None else _frames_at(batch.frames_BTCHW, index_BK)
    source_layers_BSLND = None
    if batch.tokens_BTND is not None:
        tokens_BTND = batch.tokens_BTND.float()
        source_BSND = tokens_BTND[:, :S]
        target_BKND = tokens_BTND.gather(1, index_BK[:, :, None, None].expand(-1, -1, *tokens_BTND.shape[2:]))
        if batch.layers_BTLND is not None:
            source_layers_BSLND = batch.layers_BTLND[:, :S].float()
    elif batch.frames_BTCHW is not None and target_frames_BKCHW is not None:
        sources_BSCHW = batch.frames_BTCHW[:, :S]
        if settings.feature_layers:
            source_BSND, source_layers_BSLND = encoder.encode_with_layers(sources_BSCHW, list(settings.feature_layers))
        else:
            source_BSND = encoder.encode(sources_BSCHW)
        target_BKND = encoder.encode(target_frames_BKCHW)
    else:
        raise ValueError("a batch must carry stored tokens or the frames to encode them from")
    if batch.visible_idx_BTV is not None and batch.visible_tokens_BTVD is not None:
        idx_BTV, vis_BTVD = batch.visible_idx_BTV, batch.visible_tokens_BTVD
        visible_idx_BKV = idx_BTV.long().gather(1, index_BK[:, :, None].expand(-1, -1, idx_BTV.shape[2]))
        visible_BKVD = vis_BTVD.float().gather(1, index_BK[:, :, None, None].expand(-1, -1, *vis_BTVD.shape[2:]))
    else:
        device = source_BSND.device
        N = source_BSND.shape[2]
        visible_idx_BKV = sample_visible_idx(B, K, N, settings.visible_fraction, generator).to(device)
        if visible_idx_BKV.shape[2] == 0:
            visible_BKVD = torch.zeros(B, K, 0, source_BSND.shape[-1], device=device)
        elif target_frames_BKCHW is None:
            raise ValueError(
                "objective.visible_fraction > 0 but the batch carries neither visible sets nor pixels "
                "(feature shards encoded without visible sets: re-encode them, or set objective.visible_fraction=0)"
            )
        else:
            visible_BKVD = encoder.encode_subset(target_frames_BKCHW, visible_idx_BKV)
    return Features(source_BSND, target_BKND, offsets_BK, visible_idx_BKV, visible_BKVD, source_layers_BSLND)


def _frames_at(frames_BTCHW: Tensor, index_BK: Tensor) -> Tensor:
    """The frames at ``index_BK`` of each clip, (B, K, C, H, W) uint8."""
    return frames_BTCHW.gather(1, index_BK[:, :, None, None, None].expand(-1, -1, *frames_BTCHW.shape[2:]))
