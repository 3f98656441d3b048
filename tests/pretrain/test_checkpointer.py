"""Checkpointer: which config changes a resume accepts, and checkpoints of another layout."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint import CheckpointError, load_checkpoint, write_manifest
from pretrain.checkpointer import ADDED_LATER, MODEL_KEYS, RUNTIME_KEYS, model_key_changes
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


def test_a_checkpoint_from_before_a_later_key_resumes_under_its_old_behaviour() -> None:
    """A key added after checkpoints existed reads as the value they were trained under, not as a change."""
    assert set(ADDED_LATER) <= set(MODEL_KEYS)
    saved = config_to_dict(Config())
    del saved["objective"]["recall_offsets"], saved["objective"]["change_weight"]
    assert model_key_changes(saved, config_to_dict(Config())) == []
    current = config_to_dict(Config())
    current["objective"]["change_weight"] = 1.0
    assert model_key_changes(saved, current) == ["objective.change_weight: 0.0 -> 1.0"]


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


def test_extending_train_steps_on_resume_warns_once_and_is_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A longer train.steps is allowed but reshapes the cosine schedule: one warning with the lr jump, and MLflow
    records the new value under the step it took effect (its params are immutable)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    Trainer(load_config("tiny-cpu", tiny_overrides(tmp_path, "--tracking.enabled=true"))).train(stop_at=3)
    longer = Trainer(load_config("tiny-cpu", tiny_overrides(tmp_path, "--tracking.enabled=true", "--train.steps=9")))
    with caplog.at_level("WARNING", logger="pretrain"):
        result = longer.train(finalize=False)
    assert result.step == 9
    warnings = [r.getMessage() for r in caplog.records if "schedule is recomputed" in r.getMessage()]
    assert len(warnings) == 1 and "train.steps 6 -> 9" in warnings[0] and "at step 3" in warnings[0]
    old_lr, new_lr = (float(x) for x in re.search(r"lr (\S+) -> (\S+)\)", warnings[0]).groups())
    assert new_lr > old_lr  # a longer cosine decays more slowly
    assert longer.checkpointer.schedule_changes == {"train.steps": (6, 9)}

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("video-pretrain").experiment_id])
    assert run.data.params["train.steps"] == "6" and run.data.params["resumed_at_3.train.steps"] == "9"


def test_resume_with_the_same_schedule_says_nothing_about_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    Trainer(load_config("tiny-cpu", tiny_overrides(tmp_path))).train(stop_at=2)
    again = Trainer(load_config("tiny-cpu", tiny_overrides(tmp_path)))
    with caplog.at_level("WARNING", logger="pretrain"):
        again.train(finalize=False)
    assert again.checkpointer.schedule_changes == {}
    assert not [r for r in caplog.records if "schedule" in r.getMessage()]


def test_resume_clears_a_killed_config_write_and_nothing_else(tmp_path: Path) -> None:
    """A SIGKILL inside the atomic write of config.json leaves a ``.config.json.<random>.tmp`` in the run directory."""
    Trainer(load_config("tiny-cpu", tiny_overrides(tmp_path))).train(stop_at=2)
    run_dir = load_config("tiny-cpu", tiny_overrides(tmp_path)).run_dir
    killed_write = run_dir / ".config.json.ab12cd34.tmp"
    killed_write.write_text("{")
    users_file = run_dir / ".notes.tmp"
    users_file.write_text("mine")
    Trainer(load_config("tiny-cpu", tiny_overrides(tmp_path))).checkpointer.maybe_resume()
    assert not killed_write.exists()
    assert users_file.read_text() == "mine"
