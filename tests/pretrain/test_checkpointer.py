"""Checkpointer: which config changes a resume accepts, and checkpoints of another layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pretrain.checkpoint import CheckpointError, load_checkpoint, write_manifest
from pretrain.checkpointer import MODEL_KEYS, RUNTIME_KEYS, model_key_changes
from pretrain.config import Config, config_to_dict, load_config
from pretrain.trainer import Trainer
from tests.conftest import tiny_overrides

MODEL_SECTIONS = ("encoder", "core", "predictor", "objective")


def _params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_every_key_of_the_model_sections_is_classified() -> None:
    """A new field of these sections must be declared model-defining or runtime, with a reason."""
    fields = {f"{section}.{key}" for section in MODEL_SECTIONS for key in config_to_dict(Config())[section]}
    assert not set(MODEL_KEYS) & set(RUNTIME_KEYS)
    assert set(MODEL_KEYS) | set(RUNTIME_KEYS) == fields
    assert {"encoder.chunk_frames", "encoder.compile", "encoder.compile_mode", "encoder.attn_backend"} <= set(
        RUNTIME_KEYS
    )


def test_model_key_changes_name_old_and_new_values() -> None:
    saved, current = config_to_dict(Config()), config_to_dict(Config())
    current["core"]["depth"] = 3
    current["encoder"]["chunk_frames"] = 7
    assert model_key_changes(saved, current) == ["core.depth: 1 -> 3"]
    del saved["objective"]["memory"]
    assert model_key_changes(saved, config_to_dict(Config())) == ["objective.memory: (absent) -> 'all'"]


def test_resume_after_changing_a_runtime_knob_is_exact(tmp_path: Path) -> None:
    straight = Trainer(load_config("tiny-cpu", tiny_overrides(tmp_path / "a")))
    straight.train(finalize=False)

    Trainer(load_config("tiny-cpu", tiny_overrides(tmp_path / "b"))).train(stop_at=3)
    resumed = Trainer(load_config("tiny-cpu", tiny_overrides(tmp_path / "b", "--encoder.chunk_frames=32")))
    resumed.train(finalize=False)

    assert resumed.checkpointer.resumed_from is not None
    assert resumed.state.history == straight.state.history
    for key, value in _params(straight).items():
        torch.testing.assert_close(_params(resumed)[key], value, rtol=0, atol=0, msg=key)


def test_resume_after_changing_a_model_key_is_refused_naming_it(tmp_path: Path) -> None:
    Trainer(load_config("tiny-cpu", tiny_overrides(tmp_path))).train(stop_at=2)
    deeper = Trainer(load_config("tiny-cpu", tiny_overrides(tmp_path, "--core.depth=2")))
    with pytest.raises(CheckpointError, match=r"core\.depth: 1 -> 2"):
        deeper.train()


def test_a_deepspeed_checkpoint_is_refused_by_the_torch_engine(tmp_path: Path) -> None:
    trainer = Trainer(load_config("tiny-cpu", tiny_overrides(tmp_path)))
    trainer.train(stop_at=2)
    tag = trainer.checkpointer.last
    state, _ = load_checkpoint(tag)
    torch.save(
        {"meta": state["meta"], "trainer": {"step": 2}, "world_size": 2, "zero_stage": 1, "layout": "deepspeed"},
        tag / "state.pt",
    )
    write_manifest(tag)
    with pytest.raises(CheckpointError, match=r"step_00000002 was written by DeepSpeed on 2 rank\(s\)"):
        Trainer(load_config("tiny-cpu", tiny_overrides(tmp_path))).checkpointer.maybe_resume()
