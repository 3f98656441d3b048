"""The long tail of bad input: what the builder keeps (and counts), what it skips and why, and what it costs.

Shape legend: T frames, H height, W width, C = 3 colour channels (RGB).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import signal
import struct
import subprocess
import sys
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import webdataset as wds

from data_shards import BuildArgs, VideoDecodeError, build_shards, decode_video, generate_video, probe_video
from data_shards.build import expand_inputs

REPO_ROOT = Path(__file__).resolve().parents[2]
ARGS = BuildArgs(clip_frames=8, fps=8, short_side=64)
# Peak RSS growth (MiB) of building one 1 s 3840x2160 clip in a fresh process, over the imports alone.
# Measured here: 44 MiB (the decoder's own buffers and the frame held between ticks; frames are resized
# in swscale before they are kept). Holding every decoded 4K frame, or full-size RGB ones, goes past 100.
MAX_4K_BUILD_GROWTH_MIB = 100


def _write_h264(path: Path, frames_THWC: np.ndarray, rate: int = 8) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = frames_THWC.shape[2], frames_THWC.shape[1], "yuv420p"
        for index, frame_HWC in enumerate(frames_THWC):
            frame = av.VideoFrame.from_ndarray(frame_HWC, format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def _moving_frames(count: int, size: tuple[int, int] = (32, 48)) -> np.ndarray:
    """frames_THWC: a bright square moving over a dark background."""
    frames_THWC = np.full((count, *size, 3), 30, np.uint8)
    for t in range(count):
        left = (2 * t) % (size[1] - 12)
        frames_THWC[t, 8:20, left : left + 12] = 220
    return frames_THWC


def _decode_mp4(data: bytes) -> np.ndarray:
    with av.open(io.BytesIO(data)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def _samples(out: Path) -> list[dict]:
    urls = [str(p) for p in sorted(out.glob("clips-*.tar"))]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


@contextlib.contextmanager
def _deadline(seconds: int) -> Iterator[None]:
    """Fail instead of hanging: SIGALRM interrupts a Python loop that runs past ``seconds``."""

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# -- A header that states the wrong duration ----------------------------------------------------------------


def _boxes(data: bytes, box_type: bytes) -> Iterator[int]:
    """Offsets of the payload (after size and type) of every box of this type."""
    at = 0
    while (at := data.find(box_type, at)) >= 0:
        yield at + 4
        at += 4


def _mp4_short_header(src: Path, dst: Path) -> None:
    """Divide the media header's (mdhd) duration by 3; FFmpeg reports it as the stream's duration."""
    data = bytearray(src.read_bytes())
    for at in _boxes(data, b"mdhd"):
        assert data[at] == 0, "version 0 mdhd expected"
        (duration,) = struct.unpack(">I", data[at + 16 : at + 20])
        data[at + 16 : at + 20] = struct.pack(">I", duration // 3)
    dst.write_bytes(data)


def _avi_long_header(src: Path, dst: Path) -> None:
    """Triple the video stream header's (strh) length in frames."""
    data = bytearray(src.read_bytes())
    at = data.index(b"strh") + 8
    assert data[at : at + 4] == b"vids"
    (length,) = struct.unpack("<I", data[at + 32 : at + 36])
    data[at + 32 : at + 36] = struct.pack("<I", 3 * length)
    dst.write_bytes(data)


def _mkv_scaled_header(src: Path, dst: Path, factor: float) -> None:
    """Scale the segment info's Duration element (ID 0x4489, an 8-byte float)."""
    data = bytearray(src.read_bytes())
    at = data.index(b"\x44\x89")
    assert data[at + 2] == 0x88, "8-byte Duration expected"
    (duration,) = struct.unpack(">d", data[at + 3 : at + 11])
    data[at + 3 : at + 11] = struct.pack(">d", duration * factor)
    dst.write_bytes(data)


def _write_mpeg4_avi(path: Path, frames_THWC: np.ndarray) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = frames_THWC.shape[2], frames_THWC.shape[1], "yuv420p"
        for frame_HWC in frames_THWC:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame_HWC, format="rgb24")))
        container.mux(stream.encode(None))


