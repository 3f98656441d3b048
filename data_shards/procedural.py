"""Procedural videos with exact ground truth, for the tests and the CPU eval suite, and a pre-training corpus.

generate_video / generate_dataset write mp4 files with their ground truth
(render_video returns the frames without writing); write_corpus (``python -m
data_shards procedural``) writes unlabeled clip shards of the same kinds of
videos, in the format ``data_shards build`` writes, with seeds that never
repeat an eval set's (corpus_seeds).

Shape legend: T frames, H height, W width, C = 3 colour channels (RGB),
O objects, 2 = (x, y) in pixels, 4 = box (x0, y0, x1, y1) in pixels.

A video shows ``num_objects`` textured shapes (discs and rectangles filled
with stripes of their own hue) moving in straight lines over a textured
background that pans with the camera. Everything the eval tasks need is
known exactly, because the pixels are drawn from it:

- trajectories: object centres and boxes per frame (screen pixels);
- visibility: the fraction of each object's area that is drawn, after
  nearer objects are painted over it and the frame edge cuts it;
- camera: the integer offset of the view into the background per frame;
- depth: each object has a constant depth, the background is farthest
  (per-pixel maps on request);
- a class label per video: the direction all objects drift in
  (left, right, up, down), for action classification;
- with ``speed_change=True``, the frame at which each object's speed
  changes and by what factor (the path stays straight);
- with ``temporal_labels=True``, two more per-video classes that no single
  frame reveals: the speed bin all objects move in (slow or fast, with a
  gap between the bins) and the order of two events (objects 0 and 1, one
  disc and one rect, each flash bright for one frame; which flashes first).

Where objects are placed (``anchor_frame``): "middle" draws each object's
position at the middle frame uniformly inside the frame, so at the last frame
the objects sit displaced along the motion, by an amount that grows with the
speed, and one late frame alone tells direction and speed. "last" draws the
position at the last frame instead (fully inside the frame, independently of
label and speed) and runs the motion backwards from there, so only the
motion, seen over several frames, tells them (the first frames now carry the
displacement instead). Object 1 still meets object 0 at the middle frame for
the occlusion; with "last" it moves at object 0's velocity plus a drift of at
most 0.8 px per frame across the motion, so the distance between the two is
the same for both speed bins (with "middle" it grows with the speed and tells
the bin from the last frame: 0.72 vs chance 0.5, at 112 px, 16 frames). Seen
from the last frame, the meeting lies outside the frame in about 15% of videos.

Coordinates: x grows to the right, y downwards; pixel (row i, column j)
covers [j, j + 1) x [i, i + 1) and is sampled at its centre (j + 0.5, i + 0.5).
"""

from __future__ import annotations

import base64
import colorsys
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import multiprocessing
import os
import time
from collections.abc import Iterable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from data_shards.build import MANIFEST_VERSION, SHARD_PATTERN, encode_clip_mp4
from data_shards.io import check_output_dir, file_sha256, output_dir, write_text_atomic

logger = logging.getLogger(__name__)

LABEL_NAMES: tuple[str, ...] = ("left", "right", "up", "down")
# Unit screen vectors (dx, dy) of the label directions; y grows downwards.
_DIRECTIONS_L2 = np.array([[-1.0, 0.0], [1.0, 0.0], [0.0, -1.0], [0.0, 1.0]])

SPEED_NAMES: tuple[str, ...] = ("slow", "fast")
"""speed_label classes (temporal_labels=True): screen travel over the clip as a fraction of the short side."""
# Travel over the clip per speed bin, as a fraction of the frame's short side; the gap keeps the bins apart.
_SPEED_BINS_2 = np.array([[0.25, 0.45], [0.7, 1.0]])
ORDER_NAMES: tuple[str, ...] = ("disc_first", "rect_first")
"""order_label classes (temporal_labels=True): which of objects 0 and 1 (one disc, one rect) flashes first."""
# Brightness a flashing object's pixels are pulled towards white (fraction of the way to 255).
_FLASH_MIX = 0.75
ORDER_EVENTS: tuple[str, ...] = ("object", "frame")
"""order_events choices. "object": objects 0 and 1 flash for one frame each (ORDER_NAMES). "frame": the
whole frame is pulled towards white for FRAME_EVENT_FRAMES frames at the first event and towards black
at the second, or the other way round (FRAME_ORDER_NAMES): an event every patch shows."""
DEFAULT_ORDER_EVENTS = "frame"
"""The events of the eval's order set and of the pre-training corpus, unless asked otherwise (no readout
learned the order of one-frame object flashes; render_video keeps "object" so old videos stay byte-equal)."""


def check_order_events(order_events: str) -> None:
    """Raise ValueError naming order_events unless it is one of ORDER_EVENTS."""
    if order_events not in ORDER_EVENTS:
        raise ValueError(f"order_events must be one of {ORDER_EVENTS}, got {order_events!r}")


FRAME_ORDER_NAMES: tuple[str, ...] = ("bright_first", "dark_first")
"""order_label classes with order_events="frame": which event, the bright or the dark, comes first."""
FRAME_EVENT_FRAMES = 3
"""Frames a whole-frame event lasts (cut short by the next event and by the last frame)."""

ANCHOR_FRAMES: tuple[str, ...] = ("middle", "last")
"""anchor_frame choices: the frame at which object positions are drawn uniformly (module docstring)."""
SPEED_FACTOR_RANGE: tuple[float, float] = (0.5, 2.0)
"""speed_change=True: range of the factor an object's speed is multiplied by (drawn log-uniformly)."""

# anchor_frame="last": largest drift of object 1 against object 0, pixels per frame.
_PAIR_DRIFT = 0.8

BACKGROUND_DEPTH = 10.0
"""Depth of the background in the depth maps; objects lie in [2, 8]."""
VISIBLE_THRESHOLD = 0.5
"""An object is ``visible`` in a frame when at least this fraction of its area is drawn."""
OCCLUDED_THRESHOLD = 0.1
"""An object is ``occluded`` when at least this fraction of its area is covered by nearer objects."""

# Stripe brightness on and off the stripe, as a fraction of the object's colour.
_STRIPE_ON = 1.0
_STRIPE_OFF = 0.55
# Background brightness range (uint8): darker and greyer than the objects, so they stand out.
_BACKGROUND_LOW = 40.0
_BACKGROUND_HIGH = 150.0


