"""Video files -> WebDataset shards of short H.264 clips (``python -m data_shards build``).

Shape legend: T frames, H height, W width, C = 3 colour channels (RGB).

Output directory layout (the shard format is a contract with the loader):

- ``clips-000000.tar``, ... : WebDataset shards. A sample is
  ``<source_sha256[:16]>-<clip_index:06d>.json`` (clip metadata) followed by
  ``...mp4`` (the clip as H.264/yuv420p, already resampled and resized; one
  GOP per clip, so every clip decodes on its own).
- ``manifest.json``: arguments, counts, skipped inputs with reasons, and each
  shard's name, size, sample count and SHA-256. Written atomically, last: a
  directory without it holds an unfinished build.
- ``build_stats.json``: wall time and throughput of the last run (kept out of
  the manifest so that the manifest is a pure function of inputs and arguments).
- ``.parts/``: the per-input cache that makes builds resumable (below).
- ``heldout/``: with ``--holdout-fraction F > 0``, a second shard set in the
  same format (``clips-*.tar`` + ``manifest.json``) holding, per input, the
  clips whose frames all lie in the last F of the input's output frames;
  clips entirely before that boundary stay in OUT, clips straddling it are
  dropped ("clips_dropped_at_holdout"). So held-out clips come from later
  footage of the same videos and never overlap a training clip's frames.
  With ``--holdout-videos N|FRACTION`` instead, the held-out set holds every
  clip of whole videos (``_choose_heldout_videos``: the used inputs with the
  lowest content SHA-256, so the choice depends on neither input order nor
  worker count), listed under "heldout_videos" in both manifests: for
  judging generalisation to videos never seen in training. The two splits
  are exclusive (one held-out set means one thing).

Timing. Every input is put on the output grid by presentation timestamp
(``data_shards.video.FrameClock``): output frame k of an input is the source
frame shown at tick k / fps, so variable-frame-rate, dropped-frame and
29.97-vs-30 inputs all give clips on the grid. Each clip's JSON records
``source_times_s`` (the source time of each of its frames) and ``max_gap_s``:
the longest stretch of source time without a new frame that one of its
ticks falls in (``DecodedFrames.until_s``). That is the source's own frame
interval for an ordinary input (0.04 s at 25 fps), longer where the source
drops frames, and the length of the pause for a clip in or next to one.
A clip whose max_gap_s exceeds MAX_FRAME_GAP_S touches a pause in the
source (a recording gap, a stalled stream; the frame before it is all a
player would show) and is dropped like a clip across a scene cut
("clips_dropped_at_gaps"; it is never encoded).

With ``--skip-scene-cuts``, clips that cross a hard scene cut
(``data_shards.scenes.detect_scene_cuts`` on the resampled, resized frames)
are dropped ("clips_dropped_at_cuts"). All three drop counts are in both
manifests; a clip is counted under the first that applies of gap, cut,
holdout boundary.

The manifest's ``stats`` count used inputs with a property worth knowing
but no reason to skip them: ``uniform_colour_inputs`` (every frame of every
clip is one flat colour: a legal video, likely useless), ``wrong_duration_inputs``
(the header duration disagrees with the frames, which are used),
``variable_frame_rate_inputs`` (intervals between source frames vary by more
than VFR_INTERVAL_RATIO; resampled onto the grid); and ``max_clip_gap_s``,
the largest max_gap_s of a clip in the set.

Resumability and determinism. Each input is turned, in a worker process, into
one "part": ``.parts/<source_sha256>-<args key>.tar`` holding the clip mp4s
and a ``result.json`` (clip metadata, or why the input was skipped). A part is
written under a temporary name and renamed when complete, so its final name
means "done". The args key hashes everything that shapes the clip bytes (clip
arguments, encoder, PyAV/FFmpeg versions); shard caps do not enter it. Shards
are then assembled from the parts in a fixed order (inputs sorted by path,
clips in time order) with fixed tar metadata (mtime 0, uid/gid 0, one
user/group name), and x264 runs single-threaded, whose output depends only on
its input frames. So a re-run with the same arguments re-encodes nothing,
and a run killed at any point and started again ends with the same bytes as
an uninterrupted one. Shards, too, are written under a dot-prefixed temporary
name and renamed when complete; an unchanged shard (same planned content, same
SHA-256 on disk) is kept as it is. Running two builds into one directory at the
same time is not supported.

Because a build writes into OUT in place (that is what makes it resumable),
OUT is checked before anything is written (``data_shards.io.check_output_dir``):
it must be new, empty, or an earlier or unfinished build (``is_build_dir``: its
``manifest.json`` or its ``.parts/`` cache); ``.``, the home directory and the
like are refused whatever they hold. A build with nothing to build (no input
path exists, or the inputs name no video file) raises NoInputsError and writes
nothing. Directories are searched following links, each directory once: a link
loop (or a second link to a directory already searched) is skipped with a log line.

Skipped inputs never stop a build; each is counted under one reason:
DECODE_ERROR_REASONS from data_shards.video, plus

- ``odd_dimensions``: an odd stored width or height when no resize is asked
  for (short_side 0); with a resize the output is even anyway and the input is used;
- ``rotated``: a display rotation that is not a multiple of 90 degrees.
  Multiples of 90 are applied (frames rotated as a player would show them),
  so phone videos are kept; a mirrored display matrix is not detected;
- ``duplicate``: same bytes as an input earlier in the order (its clips would
  repeat that input's sample keys).

Any other exception from a worker (or a worker process dying) is counted as
``decode_error`` with the exception as the detail, and is not cached, so a
re-run tries that input again.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import fnmatch
import glob
import hashlib
import io
import itertools
import json
import logging
import math
import multiprocessing
import os
import tarfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures.process import BrokenProcessPool
from fractions import Fraction
from functools import cache
from pathlib import Path
from typing import Any

import av
import numpy as np
from tqdm import tqdm

from data_shards.io import atomic_path, check_output_dir, write_text_atomic
from data_shards.scenes import detect_scene_cuts
from data_shards.video import (
    DECODE_ERROR_REASONS,
    DecodedFrames,
    VideoDecodeError,
    VideoInfo,
    VideoReader,
    file_sha256,
    probe_video,
)

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"
STATS_NAME = "build_stats.json"
PARTS_DIR = ".parts"
SHARD_PATTERN = "clips-{index:06d}.tar"
HELDOUT_DIR = "heldout"

BUILD_SKIP_REASONS: frozenset[str] = DECODE_ERROR_REASONS | {
    "odd_dimensions",
    "rotated",
    "duplicate",
}
"""Every reason an input can be skipped for, as counted in the manifest."""

VIDEO_EXTENSIONS: frozenset[str] = frozenset(
    {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".3gp", ".flv", ".wmv", ".ogv"}
)
"""Suffixes picked up when a directory is given as input (explicitly named files are always taken)."""

VFR_INTERVAL_RATIO = 1.5
"""An input counts as variable-frame-rate (in the manifest's stats) when max / min frame interval exceeds this."""

MAX_FRAME_GAP_S = 2.0
"""A clip with a tick in a stretch of more than this many seconds without a new source frame is dropped."""

INPUT_NOTES = ("uniform_colour", "wrong_duration", "variable_frame_rate")
"""Properties of used inputs counted in the manifest's stats as "<note>_inputs" (see the module docstring)."""

# Bump when the part layout or the clip bytes change for the same arguments.
# 2: result.json records "output_frames" and "cuts".
# 3: frames chosen by timestamp on the grid; clips record source times and gaps; input notes.
_PART_FORMAT = 3
# A frame is one flat colour when no channel varies by more than this many
# levels (codec noise on a flat frame stays below it).
_UNIFORM_SPREAD = 6
# Cut detection runs per decoded chunk; the scene detector's spike test compares
# a frame pair with 2 pairs on each side, so a chunk only decides cuts at least
# this far from its end (the rest are decided with the next chunk)...
_CUT_CONTEXT_RADIUS = 3
# ...and is joined to this many last frames of the previous one: enough for the
# neighbours (>= 2 * radius + 1) and to keep the adaptive threshold's median
# and MAD from resting on a short chunk alone.
_CUT_CONTEXT_FRAMES = 48
# Output frames decoded per VideoReader.read: bounds a worker's memory for
# long inputs (256 frames at 256x455 RGB is ~90 MB).
_DECODE_CHUNK_FRAMES = 256
# H.264 encoders to try, best first. Only libx264 is known to be deterministic here.
_H264_ENCODERS = ("libx264", "libopenh264", "h264_videotoolbox", "h264_nvenc", "h264_qsv", "h264_amf")
# Measured here (x264 in PyAV 18's FFmpeg 8.1): with macroblock-tree rate control
# on, the same frames encode to different bytes from run to run, even on one
# thread, whenever a width is not a multiple of 32 (it reads memory it did not
# write; 7 of 19 clips varied under heap churn, 0 of 19 with it off). Turning
# it off costs about 8% in size at the same CRF and makes the output a function
# of the frames alone. A single thread keeps slice/frame threading out of it too.
_X264_OPTIONS = {"x264-params": "no-mbtree=1"}
# Tar layout used to predict shard sizes: 512-byte headers and blocks, two
# zero blocks at the end, the whole padded to tarfile's 20-block record.
_TAR_BLOCK = 512
_TAR_RECORD = 20 * _TAR_BLOCK
# Fixed tar member metadata, so shards are byte-identical across runs and machines.
_TAR_USER = "data_shards"
_TAR_MTIME = 0


class BuildArgsError(ValueError):
    """Build arguments that cannot be carried out: the output directory already holds a build made with
    different arguments, two options conflict, or the arguments do not fit the inputs."""


class NoInputsError(ValueError):
    """The inputs of a build name no file that exists: there is nothing to build."""


class InputRejectedError(Exception):
    """An input is rejected for a build-specific reason (see BUILD_SKIP_REASONS)."""

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in BUILD_SKIP_REASONS:
            raise ValueError(f"reason must be one of {sorted(BUILD_SKIP_REASONS)}, got {reason!r}")
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class BuildArgs:
    """What a build makes: clip sampling, encoding and shard caps."""

    clip_frames: int = 16
    """Frames per clip (at the output rate)."""
    fps: float = 8.0
    """Output frame rate: every clip is on this grid, whatever its input's rate (a source frame is repeated
    where the input is sparser, dropped where denser). 0 keeps each input's nominal rate."""
    short_side: int = 256
    """Resize so the shorter side has this many pixels (even), aspect kept; 0 keeps the stored size."""
    stride: int | None = None
    """Output frames between clip starts; None = clip_frames (non-overlapping clips)."""
    crf: int = 23
    """x264 constant rate factor (0-51, lower = higher quality and larger files)."""
    max_samples_per_shard: int = 256
    """At most this many clips per shard."""
    max_shard_bytes: int = 1_000_000_000
    """At most this many bytes per shard file (a single larger clip still gets a shard of its own)."""
    holdout_fraction: float = 0.0
    """Per input, clips in the last this fraction of its output frames go to OUT/heldout/; 0 = no split."""
    holdout_videos: int | float | None = None
    """Every clip of whole videos goes to OUT/heldout/, to measure generalisation to unseen videos rather than
    to later footage of seen ones: an int >= 1 is that many of the inputs that give clips, a float in (0, 1)
    that fraction of them (at least 1); None = no split. At least one video must stay for training. Chosen by
    content hash (_choose_heldout_videos). Not combined with holdout_fraction: a held-out set then means one thing."""
    skip_scene_cuts: bool = False
    """Drop clips that cross a hard scene cut (detected on the resampled, resized frames)."""

    def __post_init__(self) -> None:
        if self.clip_frames < 1:
            raise ValueError(f"clip_frames must be >= 1, got {self.clip_frames}")
        if not (math.isfinite(self.fps) and self.fps >= 0):
            raise ValueError(f"fps must be >= 0 (0 = native), got {self.fps}")
        if self.short_side < 0 or self.short_side % 2:
            raise ValueError(f"short_side must be 0 or a positive even number, got {self.short_side}")
        if self.stride is not None and self.stride < 1:
            raise ValueError(f"stride must be >= 1, got {self.stride}")
        if not 0 <= self.crf <= 51:
            raise ValueError(f"crf must be in [0, 51], got {self.crf}")
        if self.max_samples_per_shard < 1:
            raise ValueError(f"max_samples_per_shard must be >= 1, got {self.max_samples_per_shard}")
        if self.max_shard_bytes < _TAR_RECORD:
            raise ValueError(f"max_shard_bytes must be >= {_TAR_RECORD}, got {self.max_shard_bytes}")
        if not (math.isfinite(self.holdout_fraction) and 0.0 <= self.holdout_fraction < 1.0):
            raise ValueError(f"holdout_fraction must be in [0, 1), got {self.holdout_fraction}")
        _check_holdout_videos(self.holdout_videos)
        if self.holdout_videos is not None and self.holdout_fraction > 0:
            raise BuildArgsError(
                f"holdout_videos {self.holdout_videos} and holdout_fraction {self.holdout_fraction} cannot be "
                "combined (--holdout-videos, --holdout-fraction): the held-out set is either whole videos or the "
                "tail of every video; give one of them"
            )

    @property
    def clip_stride(self) -> int:
        return self.clip_frames if self.stride is None else self.stride

    @property
    def holds_out(self) -> bool:
        """Whether the build writes a held-out set to OUT/heldout/."""
        return self.holdout_fraction > 0 or self.holdout_videos is not None

    def manifest_args(self) -> dict[str, Any]:
        """The ``args`` record of manifest.json."""
        return {
            "clip_frames": self.clip_frames,
            "fps": float(self.fps),
            "short_side": self.short_side,
            "stride": self.clip_stride,
            "crf": self.crf,
            "max_samples_per_shard": self.max_samples_per_shard,
            "max_shard_bytes": self.max_shard_bytes,
            "holdout_fraction": float(self.holdout_fraction),
            "skip_scene_cuts": self.skip_scene_cuts,
            # Recorded only when set, so that builds (and caches keyed by these args) made before the
            # option existed still match their arguments.
            **({"holdout_videos": self.holdout_videos} if self.holdout_videos is not None else {}),
        }

    def part_key(self, encoder: str) -> str:
        """12 hex digits naming everything that shapes the clip bytes of a part."""
        shaping = {
            "format": _PART_FORMAT,
            "clip_frames": self.clip_frames,
            "fps": float(self.fps),
            "short_side": self.short_side,
            "stride": self.clip_stride,
            "crf": self.crf,
            "encoder": encoder,
            # Parts record cuts only when asked (detection costs a pass over every frame).
            "scene_cuts": self.skip_scene_cuts,
            "av": av.__version__,
            "ffmpeg": av.ffmpeg_version_info,
        }
        return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:12]


