"""Future-feature prediction: the default pre-training objective, and its held-out evaluation.

Shape legend: B clips, S source frames, K target frames, V visible patches
per target frame, N patches, D encoder width. With encoder.feature_layers the
model's inputs also carry the sources' chosen blocks
(``Features.source_layers_BSLND``), which only the model's input uses;
targets and copy-last are final-block.

Targets are the frozen encoder's own layer-normed features of later frames;
the loss is L1 on the masked positions (every patch that is not visible;
every patch of a recalled past frame, which shows none).
The loss reads tensors only (``pretrain.features.Features``): the frozen
encoder runs before it, in ``pretrain.features.frozen_features``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pretrain.data import ClipBatch
from pretrain.encoder import FrozenEncoder
from pretrain.features import Features, FeatureSettings, frozen_features
from pretrain.model.predictor import FuturePredictor


def masked_positions(visible_idx_BKV: Tensor, N: int, offsets_BK: Tensor) -> Tensor:
    """1.0 where a patch is masked (a prediction target), (B, K, N) float.

    A recall target (offset < 0) is masked everywhere: the predictor is shown none of a recalled
    frame's tokens (``FuturePredictor.forward``), so every patch of it is a target.
    """
    B, K, _ = visible_idx_BKV.shape
    mask_BKN = torch.ones(B, K, N, device=visible_idx_BKV.device).scatter(2, visible_idx_BKV, 0.0)
    return torch.where((offsets_BK < 0)[..., None].to(mask_BKN.device), 1.0, mask_BKN)


def normed_targets(target_tokens_BKND: Tensor) -> Tensor:
    return F.layer_norm(target_tokens_BKND.float(), (target_tokens_BKND.shape[-1],))


def l1_per_position(pred_BKND: Tensor, target_tokens_BKND: Tensor) -> Tensor:
    """Mean absolute error over channels, (B, K, N)."""
    return (pred_BKND.float() - normed_targets(target_tokens_BKND)).abs().mean(-1)


def predict(model: FuturePredictor, features: Features) -> Tensor:
    """The model's prediction of every target token, (B, K, N, D)."""
    return model(
        features.source_BSND,
        features.offsets_BK,
        features.visible_idx_BKV,
        features.visible_BKVD,
        features.source_layers_BSLND,
    )


@dataclass(slots=True)
class LossOutput:
    loss: Tensor


def change_weights(features: Features, mask_BKN: Tensor, change_weight: float) -> Tensor:
    """Per-position loss weights (B, K, N), mean 1 over the masked positions (objective.change_weight).

    c = L1 between a target's layer-normed token and the last source frame's at the same patch: how
    much that patch changes. The weight mixes 1 with c / mean(c) so the loss keeps its scale.
    """
    last_BKND = features.source_BSND[:, -1:].expand_as(features.target_BKND)
    change_BKN = l1_per_position(normed_targets(last_BKND), features.target_BKND)
    mean_change = (change_BKN * mask_BKN).sum() / mask_BKN.sum().clamp_min(1.0)
    relative_BKN = change_BKN / mean_change.clamp_min(1e-6)
    return (1.0 - change_weight) + change_weight * relative_BKN


def objective_loss(model: FuturePredictor, features: Features, change_weight: float = 0.0) -> LossOutput:
    """L1 between predicted and layer-normed frozen features on masked target positions.

    ``change_weight`` > 0 weights each position by how much its target changes from the last source
    frame (``change_weights``); 0 is the plain mean.
    """
    N = features.source_BSND.shape[2]
    pred_BKND = predict(model, features)
    mask_BKN = masked_positions(features.visible_idx_BKV, N, features.offsets_BK)
    l1_BKN = l1_per_position(pred_BKND, features.target_BKND)
    # Plain L1 (the default) computes no change at all.
    weight_BKN = (
        mask_BKN if change_weight == 0.0 else change_weights(features, mask_BKN, change_weight).detach() * mask_BKN
    )
    loss = (l1_BKN * weight_BKN).sum() / mask_BKN.sum()
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
    settings: FeatureSettings,
    seed: int = 1234,
) -> list[HeldoutResult]:
    """Held-out masked-position L1 of the model and of copy-last, per target offset.

    Every batch holds one target per clip at its offset and goes through the
    training step's stage (``frozen_features``). Visible patches are drawn
    from a fixed seed (or come with the batch, for feature shards: the
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
            features = frozen_features(encoder, batch.to(device), settings, generator)
            N = features.source_BSND.shape[2]
            pred_BKND = predict(model, features)
            # Copy-last stays the final block's token: the baseline does not depend on feature_layers.
            copy_last_BKND = normed_targets(features.source_BSND[:, -1:]).expand_as(pred_BKND)
            mask_BKN = masked_positions(features.visible_idx_BKV, N, features.offsets_BK)
            model_sum += (l1_per_position(pred_BKND, features.target_BKND) * mask_BKN).sum().item()
            copy_sum += (l1_per_position(copy_last_BKND, features.target_BKND) * mask_BKN).sum().item()
            count += mask_BKN.sum().item()
            clips += features.offsets_BK.shape[0]
        if count:
            results.append(HeldoutResult(offset, clips, model_sum / count, copy_sum / count))
    model.train(was_training)
    return results
