"""The shard-path demo end to end (build -> encode -> train -> report) with a tiny random encoder."""

from __future__ import annotations

from pathlib import Path

import pytest

from pretrain.demo import main


@pytest.mark.slow
def test_shard_demo_runs_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    overrides = [
        "--encoder.source=random",
        "--encoder.arch=vit_test",
        "--encoder.image_size=56",
        "--core.dim=32",
        "--core.num_heads=2",
        "--predictor.num_heads=2",
        "--train.steps=4",
        "--train.progress=false",
        "--tracking.enabled=false",
        "--data.num_workers=0",
    ]
    assert main(["--out", str(tmp_path), "--workers", "0", *overrides]) == 0
    out = capsys.readouterr().out
    assert "copy-last" in out and "finding:" in out
    # The data.source='videos' front end built the clip shards (and their held-out split) under demo-data.
    assert len(list((tmp_path / "demo-data").glob("videos-*/clips/heldout/manifest.json"))) == 1
    assert (tmp_path / "tiny-cpu" / "export" / "model.safetensors").is_file()
    # The identity-core control was trained the same way and reported beside copy-last.
    assert "vs identity" in out and "identity-core control" in out
    control = tmp_path / "tiny-cpu-identity" / "export"
    assert (control / "model.safetensors").is_file()
    import json

    exported = json.loads((tmp_path / "tiny-cpu" / "export" / "config.json").read_text())
    assert exported["identity_control"]["export"] == str(control)
    assert len(exported["identity_control"]["heldout"]) == len(exported["heldout"]) == 3
    assert json.loads((control / "config.json").read_text())["model_spec"]["core"]["kind"] == "identity"
