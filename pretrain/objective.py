"""Future-feature prediction: the default pre-training objective, and its held-out evaluation.

Shape legend: B clips, S source frames, K target frames, V visible patches
per target frame, N patches, D encoder width. With encoder.feature_layers the
batch also carries the sources' chosen blocks (``ClipBatch.source_layers_BSLND``),
which only the model's input uses; targets and copy-last are final-block.

Targets are the frozen encoder's own layer-normed features of later frames.
A small visible fraction of each target frame is encoded from the visible
patches ONLY (encoding the full frame and picking tokens would leak masked
content through attention); the loss is L1 on the masked positions. Batches
from feature shards carry such visible tokens precomputed by the encode pass
(``ClipBatch.visible_idx_BKV``), and those are used instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pretrain.data import ClipBatch, EncodedVideo, Window, gather_batch
from pretrain.encoder import FrozenEncoder
from pretrain.model.predictor import FuturePredictor


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


def masked_positions(visible_idx_BKV: Tensor, N: int) -> Tensor:
    """1.0 where a patch is masked (a prediction target), (B, K, N) float."""
    B, K, _ = visible_idx_BKV.shape
    mask_BKN = torch.ones(B, K, N, device=visible_idx_BKV.device)
    return mask_BKN.scatter(2, visible_idx_BKV, 0.0)


def normed_targets(target_tokens_BKND: Tensor) -> Tensor:
    return F.layer_norm(target_tokens_BKND.float(), (target_tokens_BKND.shape[-1],))


def l1_per_position(pred_BKND: Tensor, target_tokens_BKND: Tensor) -> Tensor:
    """Mean absolute error over channels, (B, K, N)."""
    return (pred_BKND.float() - normed_targets(target_tokens_BKND)).abs().mean(-1)


def visible_tokens(
    encoder: FrozenEncoder, batch: ClipBatch, visible_fraction: float, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Visible target patches and their tokens: (B, K, V) int64, (B, K, V, D) float32.

    Taken from the batch when it carries them (feature shards); otherwise drawn
    from ``generator`` and encoded from the target pixels of those patches only.
    """
    if batch.visible_idx_BKV is not None and batch.visible_tokens_BKVD is not None:
        return batch.visible_idx_BKV.long(), batch.visible_tokens_BKVD.float()
    B, K = batch.offsets_BK.shape
    N = batch.source_BSND.shape[2]
    visible_idx_BKV = sample_visible_idx(B, K, N, visible_fraction, generator).to(batch.source_BSND.device)
    return visible_idx_BKV, encoder.encode_subset(batch.target_frames_BKCHW, visible_idx_BKV)


@dataclass(slots=True)
class LossOutput:
    loss: Tensor


def objective_loss(
    model: FuturePredictor,
    encoder: FrozenEncoder,
    batch: ClipBatch,
    visible_fraction: float,
    generator: torch.Generator,
) -> LossOutput:
    """L1 between predicted and layer-normed frozen features on masked target positions."""
    N = batch.source_BSND.shape[2]
    visible_idx_BKV, visible_BKVD = visible_tokens(encoder, batch, visible_fraction, generator)
    pred_BKND = model(batch.source_BSND, batch.offsets_BK, visible_idx_BKV, visible_BKVD, batch.source_layers_BSLND)
    mask_BKN = masked_positions(visible_idx_BKV, N)
    l1_BKN = l1_per_position(pred_BKND, batch.target_tokens_BKND)
    loss = (l1_BKN * mask_BKN).sum() / mask_BKN.sum()
    return LossOutput(loss)


@dataclass(slots=True)
class HeldoutResult:
    offset: int
    windows: int
    model_l1: float
    copy_last_l1: float

    @property
    def gain(self) -> float:
        """Relative improvement over copy-last (positive = better than copy-last)."""
        return 1.0 - self.model_l1 / self.copy_last_l1


@torch.no_grad()
def evaluate_batches(
    model: FuturePredictor,
    encoder: FrozenEncoder,
    batches_by_offset: dict[int, Iterable[ClipBatch]],
    visible_fraction: float,
    seed: int = 1234,
) -> list[HeldoutResult]:
    """Held-out masked-position L1 of the model and of copy-last, per target offset.

    Every batch holds one target per clip at its offset. Visible patches are
    drawn from a fixed seed (or come with the batch, for feature shards: the
    loader's unaugmented draw is seeded too) so every model sees the same
    masks; copy-last is scored on the same masked positions.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    results = []
    for offset, batches in sorted(batches_by_offset.items()):
        generator = torch.Generator().manual_seed(seed + offset)
        model_sum = copy_sum = count = 0.0
        clips = 0
        for batch in batches:
            batch = batch.to(device)
            B = batch.offsets_BK.shape[0]
            N = batch.source_BSND.shape[2]
            visible_idx, visible = visible_tokens(encoder, batch, visible_fraction, generator)
            pred = model(batch.source_BSND, batch.offsets_BK, visible_idx, visible, batch.source_layers_BSLND)
            # Copy-last stays the final block's token: the baseline does not depend on feature_layers.
            copy_last = normed_targets(batch.source_BSND[:, -1:]).expand_as(pred)
            mask = masked_positions(visible_idx, N)
            model_sum += (l1_per_position(pred, batch.target_tokens_BKND) * mask).sum().item()
            copy_sum += (l1_per_position(copy_last, batch.target_tokens_BKND) * mask).sum().item()
            count += mask.sum().item()
            clips += B
        if count:
            results.append(HeldoutResult(offset, clips, model_sum / count, copy_sum / count))
    model.train(was_training)
    return results


def evaluate_heldout(
    model: FuturePredictor,
    encoder: FrozenEncoder,
    videos: list[EncodedVideo],
    windows_by_offset: dict[int, list[Window]],
    cfg,
    batch_size: int = 16,
    seed: int = 1234,
) -> list[HeldoutResult]:
    """``evaluate_batches`` over in-memory video windows (data.source='videos')."""

    def batches(offset: int, windows: list[Window]) -> Iterator[ClipBatch]:
        for i in range(0, len(windows), batch_size):
            chunk = windows[i : i + batch_size]
            yield gather_batch(videos, chunk, torch.full((len(chunk), 1), offset, dtype=torch.long), cfg)

    by_offset = {offset: batches(offset, windows) for offset, windows in windows_by_offset.items()}
    return evaluate_batches(model, encoder, by_offset, cfg.objective.visible_fraction, seed)
