"""``python -m pretrain.encode``: clip shards -> feature shards with a config's encoder, and the one
comparison of encoder settings that makes training refuse shards its config would not have produced."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from data_shards.features import EncoderMismatchError, FeatureBlob, feature_bytes_per_frame, visible_count
from pretrain.config import Config, ConfigError, load_config
from pretrain.data import check_feature_shards
from pretrain.encode import main as encode_main
from pretrain.encoder import (
    compare_encoder_settings,
    encoder_settings,
    load_encoder,
    recorded_encoder_settings,
)
from pretrain.trainer import Trainer
from tests.conftest import tiny_overrides
from tests.data_shards.shard_fixtures import real_clips, write_clip_shards

REPO_ROOT = Path(__file__).resolve().parents[2]


def _config_args(tmp: Path, *extra: str) -> list[str]:
    """The tiny-cpu preset with the random 2-block test ViT at 56 px (tests.conftest.tiny_overrides)."""
    return ["--config", "tiny-cpu", *tiny_overrides(tmp), *extra]


def _features_config(tmp: Path, features: Path, *extra: str) -> Config:
    overrides = [*tiny_overrides(tmp), "--data.source=features", f"--data.shards={features}", *extra]
    return load_config("tiny-cpu", overrides)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 shards of 3 real carphone clips, 6 frames each, 64 px short side."""
    clips = real_clips("carphone", clip_frames=6, num_clips=3, short_side=64)
    directory = tmp_path_factory.mktemp("clips")
    write_clip_shards(directory, [clips[:2], clips[2:]])
    return directory


@pytest.fixture(scope="module")
def features(tmp_path_factory: pytest.TempPathFactory, clip_dir: Path) -> Path:
    """The command's output for the tiny config (default objective: visible fraction 0.05)."""
    tmp = tmp_path_factory.mktemp("encode")
    argv = [*_config_args(tmp), "--shards", str(clip_dir), "--out", str(tmp / "features"), "--batch", "2"]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert encode_main(argv) == 0
    # The command prints the feature directory, for scripts.
    out = Path(stdout.getvalue().strip())
    assert out.parent == tmp / "features"
    return out


def test_encode_records_the_settings_training_compares(features: Path, tmp_path: Path) -> None:
    cfg = _features_config(tmp_path, features)
    encoder = load_encoder("random", arch="vit_test", image_size=56, seed=cfg.run.seed)
    manifest = json.loads((features / "manifest.json").read_text())
    assert features.name == encoder.weights_hash[:16]
    assert manifest["clips"] == 3 and manifest["image_size"] == 56 and manifest["grid"] == [4, 4]
    assert manifest["visible_fraction"] == cfg.objective.visible_fraction == 0.05
    assert manifest["args"]["batch"] == 2 and manifest["args"]["encoder"]["source"] == "random"
    recorded = recorded_encoder_settings(manifest)
    assert recorded == encoder_settings(cfg, encoder.weights_hash)
    assert compare_encoder_settings(recorded, encoder_settings(cfg, encoder.weights_hash)) == []
    check_feature_shards(cfg, encoder.weights_hash)


@pytest.mark.parametrize(
    ("override", "key", "configured", "recorded"),
    [
        ("--encoder.image_size=28", "encoder.image_size", "28", "image size 56"),
        ("--encoder.feature_layers=[1]", "encoder.feature_layers", r"\[1\]", r"store blocks \[\]"),
        ("--objective.visible_fraction=0.1", "objective.visible_fraction", "0.1", "fraction 0.05"),
    ],
    ids=["image_size", "feature_layers", "visible_fraction"],
)
def test_a_config_with_other_encoder_settings_is_refused_naming_the_key(
    features: Path, tmp_path: Path, override: str, key: str, configured: str, recorded: str
) -> None:
    cfg = _features_config(tmp_path, features, override)
    encoder = load_encoder("random", arch="vit_test", image_size=cfg.encoder.image_size, seed=cfg.run.seed)
    with pytest.raises(ConfigError, match=rf"config key '{key}': {configured}, but .*{recorded}") as info:
        check_feature_shards(cfg, encoder.weights_hash)
    assert "python -m pretrain.encode" in str(info.value)


def test_every_differing_key_is_named_at_start_up(features: Path, tmp_path: Path) -> None:
    """Through the trainer's start-up: one refusal naming both keys, before any model is built."""
    overrides = ("--encoder.image_size=28", "--objective.visible_fraction=0.25")
    with pytest.raises(ConfigError) as info:
        Trainer(_features_config(tmp_path, features, *overrides))
    message = str(info.value)
    assert "'encoder.image_size': 28" in message and "image size 56" in message
    assert "'objective.visible_fraction': 0.25" in message and "fraction 0.05" in message