@pytest.fixture(scope="module")
def wrong_durations(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """3 s videos (24 frames at 8 fps) whose headers say 1 s or 9 s, in three containers, and a correct one."""
    folder = tmp_path_factory.mktemp("durations")
    frames_THWC = _moving_frames(24)
    _write_h264(folder / "right.mp4", frames_THWC)
    _write_h264(folder / "ok.mkv", frames_THWC)
    _write_mpeg4_avi(folder / "ok.avi", frames_THWC)
    _mp4_short_header(folder / "right.mp4", folder / "short-header.mp4")
    _avi_long_header(folder / "ok.avi", folder / "long-header.avi")
    _mkv_scaled_header(folder / "ok.mkv", folder / "long-header.mkv", 3.0)
    _mkv_scaled_header(folder / "ok.mkv", folder / "short-header.mkv", 1 / 3)
    (folder / "ok.mkv").unlink()
    (folder / "ok.avi").unlink()
    return {p.name: p for p in folder.iterdir()}


@pytest.mark.parametrize("name", ["short-header.mp4", "long-header.avi", "long-header.mkv", "short-header.mkv"])
def test_wrong_header_duration_keeps_every_frame(wrong_durations: dict[str, Path], name: str) -> None:
    """The file's layout is complete (every declared size fits), so the header is wrong, not the file cut."""
    path = wrong_durations[name]
    header_s = probe_video(path).duration_s
    assert header_s == pytest.approx(1.0 if "short" in name else 9.0, abs=0.05)
    frames_THWC, info = decode_video(path, fps=8.0)
    assert frames_THWC.shape == (24, 32, 48, 3)
    assert info.frame_times_s == pytest.approx([k / 8 for k in range(24)])
    assert info.wrong_duration is True
    assert info.decoded_duration_s == pytest.approx(3.0)
    assert decode_video(wrong_durations["right.mp4"])[1].wrong_duration is False


def test_build_keeps_wrong_duration_inputs_and_counts_them(wrong_durations: dict[str, Path], tmp_path: Path) -> None:
    result = build_shards(sorted(wrong_durations.values()), tmp_path, ARGS, workers=0, progress=False)
    manifest = result.manifest
    assert manifest["skipped"] == {} and manifest["ok_inputs"] == 5
    assert manifest["clips"] == 5 * 3
    assert manifest["stats"]["wrong_duration_inputs"] == 4
    # Input seconds come from the frames, not from the headers (1 s or 9 s).
    assert result.stats["input_duration_s"] == pytest.approx(5 * 3.0)


# -- Legal but useless, and not a video at all ---------------------------------------------------------------


def test_all_one_colour_video_is_kept_and_counted(tmp_path: Path) -> None:
    flat = tmp_path / "grey.mp4"
    _write_h264(flat, np.full((24, 32, 48, 3), 97, np.uint8))
    moving = tmp_path / "moving.mp4"
    _write_h264(moving, _moving_frames(24))
    manifest = build_shards([flat, moving], tmp_path / "out", ARGS, workers=0, progress=False).manifest
    assert manifest["skipped"] == {} and manifest["clips"] == 6
    assert manifest["stats"]["uniform_colour_inputs"] == 1
    grey = [s for s in _samples(tmp_path / "out") if json.loads(s["json"])["source"].endswith("grey.mp4")]
    frames_THWC = np.concatenate([_decode_mp4(s["mp4"]) for s in grey])
    assert frames_THWC.shape[0] == 24 and np.abs(frames_THWC.astype(int) - 97).max() <= 2


def _png(size: int = 64) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="image2pipe") as container:
        stream = container.add_stream("png", rate=1)
        stream.width, stream.height, stream.pix_fmt = size, size, "rgb24"
        image_HWC = np.full((size, size, 3), 200, np.uint8)
        container.mux(stream.encode(av.VideoFrame.from_ndarray(image_HWC, format="rgb24")))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def _write_with_cover(path: Path, *, with_video: bool) -> None:
    """An MP4 with a 1 s AAC track and a PNG cover (an attached picture), and with a 12-frame video if asked."""
    rate = 16000
    with av.open(str(path), "w", format="mp4") as container:
        audio = container.add_stream("aac", rate=rate)
        audio.layout = "mono"
        cover = container.add_stream("png", rate=1)
        cover.width, cover.height, cover.pix_fmt = 64, 64, "rgb24"
        cover.disposition = av.stream.Disposition.attached_pic
        if with_video:
            video = container.add_stream("libx264", rate=8)
            video.width, video.height, video.pix_fmt = 48, 32, "yuv420p"
        # Every stream is added before the first packet: muxing writes the header.
        packet = av.Packet(_png())
        packet.stream, packet.pts, packet.dts, packet.time_base = cover, 0, 0, Fraction(1, 1)
        container.mux(packet)
        if with_video:
            for index, frame_HWC in enumerate(_moving_frames(12)):
                frame = av.VideoFrame.from_ndarray(frame_HWC, format="rgb24")
                frame.pts = index
                container.mux(video.encode(frame))
            container.mux(video.encode(None))
        for pts in range(0, rate - 1024, 1024):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = rate, pts, Fraction(1, rate)
            container.mux(audio.encode(frame))
        container.mux(audio.encode(None))


