"""Training from clip shards and from feature shards, end to end, with exact resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from data_shards import encode_clip_shards
from pretrain.config import ConfigError, load_config
from pretrain.encoder import load_encoder
from pretrain.trainer import Trainer
from tests.conftest import tiny_overrides
from tests.data_shards.shard_fixtures import FixtureClip, real_clips, write_clip_shards


def _shards(directory: Path) -> Path:
    # 4 shards of 6 real carphone clips, 64 px short side, 10 frames each (window = 4 + 4 frames).
    clips = real_clips("carphone", clip_frames=10, num_clips=6, short_side=64)
    write_clip_shards(directory, [clips[i::4] for i in range(4)])
    return directory


def _shard_overrides(tmp: Path, source: str, shards: Path, eval_shards: Path, *extra: str) -> list[str]:
    return tiny_overrides(
        tmp,
        f"--data.source={source}",
        f"--data.shards={shards}",
        f"--data.eval_shards={eval_shards}",
        "--data.num_workers=1",
        "--data.shuffle_buffer=4",
        *extra,
    )


@pytest.fixture(scope="module")
def clip_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _shards(tmp_path_factory.mktemp("clips"))


def test_train_from_clip_shards_resumes_exactly(tmp_path: Path, clip_shards: Path) -> None:
    args = ("clips", clip_shards, clip_shards)
    straight = Trainer(load_config("tiny-cpu", _shard_overrides(tmp_path / "a", *args)))
    result = straight.train()
    assert result.step == 6 and {r.offset for r in result.heldout} == {1, 2, 4}
    # 6 clips of 10 frames, windows of 8 frames: every one of the 3 starts per clip is evaluated.
    assert all(r.windows == 6 * 3 for r in result.heldout)

    first = Trainer(load_config("tiny-cpu", _shard_overrides(tmp_path / "b", *args)))
    first.train(stop_at=3)
    resumed = Trainer(load_config("tiny-cpu", _shard_overrides(tmp_path / "b", *args)))
    resumed.train(finalize=False)
    assert resumed.state.history == straight.state.history
    for key, value in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_corrupt_samples_are_counted_not_fatal(tmp_path: Path) -> None:
    clips = real_clips("carphone", clip_frames=10, num_clips=4, short_side=64)
    bad = FixtureClip(clips[0].frames_THWC, source="broken", clip_index=0, mp4_override=b"\x00" * 500)
    shards = tmp_path / "shards"
    write_clip_shards(shards, [[*clips[:2], bad], clips[2:]])
    trainer = Trainer(load_config("tiny-cpu", _shard_overrides(tmp_path, "clips", shards, shards, "--train.steps=4")))
    trainer.train(finalize=False)
    assert trainer.sampler.skipped_samples >= 1


def test_train_from_feature_shards(tmp_path: Path, clip_shards: Path) -> None:
    """Pure forecasting from feature shards, which may carry visible sets or not."""
    encoder = load_encoder("random", arch="vit_test", image_size=56, seed=0)
    features = encode_clip_shards(clip_shards, tmp_path / "features", encoder, visible_fraction=0)
    overrides = _shard_overrides(tmp_path, "features", features, features, "--objective.visible_fraction=0")
    result = Trainer(load_config("tiny-cpu", overrides)).train()
    assert result.step == 6 and len(result.heldout) == 3


def test_train_from_feature_shards_with_visible_tokens(tmp_path: Path, clip_shards: Path) -> None:
    """The default objective from features: stored visible sets stand in for encode_subset, resume is exact."""
    encoder = load_encoder("random", arch="vit_test", image_size=56, seed=0)
    features = encode_clip_shards(clip_shards, tmp_path / "features", encoder, visible_fraction=0.25)
    args = ("features", features, features, "--objective.visible_fraction=0.25")
    straight = Trainer(load_config("tiny-cpu", _shard_overrides(tmp_path / "a", *args)))
    batch = straight.sampler.next_batch(straight.cfg.train.micro_batch_size)
    assert batch.visible_idx_BKV is not None and batch.visible_tokens_BKVD is not None
    B, K = batch.offsets_BK.shape
    assert batch.visible_idx_BKV.shape == (B, K, 4) and batch.visible_tokens_BKVD.shape == (B, K, 4, 48)
    straight = Trainer(load_config("tiny-cpu", _shard_overrides(tmp_path / "a", *args)))
    result = straight.train()
    assert result.step == 6 and len(result.heldout) == 3

    first = Trainer(load_config("tiny-cpu", _shard_overrides(tmp_path / "b", *args)))
    first.train(stop_at=3)
    resumed = Trainer(load_config("tiny-cpu", _shard_overrides(tmp_path / "b", *args)))
    resumed.train(finalize=False)
    assert resumed.state.history == straight.state.history


def test_feature_shards_of_another_encoder_are_refused(tmp_path: Path, clip_shards: Path) -> None:
    other = load_encoder("random", arch="vit_test", image_size=56, seed=1)
    features = encode_clip_shards(clip_shards, tmp_path / "features", other)
    overrides = _shard_overrides(tmp_path, "features", features, features, "--objective.visible_fraction=0")
    with pytest.raises(ValueError, match="encoder hash"):
        Trainer(load_config("tiny-cpu", overrides))


def test_feature_shards_must_match_the_visible_fraction(tmp_path: Path, clip_shards: Path) -> None:
    encoder = load_encoder("random", arch="vit_test", image_size=56, seed=0)
    plain = encode_clip_shards(clip_shards, tmp_path / "plain", encoder, visible_fraction=0)
    with_sets = encode_clip_shards(clip_shards, tmp_path / "sets", encoder, visible_fraction=0.25)
    for shards, stored in ((plain, "0.0"), (with_sets, "0.25")):
        overrides = _shard_overrides(tmp_path, "features", shards, shards, "--objective.visible_fraction=0.1")
        with pytest.raises(ConfigError, match=rf"objective\.visible_fraction.*fraction {stored}\b"):
            Trainer(load_config("tiny-cpu", overrides))
    overrides = _shard_overrides(tmp_path, "features", with_sets, plain, "--objective.visible_fraction=0.25")
    with pytest.raises(ConfigError, match=r"objective\.visible_fraction"):
        Trainer(load_config("tiny-cpu", overrides))
    with pytest.raises(ConfigError, match=r"data\.shards"):
        load_config("tiny-cpu", [f"--run.out_dir={tmp_path}", "--data.source=clips"])


@pytest.mark.slow
def test_cli_build_encode_train(tmp_path: Path) -> None:
    """The real commands: data_shards build, pretrain.encode, pretrain.train from each kind of shard.

    Both trainings use the default objective (visible fraction 0.05): the
    encode pass's default visible sets serve the feature run.
    """
    import subprocess
    import sys

    from data_shards import sample_video_path

    repo = Path(__file__).resolve().parents[2]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([sys.executable, "-m", *args], cwd=repo, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    clips = tmp_path / "clips"
    video = str(sample_video_path("carphone"))
    run(
        "data_shards",
        "build",
        "--input",
        video,
        "--out",
        str(clips),
        "--clip-frames",
        "8",
        "--fps",
        "15",
        "--short-side",
        "64",
        "--workers",
        "0",
        "--no-progress",
    )
    base = [*tiny_overrides(tmp_path / "runs"), "--data.num_workers=0", f"--data.eval_shards={clips}"]
    # The encoder settings (random vit_test, 56 px, visible fraction 0.05) come from the training config.
    run("pretrain.encode", "--config", "tiny-cpu", *base, "--shards", str(clips), "--out", str(tmp_path / "features"))
    out = run("pretrain.train", *base, "--data.source=clips", f"--data.shards={clips}").stdout
    assert "copy-last" in out
    features = f"--data.shards={tmp_path / 'features'}"
    out = run(
        "pretrain.train",
        *base,
        "--run.name=feat",
        "--data.source=features",
        features,
        f"--data.eval_shards={tmp_path / 'features'}",
    ).stdout
    assert "copy-last" in out


def test_train_from_feature_shards_with_encoder_blocks(tmp_path: Path, clip_shards: Path) -> None:
    """encoder.feature_layers from feature shards: stored blocks feed the adapters; resume is exact;
    the batch's blocks equal the encoder's for those frames; shards without (or with other) blocks are refused."""
    encoder = load_encoder("random", arch="vit_test", image_size=56, seed=0)
    features = encode_clip_shards(
        clip_shards, tmp_path / "features", encoder, visible_fraction=0.25, feature_layers=[0]
    )
    args = ("features", features, features, "--objective.visible_fraction=0.25", "--encoder.feature_layers=[0]")
    straight = Trainer(load_config("tiny-cpu", _shard_overrides(tmp_path / "a", *args)))
    batch = straight.sampler.next_batch(straight.cfg.train.micro_batch_size)
    assert batch.source_layers_BSLND is not None
    B, S, N, D = batch.source_BSND.shape
    assert batch.source_layers_BSLND.shape == (B, S, 1, N, D)
    straight = Trainer(load_config("tiny-cpu", _shard_overrides(tmp_path / "a", *args)))  # unconsumed data
    result = straight.train()
    assert result.step == 6 and len(result.heldout) == 3
    weight = straight.model.layer_adapters.adapters[0].weight.detach()
    assert not torch.equal(weight, torch.eye(weight.shape[0]))

    first = Trainer(load_config("tiny-cpu", _shard_overrides(tmp_path / "b", *args)))
    first.train(stop_at=3)
    resumed = Trainer(load_config("tiny-cpu", _shard_overrides(tmp_path / "b", *args)))
    resumed.train(finalize=False)
    assert resumed.state.history == straight.state.history

    plain = encode_clip_shards(clip_shards, tmp_path / "plain", encoder, visible_fraction=0.25)
    for shards, stored in ((plain, r"\[\]"), (features, r"\[0\]")):
        layers = "[1]" if shards == features else "[0]"
        overrides = _shard_overrides(
            tmp_path,
            "features",
            shards,
            shards,
            "--objective.visible_fraction=0.25",
            f"--encoder.feature_layers={layers}",
        )
        with pytest.raises(ConfigError, match=rf"encoder\.feature_layers.*store blocks {stored}"):
            Trainer(load_config("tiny-cpu", overrides))