@dataclasses.dataclass(kw_only=True, slots=True)
class GroundTruth:
    """Everything known about a procedural video (see the module docstring for coordinates)."""

    seed: int
    """Seed the video was generated from."""
    fps: float
    """Frame rate of the written file."""
    size: tuple[int, int]
    """(H, W) of the frames in pixels."""
    label: int
    """Class of the video: index into label_names of the direction all objects drift in."""
    label_names: tuple[str, ...]
    """Names of the classes."""
    shapes: tuple[str, ...]
    """Per object: "disc" or "rect"."""
    colors_O3: np.ndarray
    """uint8 (O, 3): base RGB colour of each object (stripes alternate between it and 55% of it)."""
    depths_O: np.ndarray
    """float32 (O,): constant depth of each object; nearer objects are drawn on top."""
    extents_O2: np.ndarray
    """float32 (O, 2): half width and half height of each object (radius twice for a disc)."""
    velocities_O2: np.ndarray
    """float32 (O, 2): screen velocity in pixels per frame."""
    speeds_O: np.ndarray
    """float32 (O,): screen speed in pixels per frame."""
    centers_OT2: np.ndarray
    """float32 (O, T, 2): object centre (x, y) per frame; may lie outside the frame."""
    boxes_OT4: np.ndarray
    """float32 (O, T, 4): object box (x0, y0, x1, y1) clipped to the frame; x0 == x1 when outside."""
    visible_fraction_OT: np.ndarray
    """float32 (O, T): fraction of the object's pixels that are drawn in the frame."""
    visible_OT: np.ndarray
    """bool (O, T): visible_fraction_OT >= VISIBLE_THRESHOLD."""
    occluded_OT: np.ndarray
    """bool (O, T): at least OCCLUDED_THRESHOLD of the object's pixels are covered by nearer objects."""
    camera_T2: np.ndarray
    """float32 (T, 2): offset (x, y) of the view into the background, (0, 0) at frame 0;
    the background moves on screen by minus the change of this offset."""
    depth_THW: np.ndarray | None = None
    """float32 (T, H, W): depth of the surface seen at each pixel (only with dense=True)."""
    masks_THW: np.ndarray | None = None
    """uint8 (T, H, W): 0 for background, o + 1 where object o is seen (only with dense=True)."""
    speed_label: int = -1
    """Index into SPEED_NAMES of the speed bin all objects move in; -1 unless temporal_labels=True."""
    order_label: int = -1
    """Index into ORDER_NAMES: which of objects 0 and 1 flashes first; -1 unless temporal_labels=True."""
    flash_frames_O: np.ndarray | None = None
    """int64 (O,): frame at which each object flashes, -1 for none (only with temporal_labels=True)."""
    speed_change_frames_O: np.ndarray | None = None
    """int64 (O,): frame k from which object o moves at speed_factors_O[o] times velocities_O2[o]
    (the step from frame t to t + 1 uses the new velocity when t >= k); only with speed_change=True."""
    speed_factors_O: np.ndarray | None = None
    """float32 (O,): factor on each object's velocity from its speed_change frame on; only with speed_change=True."""

    @property
    def num_frames(self) -> int:
        return int(self.centers_OT2.shape[1])

    @property
    def num_objects(self) -> int:
        return int(self.centers_OT2.shape[0])

    def to_json(self) -> str:
        """Serialize to JSON; dense maps (if any) are stored as base64 raw bytes."""
        record: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None and field.name in _WRITTEN_WHEN_SET:
                continue
            if isinstance(value, np.ndarray):
                if field.name in _DENSE_FIELDS:
                    value = _encode_dense(value)
                else:
                    value = value.tolist()
            elif isinstance(value, tuple):
                value = list(value)
            record[field.name] = value
        return json.dumps(record)

    @classmethod
    def from_json(cls, text: str) -> GroundTruth:
        """Inverse of to_json (arrays come back with their documented dtypes)."""
        record = json.loads(text)
        kwargs: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            # Records written before a field existed take its default.
            if field.name not in record and field.default is not dataclasses.MISSING:
                kwargs[field.name] = field.default
                continue
            value = record[field.name]
            if value is None:
                pass
            elif field.name in _DENSE_FIELDS:
                value = _decode_dense(value)
            elif field.name in _ARRAY_DTYPES:
                value = np.asarray(value, dtype=_ARRAY_DTYPES[field.name])
            elif field.name in ("size", "label_names", "shapes"):
                value = tuple(value)
            kwargs[field.name] = value
        return cls(**kwargs)


_ARRAY_DTYPES: dict[str, type] = {
    "colors_O3": np.uint8,
    "depths_O": np.float32,
    "extents_O2": np.float32,
    "velocities_O2": np.float32,
    "speeds_O": np.float32,
    "centers_OT2": np.float32,
    "boxes_OT4": np.float32,
    "visible_fraction_OT": np.float32,
    "visible_OT": np.bool_,
    "occluded_OT": np.bool_,
    "camera_T2": np.float32,
    "flash_frames_O": np.int64,
    "speed_change_frames_O": np.int64,
    "speed_factors_O": np.float32,
}
_DENSE_FIELDS = frozenset({"depth_THW", "masks_THW"})
# Fields added after records were cached: left out when unset, so a video made
# without the option keeps the exact record (and dataset hash) it had before.
_WRITTEN_WHEN_SET = frozenset({"speed_change_frames_O", "speed_factors_O"})


def _encode_dense(array: np.ndarray) -> dict[str, Any]:
    return {
        "dtype": array.dtype.str,
        "shape": list(array.shape),
        "data": base64.b64encode(np.ascontiguousarray(array).tobytes()).decode(),
    }


def _decode_dense(record: dict[str, Any]) -> np.ndarray:
    data = base64.b64decode(record["data"])
    return np.frombuffer(data, dtype=np.dtype(record["dtype"])).reshape(record["shape"]).copy()


@dataclasses.dataclass(frozen=True, slots=True)
class _Object:
    shape: str
    color_3: np.ndarray
    depth: float
    half_extent_2: np.ndarray
    velocity_2: np.ndarray
    start_2: np.ndarray
    stripe_normal_2: np.ndarray
    stripe_period: float
    stripe_phase: float
    change_frame: int = -1
    """Frame from which the velocity is speed_factor * velocity_2; -1 = constant velocity."""
    speed_factor: float = 1.0

    def center(self, t: float) -> np.ndarray:
        """Centre (x, y) at frame t (may be fractional)."""
        return self.start_2 + _displacement(self.velocity_2, t, self.change_frame, self.speed_factor)


