"""objective.recall_offsets: past source frames predicted from the core's last state, beside the future."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pretrain.config import Config, ConfigError, ObjectiveConfig
from pretrain.data import ClipBatch, draw_offsets
from pretrain.features import FeatureSettings, frozen_features
from pretrain.model.predictor import FuturePredictor, ModelSpec
from pretrain.model.spec import CoreConfig, PredictorConfig
from pretrain.objective import masked_positions, objective_loss

SPEC = ModelSpec(
    encoder_dim=24,
    grid_h=3,
    grid_w=3,
    core=CoreConfig(kind="gmmix", dim=16, depth=1, num_heads=2, mlp_ratio=2.0, d_state=4, d_conv=4, expand=2),
    predictor=PredictorConfig(depth=1, num_heads=2, mlp_ratio=2.0, residual=True),
    max_source_frames=6,
    max_offset=2,
    memory="last",
    max_recall=3,
)


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"source_frames": 4, "recall_offsets": [4], "memory": "last"}, "source_frames - 1 = 3"),
        ({"source_frames": 4, "recall_offsets": [0], "memory": "last"}, "must lie in"),
        ({"source_frames": 4, "recall_offsets": [1, 1], "memory": "last"}, "distinct"),
        ({"source_frames": 4, "recall_offsets": [2], "memory": "all"}, 'memory = "last"'),
    ],
)
def test_bad_recall_offsets_name_the_key(fields: dict, says: str) -> None:
    with pytest.raises(ConfigError, match=r"objective\.recall_offsets") as err:
        ObjectiveConfig(**fields)
    assert says in str(err.value)


def test_offsets_get_one_recall_target_first_and_keep_the_future_draw(tiny_cfg: Config) -> None:
    plain = draw_offsets(tiny_cfg, 64, torch.Generator().manual_seed(0))
    cfg = dataclasses.replace(
        tiny_cfg,
        objective=dataclasses.replace(
            tiny_cfg.objective, source_frames=4, memory="last", recall_offsets=[1, 3], target_offsets=[1, 2]
        ),
    )
    cfg_future = dataclasses.replace(cfg, objective=dataclasses.replace(cfg.objective, recall_offsets=[]))
    with_recall = draw_offsets(cfg, 64, torch.Generator().manual_seed(0))
    without = draw_offsets(cfg_future, 64, torch.Generator().manual_seed(0))
    assert with_recall.shape == (64, cfg.objective.targets_per_clip + 1)
    assert set(with_recall[:, 0].tolist()) == {-1, -3}
    torch.testing.assert_close(with_recall[:, 1:], without)
    assert (plain > 0).all()


def test_a_recall_target_is_the_source_frame_k_before_the_last() -> None:
    g = torch.Generator().manual_seed(0)
    tokens_BTND = torch.randn(2, 6, 9, 24, generator=g)
    offsets_BK = torch.tensor([[-3, 1], [-1, 2]])
    batch = ClipBatch(offsets_BK, tokens_BTND=tokens_BTND)
    features = frozen_features(None, batch, FeatureSettings(source_frames=4, visible_fraction=0.0), g)
    # S = 4: the last source frame is 3, so offset -3 is frame 0, -1 frame 2; future +1 frame 4, +2 frame 5.
    torch.testing.assert_close(features.target_BKND[0, 0], tokens_BTND[0, 0])
    torch.testing.assert_close(features.target_BKND[1, 0], tokens_BTND[1, 2])
    torch.testing.assert_close(features.target_BKND[0, 1], tokens_BTND[0, 4])
    torch.testing.assert_close(features.target_BKND[1, 1], tokens_BTND[1, 5])


def _predict(model: FuturePredictor, source_BSND: torch.Tensor, offsets_BK: torch.Tensor) -> torch.Tensor:
    B, K = offsets_BK.shape
    return model(source_BSND, offsets_BK, torch.zeros(B, K, 0, dtype=torch.long), torch.zeros(B, K, 0, 24))


def test_recall_and_future_offsets_are_told_apart_and_checked() -> None:
    torch.manual_seed(0)
    model = FuturePredictor(SPEC).eval()
    torch.nn.init.normal_(model.head.weight, std=0.1)
    source_BSND = torch.randn(1, 5, 9, 24)
    with torch.no_grad():
        past = _predict(model, source_BSND, torch.tensor([[-1]]))
        future = _predict(model, source_BSND, torch.tensor([[1]]))
    assert (past - future).abs().max() > 1e-4
    for bad in (-4, 0, 3):
        with pytest.raises(ValueError, match="offsets"):
            _predict(model, source_BSND, torch.tensor([[bad]]))
    plain = FuturePredictor(dataclasses.replace(SPEC, max_recall=0))
    with pytest.raises(ValueError, match="without recall"):
        _predict(plain, source_BSND, torch.tensor([[-1]]))


def test_without_recall_the_parameters_are_those_of_exports_before_it() -> None:
    names = set(FuturePredictor(dataclasses.replace(SPEC, max_recall=0)).state_dict())
    assert not any("recall" in n for n in names)
    record = dataclasses.replace(SPEC, max_recall=0).to_dict()
    record.pop("max_recall")
    assert ModelSpec.from_dict(record).max_recall == 0
    assert set(FuturePredictor(SPEC).state_dict()) - names == {"recall_embed.weight"}


def test_a_recalled_frame_shows_none_of_its_tokens_and_all_of_it_is_scored() -> None:
    """Visible tokens of a past frame would give away what the state was asked to keep."""
    torch.manual_seed(0)
    model = FuturePredictor(SPEC).eval()
    torch.nn.init.normal_(model.head.weight, std=0.1)
    source_BSND = torch.randn(1, 5, 9, 24)
    offsets_BK = torch.tensor([[-2, 1]])
    visible_idx_BKV = torch.tensor([[[0, 4], [0, 4]]])
    with torch.no_grad():
        shown_a = model(source_BSND, offsets_BK, visible_idx_BKV, torch.randn(1, 2, 2, 24))
        shown_b = model(source_BSND, offsets_BK, visible_idx_BKV, torch.randn(1, 2, 2, 24))
    torch.testing.assert_close(shown_a[:, 0], shown_b[:, 0])  # recall: the shown tokens change nothing
    assert (shown_a[:, 1] - shown_b[:, 1]).abs().max() > 1e-4  # future: they are read
    mask_BKN = masked_positions(visible_idx_BKV, 9, offsets_BK)
    assert mask_BKN[0, 0].tolist() == [1.0] * 9
    assert mask_BKN[0, 1, [0, 4]].tolist() == [0.0, 0.0] and mask_BKN[0, 1].sum() == 7


def _recall_loss_after_training(core_kind: str) -> float:
    torch.manual_seed(0)
    model = FuturePredictor(dataclasses.replace(SPEC, core=dataclasses.replace(SPEC.core, kind=core_kind)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    settings = FeatureSettings(source_frames=4, visible_fraction=0.0)

    def loss() -> torch.Tensor:
        # Frame 0 holds a per-clip pattern, the later frames only noise: only a memory can recall frame 0.
        tokens_BTND = 0.3 * torch.randn(16, 6, 9, 24, generator=g)
        tokens_BTND[:, 0] += torch.randn(16, 1, 24, generator=g).sign()
        batch = ClipBatch(torch.full((16, 1), -3), tokens_BTND=tokens_BTND)
        return objective_loss(model, frozen_features(None, batch, settings, g)).loss

    for _ in range(300):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    with torch.no_grad():
        return sum(loss().item() for _ in range(4)) / 4


def test_recall_trains_a_state_that_keeps_the_past() -> None:
    """A frame only memory can recall: a temporal core learns it, the identity core (no memory) cannot."""
    with_memory, without = _recall_loss_after_training("gmmix"), _recall_loss_after_training("identity")
    assert with_memory < 0.85 * without, (with_memory, without)


def test_the_trainer_scores_held_out_recall_beside_the_future_and_the_verdict_reads_the_future_only(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pretrain.trainer as trainer_module
    from pretrain.config import load_config
    from pretrain.train import _verdict, format_report
    from pretrain.trainer import Trainer
    from tests.conftest import tiny_overrides
    from tests.pretrain.test_trainer import _RecordingLogger

    logger = _RecordingLogger()
    monkeypatch.setattr(trainer_module, "build_logger", lambda *args, **kwargs: logger)
    overrides = tiny_overrides(tmp_path, "--objective.memory=last", "--objective.recall_offsets=[3,1]")
    result = Trainer(load_config("tiny-cpu", overrides)).train()
    assert sorted(r.offset for r in result.heldout) == [-3, -1, 1, 2, 4]
    assert all(r.windows > 0 and r.copy_last_l1 > 0 for r in result.heldout)
    for k in (1, 3):
        for name in ("heldout_l1", "copy_last_l1", "gain_vs_copy_last"):
            assert logger.steps_of(f"{name}_recall{k}") == [result.step], name
    assert "offset -k: recall" in format_report(result)
    # A recall row that beats copy-last never makes a future verdict.
    losing = [dataclasses.replace(r, model_l1=2 * r.copy_last_l1) if r.offset > 0 else r for r in result.heldout]
    recall_wins = [dataclasses.replace(r, model_l1=0.5 * r.copy_last_l1) if r.offset < 0 else r for r in losing]
    assert "does NOT beat copy-last" in _verdict(recall_wins, {})