def _check_holdout_videos(value: int | float | None) -> None:
    """Raise ValueError unless ``value`` is None, an int >= 1 (a count) or a float in (0, 1) (a fraction)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"holdout_videos must be a whole number >= 1 or a fraction in (0, 1), got {value!r}")
    if isinstance(value, int) and value < 1:
        raise ValueError(f"holdout_videos must be >= 1 videos (or a fraction in (0, 1)), got {value}")
    if isinstance(value, float) and not (math.isfinite(value) and 0.0 < value < 1.0):
        raise ValueError(f"holdout_videos as a fraction must be in (0, 1) (or a whole number of videos), got {value}")


def heldout_video_count(holdout_videos: int | float, videos: int) -> int:
    """How many of ``videos`` inputs ``holdout_videos`` holds out: the count itself, or the fraction rounded
    (at least 1, so that a small corpus still gets a held-out set)."""
    if isinstance(holdout_videos, int):
        return holdout_videos
    return max(1, round(holdout_videos * videos))


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class BuildResult:
    """What build_shards made: the manifest as written, and run statistics (not in the manifest)."""

    manifest: dict[str, Any]
    """The content of manifest.json."""
    stats: dict[str, Any]
    """The content of build_stats.json: wall_s, input_duration_s, throughput, parts reused/made, encoder."""
    heldout: dict[str, Any] | None = None
    """The content of heldout/manifest.json, or None without a held-out split (BuildArgs.holds_out)."""


@cache
def h264_encoder() -> str:
    """Name of the H.264 encoder used for clips: libx264 when PyAV's FFmpeg has it."""
    for name in _H264_ENCODERS:
        if name not in av.codecs_available:
            continue
        try:
            av.codec.Codec(name, "w")
        except (av.FFmpegError, ValueError):
            continue
        if name != "libx264":
            logger.warning("libx264 is not in PyAV's FFmpeg; encoding clips with %s (output may vary run to run)", name)
        return name
    raise RuntimeError(f"PyAV's FFmpeg has no H.264 encoder (tried {', '.join(_H264_ENCODERS)})")


