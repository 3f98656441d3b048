"""Procedural videos with exact ground truth, for the tests and the CPU eval suite.

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
- with ``temporal_labels=True``, two more per-video classes that no single
  frame reveals: the speed bin all objects move in (slow or fast, with a
  gap between the bins) and the order of two events (objects 0 and 1, one
  disc and one rect, each flash bright for one frame; which flashes first).

Coordinates: x grows to the right, y downwards; pixel (row i, column j)
covers [j, j + 1) x [i, i + 1) and is sampled at its centre (j + 0.5, i + 0.5).
"""

from __future__ import annotations

import base64
import colorsys
import dataclasses
import json
import logging
import os
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from data_shards.build import encode_clip_mp4

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
}
_DENSE_FIELDS = frozenset({"depth_THW", "masks_THW"})


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
            objects move in separate lanes and never overlap.
        dense: also return per-pixel depth_THW and masks_THW.
        crf: x264 constant rate factor (lower = closer to the drawn pixels).
        temporal_labels: also vary speed (speed_label) and the order of two
            flashes (order_label), needs frames >= 4 and num_objects >= 2.
            Off, the video is exactly what it was before these labels existed.
    """
    height, width = size
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    if height < 16 or width < 16 or height % 2 or width % 2:
        raise ValueError(f"size must be even and at least 16x16, got {size}")
    if num_objects < 1:
        raise ValueError(f"num_objects must be >= 1, got {num_objects}")
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    if temporal_labels and (frames < 4 or num_objects < 2):
        raise ValueError(f"temporal_labels needs frames >= 4 and num_objects >= 2, got {frames} and {num_objects}")

    rng = np.random.default_rng(seed)
    # A separate stream, so the main one draws exactly what it drew before these labels existed.
    events_rng = np.random.default_rng([seed, 1]) if temporal_labels else None
    speed_label = int(events_rng.integers(len(SPEED_NAMES))) if events_rng is not None else -1
    order_label = int(events_rng.integers(len(ORDER_NAMES))) if events_rng is not None else -1
    label = int(rng.integers(len(LABEL_NAMES)))
    objects = _sample_objects(rng, label, frames, height, width, num_objects, occlusions, speed_label)
    camera_T2 = _camera_offsets(rng, frames, camera_pan)
    background_HWC = _background_texture(rng, height, width, camera_T2)

    frames_THWC, masks_THW, centers_OT2 = _render(objects, background_HWC, camera_T2, frames, height, width)
    visible_fraction_OT, occluded_OT = _visibility(objects, masks_THW, centers_OT2)
    flash_frames_O = None
    if events_rng is not None:
        flash_frames_O = _flash_frames(events_rng, objects, visible_fraction_OT, order_label)
        _flash(frames_THWC, masks_THW, flash_frames_O)
    Path(path).write_bytes(encode_clip_mp4(frames_THWC, fps=Fraction(fps).limit_denominator(100_000), crf=crf))

    depths_O = np.array([obj.depth for obj in objects], np.float32)
    depth_THW = None
    if dense:
        depth_lookup = np.concatenate([[BACKGROUND_DEPTH], depths_O]).astype(np.float32)
        depth_THW = depth_lookup[masks_THW]
    velocities_O2 = np.stack([obj.velocity_2 for obj in objects]).astype(np.float32)
    extents_O2 = np.stack([obj.half_extent_2 for obj in objects]).astype(np.float32)
    return GroundTruth(
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
    )


def generate_dataset(
    out_dir: str | os.PathLike[str], n: int, seed: int, **kwargs: Any
) -> list[tuple[Path, GroundTruth]]:
    """Write n procedural videos (``proc-00000.mp4`` ...) and their ground truth (``.json`` beside each).

    Per-video seeds are drawn from ``np.random.SeedSequence(seed)``, so the
    dataset is a function of (n, seed, kwargs). kwargs go to generate_video.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    children = np.random.SeedSequence(seed).spawn(n)
    dataset: list[tuple[Path, GroundTruth]] = []
    for index, child in enumerate(children):
        path = out_dir / f"proc-{index:05d}.mp4"
        truth = generate_video(path, seed=int(child.generate_state(1)[0]), **kwargs)
        path.with_suffix(".json").write_text(truth.to_json())
        dataset.append((path, truth))
    logger.info("wrote %d procedural videos to %s", n, out_dir)
    return dataset


def _sample_objects(
    rng: np.random.Generator,
    label: int,
    frames: int,
    height: int,
    width: int,
    num_objects: int,
    occlusions: bool,
    speed_label: int = -1,
) -> list[_Object]:
    """Objects drifting along the label's direction; speed_label >= 0 puts every speed in that bin
    and makes objects 0 and 1 a disc and a rect (the two flashing objects of order_label)."""
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
        jitter = 0.0 if not occlusions else rng.uniform(-0.3, 0.3)
        velocity_2 = speed * (direction_2 + jitter * across_2)
        mid_2 = rng.uniform(half_extent_2, frame_2 - half_extent_2)
        if not occlusions:
            lane_center = (index + 0.5) * lane_span
            mid_2 = mid_2 * np.abs(direction_2) + lane_center * np.abs(across_2)
        elif index == 1:
            # Meet object 0 at the middle frame: the nearer of the two covers the other.
            mid_2 = objects[0].start_2 + objects[0].velocity_2 * mid_t
        r, g, b = colorsys.hsv_to_rgb((hue0 + index / num_objects) % 1.0, 0.85, 1.0)
        angle = rng.uniform(0, np.pi)
        objects.append(
            _Object(
                shape=shape,
                color_3=255.0 * np.array([r, g, b]),
                depth=float(depths[index]),
                half_extent_2=half_extent_2,
                velocity_2=velocity_2,
                start_2=mid_2 - velocity_2 * mid_t,
                stripe_normal_2=np.array([np.cos(angle), np.sin(angle)]),
                stripe_period=float(rng.uniform(5.0, 9.0)),
                stripe_phase=float(rng.uniform(0, 1)),
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


def _camera_offsets(rng: np.random.Generator, frames: int, camera_pan: bool) -> np.ndarray:
    """camera_T2: integer view offsets, so that the background is shifted exactly, without resampling."""
    if not camera_pan:
        return np.zeros((frames, 2))
    angle = rng.uniform(0, 2 * np.pi)
    speed = rng.uniform(0.5, 1.5)
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
    centers_OT2 = np.stack([[obj.start_2 + obj.velocity_2 * t for t in range(frames)] for obj in objects])
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
