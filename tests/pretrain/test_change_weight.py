"""objective.change_weight: the training loss weighted by how much each target patch changes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from pretrain import trainer as trainer_module
from pretrain.config import Config, ConfigError, load_config
from pretrain.features import Features
from pretrain.model.predictor import FuturePredictor, spec_from_config
from pretrain.objective import change_weights, masked_positions, normed_targets, objective_loss
from pretrain.trainer import Trainer
from tests.conftest import tiny_overrides


def _features(B: int = 2, S: int = 3, N: int = 16, D: int = 8, moving: int = 2, seed: int = 0) -> Features:
    """Targets equal the last source frame except on the first ``moving`` patches of each clip."""
    g = torch.Generator().manual_seed(seed)
    source_BSND = torch.randn(B, S, N, D, generator=g)
    target_BKND = source_BSND[:, -1:].clone()
    target_BKND[:, :, :moving] = torch.randn(B, 1, moving, D, generator=g)
    return Features(
        source_BSND=source_BSND,
        target_BKND=target_BKND,
        offsets_BK=torch.ones(B, 1, dtype=torch.long),
        visible_idx_BKV=torch.zeros(B, 1, 0, dtype=torch.long),
        visible_BKVD=torch.zeros(B, 1, 0, D),
    )


def test_bad_change_weight_names_the_key(tiny_cfg: Config) -> None:
    with pytest.raises(ConfigError, match=r"objective\.change_weight"):
        dataclasses.replace(tiny_cfg.objective, change_weight=1.5)


def test_weights_are_one_without_change_weight_and_mean_one_with_it() -> None:
    f = _features()
    mask_BKN = masked_positions(f.visible_idx_BKV, 16, f.offsets_BK)
    assert torch.equal(change_weights(f, mask_BKN, 0.0), torch.ones_like(mask_BKN))
    full_BKN = change_weights(f, mask_BKN, 1.0)
    # Static patches get no weight, the two changed patches all of it; the mean stays 1.
    assert torch.all(full_BKN[:, :, 2:].abs() < 1e-5)
    assert torch.all(full_BKN[:, :, :2] > 1.0)
    torch.testing.assert_close(full_BKN.mean(), torch.tensor(1.0))
    half_BKN = change_weights(f, mask_BKN, 0.5)
    torch.testing.assert_close(half_BKN, 0.5 + 0.5 * full_BKN)


def test_weights_skip_visible_patches_when_normalizing() -> None:
    f = _features(B=1, N=4, moving=1)
    visible = torch.tensor([[[0]]])  # the one changed patch is visible: not a target
    mask_BKN = masked_positions(visible, 4, f.offsets_BK)
    f.visible_idx_BKV = visible
    w_BKN = change_weights(f, mask_BKN, 1.0)
    # Only static patches are masked; their mean change is ~0, so the clamp keeps weights finite.
    assert torch.isfinite(w_BKN).all()


def test_change_weight_zero_is_the_plain_loss_and_one_ignores_static_patches(tiny_cfg: Config) -> None:
    torch.manual_seed(0)
    f = _features(D=32, N=16)
    cfg = dataclasses.replace(tiny_cfg, objective=dataclasses.replace(tiny_cfg.objective, source_frames=3))
    model = FuturePredictor(spec_from_config(cfg, 32, 4, 4))
    torch.nn.init.normal_(model.head.weight, std=0.02)
    plain = objective_loss(model, f).loss
    with torch.no_grad():
        pred_BKND = model(f.source_BSND, f.offsets_BK, f.visible_idx_BKV, f.visible_BKVD)
    l1_BKN = (pred_BKND - normed_targets(f.target_BKND)).abs().mean(-1)
    torch.testing.assert_close(plain, l1_BKN.mean())
    torch.testing.assert_close(objective_loss(model, f, 0.0).loss, plain)
    # With weight 1 the loss is the changed patches' error, rescaled: static patches do not count.
    weighted = objective_loss(model, f, 1.0).loss
    w_BKN = change_weights(f, torch.ones_like(l1_BKN), 1.0)
    torch.testing.assert_close(weighted, (l1_BKN * w_BKN).mean())
    assert not torch.allclose(weighted, plain)


def test_gradient_does_not_flow_through_the_weights(tiny_cfg: Config) -> None:
    """The weights are data: the gradient is the one of a fixed weighting of the per-patch L1."""
    f = _features(D=32, N=16)
    f.source_BSND.requires_grad_(True)
    cfg = dataclasses.replace(tiny_cfg, objective=dataclasses.replace(tiny_cfg.objective, source_frames=3))
    model = FuturePredictor(spec_from_config(cfg, 32, 4, 4))
    torch.nn.init.normal_(model.head.weight, std=0.02)
    grad = torch.autograd.grad(objective_loss(model, f, 1.0).loss, f.source_BSND)[0]
    w_BKN = change_weights(f, torch.ones(2, 1, 16), 1.0).detach()
    pred_BKND = model(f.source_BSND, f.offsets_BK, f.visible_idx_BKV, f.visible_BKVD)
    fixed = ((pred_BKND - normed_targets(f.target_BKND)).abs().mean(-1) * w_BKN).mean()
    torch.testing.assert_close(grad, torch.autograd.grad(fixed, f.source_BSND)[0])


def test_the_trainer_trains_with_the_configured_weight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--objective.change_weight reaches the loss of every training step."""
    seen: list[float] = []
    real_loss = trainer_module.objective_loss

    def spy(model, features, change_weight: float = 0.0):
        seen.append(change_weight)
        return real_loss(model, features, change_weight)

    monkeypatch.setattr(trainer_module, "objective_loss", spy)
    cfg = load_config("tiny-cpu", tiny_overrides(tmp_path, "--objective.change_weight=0.75"))
    Trainer(cfg).train(stop_at=2)
    assert seen and set(seen) == {0.75}