def encode_clip_mp4(frames_THWC: np.ndarray, *, fps: Fraction, crf: int = 23, encoder: str | None = None) -> bytes:
    """Encode frames_THWC (uint8 RGB, even H and W) as an H.264 yuv420p mp4, returned as bytes.

    One GOP covers the clip (it starts with a keyframe and needs nothing
    else). libx264 runs on one thread without macroblock-tree rate control,
    so that the bytes are a function of the frames, fps and crf (see _X264_OPTIONS).
    """
    if frames_THWC.dtype != np.uint8 or frames_THWC.ndim != 4 or frames_THWC.shape[-1] != 3:
        raise ValueError(f"frames_THWC must be uint8 (T, H, W, 3), got {frames_THWC.dtype} {frames_THWC.shape}")
    num_frames, height, width, _ = frames_THWC.shape
    if height % 2 or width % 2:
        raise ValueError(f"H.264 in yuv420p needs even sizes, got {height}x{width}")
    encoder = encoder or h264_encoder()
    buffer = io.BytesIO()
    options = _X264_OPTIONS | {"crf": str(crf)} if encoder == "libx264" else {}
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream(encoder, rate=fps, options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = num_frames
        stream.codec_context.thread_count = 1
        for index, frame_HWC in enumerate(frames_THWC):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame_HWC), format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def expand_inputs(specs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Turn --input arguments into a sorted, de-duplicated list of absolute file paths.

    A spec is a file (taken whatever its suffix; a path that does not exist
    is kept, and reported as "missing"), a directory (searched recursively
    for VIDEO_EXTENSIONS, following links, each directory once), a glob
    (``**`` allowed, searched the same way), or a list file:
    ``@list.txt`` or any existing ``.txt`` file, one spec per line (blank
    lines and ``#`` comments ignored; relative lines are relative to the
    list file's directory; lists do not nest).
    """
    found: set[Path] = set()
    for spec in specs:
        spec = os.fspath(spec)
        if spec.startswith("@"):
            found.update(_expand_list_file(Path(spec[1:])))
        elif spec.endswith(".txt") and Path(spec).is_file():
            found.update(_expand_list_file(Path(spec)))
        else:
            found.update(_expand_spec(spec))
    return sorted(found, key=str)


def _expand_list_file(list_path: Path) -> list[Path]:
    paths: list[Path] = []
    for line in list_path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        spec = line if os.path.isabs(line) else str(list_path.parent / line)
        paths.extend(_expand_spec(spec))
    return paths


def _expand_spec(spec: str) -> list[Path]:
    if "**" in Path(spec).parts:
        matches = _recursive_glob(spec)
    elif glob.has_magic(spec):
        matches = [Path(m) for m in glob.glob(spec)]
    else:
        matches = [Path(spec)]
    paths: list[Path] = []
    for match in matches:
        if not match.is_dir():
            paths.append(match)
            continue
        for path in _walk(match):
            if path.suffix.lower() not in VIDEO_EXTENSIONS:
                continue
            if path.is_file():
                paths.append(path)
            elif path.is_symlink() and not path.exists():
                logger.info("%s is a link that leads nowhere (broken, or a loop); skipped", path)
    return [Path(os.path.abspath(p)) for p in paths]


def _walk(root: Path) -> Iterator[Path]:
    """Every file and directory below root, following links; a directory reached twice is searched once.

    A second arrival (a link loop, or two links to one directory) is skipped
    with a log line: glob's ``**`` and os.walk(followlinks=True) would follow a
    loop until the path is too long, and two loops make that exponential.
    """
    seen: set[tuple[int, int]] = set()
    stack = [root]
    while stack:
        directory = stack.pop()
        try:
            status = directory.stat()
            entries = sorted(os.scandir(directory), key=lambda entry: entry.name, reverse=True)
        except OSError as e:
            logger.warning("cannot search %s (%s); skipped", directory, e)
            continue
        if (status.st_dev, status.st_ino) in seen:
            logger.info("%s is a directory already searched (a link loop or a second link to it); skipped", directory)
            continue
        seen.add((status.st_dev, status.st_ino))
        for entry in entries:
            path = Path(entry.path)
            if _is_dir(entry):
                stack.append(path)
            yield path


def _is_dir(entry: os.DirEntry[str]) -> bool:
    """entry.is_dir() following links, False for a link that leads nowhere (broken: False already; a loop: raises)."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def _recursive_glob(spec: str) -> list[Path]:
    """Like glob.glob(spec, recursive=True), but searching with _walk (safe on link loops).

    As in glob, a name starting with "." is matched only by a pattern part starting with ".".
    """
    parts = Path(spec).parts
    first_magic = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    root = Path(*parts[:first_magic]) if first_magic else Path(".")
    pattern = parts[first_magic:]
    return [path for path in _walk(root) if _glob_match(pattern, path.relative_to(root).parts)]


def _glob_match(pattern: tuple[str, ...], parts: tuple[str, ...]) -> bool:
    """Whether path parts match glob pattern parts, where "**" stands for any number of directories."""
    if not pattern:
        return not parts
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        for skip in range(len(parts) + 1):
            if _glob_match(rest, parts[skip:]):
                return True
            if skip < len(parts) and parts[skip].startswith("."):
                return False
        return False
    if not parts or (parts[0].startswith(".") and not head.startswith(".")):
        return False
    return fnmatch.fnmatchcase(parts[0], head) and _glob_match(rest, parts[1:])


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class _Job:
    path: str
    args: BuildArgs
    encoder: str
    parts_dir: str


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class _InputResult:
    path: str
    sha256: str | None
    reason: str | None
    """None when the input gave clips."""
    detail: str
    part_name: str | None
    clips: tuple[dict[str, Any], ...]
    source_duration_s: float
    reused: bool
    output_frames: int = 0
    """Frames of the input at the output rate (the holdout boundary is a fraction of them)."""
    cuts: tuple[int, ...] = ()
    """Output-frame indices t with a scene cut between t-1 and t (only detected with skip_scene_cuts)."""
    notes: tuple[str, ...] = ()
    """Properties of a used input counted in the manifest's stats: INPUT_NOTES."""


def _process_input(job: _Job) -> _InputResult:
    """Worker entry point: the cached part of one input, made if needed. Never raises."""
    path = Path(job.path)
    if not path.is_file():
        if path.exists():
            detail = "not a regular file"
        elif path.is_symlink():
            detail = "a link that leads nowhere (broken, or a loop)"
        else:
            detail = "no such file"
        return _uncached_result(job.path, None, "missing", detail)
    sha256: str | None = None
    try:
        sha256 = file_sha256(path)
        part_path = Path(job.parts_dir) / f"{sha256}-{job.args.part_key(job.encoder)}.tar"
        if part_path.exists():
            return _result_from_part(job.path, part_path, reused=True)
        _make_part(path, sha256, job.args, job.encoder, part_path)
        return _result_from_part(job.path, part_path, reused=False)
    except Exception as e:
        # A failure that is not a verdict on the file (a bug, memory, I/O): report it, cache nothing.
        logger.warning("unexpected error on %s", path, exc_info=True)
        return _uncached_result(job.path, sha256, "decode_error", f"{type(e).__name__}: {e}")


def _uncached_result(path: str, sha256: str | None, reason: str, detail: str) -> _InputResult:
    return _InputResult(
        path=path,
        sha256=sha256,
        reason=reason,
        detail=detail,
        part_name=None,
        clips=(),
        source_duration_s=0.0,
        reused=False,
    )


def _result_from_part(path: str, part_path: Path, *, reused: bool) -> _InputResult:
    with tarfile.open(part_path) as part:
        record = json.loads(_read_member(part, "result.json"))
    return _InputResult(
        path=path,
        sha256=record["source_sha256"],
        reason=record["reason"],
        detail=record["detail"],
        part_name=part_path.name,
        clips=tuple(record["clips"]),
        source_duration_s=record["source_duration_s"],
        reused=reused,
        output_frames=record.get("output_frames", 0),
        cuts=tuple(record.get("cuts", ())),
        notes=tuple(record.get("notes", ())),
    )


def _read_member(archive: tarfile.TarFile, name: str) -> bytes:
    member = archive.extractfile(name)
    if member is None:
        raise KeyError(f"{archive.name}: {name} is not a regular member")
    return member.read()


def _make_part(path: Path, sha256: str, args: BuildArgs, encoder: str, part_path: Path) -> None:
    """Encode every clip of ``path`` into a part, or record why it is skipped; atomic rename at the end."""
    record: dict[str, Any] = {"format": _PART_FORMAT, "source_sha256": sha256, "clips": [], "source_duration_s": 0.0}
    # A temporary sibling unique to this process (workers share .parts/); removed if anything below raises.
    with atomic_path(part_path) as tmp_path:
        try:
            with tarfile.open(tmp_path, "w", format=tarfile.USTAR_FORMAT) as part:
                frame_log = _FrameLog(detect_cuts=args.skip_scene_cuts)
                info = _encode_clips_into(path, args, encoder, part, record["clips"], frame_log)
                record.update(
                    reason=None,
                    detail="",
                    output_frames=frame_log.frames,
                    cuts=frame_log.finish(),
                    source_duration_s=info.decoded_duration_s or info.duration_s,
                    notes=_input_notes(info, record["clips"]),
                )
                _add_member(part, "result.json", json.dumps(record, sort_keys=True).encode())
        except (VideoDecodeError, InputRejectedError) as e:
            logger.info("skipping %s: %s: %s", path, e.reason, e.detail)
            # Rewrite the part with the verdict alone: clips made before the problem showed are dropped.
            record.update(reason=e.reason, detail=e.detail, clips=[], source_duration_s=0.0)
            with tarfile.open(tmp_path, "w", format=tarfile.USTAR_FORMAT) as part:
                _add_member(part, "result.json", json.dumps(record, sort_keys=True).encode())


def _add_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = _TAR_MTIME
    archive.addfile(info, io.BytesIO(data))


def _encode_clips_into(
    path: Path,
    args: BuildArgs,
    encoder: str,
    part: tarfile.TarFile,
    clips: list[dict[str, Any]],
    frame_log: _FrameLog,
) -> VideoInfo:
    """Decode, cut and encode the clips of ``path`` into ``part``; returns VideoReader.video_info at the end."""
    info = probe_video(path)
    if args.short_side == 0 and (info.width % 2 or info.height % 2):
        raise InputRejectedError("odd_dimensions", f"{info.width}x{info.height} and no resize (short_side 0)")
    rate = _output_rate(path, info, args)
    with VideoReader(path, fps=float(rate), short_side=args.short_side or None, threads=1) as reader:
        for clip_index, clip_THWC, source_times_s, until_s in _iter_clips(reader, args, rate, frame_log):
            start = clip_index * args.clip_stride
            ticks_s = [float(Fraction(start + i) / rate) for i in range(len(source_times_s))]
            # The stretch of source time without a new frame that each tick falls in (see DecodedFrames).
            max_gap_s = max(
                until - min(t, tick) for tick, t, until in zip(ticks_s, source_times_s, until_s, strict=True)
            )
            record = {
                "clip_index": clip_index,
                "start_s": round(ticks_s[0], 6),
                "fps": float(rate),
                "frames": int(clip_THWC.shape[0]),
                "width": int(clip_THWC.shape[2]),
                "height": int(clip_THWC.shape[1]),
                "source_times_s": [round(t, 6) for t in source_times_s],
                "max_gap_s": round(max_gap_s, 6),
                "uniform_colour": _is_uniform_colour(clip_THWC),
                "bytes": 0,
            }
            # A clip across a gap is dropped at the split whatever else holds: never encode it.
            if record["max_gap_s"] <= MAX_FRAME_GAP_S:
                data = encode_clip_mp4(clip_THWC, fps=rate, crf=args.crf, encoder=encoder)
                _add_member(part, f"{clip_index:06d}.mp4", data)
                record["bytes"] = len(data)
            clips.append(record)
        final = reader.video_info()
    if not clips:
        raise AssertionError("_iter_clips yields at least one clip or raises too_short")
    return final


def _output_rate(path: Path, info: VideoInfo, args: BuildArgs) -> Fraction:
    """The clip frame rate for an input with header ``info``: args.fps, or with 0 the input's nominal rate."""
    if args.fps > 0:
        return Fraction(args.fps).limit_denominator(100_000)
    if info.fps <= 0:
        raise VideoDecodeError(path, "bad_timestamps", "the stream declares no frame rate and fps 0 asks for it")
    return Fraction(info.fps).limit_denominator(100_000)


def _is_uniform_colour(frames_THWC: np.ndarray) -> bool:
    """Whether every frame is one flat colour (no channel spread above _UNIFORM_SPREAD)."""
    spread_TC = frames_THWC.max(axis=(1, 2)).astype(np.int16) - frames_THWC.min(axis=(1, 2))
    return bool(spread_TC.max() <= _UNIFORM_SPREAD)


def _input_notes(info: VideoInfo, clips: list[dict[str, Any]]) -> list[str]:
    notes = []
    if clips and all(clip["uniform_colour"] for clip in clips):
        notes.append("uniform_colour")
    if info.wrong_duration:
        notes.append("wrong_duration")
    intervals = info.frame_interval_range_s
    if intervals is not None and intervals[1] > VFR_INTERVAL_RATIO * intervals[0]:
        notes.append("variable_frame_rate")
    return notes


class _FrameLog:
    """Counts an input's output frames and, if asked, finds its scene cuts chunk by chunk.

    Each chunk is detected joined to the tail of the previous one (see
    _CUT_CONTEXT_FRAMES), so a cut between two chunks is found, and every
    frame pair is judged with the same neighbours as in one pass. The
    adaptive threshold is that of the joined chunk (a few hundred frames in
    the builder) rather than of the whole video; frames are held one chunk
    and a tail at a time, never the whole video.
    """

    def __init__(self, *, detect_cuts: bool) -> None:
        self.detect_cuts = detect_cuts
        self.frames = 0
        self._cuts: list[int] = []
        self._pending: list[int] = []
        self._decided_until = 0
        self._tail_THWC: np.ndarray | None = None

    def push(self, chunk_THWC: np.ndarray) -> None:
        self.frames += len(chunk_THWC)
        if not self.detect_cuts or len(chunk_THWC) == 0:
            return
        joined_THWC = chunk_THWC if self._tail_THWC is None else np.concatenate([self._tail_THWC, chunk_THWC])
        joined_start = self.frames - len(joined_THWC)
        found = [joined_start + t for t in detect_scene_cuts(joined_THWC)]
        # Cuts this close to the end lack right-hand neighbours: decide them with the next chunk.
        limit = self.frames - _CUT_CONTEXT_RADIUS
        self._cuts.extend(c for c in found if self._decided_until <= c < limit)
        self._pending = [c for c in found if c >= max(limit, self._decided_until)]
        self._decided_until = max(self._decided_until, limit)
        self._tail_THWC = joined_THWC[-_CUT_CONTEXT_FRAMES:].copy()

    def finish(self) -> list[int]:
        """Every cut found (sorted, output-frame indices); [] without detection."""
        return sorted(set(self._cuts + self._pending))


def _iter_clips(
    reader: VideoReader, args: BuildArgs, rate: Fraction, frame_log: _FrameLog | None = None
) -> Iterator[tuple[int, np.ndarray, tuple[float, ...], tuple[float, ...]]]:
    """(clip_index, clip_THWC, source times_s, until_s of its frames) for each full clip, a bounded chunk at a time."""
    frames: list[np.ndarray] = []
    times_s: list[float] = []
    until_s: list[float] = []
    # Output-frame index of frames[0].
    first = 0
    clip_index = 0
    for chunk in _decoded_chunks(reader, args):
        if frame_log is not None:
            frame_log.push(chunk.frames_THWC)
        frames.extend(chunk.frames_THWC)
        times_s.extend(chunk.times_s)
        until_s.extend(chunk.until_s)
        while (start := clip_index * args.clip_stride - first) + args.clip_frames <= len(frames):
            end = start + args.clip_frames
            yield clip_index, np.stack(frames[start:end]), tuple(times_s[start:end]), tuple(until_s[start:end])
            clip_index += 1
            drop = min(clip_index * args.clip_stride - first, len(frames))
            del frames[:drop], times_s[:drop], until_s[:drop]
            first += drop
    if clip_index == 0:
        total = first + len(frames)
        raise VideoDecodeError(
            reader.path, "too_short", f"{total} frames at {float(rate):.3f} fps, one clip needs {args.clip_frames}"
        )


def _decoded_chunks(reader: VideoReader, args: BuildArgs) -> Iterator[DecodedFrames]:
    """Consecutive runs of output frames, rotated for display, until the stream ends."""
    chunk = max(_DECODE_CHUNK_FRAMES, args.clip_frames)
    while not reader.at_end:
        decoded = reader.read(chunk)
        if len(decoded.frames_THWC):
            yield decoded._replace(frames_THWC=_apply_rotation(reader.path, decoded.frames_THWC, reader.rotation or 0))


def _apply_rotation(path: Path, frames_THWC: np.ndarray, rotation: int) -> np.ndarray:
    """Rotate frames as a player would show them: ``rotation`` is counterclockwise (FFmpeg's display matrix)."""
    if rotation % 90:
        raise InputRejectedError("rotated", f"display rotation {rotation} degrees is not a multiple of 90")
    quarter_turns = (rotation // 90) % 4
    if quarter_turns == 0:
        return frames_THWC
    # np.rot90 over (H, W) turns the picture counterclockwise, as the display matrix does.
    return np.ascontiguousarray(np.rot90(frames_THWC, quarter_turns, axes=(1, 2)))


def _run_jobs(jobs: list[_Job], workers: int, progress: bool) -> list[_InputResult]:
    """Process every job (in spawned worker processes unless workers == 0); results in job order."""
    results: dict[str, _InputResult] = {}
    bar = tqdm(total=len(jobs), desc="videos", unit="file", disable=not progress)
    if workers == 0:
        for job in jobs:
            results[job.path] = _process_input(job)
            bar.update()
    else:
        crashed = _run_in_pool(jobs, workers, results, bar)
        # A worker that died takes the pool down with it: retry those inputs one at a time to find the culprit.
        for job in crashed:
            results[job.path] = _run_isolated(job)
            bar.update()
    bar.close()
    return [results[job.path] for job in jobs]


def _run_in_pool(jobs: list[_Job], workers: int, results: dict[str, _InputResult], bar: tqdm) -> list[_Job]:
    context = multiprocessing.get_context("spawn")
    crashed: list[_Job] = []
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {pool.submit(_process_input, job): job for job in jobs}
        for future in concurrent.futures.as_completed(futures):
            try:
                results[futures[future].path] = future.result()
                bar.update()
            except BrokenProcessPool:
                crashed.append(futures[future])
    return sorted(crashed, key=lambda job: job.path)


def _run_isolated(job: _Job) -> _InputResult:
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        try:
            return pool.submit(_process_input, job).result()
        except BrokenProcessPool as e:
            return _uncached_result(job.path, None, "decode_error", f"worker process died ({e})")


@dataclasses.dataclass(frozen=True, slots=True)
class _Sample:
    key: str
    json_bytes: bytes
    part_name: str
    member: str
    mp4_size: int
    duration_s: float
    max_gap_s: float

    @property
    def tar_bytes(self) -> int:
        return 2 * _TAR_BLOCK + _padded(len(self.json_bytes)) + _padded(self.mp4_size)


def _padded(size: int, block: int = _TAR_BLOCK) -> int:
    return -(-size // block) * block


def _shard_file_bytes(member_bytes: int) -> int:
    """Size of a shard whose samples take member_bytes (headers + padded data)."""
    return _padded(member_bytes + 2 * _TAR_BLOCK, _TAR_RECORD)


def _mark_duplicates(results: list[_InputResult]) -> list[_InputResult]:
    """Inputs with the same bytes as an earlier used input are skipped as "duplicate"."""
    first_path: dict[str, str] = {}
    marked: list[_InputResult] = []
    for result in results:
        if result.reason is None and result.sha256 in first_path:
            result = dataclasses.replace(
                result, reason="duplicate", detail=f"same bytes as {first_path[result.sha256]}", clips=()
            )
        elif result.reason is None and result.sha256 is not None:
            first_path[result.sha256] = result.path
        marked.append(result)
    return marked


@dataclasses.dataclass(frozen=True, slots=True)
class _Split:
    """Samples of a build by destination, and the clips left out."""

    train: list[_Sample]
    heldout: list[_Sample]
    dropped_at_holdout: int
    dropped_at_cuts: int
    dropped_at_gaps: int
    heldout_videos: list[dict[str, str | None]] | None = None
    """With holdout_videos: path and source_sha256 of each wholly held-out input; None without."""

    def counts(self) -> dict[str, Any]:
        """The manifest's split record (heldout_videos only where asked for, so other manifests are unchanged)."""
        counts: dict[str, Any] = {
            "clips_dropped_at_holdout": self.dropped_at_holdout,
            "clips_dropped_at_cuts": self.dropped_at_cuts,
            "clips_dropped_at_gaps": self.dropped_at_gaps,
        }
        if self.heldout_videos is not None:
            counts["heldout_videos"] = self.heldout_videos
        return counts


def clip_destination(
    start: int,
    frames: int,
    output_frames: int,
    cuts: Sequence[int],
    args: BuildArgs,
    max_gap_s: float = 0.0,
    *,
    heldout_video: bool = False,
) -> str:
    """Where the clip of output frames [start, start + frames) goes: "train", "heldout", "gap", "cut", "holdout".

    The last three are drops. A clip whose max_gap_s exceeds MAX_FRAME_GAP_S spans a gap in the source.
    A cut c (between frames c-1 and c) breaks the clip when start < c < start + frames.
    Past those two drops, every clip of a held-out video (``heldout_video``, see _choose_heldout_videos)
    is held out.
    The held-out region is the last round(holdout_fraction * output_frames) frames.
    """
    end = start + frames
    if max_gap_s > MAX_FRAME_GAP_S:
        return "gap"
    if any(start < c < end for c in cuts):
        return "cut"
    if heldout_video:
        return "heldout"
    if args.holdout_fraction <= 0:
        return "train"
    boundary = output_frames - round(args.holdout_fraction * output_frames)
    if start >= boundary:
        return "heldout"
    return "train" if end <= boundary else "holdout"


def _choose_heldout_videos(results: Sequence[_InputResult], args: BuildArgs) -> list[_InputResult]:
    """The used inputs whose every clip is held out (args.holdout_videos; [] without it), sorted by path.

    They are the ones with the lowest content SHA-256: a function of the
    videos' bytes alone, so neither the order the inputs were named in, nor
    where they lie, nor the worker count changes the choice. Chosen among
    inputs that gave clips, so a skipped file never takes a held-out place.
    Raises BuildArgsError when the choice would leave no video for training.
    """
    if args.holdout_videos is None:
        return []
    used = [r for r in results if r.reason is None]
    if not used:
        return []
    count = heldout_video_count(args.holdout_videos, len(used))
    if count >= len(used):
        raise BuildArgsError(
            f"holdout_videos {args.holdout_videos} holds out {count} videos, but only {len(used)} of the "
            f"{len(results)} inputs gave clips: at least one must stay for training"
        )
    chosen = sorted(used, key=lambda r: (r.sha256 or "", r.path))[:count]
    return sorted(chosen, key=lambda r: r.path)


def _check_holdout_videos_fit(args: BuildArgs, paths: Sequence[Path]) -> None:
    """Refuse, before anything is written, a --holdout-videos that would hold out every named input.

    Inputs that turn out skipped are only known after decoding; _choose_heldout_videos checks again then.
    """
    if args.holdout_videos is None:
        return
    count = heldout_video_count(args.holdout_videos, len(paths))
    if count >= len(paths):
        raise BuildArgsError(
            f"holdout_videos {args.holdout_videos} holds out {count} videos, but the inputs name "
            f"{len(paths)}: at least one must stay for training"
        )


def _split_samples(results: list[_InputResult], args: BuildArgs, heldout_videos: Sequence[_InputResult] = ()) -> _Split:
    train: list[_Sample] = []
    heldout: list[_Sample] = []
    dropped: Counter[str] = Counter()
    heldout_paths = {r.path for r in heldout_videos}
    for result in results:
        if result.reason is not None:
            continue
        whole = result.path in heldout_paths
        for clip in result.clips:
            start = clip["clip_index"] * args.clip_stride
            where = clip_destination(
                start,
                clip["frames"],
                result.output_frames,
                result.cuts,
                args,
                clip["max_gap_s"],
                heldout_video=whole,
            )
            if where == "train":
                train.append(_sample_of(result, clip, args.crf))
            elif where == "heldout":
                heldout.append(_sample_of(result, clip, args.crf))
            else:
                dropped[where] += 1
    videos = None
    if args.holdout_videos is not None:
        videos = [{"path": r.path, "source_sha256": r.sha256} for r in heldout_videos]
    return _Split(train, heldout, dropped["holdout"], dropped["cut"], dropped["gap"], videos)


def _sample_of(result: _InputResult, clip: dict[str, Any], crf: int) -> _Sample:
    """The shard sample of one clip of a used input."""
    if result.sha256 is None or result.part_name is None:
        raise AssertionError(f"{result.path} gave clips but has no part")
    meta = {
        "source": result.path,
        "source_sha256": result.sha256,
        "clip_index": clip["clip_index"],
        "start_s": clip["start_s"],
        "fps": clip["fps"],
        "frames": clip["frames"],
        "width": clip["width"],
        "height": clip["height"],
        "crf": crf,
        "source_times_s": clip["source_times_s"],
        "max_gap_s": clip["max_gap_s"],
    }
    return _Sample(
        key=f"{result.sha256[:16]}-{clip['clip_index']:06d}",
        json_bytes=json.dumps(meta).encode("utf-8"),
        part_name=result.part_name,
        member=f"{clip['clip_index']:06d}.mp4",
        mp4_size=clip["bytes"],
        duration_s=clip["frames"] / clip["fps"],
        max_gap_s=clip["max_gap_s"],
    )


def _plan_shards(samples: list[_Sample], args: BuildArgs) -> list[list[_Sample]]:
    """Fill shards in order, starting a new one when the next sample would break a cap."""
    shards: list[list[_Sample]] = []
    current: list[_Sample] = []
    current_bytes = 0
    for sample in samples:
        too_many = len(current) >= args.max_samples_per_shard
        too_big = _shard_file_bytes(current_bytes + sample.tar_bytes) > args.max_shard_bytes
        if current and (too_many or too_big):
            shards.append(current)
            current, current_bytes = [], 0
        if not current and _shard_file_bytes(sample.tar_bytes) > args.max_shard_bytes:
            logger.warning("clip %s alone exceeds max_shard_bytes; it gets a shard of its own", sample.key)
        current.append(sample)
        current_bytes += sample.tar_bytes
    if current:
        shards.append(current)
    return shards


def _plan_hash(shard: list[_Sample]) -> str:
    digest = hashlib.sha256(f"tar:{_TAR_USER}:{_TAR_MTIME}".encode())
    for sample in shard:
        digest.update(json.dumps([sample.key, sample.json_bytes.decode(), sample.part_name]).encode())
    return digest.hexdigest()


def _write_shard(path: Path, shard: list[_Sample], parts_dir: Path) -> None:
    """Write a shard under a temporary dot-name (fsynced), then rename it into place."""
    # Imported here so that worker processes, which never write shards, skip the import.
    from webdataset import TarWriter

    with atomic_path(path) as tmp_path, open(tmp_path, "wb") as f:
        writer = TarWriter(f, encoder=False, user=_TAR_USER, group=_TAR_USER, mtime=_TAR_MTIME)
        try:
            # Samples of one input are adjacent, so each part is opened once per shard.
            for part_name, part_samples in itertools.groupby(shard, key=lambda sample: sample.part_name):
                with tarfile.open(parts_dir / part_name) as part:
                    for sample in part_samples:
                        mp4 = _read_member(part, sample.member)
                        writer.write({"__key__": sample.key, "json": sample.json_bytes, "mp4": mp4})
        finally:
            # Also on failure, so that the tar stream does not flush into a closed file later.
            writer.close()


def is_build_dir(path: Path) -> bool:
    """Whether ``path`` holds an earlier or unfinished build: its parts cache, or a manifest written by a build.

    The parts cache is made before anything else, so even a build killed at
    its first input is recognised; a manifest alone (the cache deleted to
    save space) must have the build manifest's fields, not just its name.
    """
    if (path / PARTS_DIR).is_dir():
        return True
    try:
        manifest = json.loads((path / MANIFEST_NAME).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(manifest, dict) and {"version", "args", "inputs", "shards"} <= manifest.keys()


def _check_something_to_build(specs: Sequence[str | os.PathLike[str]], paths: list[Path]) -> None:
    """Raise NoInputsError when no input file exists (missing inputs alone are skipped, never a build)."""
    if not paths:
        named = ", ".join(os.fspath(spec) for spec in specs)
        raise NoInputsError(
            f"nothing to build: {named} names no video file (directories are searched for "
            f"{', '.join(sorted(VIDEO_EXTENSIONS))})"
        )
    if len(paths) == 1 and not paths[0].is_file():
        raise NoInputsError(f"nothing to build: the input {paths[0]} does not exist or is not a file")
    if not any(path.is_file() for path in paths):
        raise NoInputsError(f"nothing to build: none of the {len(paths)} input files exists (such as {paths[0]})")


def _check_existing_manifest(out_dir: Path, args: BuildArgs) -> None:
    path = out_dir / MANIFEST_NAME
    if not path.exists():
        return
    old = json.loads(path.read_text())
    new_args = args.manifest_args()
    if old.get("version") != MANIFEST_VERSION or old.get("args") != new_args:
        old_args = old.get("args", {})
        # Both sides' keys: an argument recorded only when set (holdout_videos) is named when dropped too.
        keys = [*new_args, *(key for key in old_args if key not in new_args)]
        changes = [
            f"{key} {old_args.get(key)!r} -> {new_args.get(key)!r}"
            for key in keys
            if old_args.get(key) != new_args.get(key)
        ]
        raise BuildArgsError(
            f"{out_dir} holds a build made with other arguments ({'; '.join(changes) or 'manifest version'}); "
            "build into a new --out directory, or delete that one first"
        )


def _remove_temporaries(out_dir: Path, parts_dir: Path) -> None:
    """Temporaries left by a killed run: never read, safe to delete (one build per directory at a time)."""
    for stale in [*out_dir.glob(".*.tmp"), *(out_dir / HELDOUT_DIR).glob(".*.tmp"), *parts_dir.glob(".*.tmp")]:
        logger.info("removing %s left by an interrupted run", stale)
        stale.unlink(missing_ok=True)


def _manifest(
    args: BuildArgs,
    results: list[_InputResult],
    shards: list[list[_Sample]],
    shard_records: list[dict[str, Any]],
    split: _Split,
) -> dict[str, Any]:
    skipped = [r for r in results if r.reason is not None]
    clip_seconds = sum(sample.duration_s for shard in shards for sample in shard)
    notes = Counter(note for r in results if r.reason is None for note in r.notes)
    stats: dict[str, float] = {f"{note}_inputs": notes[note] for note in INPUT_NOTES}
    stats["max_clip_gap_s"] = max((sample.max_gap_s for shard in shards for sample in shard), default=0.0)
    return {
        "version": MANIFEST_VERSION,
        "args": args.manifest_args(),
        "inputs": len(results),
        "ok_inputs": len(results) - len(skipped),
        "clips": sum(len(shard) for shard in shards),
        "total_duration_s": round(clip_seconds, 6),
        "skipped": dict(sorted(Counter(r.reason for r in skipped).items())),
        "skipped_files": [{"path": r.path, "reason": r.reason, "detail": r.detail} for r in skipped],
        **split.counts(),
        "stats": stats,
        "shards": shard_records,
    }


def _assemble(
    out_dir: Path, parts_dir: Path, shards: list[list[_Sample]], record_name: str = "shards.json"
) -> tuple[list[dict[str, Any]], int]:
    """Write the shards that changed; returns the manifest's shard records and how many were written."""
    record_path = parts_dir / record_name
    previous: dict[str, Any] = json.loads(record_path.read_text()) if record_path.exists() else {}
    records: dict[str, Any] = {}
    written = 0
    for index, shard in enumerate(shards):
        name = SHARD_PATTERN.format(index=index)
        path = out_dir / name
        plan = _plan_hash(shard)
        old = previous.get(name)
        unchanged = (
            old is not None
            and old["plan"] == plan
            and path.is_file()
            and path.stat().st_size == old["bytes"]
            and file_sha256(path) == old["sha256"]
        )
        if not unchanged:
            # From the first change on, the old manifest no longer describes the directory.
            (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
            _write_shard(path, shard, parts_dir)
            written += 1
            old = {"plan": plan, "bytes": path.stat().st_size, "sha256": file_sha256(path), "samples": len(shard)}
        records[name] = old
    names = set(records)
    for stale in sorted(out_dir.glob("clips-*.tar")):
        if stale.name not in names:
            (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
            stale.unlink()
    write_text_atomic(record_path, json.dumps(records, indent=1, sort_keys=True))
    shard_records = [
        {"name": name, "bytes": rec["bytes"], "samples": rec["samples"], "sha256": rec["sha256"]}
        for name, rec in records.items()
    ]
    return shard_records, written


def _write_shard_set(
    out_dir: Path,
    parts_dir: Path,
    shards: list[list[_Sample]],
    args: BuildArgs,
    results: list[_InputResult],
    split: _Split,
    record_name: str,
) -> tuple[dict[str, Any], int]:
    """Assemble one shard set (OUT or OUT/heldout) and write its manifest last; returns it and the shards written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shard_records, written = _assemble(out_dir, parts_dir, shards, record_name)
    manifest = _manifest(args, results, shards, shard_records, split)
    manifest_text = json.dumps(manifest, indent=1) + "\n"
    manifest_path = out_dir / MANIFEST_NAME
    if not manifest_path.exists() or manifest_path.read_text() != manifest_text:
        write_text_atomic(manifest_path, manifest_text)
    return manifest, written


def build_shards(
    inputs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    args: BuildArgs | None = None,
    *,
    workers: int | None = None,
    progress: bool = True,
) -> BuildResult:
    """Build (or finish, or confirm) WebDataset clip shards of ``inputs`` in ``out_dir``.

    Args:
        inputs: files, directories, globs or list files (see expand_inputs).
            If no input file exists, NoInputsError is raised and nothing is written.
        out_dir: created if needed. It must be new, empty or an earlier build
            (``is_build_dir``); anything else raises OutputDirError and nothing
            is touched. If it holds a manifest made with other arguments,
            BuildArgsError is raised and nothing is touched.
        args: clip, encoding and shard settings; defaults to BuildArgs().
        workers: worker processes (spawned; each opens its own files);
            None = min(4, CPU count); 0 runs in this process (no isolation
            from a crashing decoder; for tests and debugging).
        progress: show a tqdm bar over input files.

    With ``args.holdout_fraction > 0`` or ``args.holdout_videos`` the held-out
    clips go to ``out_dir/heldout/`` (written before ``out_dir/manifest.json``,
    so that manifest still marks a finished build). A ``holdout_videos`` that
    would leave no video for training raises BuildArgsError: before anything
    is written when the named inputs are too few, after decoding (with the
    parts cache written, nothing else) when skipped inputs make them so.

    Returns:
        BuildResult with the manifest(s) as written and this run's statistics.
    """
    args = args or BuildArgs()
    if workers is None:
        workers = min(4, os.cpu_count() or 1)
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    started = time.perf_counter()
    # Every refusal comes before the first write: a refused OUT is left exactly as it was.
    out_dir = check_output_dir(out_dir, is_ours=is_build_dir, what="clip-shard build")
    paths = expand_inputs(inputs)
    _check_something_to_build(inputs, paths)
    _check_holdout_videos_fit(args, paths)
    _check_existing_manifest(out_dir, args)
    parts_dir = out_dir / PARTS_DIR
    parts_dir.mkdir(parents=True, exist_ok=True)
    _remove_temporaries(out_dir, parts_dir)

    encoder = h264_encoder()
    jobs = [_Job(path=str(p), args=args, encoder=encoder, parts_dir=str(parts_dir)) for p in paths]
    logger.info("building clips of %d inputs into %s with %d workers", len(jobs), out_dir, workers)
    results = _mark_duplicates(_run_jobs(jobs, workers, progress))

    heldout_videos = _choose_heldout_videos(results, args)
    if heldout_videos:
        logger.info("holding out every clip of %s", ", ".join(r.path for r in heldout_videos))
    split = _split_samples(results, args, heldout_videos)
    shards = _plan_shards(split.train, args)
    written, total_shards = 0, len(shards)
    heldout: dict[str, Any] | None = None
    if args.holds_out:
        # The held-out set first: OUT/manifest.json, written last, then means the whole build is done.
        heldout_shards = _plan_shards(split.heldout, args)
        heldout, written = _write_shard_set(
            out_dir / HELDOUT_DIR, parts_dir, heldout_shards, args, results, split, "shards-heldout.json"
        )
        total_shards += len(heldout_shards)
        logger.info("held out %d clips in %d shards", heldout["clips"], len(heldout_shards))
    manifest, written_train = _write_shard_set(out_dir, parts_dir, shards, args, results, split, "shards.json")
    written += written_train

    wall_s = time.perf_counter() - started
    input_duration_s = sum(r.source_duration_s for r in results if r.reason is None)
    stats = {
        "wall_s": round(wall_s, 3),
        "input_duration_s": round(input_duration_s, 3),
        "input_s_per_wall_s": round(input_duration_s / wall_s, 3) if wall_s > 0 else 0.0,
        "parts_reused": sum(r.reused for r in results),
        "parts_made": sum(r.part_name is not None and not r.reused for r in results),
        "shards_written": written,
        "shards_kept": total_shards - written,
        "workers": workers,
        "encoder": encoder,
    }
    write_text_atomic(out_dir / STATS_NAME, json.dumps(stats, indent=1) + "\n")
    logger.info("built %d clips in %d shards; skipped %s", manifest["clips"], len(shards), manifest["skipped"])
    return BuildResult(manifest=manifest, stats=stats, heldout=heldout)
