"""Building WebDataset clip shards: contents, skipped inputs, determinism, resume after a crash, caps, CLI.

Shape legend: T frames, H height, W width, C = 3 colour channels (RGB).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import webdataset as wds

from data_shards import (
    BuildArgs,
    build_shards,
    decode_video,
    detect_scene_cuts,
    file_sha256,
    generate_video,
    sample_video_path,
)
from data_shards import build as build_module
from data_shards.__main__ import main
from data_shards.build import BuildArgsError, expand_inputs

REPO_ROOT = Path(__file__).resolve().parents[2]
# Small clips keep every build here to a second or two.
ARGS = BuildArgs(clip_frames=8, fps=8, short_side=64, max_samples_per_shard=8)
# Input stem -> the reason it must be skipped for.
BAD_REASONS = {
    "truncated.mp4": "truncated",
    "empty.mp4": "empty_file",
    "notes.mp4": "not_video",
    "tone.wav": "no_video_stream",
    "short.mp4": "too_short",
    "tilted.mp4": "rotated",
    "unknown.avi": "unsupported_codec",
    "carphone_copy.mp4": "duplicate",
    "missing.mp4": "missing",
}
# Good inputs -> clips at 8 fps, 8 frames a clip (carphone 4.0 s, bikes 10 s, procedural 4 s,
# odd-sized 2.5 s, rotated 3 s, variable frame rate 2.2 s).
GOOD_CLIPS = {
    "carphone": 4,
    "bikes": 10,
    "proc-0.mp4": 4,
    "proc-1.mp4": 4,
    "odd.mp4": 2,
    "turned.mp4": 3,
    "vfr.mkv": 2,
}


def _write_frames(
    path: Path, frames_THWC: np.ndarray, *, codec: str = "mpeg4", rate: int = 10, pts: list[int] | None = None
) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = frames_THWC.shape[2], frames_THWC.shape[1], "yuv420p"
        for index, frame_HWC in enumerate(frames_THWC):
            frame = av.VideoFrame.from_ndarray(frame_HWC, format="rgb24")
            frame.pts = index if pts is None else pts[index]
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def _write_rotated(path: Path, degrees: int, frames: int) -> None:
    """A 48x32 (W x H) H.264 mp4 with a display rotation and a white marker in the stored top-left corner."""
    frames_THWC = np.full((frames, 32, 48, 3), 60, np.uint8)
    frames_THWC[:, :12, :12] = 255
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
        stream.set_display_rotation(degrees)
        for index, frame_HWC in enumerate(frames_THWC):
            frame = av.VideoFrame.from_ndarray(frame_HWC, format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def _write_tone(path: Path, seconds: float = 0.5, rate: int = 16000) -> None:
    samples = (0.3 * np.sin(np.arange(int(seconds * rate)) * 2 * np.pi * 440 / rate) * 32767).astype(np.int16)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=rate)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(samples[None], format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = rate, 0, Fraction(1, rate)
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def make_bad_inputs(folder: Path) -> list[Path]:
    """One input of each class that the build must skip (missing.mp4 is listed but never written)."""
    folder.mkdir(parents=True, exist_ok=True)
    bikes = sample_video_path("bikes").read_bytes()
    (folder / "truncated.mp4").write_bytes(bikes[: int(0.4 * len(bikes))])
    (folder / "empty.mp4").touch()
    (folder / "notes.mp4").write_text("not a video\n" * 100)
    _write_tone(folder / "tone.wav")
    generate_video(folder / "short.mp4", seed=5, frames=3, size=(64, 64))
    _write_rotated(folder / "tilted.mp4", 45, frames=16)
    avi = folder / "unknown.avi"
    _write_frames(avi, np.zeros((12, 32, 48, 3), np.uint8))
    avi.write_bytes(avi.read_bytes().replace(b"FMP4", b"QQQQ"))
    shutil.copy(sample_video_path("carphone"), folder / "carphone_copy.mp4")
    return [folder / name for name in BAD_REASONS]


def make_good_inputs(folder: Path) -> list[Path]:
    """Two procedural videos, an odd-sized one (175x143, resized to even; each frame one grey level),
    a 90-degree rotated one, and one with a dropped stretch (frame intervals of 0.1 and 0.3 s)."""
    folder.mkdir(parents=True, exist_ok=True)
    generate_video(folder / "proc-0.mp4", seed=0, frames=32, size=(64, 96))
    generate_video(folder / "proc-1.mp4", seed=1, frames=32, size=(64, 64))
    ramp_THWC = np.broadcast_to(np.arange(25, dtype=np.uint8)[:, None, None, None] * 8, (25, 143, 175, 3)).copy()
    _write_frames(folder / "odd.mp4", ramp_THWC)
    _write_rotated(folder / "turned.mp4", 90, frames=24)
    irregular_pts = [0, 1, 2, 3, 4, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]
    _write_frames(folder / "vfr.mkv", generate_video_frames(20), codec="libx264", pts=irregular_pts)
    return sorted(folder.iterdir())


def generate_video_frames(frames: int) -> np.ndarray:
    """frames_THWC of a bright square moving over a dark 48x32 background: no two frames alike."""
    frames_THWC = np.full((frames, 32, 48, 3), 30, np.uint8)
    for t in range(frames):
        frames_THWC[t, 8:20, 2 * t % 36 : 2 * t % 36 + 12] = 220
    return frames_THWC


def _list_file(path: Path, entries: list[Path]) -> Path:
    path.write_text("# inputs\n" + "\n".join(str(p) for p in entries) + "\n")
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("inputs")
    good = make_good_inputs(root / "good")
    bad = make_bad_inputs(root / "bad")
    listed = _list_file(root / "list.txt", [sample_video_path("carphone"), sample_video_path("bikes"), *bad])
    return {"root": root, "good": good, "bad": bad, "specs": [f"@{listed}", str(root / "good")]}


@pytest.fixture(scope="module")
def built(inputs: dict[str, object], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The main build, in two spawned worker processes."""
    out = tmp_path_factory.mktemp("built")
    build_shards(inputs["specs"], out, ARGS, workers=2, progress=False)
    return out


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _shard_hashes(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("clips-*.tar"))}