def test_settings_a_config_leaves_empty_accept_any_shards(features: Path, tmp_path: Path) -> None:
    """No blocks asked, visible fraction 0 (pure forecasting): stored extras are ignored, not refused."""
    cfg = _features_config(tmp_path, features, "--objective.visible_fraction=0")
    check_feature_shards(cfg, load_encoder("random", arch="vit_test", image_size=56).weights_hash)
    recorded = {"weights_hash": "h", "image_size": 56, "feature_layers": [0, 1], "visible_fraction": 0.05}
    asks = {"weights_hash": "h", "image_size": 56, "feature_layers": [], "visible_fraction": 0.0}
    assert compare_encoder_settings(recorded, asks) == []
    assert compare_encoder_settings(recorded, {**asks, "visible_fraction": 0.05 + 1e-12}) == []
    assert compare_encoder_settings(recorded, {**asks, "feature_layers": [1, 0]}) == ["feature_layers"]
    assert compare_encoder_settings(recorded, {**asks, "weights_hash": "g", "image_size": 28}) == [
        "weights_hash",
        "image_size",
    ]


def test_shards_of_another_encoder_are_refused_naming_both_hashes(features: Path, tmp_path: Path) -> None:
    cfg = _features_config(tmp_path, features, "--run.seed=1")
    other = load_encoder("random", arch="vit_test", image_size=56, seed=1).weights_hash
    with pytest.raises(EncoderMismatchError) as info:
        check_feature_shards(cfg, other)
    recorded = json.loads((features / "manifest.json").read_text())["encoder"]["weights_hash"]
    assert other in str(info.value) and recorded in str(info.value)


def test_manifests_without_visible_sets_record_fraction_zero() -> None:
    manifest = {"encoder": {"weights_hash": "h"}, "image_size": 56, "visible_fraction": 0.05, "visible_sets": 0}
    assert recorded_encoder_settings(manifest) == {
        "weights_hash": "h",
        "image_size": 56,
        "feature_layers": [],
        "visible_fraction": 0.0,
    }


def test_reencoding_with_other_settings_into_the_same_out_is_refused(
    clip_dir: Path, features: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Same encoder (same hash, same directory), other image size: refused, the existing features kept."""
    before = (features / "manifest.json").read_bytes()
    argv = [*_config_args(features.parent.parent, "--encoder.image_size=28"), "--shards", str(clip_dir)]
    assert encode_main([*argv, "--out", str(features.parent)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: ") and "image_size=56" in error[0]
    assert (features / "manifest.json").read_bytes() == before


def test_the_command_refuses_bad_overrides_in_one_line(tmp_path: Path) -> None:
    """A subprocess, as a user runs it: unknown config keys are errors, exit code 2, nothing written."""
    argv = ["--config", "tiny-cpu", "--encoder.image_sise=56", "--shards", str(tmp_path), "--out", str(tmp_path / "o")]
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain.encode", *argv], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "encoder.image_sise" in lines[0]
    assert not (tmp_path / "o").exists()


def _encode_with_stderr(clip_dir: Path, out: Path, *extra: str) -> tuple[Path, list[str]]:
    """Run the command in-process; its stdout (the feature directory) and its stderr lines."""
    stdout, stderr = io.StringIO(), io.StringIO()
    argv = [*_config_args(out.parent), "--shards", str(clip_dir), "--out", str(out), "--batch", "2", *extra]
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        assert encode_main(argv) == 0
    return Path(stdout.getvalue().strip()), stderr.getvalue().splitlines()


def test_the_command_prints_the_storage_estimate_and_a_progress_bar(clip_dir: Path, tmp_path: Path) -> None:
    """Before encoding: one estimate line (per frame, and the corpus total from the manifest); then a bar over clips.

    The estimate is the real layout: each stored blob is its frames times the per-frame figure plus its header.
    """
    # A build's manifest records args.clip_frames; the fixture's does not, so add it (shard bytes are unchanged).
    clips = shutil.copytree(clip_dir, tmp_path / "clips")
    manifest = json.loads((clips / "manifest.json").read_text())
    (clips / "manifest.json").write_text(json.dumps({**manifest, "args": {"clip_frames": 6}}))
    out, stderr = _encode_with_stderr(clips, tmp_path / "features")

    encoder = load_encoder("random", arch="vit_test", image_size=56)
    V = visible_count(encoder.num_tokens, 0.05)
    per_frame = feature_bytes_per_frame(encoder.num_tokens, encoder.embed_dim, 2, V, 0)
    assert stderr[0].startswith(f"storage estimate: {per_frame:,} B ")
    assert f"3 clips x 6 frames = 18 frames -> about {18 * per_frame / 1000:.1f} kB" in stderr[0]
    bar = "\n".join(stderr[1:])
    assert "encode" in bar and "3/3" in bar and "clip/s" in bar and "frames/s" in bar
    for tar in sorted(out.glob("features-*.tar")):
        for sample in _tar_samples(tar):
            blob = FeatureBlob(sample["safetensors"])
            header = 8 + int.from_bytes(blob.blob[:8], "little")
            assert len(blob.blob) == header + blob.num_frames * per_frame


def test_no_progress_leaves_only_the_estimate_on_stderr(clip_dir: Path, tmp_path: Path) -> None:
    """--no-progress (as data_shards build has): no bar; without args.clip_frames the corpus total is unknown."""
    _, stderr = _encode_with_stderr(clip_dir, tmp_path / "features", "--no-progress")
    assert len(stderr) == 1, stderr
    assert stderr[0].startswith("storage estimate: ") and "corpus total unknown (3 clips" in stderr[0]


def _tar_samples(tar: Path) -> list[dict]:
    import webdataset as wds

    return list(wds.WebDataset(str(tar), shardshuffle=False))