def _displacement(velocity_2: np.ndarray, t: float, change_frame: int, speed_factor: float) -> np.ndarray:
    """Travel (x, y) from frame 0 to frame t: velocity_2 per frame, times speed_factor from change_frame on."""
    if change_frame < 0:
        # The constant-velocity product exactly as before speed changes existed (same floats).
        return velocity_2 * t
    return velocity_2 * min(t, change_frame) + (speed_factor * velocity_2) * max(t - change_frame, 0)


def generate_video(
    path: str | os.PathLike[str],
    *,
    seed: int,
    frames: int = 32,
    size: tuple[int, int] = (128, 128),
    fps: float = 8,
    num_objects: int = 3,
    camera_pan: bool = True,
    occlusions: bool = True,
    dense: bool = False,
    crf: int = 18,
    temporal_labels: bool = False,
    anchor_frame: str = "middle",
    pan_speed: tuple[float, float] = (0.5, 1.5),
    speed_change: bool = False,
    order_events: str = "object",
) -> GroundTruth:
    """Write a procedural H.264 mp4 to ``path`` and return its ground truth.

    Args:
        seed: everything (objects, motion, textures, label) follows from it.
        frames: number of frames T (>= 1).
        size: (H, W) in pixels, both even (H.264 with 4:2:0 chroma).
        fps: frame rate of the file.
        num_objects: O >= 1.
        camera_pan: pan the background at a constant random velocity.
        occlusions: with two or more objects, make objects 0 and 1 meet at the
            middle frame so that the nearer one covers the other; without,
            objects move in separate lanes and never overlap (the lanes show
            the motion's axis, though not its sign, in any frame).
        dense: also return per-pixel depth_THW and masks_THW.
        crf: x264 constant rate factor (lower = closer to the drawn pixels).
        temporal_labels: also vary speed (speed_label) and the order of two
            flashes (order_label), needs frames >= 4 and num_objects >= 2.
            Off, the video is exactly what it was before these labels existed.
        anchor_frame: "middle" or "last", the frame at which object positions
            are drawn uniformly inside the frame (see the module docstring);
            "last" leaves no direction or speed cue in where the objects are
            in the last frame, except the distance between objects 0 and 1.
        pan_speed: (low, high) camera pan speed in pixels per frame, drawn
            uniformly (before rounding the view offsets to whole pixels).
        speed_change: each object's speed changes once, by a factor drawn
            log-uniformly from SPEED_FACTOR_RANGE, at a frame k drawn from the
            middle half of the clip, [ceil((T-1)/4), floor(3(T-1)/4)]; the
            direction is kept. The initial speed is set so that the mean speed
            over the clip, and so the travel, is the one drawn without the
            change: with temporal_labels, speed_label is the bin of that mean
            speed (the speeds before and after k may each lie outside it).
            Needs frames >= 4.
        order_events: with temporal_labels, what the two ordered events are:
            "object" (objects 0 and 1 flash; ORDER_NAMES) or "frame" (the whole
            frame brightens, then darkens, or the reverse, for FRAME_EVENT_FRAMES
            frames each; FRAME_ORDER_NAMES). The same event frames either way.

    The defaults of the last four give exactly the video made before they
    existed; each option draws from its own random stream, so turning one on
    changes nothing that it does not have to (objects, colours, camera, label).
    """
    frames_THWC, truth = render_video(
        seed=seed,
        frames=frames,
        size=size,
        fps=fps,
        num_objects=num_objects,
        camera_pan=camera_pan,
        occlusions=occlusions,
        dense=dense,
        temporal_labels=temporal_labels,
        anchor_frame=anchor_frame,
        pan_speed=pan_speed,
        speed_change=speed_change,
        order_events=order_events,
    )
    Path(path).write_bytes(encode_clip_mp4(frames_THWC, fps=Fraction(fps).limit_denominator(100_000), crf=crf))
    return truth


def render_video(
    *,
    seed: int,
    frames: int = 32,
    size: tuple[int, int] = (128, 128),
    fps: float = 8,
    num_objects: int = 3,
    camera_pan: bool = True,
    occlusions: bool = True,
    dense: bool = False,
    temporal_labels: bool = False,
    anchor_frame: str = "middle",
    pan_speed: tuple[float, float] = (0.5, 1.5),
    speed_change: bool = False,
    order_events: str = "object",
) -> tuple[np.ndarray, GroundTruth]:
    """The frames of generate_video before encoding, uint8 (T, H, W, 3), and its ground truth; writes nothing.

    Arguments as in generate_video; fps is only recorded in the ground truth.
    """
    height, width = size
    _check_video_args(frames, height, width, num_objects, fps, temporal_labels, anchor_frame, pan_speed, speed_change)
    check_order_events(order_events)

    rng = np.random.default_rng(seed)
    # Separate streams, so the main one draws exactly what it drew before these options existed.
    events_rng = np.random.default_rng([seed, 1]) if temporal_labels else None
    speed_label = int(events_rng.integers(len(SPEED_NAMES))) if events_rng is not None else -1
    order_label = int(events_rng.integers(len(ORDER_NAMES))) if events_rng is not None else -1
    changes = _speed_changes(np.random.default_rng([seed, 2]), frames, num_objects) if speed_change else None
    label = int(rng.integers(len(LABEL_NAMES)))
    objects = _sample_objects(
        rng, label, frames, height, width, num_objects, occlusions, speed_label, anchor_frame, changes
    )
    camera_T2 = _camera_offsets(rng, frames, camera_pan, pan_speed)
    background_HWC = _background_texture(rng, height, width, camera_T2)

    frames_THWC, masks_THW, centers_OT2 = _render(objects, background_HWC, camera_T2, frames, height, width)
    visible_fraction_OT, occluded_OT = _visibility(objects, masks_THW, centers_OT2)
    flash_frames_O = None
    if events_rng is not None:
        flash_frames_O = _flash_frames(events_rng, objects, visible_fraction_OT, order_label)
        if order_events == "object":
            _flash(frames_THWC, masks_THW, flash_frames_O)
        else:
            _frame_events(frames_THWC, flash_frames_O, order_label)

    depths_O = np.array([obj.depth for obj in objects], np.float32)
    depth_THW = None
    if dense:
        depth_lookup = np.concatenate([[BACKGROUND_DEPTH], depths_O]).astype(np.float32)
        depth_THW = depth_lookup[masks_THW]
    velocities_O2 = np.stack([obj.velocity_2 for obj in objects]).astype(np.float32)
    extents_O2 = np.stack([obj.half_extent_2 for obj in objects]).astype(np.float32)
    truth = GroundTruth(
        seed=seed,
        fps=float(fps),
        size=(height, width),
        label=label,
        label_names=LABEL_NAMES,
        shapes=tuple(obj.shape for obj in objects),
        colors_O3=np.stack([obj.color_3 for obj in objects]).round().astype(np.uint8),
        depths_O=depths_O,
        extents_O2=extents_O2,
        velocities_O2=velocities_O2,
        speeds_O=np.linalg.norm(velocities_O2, axis=1).astype(np.float32),
        centers_OT2=centers_OT2.astype(np.float32),
        boxes_OT4=_clipped_boxes(centers_OT2, extents_O2, height, width),
        visible_fraction_OT=visible_fraction_OT.astype(np.float32),
        visible_OT=visible_fraction_OT >= VISIBLE_THRESHOLD,
        occluded_OT=occluded_OT,
        camera_T2=camera_T2.astype(np.float32),
        depth_THW=depth_THW,
        masks_THW=masks_THW if dense else None,
        speed_label=speed_label,
        order_label=order_label,
        flash_frames_O=flash_frames_O,
        speed_change_frames_O=None if changes is None else changes[0],
        speed_factors_O=None if changes is None else changes[1].astype(np.float32),
    )
    return frames_THWC, truth


