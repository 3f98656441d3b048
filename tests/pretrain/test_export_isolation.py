"""Exports are read without the trainer, through one typed schema, in the current format and the previous one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from pretrain.config import Config, config_to_dict, load_config
from pretrain.data import config_geometry
from pretrain.export import (
    EXPORT_FORMAT,
    EXPORT_FORMAT_V1,
    export_config,
    load_export,
    open_export,
    read_export_config,
    spec_dict,
    write_export,
)
from pretrain.model.predictor import FuturePredictor, spec_from_config
from pretrain.objective import HeldoutResult
from tests.conftest import tiny_overrides

ENCODER_IDENTITY = {
    "name": "random:vit_test",
    "weights_hash": "0123456789abcdef",
    "image_size": 56,
    "patch_size": 14,
    "embed_dim": 24,
    "depth": 2,
    "num_heads": 2,
    "num_registers": 0,
}


def test_load_export_does_not_import_the_trainer() -> None:
    code = (
        "import sys; from pretrain.export import load_export; "
        "bad = [m for m in ('pretrain.trainer', 'pretrain.tracking', 'mlflow', 'deepspeed') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_model_code_does_not_import_deepspeed_and_its_spec_not_torch() -> None:
    code = (
        "import sys; import pretrain.model.spec; torch_free = 'torch' not in sys.modules; "
        "import pretrain.model.predictor, pretrain.model.cores, pretrain.model.blocks, pretrain.model.vit; "
        "sys.exit(0 if torch_free and 'deepspeed' not in sys.modules else 1)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _flat_v1_spec(cfg: Config, encoder_dim: int, grid: int) -> dict[str, Any]:
    """model_spec as format 1 wrote it (pretrain/export.py and predictor.py at fd321d2): one flat record."""
    core, predictor = cfg.core, cfg.predictor
    return {
        "encoder_dim": encoder_dim,
        "grid_h": grid,
        "grid_w": grid,
        "core_kind": core.kind,
        "dim": core.dim,
        "core_depth": core.depth,
        "core_heads": core.num_heads,
        "core_mlp_ratio": core.mlp_ratio,
        "d_state": core.d_state,
        "d_conv": core.d_conv,
        "expand": core.expand,
        "predictor_depth": predictor.depth,
        "predictor_heads": predictor.num_heads,
        "predictor_mlp_ratio": predictor.mlp_ratio,
        "residual": predictor.residual,
        "max_source_frames": cfg.objective.source_frames,
        "max_offset": max(cfg.objective.target_offsets),
        "feature_layers": list(cfg.encoder.feature_layers),
        "memory": cfg.objective.memory,
    }


def write_v1_export(directory: Path, cfg: Config, encoder_identity: dict[str, Any], seed: int = 0) -> FuturePredictor:
    """An export in format 1, laid out as the previous code wrote it (trained identity control and all)."""
    encoder_dim, grid = encoder_identity["embed_dim"], encoder_identity["image_size"] // encoder_identity["patch_size"]
    torch.manual_seed(seed)
    model = FuturePredictor(spec_from_config(cfg, encoder_dim, grid, grid))
    config = config_to_dict(cfg)
    heldout = [{"offset": o, "windows": 4, "model_l1": 0.5, "copy_last_l1": 0.6} for o in cfg.objective.target_offsets]
    record = {
        "format": EXPORT_FORMAT_V1,
        "step": 3,
        "model_spec": _flat_v1_spec(cfg, encoder_dim, grid),
        "encoder": encoder_identity,
        "objective": config["objective"],
        "data": {"videos": [], "train_windows": 10, "heldout_windows": 4},
        "clip_geometry": config_geometry(config).to_dict(),
        "config": config,
        "code_version": "0.1.0+gfd321d2",
        "dtype": "fp32",
        "heldout": heldout,
        "identity_control": {"export": str(directory.parent / "control"), "heldout": heldout},
    }
    directory.mkdir(parents=True)
    save_file(model.state_dict(), directory / "model.safetensors", metadata={"format": EXPORT_FORMAT_V1})
    (directory / "config.json").write_text(json.dumps(record, indent=2))
    return model


@pytest.mark.parametrize("kind", ["gmmix", "gated_transformer"])
def test_a_format_1_export_still_loads(tmp_path: Path, kind: str) -> None:
    cfg = load_config("tiny-cpu", tiny_overrides(tmp_path, f"--core.kind={kind}"))
    written = write_v1_export(tmp_path / "export", cfg, ENCODER_IDENTITY)
    model, config = open_export(tmp_path / "export")
    assert config.model_spec == spec_from_config(cfg, 24, 4, 4)
    assert (config.model_spec.core.kind, config.step, config.encoder.weights_hash) == (kind, 3, "0123456789abcdef")
    assert config.training == cfg and config.clip_geometry is not None and config.dtype == "fp32"
    assert config.heldout == [HeldoutResult(o, 4, 0.5, 0.6) for o in (1, 2, 4)]
    assert config.identity_control is not None and config.identity_control.heldout == config.heldout
    for key, value in written.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    # The plain-dict view is the current format: the same record, nested spec, no top-level objective copy.
    _, record = load_export(tmp_path / "export")
    assert record["format"] == EXPORT_FORMAT and "objective" not in record
    assert record["model_spec"]["core"]["kind"] == kind and record["model_spec"]["predictor"]["depth"] == 1
    # Written again (as an earlier export it may replace), it is format 2 and reads back equal.
    write_export(written.state_dict(), record, tmp_path / "export", "bf16")
    again = read_export_config(tmp_path / "export")
    assert json.loads((tmp_path / "export" / "config.json").read_text())["format"] == EXPORT_FORMAT
    assert again.model_spec == config.model_spec and again.training == cfg and again.dtype == "bf16"


def test_export_config_round_trips_and_refuses_unknown_keys(tmp_path: Path) -> None:
    cfg = load_config("tiny-cpu", tiny_overrides(tmp_path))
    spec = spec_from_config(cfg, 24, 4, 4)
    meta = {"model_spec": spec_dict(spec), "encoder": ENCODER_IDENTITY, "data_summary": {"train_windows": 1}}
    record = export_config(meta, config_to_dict(cfg), step=5)
    assert record["format"] == EXPORT_FORMAT and record["model_spec"]["core"] == config_to_dict(cfg)["core"]
    record["heldout"] = [{"offset": 1, "windows": 2, "model_l1": 0.1, "copy_last_l1": 0.2}]
    write_export(FuturePredictor(spec).state_dict(), record, tmp_path / "a", "fp32")
    config = read_export_config(tmp_path / "a")
    assert config.to_json() == {**record, "dtype": "fp32"}
    assert config.model_spec == spec and config.model_spec.core is not cfg.core

    with pytest.raises(ValueError, match="heldot"):
        write_export(FuturePredictor(spec).state_dict(), {**record, "heldot": []}, tmp_path / "b", "fp32")
    bad_spec = {**record, "model_spec": {**record["model_spec"], "core": {**record["model_spec"]["core"], "kind": "x"}}}
    with pytest.raises(ValueError, match=r"model_spec\.core\.kind"):
        write_export(FuturePredictor(spec).state_dict(), bad_spec, tmp_path / "b", "fp32")
    assert not (tmp_path / "b").exists()


def test_an_unknown_format_is_refused(tmp_path: Path) -> None:
    cfg = load_config("tiny-cpu", tiny_overrides(tmp_path))
    write_v1_export(tmp_path / "export", cfg, ENCODER_IDENTITY)
    path = tmp_path / "export" / "config.json"
    path.write_text(path.read_text().replace(EXPORT_FORMAT_V1, "video-pretrain-export/9"))
    with pytest.raises(ValueError, match="video-pretrain-export/9"):
        read_export_config(tmp_path / "export")
