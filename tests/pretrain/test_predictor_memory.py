"""objective.memory="last": the predictor reads the core's current state only; the past reaches it through the core."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pretrain.export import spec_from_record
from pretrain.model.predictor import FuturePredictor, ModelSpec
from pretrain.model.spec import CoreConfig, PredictorConfig

SPEC = ModelSpec(
    encoder_dim=24,
    grid_h=3,
    grid_w=3,
    core=CoreConfig(kind="gmmix", dim=16, depth=1, num_heads=2, mlp_ratio=2.0, d_state=4, d_conv=4, expand=2),
    predictor=PredictorConfig(depth=1, num_heads=2, mlp_ratio=2.0, residual=True),
    max_source_frames=6,
    max_offset=2,
)


def _predict(model: FuturePredictor, source_BSND: torch.Tensor) -> torch.Tensor:
    offsets_BK = torch.ones(2, 1, dtype=torch.long)
    empty_idx = torch.zeros(2, 1, 0, dtype=torch.long)
    return model(source_BSND, offsets_BK, empty_idx, torch.zeros(2, 1, 0, 24))


@pytest.mark.parametrize(
    ("core_kind", "memory", "past_matters"),
    [("identity", "last", False), ("identity", "all", True), ("gmmix", "last", True)],
    ids=["identity-last", "identity-all", "gmmix-last"],
)
def test_what_reaches_the_predictor_from_earlier_frames(core_kind: str, memory: str, past_matters: bool) -> None:
    torch.manual_seed(0)
    spec = dataclasses.replace(SPEC, core=dataclasses.replace(SPEC.core, kind=core_kind), memory=memory)
    model = FuturePredictor(spec).eval()
    torch.nn.init.normal_(model.head.weight, std=0.1)
    source_BSND = torch.randn(2, 5, 9, 24)
    changed = source_BSND.clone()
    changed[:, :-1] = torch.randn(2, 4, 9, 24)
    with torch.no_grad():
        moved = (_predict(model, source_BSND) - _predict(model, changed)).abs().max().item()
    assert (moved > 1e-4) == past_matters, moved


def test_memory_is_recorded_and_old_specs_default_to_all() -> None:
    record = SPEC.to_dict()
    assert record["memory"] == "all" and ModelSpec.from_dict(record) == SPEC
    record.pop("memory")
    assert ModelSpec.from_dict(record).memory == "all"
    # A format-1 export's flat spec, written before memory and feature_layers existed.
    flat = {
        "encoder_dim": 24,
        "grid_h": 3,
        "grid_w": 3,
        "core_kind": "gmmix",
        "dim": 16,
        "core_depth": 1,
        "core_heads": 2,
        "core_mlp_ratio": 2.0,
        "d_state": 4,
        "d_conv": 4,
        "expand": 2,
        "predictor_depth": 1,
        "predictor_heads": 2,
        "predictor_mlp_ratio": 2.0,
        "residual": True,
        "max_source_frames": 6,
        "max_offset": 2,
    }
    assert spec_from_record(flat) == SPEC