def _check_video_args(
    frames: int,
    height: int,
    width: int,
    num_objects: int,
    fps: float,
    temporal_labels: bool,
    anchor_frame: str,
    pan_speed: tuple[float, float],
    speed_change: bool,
) -> None:
    """Raise ValueError naming the first argument of render_video that cannot be honoured."""
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    if height < 16 or width < 16 or height % 2 or width % 2:
        raise ValueError(f"size must be even and at least 16x16, got {(height, width)}")
    if num_objects < 1:
        raise ValueError(f"num_objects must be >= 1, got {num_objects}")
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    if temporal_labels and (frames < 4 or num_objects < 2):
        raise ValueError(f"temporal_labels needs frames >= 4 and num_objects >= 2, got {frames} and {num_objects}")
    if anchor_frame not in ANCHOR_FRAMES:
        raise ValueError(f"anchor_frame must be one of {ANCHOR_FRAMES}, got {anchor_frame!r}")
    low, high = pan_speed
    if not (np.isfinite(low) and np.isfinite(high) and 0 <= low <= high):
        raise ValueError(f"pan_speed must be (low, high) with 0 <= low <= high, got {pan_speed}")
    if speed_change and frames < 4:
        raise ValueError(f"speed_change needs frames >= 4, got {frames}")


def generate_dataset(
    out_dir: str | os.PathLike[str], n: int, seed: int, **kwargs: Any
) -> list[tuple[Path, GroundTruth]]:
    """Write n procedural videos (``proc-00000.mp4`` ...) and their ground truth (``.json`` beside each).

    Per-video seeds are ``dataset_seeds(n, seed)``, so the dataset is a
    function of (n, seed, kwargs). kwargs go to generate_video (frames, size,
    temporal_labels, anchor_frame, pan_speed, speed_change, ...).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dataset: list[tuple[Path, GroundTruth]] = []
    for index, video_seed in enumerate(dataset_seeds(n, seed)):
        path = out_dir / f"proc-{index:05d}.mp4"
        truth = generate_video(path, seed=video_seed, **kwargs)
        path.with_suffix(".json").write_text(truth.to_json())
        dataset.append((path, truth))
    logger.info("wrote %d procedural videos to %s", n, out_dir)
    return dataset


def dataset_seeds(n: int, seed: int) -> list[int]:
    """Per-video seeds of generate_dataset: 32-bit words of ``np.random.SeedSequence(seed).spawn(n)``."""
    return [int(child.generate_state(1)[0]) for child in np.random.SeedSequence(seed).spawn(n)]


def _speed_changes(rng: np.random.Generator, frames: int, num_objects: int) -> tuple[np.ndarray, np.ndarray]:
    """(change_frames_O int64, factors_O float64): a frame in the middle half of the clip and a log-uniform factor."""
    first, last = int(np.ceil((frames - 1) / 4)), int(np.floor(3 * (frames - 1) / 4))
    change_frames_O = rng.integers(first, last + 1, num_objects).astype(np.int64)
    low, high = np.log(SPEED_FACTOR_RANGE)
    # Log-uniform: slowing to half is as likely as doubling.
    factors_O = np.exp(rng.uniform(low, high, num_objects))
    return change_frames_O, factors_O


def _sample_objects(
    rng: np.random.Generator,
    label: int,
    frames: int,
    height: int,
    width: int,
    num_objects: int,
    occlusions: bool,
    speed_label: int = -1,
    anchor_frame: str = "middle",
    changes: tuple[np.ndarray, np.ndarray] | None = None,
) -> list[_Object]:
    """Objects drifting along the label's direction; speed_label >= 0 puts every (mean) speed in that bin
    and makes objects 0 and 1 a disc and a rect (the two flashing objects of order_label).

    Each object's position is drawn at anchor_frame ("middle" or "last") and
    the motion runs from there; changes (change_frames_O, factors_O) bend each
    object's speed once, keeping its mean speed over the clip.
    """
    direction_2 = _DIRECTIONS_L2[label]
    across_2 = direction_2[::-1].copy()
    short = min(height, width)
    # Evenly spread hues keep objects distinguishable from each other by colour.
    hue0 = rng.random()
    depths = np.linspace(2.0, 8.0, num_objects) + rng.uniform(-0.2, 0.2, num_objects)
    depths = rng.permutation(depths)
    # Without occlusions each object owns a lane across the motion direction.
    lane_count = 1 if occlusions else num_objects
    lane_span = (width if across_2[0] else height) / lane_count
    frame_2 = np.array([width, height], float)
    mid_t = (frames - 1) / 2
    anchor_t = mid_t if anchor_frame == "middle" else frames - 1
    objects: list[_Object] = []
    for index in range(num_objects):
        radius = rng.uniform(0.08, 0.14) * short
        if not occlusions:
            radius = min(radius, lane_span / 2 - 1)
        shape = "disc" if rng.random() < 0.5 else "rect"
        if shape == "disc":
            half_extent_2 = np.array([radius, radius])
        else:
            half_extent_2 = radius * rng.uniform(0.7, 1.0, 2)
        if speed_label >= 0 and index == 1 and shape == objects[0].shape:
            # Order is told by shape: the two flashing objects must differ in it.
            shape = "rect" if shape == "disc" else "disc"
            half_extent_2 = np.array([radius, radius]) if shape == "disc" else radius * np.array([1.0, 0.75])
        # Travel about half to all of the frame over the clip.
        travel = rng.uniform(0.5, 1.0)
        if speed_label >= 0:
            # The same draw, mapped into the bin, keeps the main stream unchanged.
            low, high = _SPEED_BINS_2[speed_label]
            travel = low + (travel - 0.5) / 0.5 * (high - low)
        speed = travel * short / max(frames, 2)
        change_frame, speed_factor = -1, 1.0
        if changes is not None:
            change_frame, speed_factor = int(changes[0][index]), float(changes[1][index])
            # Start at the speed that makes the clip's mean speed (its travel) the one drawn.
            steps = max(frames - 1, 1)
            speed = speed * steps / (change_frame + speed_factor * (steps - change_frame))
        jitter = 0.0 if not occlusions else rng.uniform(-0.3, 0.3)
        velocity_2 = speed * (direction_2 + jitter * across_2)
        anchor_2 = rng.uniform(half_extent_2, frame_2 - half_extent_2)
        anchor_at_t = anchor_t
        if not occlusions:
            lane_center = (index + 0.5) * lane_span
            anchor_2 = anchor_2 * np.abs(direction_2) + lane_center * np.abs(across_2)
        elif index == 1:
            # Meet object 0 at the middle frame: the nearer of the two covers the other.
            anchor_2, anchor_at_t = objects[0].center(mid_t), mid_t
            if anchor_frame == "last":
                # Object 0's velocity plus a drift of fixed size in pixels: their distance in any
                # frame is then the same for both speed bins (a speed-proportional jitter told the
                # bin from the last frame alone).
                # The jitter already drawn sets it, so the random stream (and every other object) is unchanged.
                velocity_2 = objects[0].velocity_2 + (jitter / 0.3) * _PAIR_DRIFT * across_2
                change_frame, speed_factor = objects[0].change_frame, objects[0].speed_factor
        r, g, b = colorsys.hsv_to_rgb((hue0 + index / num_objects) % 1.0, 0.85, 1.0)
        angle = rng.uniform(0, np.pi)
        objects.append(
            _Object(
                shape=shape,
                color_3=255.0 * np.array([r, g, b]),
                depth=float(depths[index]),
                half_extent_2=half_extent_2,
                velocity_2=velocity_2,
                start_2=anchor_2 - _displacement(velocity_2, anchor_at_t, change_frame, speed_factor),
                stripe_normal_2=np.array([np.cos(angle), np.sin(angle)]),
                stripe_period=float(rng.uniform(5.0, 9.0)),
                stripe_phase=float(rng.uniform(0, 1)),
                change_frame=change_frame,
                speed_factor=speed_factor,
            )
        )
    return objects


def _flash_frames(
    rng: np.random.Generator, objects: list[_Object], visible_fraction_OT: np.ndarray, order_label: int
) -> np.ndarray:
    """flash_frames_O: objects 0 and 1 flash at distinct frames in [1, T-2], the one order_label names first.

    Neither flash is on the last frame (it would give the order away) nor on
    frame 0; both are chosen where the flashing object is visible, when the
    clip allows it (else where it is most visible).
    """
    frames = visible_fraction_OT.shape[1]
    disc = 0 if objects[0].shape == "disc" else 1
    first, second = (disc, 1 - disc) if ORDER_NAMES[order_label] == "disc_first" else (1 - disc, disc)
    pairs = [(a, b) for a in range(1, frames - 1) for b in range(a + 1, frames - 1)]
    seen_P = np.array([min(visible_fraction_OT[first, a], visible_fraction_OT[second, b]) for a, b in pairs])
    good = np.flatnonzero(seen_P >= VISIBLE_THRESHOLD)
    pick = int(rng.choice(good)) if len(good) else int(np.argmax(seen_P))
    flash_frames_O = np.full(len(objects), -1, np.int64)
    flash_frames_O[first], flash_frames_O[second] = pairs[pick]
    return flash_frames_O


def _flash(frames_THWC: np.ndarray, masks_THW: np.ndarray, flash_frames_O: np.ndarray) -> None:
    """Pull the drawn pixels of each flashing object towards white on its flash frame (in place)."""
    for o, t in enumerate(flash_frames_O):
        if t < 0:
            continue
        seen_HW = masks_THW[t] == o + 1
        pixels = frames_THWC[t][seen_HW].astype(np.float32)
        frames_THWC[t][seen_HW] = np.round(pixels + _FLASH_MIX * (255.0 - pixels)).astype(np.uint8)


def _frame_events(frames_THWC: np.ndarray, flash_frames_O: np.ndarray, order_label: int) -> None:
    """order_events="frame": pull whole frames towards white or black from each event frame on (in place).

    The first event (the earlier of the two event frames) is the bright one
    when FRAME_ORDER_NAMES[order_label] is "bright_first"; each lasts
    FRAME_EVENT_FRAMES frames, cut short by the next event, and never reaches
    the last frame (it would give the order away).
    """
    T = len(frames_THWC)
    starts = sorted(int(t) for t in flash_frames_O if t >= 0)
    bright_first = FRAME_ORDER_NAMES[order_label] == "bright_first"
    for rank, start in enumerate(starts):
        end = min(start + FRAME_EVENT_FRAMES, T - 1, *(s for s in starts if s > start))
        target = 255.0 if (rank == 0) == bright_first else 0.0
        pixels = frames_THWC[start:end].astype(np.float32)
        frames_THWC[start:end] = np.round(pixels + _FLASH_MIX * (target - pixels)).astype(np.uint8)


def _camera_offsets(
    rng: np.random.Generator, frames: int, camera_pan: bool, pan_speed: tuple[float, float] = (0.5, 1.5)
) -> np.ndarray:
    """camera_T2: integer view offsets, so that the background is shifted exactly, without resampling.

    The pan has a uniform random direction and a speed (pixels per frame) drawn uniformly from pan_speed.
    """
    if not camera_pan:
        return np.zeros((frames, 2))
    angle = rng.uniform(0, 2 * np.pi)
    speed = rng.uniform(*pan_speed)
    velocity_2 = speed * np.array([np.cos(angle), np.sin(angle)])
    return np.round(np.arange(frames)[:, None] * velocity_2[None, :])


def _background_texture(rng: np.random.Generator, height: int, width: int, camera_T2: np.ndarray) -> np.ndarray:
    """background_HWC (float32) covering every view; indexed by view offset minus its minimum."""
    span_2 = (camera_T2.max(axis=0) - camera_T2.min(axis=0)).astype(int)
    big_h, big_w = height + span_2[1], width + span_2[0]
    # Blobs of about 16 px (upsampled coarse noise) plus fine grain: structure to track at two scales.
    cell = 16
    coarse = rng.random((big_h // cell + 2, big_w // cell + 2, 3))
    ys = (np.arange(big_h) + 0.5) / cell
    xs = (np.arange(big_w) + 0.5) / cell
    smooth_HWC = _bilinear(coarse, ys, xs)
    grain_HW1 = rng.random((big_h, big_w, 1))
    grey_HW1 = smooth_HWC.mean(axis=2, keepdims=True)
    # Mostly grey (low saturation) so the saturated objects stand out.
    texture_HWC = 0.6 * grey_HW1 + 0.2 * smooth_HWC + 0.2 * grain_HW1
    return (_BACKGROUND_LOW + (_BACKGROUND_HIGH - _BACKGROUND_LOW) * texture_HWC).astype(np.float32)


def _bilinear(grid_YXC: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    y0 = np.floor(ys).astype(int)
    x0 = np.floor(xs).astype(int)
    fy = (ys - y0)[:, None, None]
    fx = (xs - x0)[None, :, None]
    top = grid_YXC[y0][:, x0] * (1 - fx) + grid_YXC[y0][:, x0 + 1] * fx
    bottom = grid_YXC[y0 + 1][:, x0] * (1 - fx) + grid_YXC[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def _local_grid(obj: _Object, center_2: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Pixel-centre offsets (dx_hw, dy_hw) from the centre over the object's bounding pixels, and the grid origin."""
    x0 = int(np.floor(center_2[0] - obj.half_extent_2[0]))
    y0 = int(np.floor(center_2[1] - obj.half_extent_2[1]))
    x1 = int(np.ceil(center_2[0] + obj.half_extent_2[0]))
    y1 = int(np.ceil(center_2[1] + obj.half_extent_2[1]))
    dx_w = np.arange(x0, x1) + 0.5 - center_2[0]
    dy_h = np.arange(y0, y1) + 0.5 - center_2[1]
    return dx_w[None, :], dy_h[:, None], x0, y0