def test_audio_with_cover_art_is_not_a_one_frame_video(tmp_path: Path) -> None:
    song = tmp_path / "song.mp4"
    _write_with_cover(song, with_video=False)
    with av.open(str(song)) as container:
        assert [s.type for s in container.streams] == ["audio", "video"]
    for read in (probe_video, decode_video):
        with pytest.raises(VideoDecodeError) as error:
            read(song)
        assert error.value.reason == "no_video_stream"
        assert "attached picture" in error.value.detail and "audio" in error.value.detail
    manifest = build_shards([song], tmp_path / "out", ARGS, workers=0, progress=False).manifest
    assert manifest["skipped"] == {"no_video_stream": 1}
    assert "cover art" in manifest["skipped_files"][0]["detail"]


def test_video_with_cover_art_decodes_the_video(tmp_path: Path) -> None:
    clip = tmp_path / "music-video.mp4"
    _write_with_cover(clip, with_video=True)
    frames_THWC, info = decode_video(clip)
    assert frames_THWC.shape == (12, 32, 48, 3) and info.codec == "h264"


# -- Size and the file system ----------------------------------------------------------------------------------

_RSS_SCRIPT = """
import json, resource, sys
from data_shards.build import BuildArgs, build_shards
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
args = BuildArgs(clip_frames=8, fps=8, short_side=64)
manifest = build_shards([sys.argv[1]], sys.argv[2], args, workers=0, progress=False).manifest
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"before_kib": before, "after_kib": after, "manifest": manifest}))
"""


def test_4k_input_is_resized_with_bounded_memory(tmp_path: Path) -> None:
    """One second of 3840x2160 H.264 at 8 fps: one 64-pixel clip, built in a fresh process whose peak RSS is read."""
    path = tmp_path / "uhd.mp4"
    height, width = 2160, 3840
    y_H1, x_1W = np.arange(height)[:, None], np.arange(width)[None, :]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8, options={"preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index in range(8):
            image_HWC = np.empty((height, width, 3), np.uint8)
            image_HWC[..., 0] = (x_1W // 16 + 4 * index) % 256
            image_HWC[..., 1] = (y_H1 // 16) % 256
            image_HWC[..., 2] = 128
            frame = av.VideoFrame.from_ndarray(image_HWC, format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(path), str(tmp_path / "out")],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    manifest = report["manifest"]
    assert manifest["skipped"] == {} and manifest["clips"] == 1
    (sample,) = _samples(tmp_path / "out")
    meta = json.loads(sample["json"])
    assert (meta["width"], meta["height"]) == (114, 64)
    growth_mib = (report["after_kib"] - report["before_kib"]) / 1024
    assert growth_mib < MAX_4K_BUILD_GROWTH_MIB, f"building one 4K clip grew peak RSS by {growth_mib:.0f} MiB"


def test_directory_link_loops_are_searched_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Links back up the tree, to itself, a second link to a directory, and a link to itself named like a video."""
    videos = tmp_path / "videos"
    (videos / "sub").mkdir(parents=True)
    generate_video(videos / "a.mp4", seed=0, frames=16, size=(64, 64))
    generate_video(videos / "sub" / "b.mp4", seed=1, frames=16, size=(64, 64))
    (videos / "sub" / "up").symlink_to("..", target_is_directory=True)
    (videos / "sub" / "here").symlink_to(".", target_is_directory=True)
    (videos / "alias").symlink_to("sub", target_is_directory=True)
    (videos / "knot.mp4").symlink_to("knot.mp4")
    expected = [videos / "a.mp4", videos / "sub" / "b.mp4"]
    with _deadline(30), caplog.at_level(logging.INFO, logger="data_shards.build"):
        found = expand_inputs([videos])
        # The same through a recursive glob, which glob.glob would follow into the loops.
        globbed = expand_inputs([str(videos / "**" / "*.mp4")])
        manifest = build_shards([videos], tmp_path / "out", ARGS, workers=0, progress=False).manifest
    # Each video once, under one of its paths (directories are searched in name order: "alias" before "sub").
    assert sorted(p.name for p in found) == ["a.mp4", "b.mp4"]
    assert [p.resolve() for p in found] == [p.resolve() for p in expected]
    assert "already searched" in caplog.text and "leads nowhere" in caplog.text
    assert manifest["inputs"] == manifest["ok_inputs"] == 2 and manifest["skipped"] == {}
    # A glob names the looping link itself, as glob.glob would; the build counts it as missing.
    assert sorted(p.name for p in globbed) == ["a.mp4", "b.mp4", "knot.mp4"]
    with _deadline(30):
        manifest = build_shards(globbed, tmp_path / "globbed", ARGS, workers=0, progress=False).manifest
    assert manifest["skipped"] == {"missing": 1}
    assert "leads nowhere" in manifest["skipped_files"][0]["detail"]
