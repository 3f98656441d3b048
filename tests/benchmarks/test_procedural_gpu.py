"""benchmarks/procedural_gpu.sh, the larger-scale efficiency experiment, end to end on CPU at toy size.

The script is meant for a GPU node; this runs every step of it (corpus, encode, the procedural-gpu
preset with its identity-core control, eval.efficiency) on a few clips so that it cannot rot unseen,
and checks that a rerun continues instead of starting over.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "procedural_gpu.sh"

TINY_TRAIN = [
    "--core.dim=32",
    "--core.depth=1",
    "--core.num_heads=2",
    "--predictor.depth=1",
    "--predictor.num_heads=2",
    "--train.steps=2",
    "--train.warmup_steps=1",
    "--train.micro_batch_size=4",
    "--train.eval_every=2",
    "--train.ckpt_every=2",
    "--data.num_workers=0",
    "--data.shuffle_buffer=4",
]
TINY_EVAL = "--tasks classification --budgets 4 --test-videos 10 --seeds 2 --steps 2 --variants pretrained,scratch"


def _run(tmp: Path, **settings: str) -> subprocess.CompletedProcess[str]:
    tiny = {
        "PYTHON": sys.executable,
        "VIDEOS": "8",
        "HELDOUT": "4",
        "SIZE": "112",
        "DIR": str(tmp / "corpus"),
        "OUT_DIR": str(tmp / "runs"),
        "RUN": "gpu-tiny",
        "TRAIN_ARGS": " ".join([*TINY_TRAIN, f"--tracking.tracking_uri=sqlite:///{tmp}/mlflow.db"]),
        "EVAL_ARGS": f"{TINY_EVAL} --workers 1 --no-mlflow --cache-dir {tmp / 'cache'}",
    }
    env = {**os.environ, **tiny, **settings}
    return subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_procedural_gpu_script_runs_every_step_and_a_rerun_continues(tmp_path: Path) -> None:
    first = _run(tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    export = tmp_path / "runs" / "gpu-tiny" / "export"
    config = json.loads((export / "config.json").read_text())["config"]
    # The preset, with only what the test shrank changed.
    assert config["run"]["name"] == "gpu-tiny"
    assert config["encoder"]["image_size"] == 112
    assert config["objective"]["memory"] == "last"
    assert config["objective"]["change_weight"] == 1.0
    assert config["core"]["kind"] == "gated_transformer"
    assert (tmp_path / "runs" / "gpu-tiny-identity" / "export" / "model.safetensors").is_file()

    report = json.loads((tmp_path / "runs" / "gpu-tiny" / "efficiency" / "efficiency.json").read_text())
    assert report["config"]["size"] == 112
    assert {(r["task"], r["variant"], r["budget"]) for r in report["rows"]} >= {
        ("classification", "pretrained", 4),
        ("classification", "scratch", 4),
    }

    # A rerun keeps the corpus, the features and the finished run (it resumes at the last step rather
    # than training again): the same export bytes.
    before = (export / "model.safetensors").read_bytes()
    second = _run(tmp_path)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    said = second.stdout + second.stderr
    assert "already there" in said
    assert "resumed from" in said and "at step 2" in said
    assert (export / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize(
    ("setting", "named"),
    [
        ({"TRAIN_ARGS": "--core.dimm=32"}, "core.dimm"),
        ({"EVAL_ARGS": "--test-videos 8"}, "test_videos"),
    ],
)
def test_a_bad_setting_fails_before_anything_is_built(tmp_path: Path, setting: dict[str, str], named: str) -> None:
    result = _run(tmp_path, **setting)
    assert result.returncode != 0
    assert named in result.stderr
    assert not (tmp_path / "corpus").exists() and not (tmp_path / "runs").exists()
