"""The real CLI on tiny configs: a full run, and one-line errors with nothing half-written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[2]


def run_cli(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_train_cli_end_to_end(tmp_path: Path) -> None:
    proc = run_cli("pretrain.train", "--config", "tiny-cpu", *tiny_overrides(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "copy-last" in proc.stdout and "finding:" in proc.stdout
    run_dir = tmp_path / "tiny-cpu"
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["train"]["steps"] == 6 and saved["encoder"]["source"] == "random"
    assert (run_dir / "export" / "model.safetensors").is_file()

    out = tmp_path / "exported"
    proc = run_cli("pretrain.export", str(run_dir), str(out))
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "config.json").read_text())["step"] == 6


def _assert_clean_failure(proc: subprocess.CompletedProcess[str], needle: str, out_dir: Path) -> None:
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (out_dir / "tiny-cpu").exists(), "a failed start must not leave a run directory"


def test_bad_config_key(tmp_path: Path) -> None:
    proc = run_cli("pretrain.train", *tiny_overrides(tmp_path, "--train.stepz=3"))
    _assert_clean_failure(proc, "train.stepz", tmp_path)


def test_bad_config_value(tmp_path: Path) -> None:
    proc = run_cli("pretrain.train", *tiny_overrides(tmp_path, "--core.kind=lstm"))
    _assert_clean_failure(proc, "core.kind", tmp_path)


def test_missing_video(tmp_path: Path) -> None:
    proc = run_cli("pretrain.train", *tiny_overrides(tmp_path, f'--data.videos=["{tmp_path}/nope.mp4"]'))
    _assert_clean_failure(proc, "nope.mp4", tmp_path)


def test_unreadable_video(tmp_path: Path) -> None:
    bad = tmp_path / "notes.mp4"
    bad.write_text("this is not a video\n" * 100)
    proc = run_cli("pretrain.train", *tiny_overrides(tmp_path, f'--data.videos=["{bad}"]'))
    _assert_clean_failure(proc, "notes.mp4", tmp_path)


def test_missing_weights(tmp_path: Path) -> None:
    proc = run_cli("pretrain.train", *tiny_overrides(tmp_path, f"--encoder.source={tmp_path}/no-weights"))
    _assert_clean_failure(proc, "no-weights", tmp_path)


@pytest.mark.parametrize("bad_key", ["embeddings.cls_token", "encoder.layer.0.mlp.fc1.weight"])
def test_weights_of_the_wrong_shape(tmp_path: Path, bad_key: str) -> None:
    weights = tmp_path / "hf"
    weights.mkdir()
    cfg = {
        "model_type": "dinov2",
        "hidden_size": 48,
        "num_hidden_layers": 1,
        "num_attention_heads": 3,
        "mlp_ratio": 4,
        "patch_size": 14,
        "image_size": 56,
        "layer_norm_eps": 1e-6,
        "layerscale_value": 1.0,
    }
    (weights / "config.json").write_text(json.dumps(cfg))
    D = 48
    state = {
        "embeddings.cls_token": torch.zeros(1, 1, D),
        "embeddings.position_embeddings": torch.zeros(1, 17, D),
        "embeddings.patch_embeddings.projection.weight": torch.zeros(D, 3, 14, 14),
        "embeddings.patch_embeddings.projection.bias": torch.zeros(D),
        "layernorm.weight": torch.ones(D),
        "layernorm.bias": torch.zeros(D),
    }
    prefix = "encoder.layer.0."
    for name in ("query", "key", "value"):
        state[f"{prefix}attention.attention.{name}.weight"] = torch.zeros(D, D)
        state[f"{prefix}attention.attention.{name}.bias"] = torch.zeros(D)
    state[f"{prefix}attention.output.dense.weight"] = torch.zeros(D, D)
    state[f"{prefix}attention.output.dense.bias"] = torch.zeros(D)
    for n in ("norm1", "norm2"):
        state[f"{prefix}{n}.weight"] = torch.ones(D)
        state[f"{prefix}{n}.bias"] = torch.zeros(D)
    state[f"{prefix}layer_scale1.lambda1"] = torch.ones(D)
    state[f"{prefix}layer_scale2.lambda1"] = torch.ones(D)
    state[f"{prefix}mlp.fc1.weight"] = torch.zeros(4 * D, D)
    state[f"{prefix}mlp.fc1.bias"] = torch.zeros(4 * D)
    state[f"{prefix}mlp.fc2.weight"] = torch.zeros(D, 4 * D)
    state[f"{prefix}mlp.fc2.bias"] = torch.zeros(D)
    state[bad_key] = torch.zeros(*[s + 1 for s in state[bad_key].shape])
    save_file(state, weights / "model.safetensors")
    proc = run_cli("pretrain.train", *tiny_overrides(tmp_path, f"--encoder.source={weights}"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "tiny-cpu").exists()


def test_weights_import_cli(tmp_path: Path) -> None:
    proc = run_cli("pretrain.weights", "import-onnx", "--out", str(tmp_path / "enc"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "enc" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "enc" / "arch.json").read_text())["embed_dim"] == 384