def _shape_mask(obj: _Object, dx_hw: np.ndarray, dy_hw: np.ndarray) -> np.ndarray:
    """mask_hw (bool): pixel centres inside the object's shape."""
    if obj.shape == "disc":
        return dx_hw**2 + dy_hw**2 <= obj.half_extent_2[0] ** 2
    return (np.abs(dx_hw) <= obj.half_extent_2[0]) & (np.abs(dy_hw) <= obj.half_extent_2[1])


def _render(
    objects: list[_Object],
    background_HWC: np.ndarray,
    camera_T2: np.ndarray,
    frames: int,
    height: int,
    width: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Paint each frame far to near; returns frames_THWC uint8, masks_THW uint8, centers_OT2."""
    order = sorted(range(len(objects)), key=lambda o: -objects[o].depth)
    view_origin_T2 = (camera_T2 - camera_T2.min(axis=0)).astype(int)
    frames_THWC = np.empty((frames, height, width, 3), np.uint8)
    masks_THW = np.zeros((frames, height, width), np.uint8)
    centers_OT2 = np.stack([[obj.center(t) for t in range(frames)] for obj in objects])
    for t in range(frames):
        ox, oy = view_origin_T2[t]
        canvas_HWC = background_HWC[oy : oy + height, ox : ox + width].copy()
        for o in order:
            _paint(objects[o], centers_OT2[o, t], canvas_HWC, masks_THW[t], o + 1)
        frames_THWC[t] = np.clip(np.round(canvas_HWC), 0, 255).astype(np.uint8)
    return frames_THWC, masks_THW, centers_OT2


def _paint(obj: _Object, center_2: np.ndarray, canvas_HWC: np.ndarray, mask_HW: np.ndarray, object_id: int) -> None:
    dx_hw, dy_hw, x0, y0 = _local_grid(obj, center_2)
    shape_hw = _shape_mask(obj, dx_hw, dy_hw)
    height, width = mask_HW.shape
    # Crop the local grid to the frame.
    cx0, cy0 = max(x0, 0), max(y0, 0)
    cx1, cy1 = min(x0 + shape_hw.shape[1], width), min(y0 + shape_hw.shape[0], height)
    if cx0 >= cx1 or cy0 >= cy1:
        return
    local = (slice(cy0 - y0, cy1 - y0), slice(cx0 - x0, cx1 - x0))
    inside_hw = shape_hw[local]
    # Stripes are fixed to the object (offsets from its centre), so the texture moves with it.
    along_hw = (dx_hw * obj.stripe_normal_2[0] + dy_hw * obj.stripe_normal_2[1])[local]
    on_hw = ((along_hw / obj.stripe_period + obj.stripe_phase) % 1.0) < 0.5
    shade_hw = np.where(on_hw, _STRIPE_ON, _STRIPE_OFF)
    region_hwC = canvas_HWC[cy0:cy1, cx0:cx1]
    region_hwC[inside_hw] = (shade_hw[..., None] * obj.color_3[None, None, :])[inside_hw]
    mask_HW[cy0:cy1, cx0:cx1][inside_hw] = object_id


def _visibility(
    objects: list[_Object], masks_THW: np.ndarray, centers_OT2: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(visible_fraction_OT, occluded_OT) from the painted masks and each object's full and in-frame area."""
    num_objects, frames = centers_OT2.shape[:2]
    height, width = masks_THW.shape[1:]
    drawn_OT = np.stack([(masks_THW == o + 1).sum(axis=(1, 2)) for o in range(num_objects)]).astype(float)
    area_OT = np.zeros((num_objects, frames))
    in_frame_OT = np.zeros((num_objects, frames))
    for o, obj in enumerate(objects):
        for t in range(frames):
            dx_hw, dy_hw, x0, y0 = _local_grid(obj, centers_OT2[o, t])
            ys, xs = np.nonzero(_shape_mask(obj, dx_hw, dy_hw))
            ys, xs = ys + y0, xs + x0
            area_OT[o, t] = len(ys)
            in_frame_OT[o, t] = ((ys >= 0) & (ys < height) & (xs >= 0) & (xs < width)).sum()
    area_OT = np.maximum(area_OT, 1)
    return drawn_OT / area_OT, (in_frame_OT - drawn_OT) / area_OT >= OCCLUDED_THRESHOLD


def _clipped_boxes(centers_OT2: np.ndarray, extents_O2: np.ndarray, height: int, width: int) -> np.ndarray:
    low_OT2 = centers_OT2 - extents_O2[:, None, :]
    high_OT2 = centers_OT2 + extents_O2[:, None, :]
    limit_2 = np.array([width, height], float)
    low_OT2 = np.clip(low_OT2, 0, limit_2)
    high_OT2 = np.clip(high_OT2, 0, limit_2)
    return np.concatenate([low_OT2, high_OT2], axis=-1).astype(np.float32)


# ---------------------------------------------------------------------------
# Procedural pre-training corpus: unlabeled clip shards in the build's format.

CORPUS_SPAWN_KEY = 0x5052
"""spawn_key of the corpus's SeedSequence ("PR"); generate_dataset's sequences have none."""
# Fixed tar member metadata, as data_shards.build writes it, so shards are byte-identical across runs.
_TAR_USER = "data_shards"
_TAR_MTIME = 0


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class CorpusArgs:
    """What write_corpus makes: which videos, how they are cut into clips, and the shard cap."""

    videos: int
    """Number of procedural videos (V)."""
    seed: int = 0
    """Corpus seed; per-video seeds are corpus_seeds(videos, seed)."""
    frames: int = 16
    """Frames per video (T); cut into T // clip_frames clips, the rest dropped. Objects travel about a frame
    width over the video whatever T is, so T sets the speed per frame; 16 is the eval's (ProceduralConfig.frames)."""
    size: int = 112
    """Frame height and width in pixels (even, >= 16)."""
    clip_frames: int = 16
    """Frames per clip."""
    fps: float = 8.0
    """Frame rate written into the clips (the motion is per frame; this only sets timestamps)."""
    num_objects: int = 3
    """Moving objects per video (>= 2: objects 0 and 1 flash and occlude each other)."""
    pan_speed: tuple[float, float] = (2.0, 6.0)
    """Camera pan speed range in pixels per frame: large enough to read, as the eval is to use."""
    order_events: str = DEFAULT_ORDER_EVENTS
    """The two timed events of each video (render_video's order_events): whole-"frame" brightness changes,
    as in the eval's default set, or one-frame "object" flashes. Unlabeled
    here; the eval's classify_order asks which came first."""
    crf: int = 23
    """x264 constant rate factor of the clips (the build's default)."""
    max_samples_per_shard: int = 256
    """At most this many clips per shard."""

    def __post_init__(self) -> None:
        if self.videos < 1:
            raise ValueError(f"videos must be >= 1, got {self.videos}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.clip_frames < 1:
            raise ValueError(f"clip_frames must be >= 1, got {self.clip_frames}")
        if self.frames < max(self.clip_frames, 4):
            raise ValueError(
                f"frames must be >= max(clip_frames, 4), got {self.frames} (clip_frames {self.clip_frames})"
            )
        if not 0 <= self.crf <= 51:
            raise ValueError(f"crf must be in [0, 51], got {self.crf}")
        if self.max_samples_per_shard < 1:
            raise ValueError(f"max_samples_per_shard must be >= 1, got {self.max_samples_per_shard}")
        check_order_events(self.order_events)
        # The rest (size, fps, num_objects, pan_speed) are checked as render_video would check them.
        _check_video_args(
            self.frames, self.size, self.size, self.num_objects, self.fps, True, "last", self.pan_speed, True
        )

    def video_kwargs(self) -> dict[str, Any]:
        """render_video arguments (except seed): every kind of dynamics the eval tasks probe."""
        return {
            "frames": self.frames,
            "size": (self.size, self.size),
            "fps": self.fps,
            "num_objects": self.num_objects,
            "camera_pan": True,
            "occlusions": True,
            "temporal_labels": True,
            "anchor_frame": "last",
            "pan_speed": tuple(self.pan_speed),
            "speed_change": True,
            "order_events": self.order_events,
        }

    def manifest_args(self) -> dict[str, Any]:
        """The ``args`` record of manifest.json: the build's fields, plus "procedural" (what was generated)."""
        return {
            "clip_frames": self.clip_frames,
            "fps": float(self.fps),
            "short_side": self.size,
            "stride": self.clip_frames,
            "crf": self.crf,
            "max_samples_per_shard": self.max_samples_per_shard,
            "procedural": {
                "videos": self.videos,
                "seed": self.seed,
                "spawn_key": CORPUS_SPAWN_KEY,
                **{k: list(v) if isinstance(v, tuple) else v for k, v in self.video_kwargs().items()},
            },
        }


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class CorpusResult:
    """What write_corpus left in its output directory."""

    manifest: dict[str, Any]
    """The content of manifest.json."""
    wall_s: float
    """Seconds the call took."""
    bytes: int
    """Bytes of the shards (the manifest aside)."""
    unchanged: bool
    """True when the directory already held this corpus and nothing was written."""


def corpus_seeds(n: int, seed: int) -> list[int]:
    """Per-video seeds of a corpus: 64-bit words with the top bit set, from its own SeedSequence.

    The sequence is ``SeedSequence(entropy=seed, spawn_key=(CORPUS_SPAWN_KEY,))``,
    a different one from any generate_dataset's; and since generate_dataset's
    per-video seeds are 32-bit words (dataset_seeds), the top bit alone keeps
    every corpus video apart from every eval video, whatever the two seeds.
    """
    children = np.random.SeedSequence(entropy=seed, spawn_key=(CORPUS_SPAWN_KEY,)).spawn(n)
    return [int(child.generate_state(1, np.uint64)[0]) | (1 << 63) for child in children]


def is_corpus_dir(path: Path) -> bool:
    """Whether ``path`` holds a corpus written by write_corpus (its manifest names the procedural arguments)."""
    try:
        manifest = json.loads((Path(path) / "manifest.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(manifest, dict) and isinstance(manifest.get("args"), dict) and "procedural" in manifest["args"]


def write_corpus(
    out_dir: str | os.PathLike[str], args: CorpusArgs, *, workers: int = 0, progress: bool = False
) -> CorpusResult:
    """Write a procedural pre-training corpus: clip shards (``clips-*.tar`` + ``manifest.json``) in the build's format.

    Each video is rendered with CorpusArgs.video_kwargs (moving, occluding,
    flashing textured objects with one speed change each, a camera pan,
    positions anchored at the last frame), cut into non-overlapping clips of
    clip_frames, and each clip encoded once as the build encodes (one GOP,
    single-threaded x264): the clips never go through an intermediate file,
    so they are encoded only once. A sample is ``<sha256(frames)[:16]>-<clip:06d>``
    with the build's json fields; "source" is ``procedural:<video seed>``
    (render_video(seed=..., **video_kwargs) makes the video again), never a
    path, so the bytes do not depend on where the corpus is written. The labels
    are not stored: this is unlabeled pre-training video.

    Args:
        out_dir: must be new, empty, or an earlier corpus (is_corpus_dir);
            anything else raises OutputDirError and nothing is written. It is
            filled as a temporary sibling and renamed into place whole. When it
            already holds this corpus (same arguments, shards as listed), nothing
            is written; otherwise it is replaced.
        args: the corpus.
        workers: processes rendering and encoding videos (spawned); 0 = in this process.
        progress: show a tqdm bar over videos.

    Deterministic: the same args give byte-identical shards and manifest.
    """
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    started = time.perf_counter()
    out_dir = check_output_dir(Path(out_dir), is_ours=is_corpus_dir, what="procedural corpus")
    existing = _existing_corpus(out_dir, args)
    if existing is not None:
        logger.info("%s already holds this corpus; nothing written", out_dir)
        return CorpusResult(
            manifest=existing,
            wall_s=time.perf_counter() - started,
            bytes=sum(s["bytes"] for s in existing["shards"]),
            unchanged=True,
        )
    seeds = corpus_seeds(args.videos, args.seed)
    with output_dir(out_dir, is_ours=is_corpus_dir, what="procedural corpus") as tmp:
        samples = _corpus_samples(seeds, args, workers)
        bar = tqdm(samples, total=args.videos, desc="videos", unit="video", disable=not progress)
        shard_records = _write_corpus_shards(tmp, bar, args.max_samples_per_shard)
        manifest = _corpus_manifest(args, shard_records)
        write_text_atomic(tmp / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    logger.info(
        "wrote %d clips of %d videos in %d shards to %s", manifest["clips"], args.videos, len(shard_records), out_dir
    )
    return CorpusResult(
        manifest=manifest,
        wall_s=time.perf_counter() - started,
        bytes=sum(s["bytes"] for s in shard_records),
        unchanged=False,
    )


def _existing_corpus(out_dir: Path, args: CorpusArgs) -> dict[str, Any] | None:
    """The manifest of ``out_dir`` if it already holds exactly this corpus (arguments, and shards as listed)."""
    if not is_corpus_dir(out_dir):
        return None
    manifest = json.loads((out_dir / "manifest.json").read_text())
    if manifest.get("version") != MANIFEST_VERSION or manifest.get("args") != args.manifest_args():
        return None
    for shard in manifest.get("shards", []):
        path = out_dir / shard["name"]
        if not path.is_file() or path.stat().st_size != shard["bytes"] or file_sha256(path) != shard["sha256"]:
            return None
    return manifest


_Clip = tuple[str, bytes, bytes]
"""(key, json bytes, mp4 bytes) of one clip sample."""


def _corpus_samples(seeds: list[int], args: CorpusArgs, workers: int) -> Iterator[list[_Clip]]:
    """The clips of each video, in video order (rendered and encoded in worker processes when workers > 0)."""
    make = functools.partial(_video_clips, args=args)
    if workers == 0:
        yield from map(make, seeds)
        return
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers) as pool:
        # imap keeps the video order (so the shards are deterministic) while workers run ahead.
        yield from pool.imap(make, seeds, chunksize=4)


def _video_clips(seed: int, *, args: CorpusArgs) -> list[_Clip]:
    """Render one corpus video and encode its clips (worker entry point)."""
    frames_THWC, _ = render_video(seed=seed, **args.video_kwargs())
    source_sha256 = hashlib.sha256(frames_THWC.tobytes()).hexdigest()
    rate = Fraction(args.fps).limit_denominator(100_000)
    clips: list[_Clip] = []
    for clip_index in range(args.frames // args.clip_frames):
        start = clip_index * args.clip_frames
        mp4 = encode_clip_mp4(frames_THWC[start : start + args.clip_frames], fps=rate, crf=args.crf)
        meta = {
            "source": f"procedural:{seed}",
            "source_sha256": source_sha256,
            "clip_index": clip_index,
            "start_s": round(start / float(rate), 6),
            "fps": float(rate),
            "frames": args.clip_frames,
            "width": args.size,
            "height": args.size,
            "crf": args.crf,
        }
        clips.append((f"{source_sha256[:16]}-{clip_index:06d}", json.dumps(meta).encode("utf-8"), mp4))
    return clips


def _write_corpus_shards(directory: Path, videos: Iterable[list[_Clip]], max_samples: int) -> list[dict[str, Any]]:
    """Write the clips into ``clips-NNNNNN.tar`` shards of at most max_samples each; returns the manifest records."""
    # Imported here, as in data_shards.build: worker processes never write shards.
    from webdataset import TarWriter

    records: list[dict[str, Any]] = []
    with contextlib.ExitStack() as shard:
        writer = None
        for clips in videos:
            for key, json_bytes, mp4 in clips:
                if writer is None or records[-1]["samples"] == max_samples:
                    # Closing the previous shard's writer before its file (ExitStack unwinds in reverse).
                    shard.close()
                    name = SHARD_PATTERN.format(index=len(records))
                    f = shard.enter_context(open(directory / name, "wb"))
                    writer = TarWriter(f, encoder=False, user=_TAR_USER, group=_TAR_USER, mtime=_TAR_MTIME)
                    shard.callback(writer.close)
                    records.append({"name": name, "bytes": 0, "samples": 0, "sha256": ""})
                writer.write({"__key__": key, "json": json_bytes, "mp4": mp4})
                records[-1]["samples"] += 1
    for record in records:
        path = directory / record["name"]
        record.update(bytes=path.stat().st_size, sha256=file_sha256(path))
    return records


def _corpus_manifest(args: CorpusArgs, shard_records: list[dict[str, Any]]) -> dict[str, Any]:
    """manifest.json with the build's fields (so loaders and tools read it alike); no times, so it is deterministic."""
    clips = sum(record["samples"] for record in shard_records)
    return {
        "version": MANIFEST_VERSION,
        "args": args.manifest_args(),
        "inputs": args.videos,
        "ok_inputs": args.videos,
        "clips": clips,
        "total_duration_s": round(clips * args.clip_frames / args.fps, 6),
        "skipped": {},
        "skipped_files": [],
        "clips_dropped_at_holdout": 0,
        "clips_dropped_at_cuts": 0,
        "shards": shard_records,
    }
