"""Training from clip shards, feature shards and the videos front end, end to end, with exact resume; the
frozen encoder runs in the feature stage only."""

from __future__ import annotations

import json
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from data_shards import encode_clip_shards
from data_shards.loader import list_shards
from pretrain.config import ConfigError, load_config
from pretrain.data import video_build_args
from pretrain.encoder import load_encoder
from pretrain.features import frozen_features
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
    # The source hands over what it read: stored tokens and visible sets, no pixels.
    assert batch.frames_BTCHW is None and batch.visible_idx_BTV is not None
    untouched = torch.Generator().manual_seed(5)
    state = untouched.get_state()
    stage = frozen_features(straight.encoder, batch, straight.features, untouched)
    assert torch.equal(untouched.get_state(), state)
    B, K = batch.offsets_BK.shape
    assert stage.visible_idx_BKV.shape == (B, K, 4) and stage.visible_BKVD.shape == (B, K, 4, 48)
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
    # Each export records the shards it was trained on, not the unused default data.videos.
    from pretrain.export import read_export_config

    for name, source, spec in (("tiny-cpu", "clips", clips), ("feat", "features", tmp_path / "features")):
        recorded = read_export_config(tmp_path / "runs" / name / "export")
        assert recorded.training.data.videos == []
        assert recorded.data["source"] == source and recorded.data["shards"] == str(spec)
        assert (recorded.data["clip_frames"], recorded.data["fps"]) == (8, 15.0)


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
    stage = frozen_features(straight.encoder, batch, straight.features, torch.Generator())
    assert stage.source_layers_BSLND is not None
    B, S, N, D = stage.source_BSND.shape
    assert stage.source_layers_BSLND.shape == (B, S, 1, N, D)
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


def _clip_ranges(shards: Path, clip_stride: int) -> list[tuple[int, int]]:
    """[first, end) output frames of every clip of a clip-shard directory (one input video)."""
    entries, _ = list_shards(shards, "clips")
    ranges = []
    for entry in entries:
        with tarfile.open(entry.path) as archive:
            for member in archive:
                if member.name.endswith(".json"):
                    data = archive.extractfile(member)
                    assert data is not None
                    clip = json.loads(data.read())
                    first = clip["clip_index"] * clip_stride
                    ranges.append((first, first + clip["frames"]))
    return sorted(ranges)


def test_videos_are_a_front_end_to_the_shard_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """data.source='videos' builds shards with the builder's held-out split, once, and trains from features."""
    cfg = load_config("tiny-cpu", tiny_overrides(tmp_path))
    trainer = Trainer(cfg)
    data = trainer.shards.cfg.data
    assert data.source == "features" and data.eval_shards and trainer.shards.summary["videos"][0]["sha256"]
    [clips] = (tmp_path / "feature_cache").glob("videos-*/clips")
    args = video_build_args(cfg)
    train, heldout = _clip_ranges(clips, args.clip_stride), _clip_ranges(clips / "heldout", args.clip_stride)
    # The builder's split of carphone's 120 frames: held-out clips in the last quarter, training clips
    # before it, so no held-out frame is ever trained on.
    boundary = 120 - round(0.25 * 120)
    assert train and heldout
    assert max(end for _, end in train) <= boundary <= min(first for first, _ in heldout)
    # Every window start before the boundary lies in exactly one training clip.
    span = (cfg.objective.clip_frames - 1) * cfg.data.frame_stride + 1
    starts = [s for first, end in train for s in range(first, end - span + 1)]
    assert len(starts) == len(set(starts)) and starts == list(range(len(starts)))
    assert trainer.evaluate(trainer.model)[0].windows == sum(end - first - span + 1 for first, end in heldout)

    # A second run with the same videos and settings builds and encodes nothing.
    import pretrain.data

    def refuse(*args, **kwargs):
        raise AssertionError("rebuilt a cached entry")

    monkeypatch.setattr(pretrain.data, "build_shards", refuse)
    monkeypatch.setattr(pretrain.data, "encode_clip_shards", refuse)
    again = Trainer(load_config("tiny-cpu", tiny_overrides(tmp_path, "--run.name=again")))
    assert again.shards.cfg.data == data
    # Other encoder settings encode again, into their own entry, from the same clips.
    monkeypatch.setattr(pretrain.data, "encode_clip_shards", encode_clip_shards)
    other = Trainer(
        load_config("tiny-cpu", tiny_overrides(tmp_path, "--run.name=other", "--objective.visible_fraction=0"))
    )
    assert other.shards.cfg.data.shards != data.shards
    assert Path(other.shards.cfg.data.shards).parents[2] == Path(data.shards).parents[2] == clips.parent


def test_the_encoder_runs_in_the_feature_stage_only_timed_apart_from_data(
    tmp_path: Path, clip_shards: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Clip batches: every ViT call of a step and of the held-out evaluation comes from ``frozen_features``;
    ``data_wait_s`` counts the batch source only and ``encode_s`` the encoder."""
    overrides = _shard_overrides(tmp_path, "clips", clip_shards, clip_shards, "--data.num_workers=0")
    trainer = Trainer(load_config("tiny-cpu", overrides))
    callers: list[str] = []
    delay = {"encoder": 0.3, "data": 0.2}

    def slowed(original):
        def slow(*args, **kwargs):
            callers.append(sys._getframe(1).f_code.co_name)
            time.sleep(delay["encoder"])
            return original(*args, **kwargs)

        return slow

    for name in ("encode", "encode_with_layers", "encode_subset"):
        monkeypatch.setattr(trainer.encoder, name, slowed(getattr(trainer.encoder, name)))
    next_batch = trainer.sampler.next_batch

    def slow_batch(n: int):
        time.sleep(delay["data"])
        return next_batch(n)

    monkeypatch.setattr(trainer.sampler, "next_batch", slow_batch)
    metrics = trainer.train_step()
    # Sources, targets, visible patches: three encoder calls of 0.3 s; the data source's 0.2 s apart.
    assert callers == ["frozen_features"] * 3
    assert metrics["encode_s"] >= 0.9 and 0.2 <= metrics["data_wait_s"] < 0.2 + 0.9
    delay["encoder"] = 0.0
    trainer.evaluate(trainer.model)
    assert set(callers) == {"frozen_features"} and len(callers) > 3


def test_clips_shorter_than_the_window_are_refused_at_start_up(
    tmp_path: Path, clip_shards: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """10-frame clips cannot hold a window of 8 frames at stride 2 (15 frames): one error naming the keys."""
    from pretrain import train as train_cli

    overrides = _shard_overrides(tmp_path, "clips", clip_shards, clip_shards, "--data.frame_stride=2")
    with pytest.raises(ConfigError, match=r"hold 10 frames.*spans 15.*data\.frame_stride 2.*--clip-frames 15"):
        Trainer(load_config("tiny-cpu", overrides))
    assert train_cli.main(["--config", "tiny-cpu", *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "--clip-frames 15" in err[0]
    # At stride 1 the same shards train.
    Trainer(load_config("tiny-cpu", _shard_overrides(tmp_path / "ok", "clips", clip_shards, clip_shards)))