def _samples(out: Path) -> list[dict]:
    urls = [str(p) for p in sorted(out.glob("clips-*.tar"))]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def _decode_mp4(data: bytes) -> tuple[np.ndarray, float]:
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        return np.stack(frames), float(stream.average_rate)


def test_manifest_counts_and_skip_reasons(built: Path, inputs: dict[str, object]) -> None:
    manifest = _manifest(built)
    assert manifest["version"] == 1
    assert manifest["args"] == {
        "clip_frames": 8,
        "fps": 8.0,
        "short_side": 64,
        "stride": 8,
        "crf": 23,
        "max_samples_per_shard": 8,
        "max_shard_bytes": 1_000_000_000,
        "holdout_fraction": 0.0,
        "skip_scene_cuts": False,
    }
    assert manifest["clips_dropped_at_holdout"] == manifest["clips_dropped_at_cuts"] == 0
    assert manifest["clips_dropped_at_gaps"] == 0
    # odd.mp4 is a ramp of flat grey frames; vfr.mkv's frames are 0.1 and 0.3 s apart.
    assert manifest["stats"]["uniform_colour_inputs"] == 1
    assert manifest["stats"]["variable_frame_rate_inputs"] == 1
    assert manifest["stats"]["wrong_duration_inputs"] == 0
    # The longest stretch without a new frame is vfr.mkv's dropped stretch.
    assert manifest["stats"]["max_clip_gap_s"] == pytest.approx(0.3, abs=1e-3)
    assert not (built / "heldout").exists()
    assert manifest["inputs"] == len(GOOD_CLIPS) + len(BAD_REASONS)
    assert manifest["ok_inputs"] == len(GOOD_CLIPS)
    assert manifest["clips"] == sum(GOOD_CLIPS.values())
    assert manifest["total_duration_s"] == pytest.approx(manifest["clips"] * 8 / 8)
    assert manifest["skipped"] == {reason: 1 for reason in sorted(BAD_REASONS.values())}
    # Of two inputs with the same bytes, the one later in path order is the duplicate.
    copy, original = inputs["root"] / "bad" / "carphone_copy.mp4", sample_video_path("carphone")
    later, earlier = sorted([copy, original], key=str, reverse=True)
    expected = {**BAD_REASONS, later.name: "duplicate"}
    if later != copy:
        del expected[copy.name]
    by_name = {Path(entry["path"]).name: entry for entry in manifest["skipped_files"]}
    assert {name: entry["reason"] for name, entry in by_name.items()} == expected
    assert all(entry["detail"] for entry in by_name.values())
    assert str(earlier) in by_name[later.name]["detail"]
    shards = manifest["shards"]
    assert [s["name"] for s in shards] == [f"clips-{i:06d}.tar" for i in range(len(shards))]
    assert sum(s["samples"] for s in shards) == manifest["clips"]
    for shard in shards:
        path = built / shard["name"]
        assert path.stat().st_size == shard["bytes"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == shard["sha256"]
        assert shard["samples"] <= 8
    assert not list(built.glob(".*.tmp")) and not list((built / ".parts").glob(".*.tmp"))


def test_samples_decode_with_metadata(built: Path) -> None:
    samples = _samples(built)
    assert len(samples) == sum(GOOD_CLIPS.values())
    sources: list[str] = []
    for sample in samples:
        meta = json.loads(sample["json"])
        assert set(meta) == {
            "source",
            "source_sha256",
            "clip_index",
            "start_s",
            "fps",
            "frames",
            "width",
            "height",
            "crf",
            "source_times_s",
            "max_gap_s",
        }
        assert sample["__key__"] == f"{meta['source_sha256'][:16]}-{meta['clip_index']:06d}"
        # Clips sit on the 8 fps grid; each frame is the source frame shown at its tick.
        assert meta["start_s"] == pytest.approx(meta["clip_index"] * 8 / 8, abs=1e-6)
        ticks_T = meta["start_s"] + np.arange(8) / 8
        source_T = np.asarray(meta["source_times_s"])
        assert source_T.shape == (8,) and (np.diff(source_T) >= 0).all()
        assert (source_T <= ticks_T + 1e-3).all()
        # The gap a tick falls in is at least how long ago its frame was shown.
        assert (ticks_T - source_T).max() <= meta["max_gap_s"] <= 0.3 + 1e-6
        frames_THWC, rate = _decode_mp4(sample["mp4"])
        assert frames_THWC.shape == (8, meta["height"], meta["width"], 3)
        assert min(meta["height"], meta["width"]) == 64 and meta["width"] % 2 == 0 and meta["height"] % 2 == 0
        assert rate == meta["fps"] == 8.0 and meta["frames"] == 8 and meta["crf"] == 23
        if not sources or sources[-1] != meta["source"]:
            sources.append(meta["source"])
    # Sample order: inputs sorted by path, clips in time order within each.
    assert sources == sorted(sources)
    assert len(sources) == len(GOOD_CLIPS)
    keys = [s["__key__"] for s in samples]
    assert len(set(keys)) == len(keys)


def test_clip_pixels_match_a_direct_decode(built: Path) -> None:
    """Clip 3 of bikes is frames 24..31 of bikes decoded at 8 fps and short side 64, up to x264 loss."""
    from data_shards import decode_video

    expected_THWC, _ = decode_video(sample_video_path("bikes"), fps=8, short_side=64)
    sample = next(
        s
        for s in _samples(built)
        if json.loads(s["json"])["source"].endswith("bikes.mp4") and s["__key__"].endswith("3")
    )
    frames_THWC, _ = _decode_mp4(sample["mp4"])
    error = np.abs(frames_THWC.astype(float) - expected_THWC[24:32].astype(float)).mean()
    assert error < 6.0, error


def test_rotation_is_applied(built: Path) -> None:
    """A 48x32 video shown rotated 90 degrees counterclockwise becomes portrait, its top-left marker bottom-left."""
    sample = next(s for s in _samples(built) if json.loads(s["json"])["source"].endswith("turned.mp4"))
    meta = json.loads(sample["json"])
    assert (meta["width"], meta["height"]) == (64, 96)
    frames_THWC, _ = _decode_mp4(sample["mp4"])
    corners = {
        "top_left": frames_THWC[:, :16, :16].mean(),
        "bottom_left": frames_THWC[:, -16:, :16].mean(),
        "top_right": frames_THWC[:, :16, -16:].mean(),
        "bottom_right": frames_THWC[:, -16:, -16:].mean(),
    }
    assert max(corners, key=corners.get) == "bottom_left", corners


def test_rerun_reuses_parts_and_is_byte_identical(built: Path, inputs: dict[str, object]) -> None:
    manifest_bytes = (built / "manifest.json").read_bytes()
    hashes = _shard_hashes(built)
    mtimes = {p: p.stat().st_mtime_ns for p in [*built.glob("clips-*.tar"), *(built / ".parts").glob("*.tar")]}
    result = build_shards(inputs["specs"], built, ARGS, workers=0, progress=False)
    assert result.stats["parts_made"] == 0
    assert result.stats["parts_reused"] == len(GOOD_CLIPS) + len(BAD_REASONS) - 1  # missing.mp4 has no part
    assert result.stats["shards_written"] == 0
    assert (built / "manifest.json").read_bytes() == manifest_bytes
    assert _shard_hashes(built) == hashes
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes


def test_fresh_build_in_process_is_byte_identical(built: Path, inputs: dict[str, object], tmp_path: Path) -> None:
    """Same inputs and arguments, another directory, no worker processes: the same bytes (x264 is deterministic)."""
    build_shards(inputs["specs"], tmp_path, ARGS, workers=0, progress=False)
    assert _shard_hashes(tmp_path) == _shard_hashes(built)
    assert (tmp_path / "manifest.json").read_bytes() == (built / "manifest.json").read_bytes()


def test_other_arguments_are_refused(built: Path, inputs: dict[str, object]) -> None:
    manifest_bytes = (built / "manifest.json").read_bytes()
    with pytest.raises(BuildArgsError, match=r"crf 23 -> 30"):
        build_shards(inputs["specs"], built, BuildArgs(clip_frames=8, fps=8, short_side=64, crf=30), progress=False)
    assert (built / "manifest.json").read_bytes() == manifest_bytes


def test_crash_inside_a_part_then_rerun(inputs: dict[str, object], built: Path, tmp_path: Path, monkeypatch) -> None:
    """An interrupt in the middle of encoding an input leaves no part for it; the re-run finishes the same build."""
    real_encode = build_module.encode_clip_mp4
    calls = {"n": 0}

    def encode_then_crash(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 12:
            raise KeyboardInterrupt
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(build_module, "encode_clip_mp4", encode_then_crash)
    with pytest.raises(KeyboardInterrupt):
        build_shards(inputs["specs"], tmp_path, ARGS, workers=0, progress=False)
    assert not (tmp_path / "manifest.json").exists()
    assert not list(tmp_path.glob("clips-*.tar"))
    finished_parts = list((tmp_path / ".parts").glob("*.tar"))
    assert finished_parts
    monkeypatch.setattr(build_module, "encode_clip_mp4", real_encode)
    result = build_shards(inputs["specs"], tmp_path, ARGS, workers=0, progress=False)
    # Only the inputs without a finished part were encoded again.
    assert result.stats["parts_made"] == len(list((tmp_path / ".parts").glob("*.tar"))) - len(finished_parts) > 0
    assert _shard_hashes(tmp_path) == _shard_hashes(built)


def test_crash_while_writing_shards_leaves_no_final_partial_shard(
    inputs: dict[str, object], built: Path, tmp_path: Path, monkeypatch
) -> None:
    real_write = wds.TarWriter.write
    calls = {"n": 0}

    def write_then_crash(self, obj):
        calls["n"] += 1
        if calls["n"] == 13:
            raise OSError("disk went away")
        return real_write(self, obj)

    monkeypatch.setattr(wds.TarWriter, "write", write_then_crash)
    with pytest.raises(OSError, match="disk went away"):
        build_shards(inputs["specs"], tmp_path, ARGS, workers=0, progress=False)
    # Shard 0 (8 samples) was complete and renamed; shard 1 died at its 5th sample and has no final name.
    assert sorted(p.name for p in tmp_path.glob("clips-*.tar")) == ["clips-000000.tar"]
    assert not (tmp_path / "manifest.json").exists()
    monkeypatch.setattr(wds.TarWriter, "write", real_write)
    build_shards(inputs["specs"], tmp_path, ARGS, workers=0, progress=False)
    assert _shard_hashes(tmp_path) == _shard_hashes(built)
    assert (tmp_path / "manifest.json").read_bytes() == (built / "manifest.json").read_bytes()


@pytest.mark.slow
def test_killed_cli_build_resumes_to_identical_shards(inputs: dict[str, object], tmp_path: Path) -> None:
    """SIGKILL a real `python -m data_shards build` once it has finished a part; the re-run completes the job."""
    many = tmp_path / "many"
    many.mkdir()
    for seed in range(8):
        generate_video(many / f"p{seed}.mp4", seed=seed, frames=48, size=(96, 128))
    command = [sys.executable, "-m", "data_shards", "build", "--input", str(many), "--clip-frames", "8"]
    command += ["--short-side", "64", "--workers", "1", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    killed = tmp_path / "killed"
    process = subprocess.Popen([*command, "--out", str(killed)], env=env, cwd=REPO_ROOT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not list((killed / ".parts").glob("*.tar")) and time.monotonic() < deadline:
            assert process.poll() is None, "the build ended before it could be killed"
            time.sleep(0.01)
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    assert not (killed / "manifest.json").exists()
    assert not list(killed.glob("clips-*.tar"))
    parts_before = len(list((killed / ".parts").glob("*.tar")))
    assert 1 <= parts_before < 8

    subprocess.run([*command, "--out", str(killed)], env=env, cwd=REPO_ROOT, check=True, capture_output=True)
    reference = tmp_path / "reference"
    subprocess.run([*command, "--out", str(reference), "--workers", "0"], env=env, cwd=REPO_ROOT, check=True)
    assert _shard_hashes(killed) == _shard_hashes(reference)
    assert (killed / "manifest.json").read_bytes() == (reference / "manifest.json").read_bytes()
    assert json.loads((killed / "build_stats.json").read_text())["parts_reused"] >= parts_before


def test_shard_caps(inputs: dict[str, object], built: Path, tmp_path: Path) -> None:
    """Caps move shard boundaries only: the samples, in order, are the same as in the main build."""
    reference_keys = [s["__key__"] for s in _samples(built)]
    by_count = tmp_path / "by_count"
    args = BuildArgs(clip_frames=8, fps=8, short_side=64, max_samples_per_shard=3)
    manifest = build_shards(inputs["specs"], by_count, args, workers=0, progress=False).manifest
    assert [s["samples"] for s in manifest["shards"]] == [3] * 9 + [2]
    assert [s["__key__"] for s in _samples(by_count)] == reference_keys

    # About three typical samples per shard; every shard file stays under the cap.
    mp4_sizes = [len(s["mp4"]) for s in _samples(built)]
    cap = 10240 * (1 + 3 * int(np.median(mp4_sizes)) // 10240)
    by_bytes = tmp_path / "by_bytes"
    args = BuildArgs(clip_frames=8, fps=8, short_side=64, max_shard_bytes=cap)
    manifest = build_shards(inputs["specs"], by_bytes, args, workers=0, progress=False).manifest
    assert len(manifest["shards"]) > 3
    for shard in manifest["shards"]:
        assert shard["bytes"] <= cap or shard["samples"] == 1
        assert (by_bytes / shard["name"]).stat().st_size == shard["bytes"]
    assert [s["__key__"] for s in _samples(by_bytes)] == reference_keys


def test_native_rate_without_resize_skips_odd_dimensions(inputs: dict[str, object], tmp_path: Path) -> None:
    odd = next(p for p in inputs["good"] if p.name == "odd.mp4")
    args = BuildArgs(clip_frames=30, fps=0, short_side=0, stride=45)
    manifest = build_shards([sample_video_path("carphone"), odd], tmp_path, args, workers=0, progress=False).manifest
    assert manifest["skipped"] == {"odd_dimensions": 1}
    assert "175x143" in manifest["skipped_files"][0]["detail"]
    samples = _samples(tmp_path)
    # 120 native frames, clips of 30 starting every 45: at 0, 45, 90.
    assert len(samples) == 3
    for index, sample in enumerate(samples):
        meta = json.loads(sample["json"])
        assert meta["fps"] == pytest.approx(30000 / 1001)
        assert meta["start_s"] == pytest.approx(index * 45 * 1001 / 30000, abs=1e-4)
        frames_THWC, rate = _decode_mp4(sample["mp4"])
        assert frames_THWC.shape == (30, 144, 176, 3)
        assert rate == pytest.approx(30000 / 1001)


def test_overlapping_clips(inputs: dict[str, object], tmp_path: Path) -> None:
    proc = next(p for p in inputs["good"] if p.name == "proc-1.mp4")
    args = BuildArgs(clip_frames=8, fps=8, short_side=64, stride=4)
    manifest = build_shards([proc], tmp_path, args, workers=0, progress=False).manifest
    # 32 frames, clips of 8 every 4 frames: 7 clips.
    assert manifest["clips"] == 7
    starts = [json.loads(s["json"])["start_s"] for s in _samples(tmp_path)]
    assert starts == pytest.approx([0.5 * k for k in range(7)])


def _clip_spans(out: Path, stride: int) -> dict[str, list[tuple[int, int]]]:
    """Output-frame spans [start, end) of the clips in a shard set, by source sha."""
    spans: dict[str, list[tuple[int, int]]] = {}
    for sample in _samples(out):
        meta = json.loads(sample["json"])
        start = meta["clip_index"] * stride
        spans.setdefault(meta["source_sha256"], []).append((start, start + meta["frames"]))
    return spans


def test_holdout_split(tmp_path: Path) -> None:
    """Per input, the last 30% of output frames is held out; clips straddling the boundary are dropped."""
    videos = [sample_video_path("carphone"), sample_video_path("bikes")]
    args = BuildArgs(clip_frames=8, fps=8, short_side=64, stride=4, max_samples_per_shard=4, holdout_fraction=0.3)
    result = build_shards(videos, tmp_path, args, workers=0, progress=False)
    manifest, heldout = result.manifest, result.heldout
    assert heldout == _manifest(tmp_path / "heldout") and heldout["args"] == manifest["args"]
    # Clips of 8 frames every 4. carphone: 33 frames, boundary 33 - round(9.9) = 23, starts 0..24:
    # 4 train (0..12), 2 dropped (16, 20), 1 held out (24). bikes: 80 frames, boundary 80 - 24 = 56,
    # starts 0..72: 13 train (0..48), 1 dropped (52), 5 held out (56..72).
    assert (manifest["clips"], heldout["clips"]) == (17, 6)
    assert manifest["clips_dropped_at_holdout"] == heldout["clips_dropped_at_holdout"] == 3
    assert manifest["clips_dropped_at_cuts"] == 0
    held_dir = tmp_path / "heldout"
    assert sorted(p.name for p in held_dir.glob("clips-*.tar")) == [s["name"] for s in heldout["shards"]]
    for shard in heldout["shards"]:
        assert hashlib.sha256((held_dir / shard["name"]).read_bytes()).hexdigest() == shard["sha256"]
    train_keys = {s["__key__"] for s in _samples(tmp_path)}
    held_keys = {s["__key__"] for s in _samples(held_dir)}
    assert len(train_keys) == 17 and len(held_keys) == 6 and not train_keys & held_keys
    train_spans, held_spans = _clip_spans(tmp_path, 4), _clip_spans(held_dir, 4)
    assert set(train_spans) == set(held_spans)
    for sha, spans in held_spans.items():
        # Every held-out frame comes after every training frame of the same video.
        assert max(end for _, end in train_spans[sha]) <= min(start for start, _ in spans)
    boundaries = sorted(min(start for start, _ in spans) for spans in held_spans.values())
    assert boundaries == [24, 56]

    # Same arguments: nothing changes; another fraction is refused.
    again = build_shards(videos, tmp_path, args, workers=0, progress=False)
    assert again.stats["shards_written"] == 0 and again.heldout == heldout
    with pytest.raises(BuildArgsError, match="holdout_fraction"):
        build_shards(videos, tmp_path, dataclasses.replace(args, holdout_fraction=0.5), workers=0, progress=False)


def test_scene_cuts_found_across_decode_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunked cut detection finds the cuts of one pass over bikes.mp4, also where a chunk boundary falls on one."""
    frames_THWC, _ = decode_video(sample_video_path("bikes"), fps=8, short_side=64)
    whole = detect_scene_cuts(frames_THWC)
    # Native cuts near frames 30, 76, 137, 187, 242 of 25 fps: at 8 fps near 9.6, 24.3, 43.8, 59.8, 77.4.
    assert len(whole) == 5
    assert all(abs(c - n * 8 / 25) <= 1.5 for c, n in zip(whole, [30, 76, 137, 187, 242], strict=True))
    for chunk in (whole[1], 7, 12, 40):
        log = build_module._FrameLog(detect_cuts=True)
        for start in range(0, len(frames_THWC), chunk):
            log.push(frames_THWC[start : start + chunk])
        assert log.frames == len(frames_THWC)
        assert log.finish() == whole, chunk


def test_skip_scene_cuts_on_bikes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bikes = sample_video_path("bikes")
    frames_THWC, _ = decode_video(bikes, fps=8, short_side=64)
    cuts = detect_scene_cuts(frames_THWC)
    # Small decode chunks, so that cuts fall near chunk boundaries in the builder too.
    monkeypatch.setattr(build_module, "_DECODE_CHUNK_FRAMES", 12)
    args = BuildArgs(clip_frames=8, fps=8, short_side=64, skip_scene_cuts=True)
    manifest = build_shards([bikes], tmp_path, args, workers=0, progress=False).manifest
    crossing = [s for s in range(0, 80 - 7, 8) if any(s < c < s + 8 for c in cuts)]
    assert len(crossing) >= 4
    assert manifest["clips_dropped_at_cuts"] == len(crossing)
    assert manifest["clips"] == 10 - len(crossing)
    kept = sorted(start for start, _ in _clip_spans(tmp_path, 8)[file_sha256(bikes)])
    assert kept == [s for s in range(0, 80 - 7, 8) if s not in crossing]
    # Cut skipping composes with the holdout split (cuts counted first).
    both = dataclasses.replace(args, holdout_fraction=0.25)
    result = build_shards([bikes], tmp_path / "both", both, workers=0, progress=False)
    assert result.manifest["clips_dropped_at_cuts"] == len(crossing)
    assert (
        result.manifest["clips"] + result.heldout["clips"] + len(crossing) + result.manifest["clips_dropped_at_holdout"]
        == 10
    )


def test_expand_inputs(tmp_path: Path) -> None:
    (tmp_path / "a" / "deep").mkdir(parents=True)
    for name in ["a/x.mp4", "a/deep/y.MKV", "a/readme.md", "b.webm", "c.mov"]:
        (tmp_path / name).touch()
    listed = tmp_path / "more.txt"
    listed.write_text("# comment\n\nc.mov\nnot-there.mp4\n")
    paths = expand_inputs([str(tmp_path / "a"), str(tmp_path / "*.webm"), f"@{listed}", str(tmp_path / "b.webm")])
    names = [str(p.relative_to(tmp_path)) for p in paths]
    assert names == ["a/deep/y.MKV", "a/x.mp4", "b.webm", "c.mov", "not-there.mp4"]
    assert expand_inputs([str(listed)]) == expand_inputs([f"@{listed}"])
    assert expand_inputs([str(tmp_path / "**" / "*.mp4")]) == [tmp_path / "a" / "x.mp4"]


def test_cli_build_and_refusal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    proc = tmp_path / "proc.mp4"
    generate_video(proc, seed=3, frames=16, size=(64, 64))
    common = ["build", "--input", str(proc), "--out", str(tmp_path / "out"), "--clip-frames", "8", "--no-progress"]
    assert main([*common, "--short-side", "64"]) == 0
    assert "2 clips" in capsys.readouterr().out
    assert main([*common, "--short-side", "32"]) == 2
    assert "short_side 64 -> 32" in capsys.readouterr().err
    assert main([*common, "--short-side", "33"]) == 2
