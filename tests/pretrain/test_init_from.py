"""train.init_from: continued pre-training starts from an export's weights, or is refused with the key named."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from pretrain import train as train_cli
from pretrain.config import load_config
from pretrain.export import init_from_export, open_export
from pretrain.model.predictor import FuturePredictor
from pretrain.model.spec import ConfigError
from pretrain.trainer import Trainer
from tests.conftest import tiny_overrides


@pytest.fixture(scope="module")
def first_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run trained for 6 steps, exported: what a second run continues from."""
    out = tmp_path_factory.mktemp("first")
    result = Trainer(load_config("tiny-cpu", tiny_overrides(out))).train()
    assert result.export_dir is not None
    return result.export_dir


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def test_a_continued_run_starts_from_the_export_and_records_it(first_export: Path, tmp_path: Path) -> None:
    exported, _ = open_export(first_export)
    trainer = Trainer(load_config("tiny-cpu", tiny_overrides(tmp_path, f"--train.init_from={first_export}")))
    start = _state(trainer.model)
    for key, value in _state(exported).items():
        torch.testing.assert_close(start[key], value, rtol=0, atol=0, msg=key)
    fresh = Trainer(load_config("tiny-cpu", tiny_overrides(tmp_path / "fresh")))
    assert any(not torch.equal(start[k], v) for k, v in _state(fresh.model).items()), "init_from changed nothing"

    result = trainer.train()
    assert result.export_dir is not None
    record = json.loads((result.export_dir / "config.json").read_text())
    assert record["config"]["train"]["init_from"] == str(first_export)
    moved = _state(open_export(result.export_dir)[0])
    assert any(not torch.equal(moved[k], v) for k, v in start.items()), "training from the export moved nothing"


def test_the_identity_control_takes_all_but_the_core(first_export: Path, tmp_path: Path) -> None:
    exported = _state(open_export(first_export)[0])
    cfg = load_config("tiny-cpu", tiny_overrides(tmp_path, f"--train.init_from={first_export}", "--core.kind=identity"))
    start = _state(Trainer(cfg).model)
    assert not any(k.startswith("core.") for k in start)
    assert start.keys() == {k for k in exported if not k.startswith("core.")}
    for key, value in start.items():
        torch.testing.assert_close(value, exported[key], rtol=0, atol=0, msg=key)


def test_another_model_spec_is_refused_naming_the_keys(first_export: Path) -> None:
    _, config = open_export(first_export)
    spec = dataclasses.replace(
        config.model_spec,
        core=dataclasses.replace(config.model_spec.core, dim=48),
        max_source_frames=config.model_spec.max_source_frames + 1,
    )
    model = FuturePredictor(spec)
    before = _state(model)
    with pytest.raises(ConfigError, match=r"train\.init_from.*core\.dim \(export 32, this run 48\).*max_source_frames"):
        init_from_export(model, first_export, config.encoder.weights_hash)
    for key, value in _state(model).items():
        assert torch.equal(value, before[key]), "a refused init_from must leave the model as it was"


def test_another_encoder_or_a_missing_export_is_refused(first_export: Path, tmp_path: Path) -> None:
    _, config = open_export(first_export)
    model = FuturePredictor(config.model_spec)
    with pytest.raises(ConfigError, match=r"train\.init_from: .* was trained on encoder .* this run's encoder"):
        init_from_export(model, first_export, "0" * 64)
    with pytest.raises(ConfigError, match=r"train\.init_from: .*nowhere is not a readable export"):
        init_from_export(model, tmp_path / "nowhere", config.encoder.weights_hash)


def test_the_cli_names_the_key_of_a_bad_init_from(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--config", "tiny-cpu", *tiny_overrides(tmp_path, f"--train.init_from={tmp_path / 'nowhere'}")]
    assert train_cli.main(argv) == 2
    assert "train.init_from" in capsys.readouterr().err
    assert not list(tmp_path.glob("*/checkpoints/step_*")), "a refused run must not write checkpoints"


def test_a_resumed_run_reads_its_checkpoint_not_the_moved_export(first_export: Path, tmp_path: Path) -> None:
    import shutil

    export = tmp_path / "export"
    shutil.copytree(first_export, export)
    overrides = tiny_overrides(tmp_path / "run", f"--train.init_from={export}", "--train.ckpt_every=3")
    Trainer(load_config("tiny-cpu", overrides)).train(stop_at=3)
    shutil.rmtree(export)
    resumed = Trainer(load_config("tiny-cpu", overrides))
    assert resumed.train().export_dir is not None
    assert resumed.state.step == 6 and resumed.checkpointer.resumed_from is not None
