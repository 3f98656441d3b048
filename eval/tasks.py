"""The five task families on procedural video: exact targets, a readout, a loss, metrics.

Shape legend: V videos (B in a batch), T frames, N patch tokens, d feature
width, Q query points or objects, U depth-map side, C classes, 2 = (x, y),
4 = box (x0, y0, x1, y1).

A task turns ground truth into fixed-shape target tensors once (stacked over
videos, so a batch is an index), and is otherwise a thin head over the
shared features: ``outputs`` runs its readout, ``loss`` trains it,
``metrics`` scores the held-out outputs. Nothing here knows which variant or
protocol produced the features.

``build_readout(..., streaming)`` picks one of two readings (eval.readouts):
streaming, where frame t's answer reads frame t's core outputs only and
task queries are coordinates, so the past must come through the core; or
all frames, one cross-attention over every frame's outputs (the 4DS-style
control). Both have width E = ``width`` (128) whatever the core's width.
``config()`` names both, their width and which of them this task built, so
a report can state that every variant used the same readout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data_shards import GroundTruth
from data_shards.procedural import LABEL_NAMES, ORDER_NAMES, SPEED_NAMES
from eval.data import frame_grid_sample
from eval.metrics import box_iou, depth_metrics, relative_pose_errors, tapvid_metrics, topk_accuracy
from eval.readouts import (
    READOUT_WIDTH,
    AttentiveProbe,
    BoxTrackHead,
    DenseDepthHead,
    PointTrackHead,
    RelativePoseHead,
)

Batch = dict[str, Tensor]

TAPVID_SIZE = 256.0
"""TAP-Vid scores tracks in pixels of a 256 x 256 frame."""


class Task(Protocol):
    """What the runner needs from a task."""

    name: str
    primary: str
    """The metric the comparison table and the bar chart lead with."""
    higher_is_better: bool

    def targets(self, truths: list[GroundTruth], grid: int) -> Batch: ...
    def build_readout(self, dim: int, grid: int, frames: int, streaming: bool) -> nn.Module: ...
    def outputs(self, readout: nn.Module, features_BTNd: Tensor, batch: Batch) -> Batch: ...
    def loss(self, outputs: Batch, batch: Batch) -> Tensor: ...
    def metrics(self, outputs: Batch, batch: Batch) -> dict[str, float]: ...
    def config(self) -> dict[str, Any]: ...


# What each classification task reads from the ground truth: (GroundTruth field, class names). Order's names
# are the object flashes'; with whole-frame events (order_events="frame") the same two indices mean
# FRAME_ORDER_NAMES (bright_first, dark_first).
CLASS_LABELS: dict[str, tuple[str, tuple[str, ...]]] = {
    "direction": ("label", LABEL_NAMES),
    "speed": ("speed_label", SPEED_NAMES),
    "order": ("order_label", ORDER_NAMES),
}


@dataclass(kw_only=True, slots=True)
class Classification:
    """A per-video class one frame cannot tell: drift direction (4), speed bin (2) or flash order (2).

    All three come from the same procedural videos (generated with
    temporal_labels), so they share the cached tokens and features.
    """

    label: str = "direction"
    """Which label: direction, speed or order (see CLASS_LABELS)."""
    classes: int | None = None
    """Number of classes; None takes the label's (set for a dataset with its own labels)."""
    width: int = READOUT_WIDTH
    """Readout width E (the core's outputs are projected to it)."""
    num_queries: int = 4
    """Learned queries of the attentive probe."""
    heads: int = 4
    """Attention heads of the attentive probe."""
    name: str = "classification"
    primary: str = "top1"
    higher_is_better: bool = True
    built: list[str] = field(default_factory=list, init=False, repr=False, compare=False)
    """Readings this task has built a readout for ("streaming", "all_frames"), in order."""

    def __post_init__(self) -> None:
        _check_width(self.width, self.heads)
        if self.label not in CLASS_LABELS:
            raise ValueError(f"label must be one of {tuple(CLASS_LABELS)}, got {self.label!r}")
        if self.classes is None:
            self.classes = len(CLASS_LABELS[self.label][1])
        if self.classes < 2:
            raise ValueError(f"classes must be >= 2, got {self.classes}")

    def targets(self, truths: list[GroundTruth], grid: int) -> Batch:
        field = CLASS_LABELS[self.label][0]
        labels = [getattr(t, field) for t in truths]
        if min(labels) < 0:
            raise ValueError(f"{self.name} needs procedural videos generated with temporal_labels=True ({field} is -1)")
        return {"label": torch.tensor(labels)}

    def build_readout(self, dim: int, grid: int, frames: int, streaming: bool) -> nn.Module:
        _record_build(self, streaming)
        return AttentiveProbe(
            dim,
            grid,
            frames,
            self.classes,
            streaming=streaming,
            width=self.width,
            num_queries=self.num_queries,
            heads=self.heads,
        )

    def outputs(self, readout: nn.Module, features_BTNd: Tensor, batch: Batch) -> Batch:
        return {"logits": readout(features_BTNd)}

    def loss(self, outputs: Batch, batch: Batch) -> Tensor:
        return F.cross_entropy(outputs["logits"], batch["label"])

    def metrics(self, outputs: Batch, batch: Batch) -> dict[str, float]:
        logits, labels = outputs["logits"].numpy(), batch["label"].numpy()
        metrics = {"top1": topk_accuracy(logits, labels, 1)}
        # Top-5 needs more than 5 classes to mean anything; with 4, top-2 is the informative second number.
        for k in (2, 5):
            if self.classes > k:
                metrics[f"top{k}"] = topk_accuracy(logits, labels, k)
        return metrics

    def config(self) -> dict[str, Any]:
        return _readout_config(
            self,
            "attentive_probe",
            self.width,
            streaming="learned queries attend to the last frame's output tokens only",
            all_frames="learned queries attend to all T*N output tokens (time + patch position embeddings)",
        )


@dataclass(kw_only=True, slots=True)
class Depth:
    """Per-pixel depth from the known layer order (objects in [2, 8], background 10)."""

    up: int = 4
    """Output pixels per patch side (the map is grid*up square)."""
    hidden: int = READOUT_WIDTH
    """Readout width: hidden width of the per-patch MLP."""
    name: str = "depth"
    primary: str = "abs_rel"
    higher_is_better: bool = False
    built: list[str] = field(default_factory=list, init=False, repr=False, compare=False)
    """Readings this task has built a readout for ("streaming", "all_frames"), in order."""

    def targets(self, truths: list[GroundTruth], grid: int) -> Batch:
        maps = [frame_grid_sample(t.depth_THW, grid * self.up) for t in truths]
        return {"depth": torch.from_numpy(np.stack(maps)).float()}

    def build_readout(self, dim: int, grid: int, frames: int, streaming: bool) -> nn.Module:
        _record_build(self, streaming)
        return DenseDepthHead(dim, grid, up=self.up, hidden=self.hidden)

    def outputs(self, readout: nn.Module, features_BTNd: Tensor, batch: Batch) -> Batch:
        return {"log_depth": readout(features_BTNd)}

    def loss(self, outputs: Batch, batch: Batch) -> Tensor:
        # Real depth maps hold 0 where the sensor has no reading: those pixels carry no loss.
        valid = batch["depth"] > 0
        return F.l1_loss(outputs["log_depth"][valid], batch["depth"][valid].log())

    def metrics(self, outputs: Batch, batch: Batch) -> dict[str, float]:
        return depth_metrics(outputs["log_depth"].exp().numpy().ravel(), batch["depth"].numpy().ravel())

    def config(self) -> dict[str, Any]:
        per_frame = "per-patch MLP on frame t's output tokens only"
        return _readout_config(
            self,
            "dense_per_patch_head",
            self.hidden,
            streaming=per_frame,
            all_frames=f"the same per-frame dense head ({per_frame}): depth is per frame",
        )


@dataclass(kw_only=True, slots=True)
class PointTracking:
    """Track points queried on frame 0 (half on objects, half on the panning background)."""

    points: int = 16
    """Query points per video."""
    width: int = READOUT_WIDTH
    """Readout width E (the core's outputs are projected to it)."""
    heads: int = 4
    """Attention heads of the query's cross-attention."""
    detach_recurrence: bool = True
    """Streaming: stop gradients through the chain of predicted positions (each step learns to track one frame)."""
    name: str = "point_tracking"
    primary: str = "aj"
    higher_is_better: bool = True
    built: list[str] = field(default_factory=list, init=False, repr=False, compare=False)
    """Readings this task has built a readout for ("streaming", "all_frames"), in order."""

    def __post_init__(self) -> None:
        _check_width(self.width, self.heads)

    def targets(self, truths: list[GroundTruth], grid: int) -> Batch:
        per_video = [point_tracks(t, self.points) for t in truths]
        queries, tracks, visible = (np.stack(x) for x in zip(*per_video))
        return {
            "queries": torch.from_numpy(queries).float(),
            "tracks": torch.from_numpy(tracks).float(),
            "visible": torch.from_numpy(visible),
        }

    def build_readout(self, dim: int, grid: int, frames: int, streaming: bool) -> nn.Module:
        _record_build(self, streaming)
        return PointTrackHead(
            dim,
            grid,
            frames,
            streaming=streaming,
            width=self.width,
            heads=self.heads,
            detach_recurrence=self.detach_recurrence,
        )

    def outputs(self, readout: nn.Module, features_BTNd: Tensor, batch: Batch) -> Batch:
        positions, visibility = readout(features_BTNd, batch["queries"])
        return {"positions": positions, "visibility_logits": visibility}

    def loss(self, outputs: Batch, batch: Batch) -> Tensor:
        visible = batch["visible"].float()
        error_BQT = (outputs["positions"] - batch["tracks"]).abs().sum(-1)
        position_loss = (error_BQT * visible).sum() / visible.sum().clamp(min=1)
        return 10 * position_loss + F.binary_cross_entropy_with_logits(outputs["visibility_logits"], visible)

    def metrics(self, outputs: Batch, batch: Batch) -> dict[str, float]:
        V, Q = batch["visible"].shape[:2]
        return tapvid_metrics(
            query_frame_VQ=np.zeros((V, Q), int),
            gt_occluded_VQT=~batch["visible"].numpy(),
            gt_tracks_VQT2=batch["tracks"].numpy() * TAPVID_SIZE,
            pred_occluded_VQT=outputs["visibility_logits"].numpy() < 0,
            pred_tracks_VQT2=outputs["positions"].numpy() * TAPVID_SIZE,
        )

    def config(self) -> dict[str, Any]:
        return {
            **_readout_config(
                self,
                "point_coordinate_query",
                self.width,
                streaming="recurrent: the position predicted at t-1 (the frame-0 query at t=0), Fourier-encoded, "
                "attends to frame t's output tokens only -> a step of at most a patch, and visibility, at t",
                all_frames="per (point, frame) query (coordinate + frame embedding) attends to all T*N output tokens",
            ),
            "query_frame": 0,
        }


@dataclass(kw_only=True, slots=True)
class BoxTracking:
    """Every object visible in frame 0: its first-frame box is the query, a box per later frame the answer."""

    width: int = READOUT_WIDTH
    """Readout width E (the core's outputs are projected to it)."""
    heads: int = 4
    """Attention heads of the query's cross-attention."""
    detach_recurrence: bool = True
    """Streaming: stop gradients through the chain of predicted boxes (each step learns to track one frame)."""
    name: str = "box_tracking"
    primary: str = "miou"
    higher_is_better: bool = True
    built: list[str] = field(default_factory=list, init=False, repr=False, compare=False)
    """Readings this task has built a readout for ("streaming", "all_frames"), in order."""

    def __post_init__(self) -> None:
        _check_width(self.width, self.heads)

    def targets(self, truths: list[GroundTruth], grid: int) -> Batch:
        boxes, valid = [], []
        for truth in truths:
            H, W = truth.size
            boxes_OT4 = truth.boxes_OT4 / np.array([W, H, W, H], np.float32)
            in_frame_OT = (boxes_OT4[..., 2] > boxes_OT4[..., 0]) & (boxes_OT4[..., 3] > boxes_OT4[..., 1])
            queried_O = truth.visible_OT[:, 0] & in_frame_OT[:, 0]
            boxes.append(boxes_OT4)
            valid.append(in_frame_OT & queried_O[:, None])
        boxes_VOT4 = torch.from_numpy(np.stack(boxes)).float()
        return {"query_boxes": boxes_VOT4[:, :, 0], "boxes": boxes_VOT4, "valid": torch.from_numpy(np.stack(valid))}

    def build_readout(self, dim: int, grid: int, frames: int, streaming: bool) -> nn.Module:
        _record_build(self, streaming)
        return BoxTrackHead(
            dim,
            grid,
            frames,
            streaming=streaming,
            width=self.width,
            heads=self.heads,
            detach_recurrence=self.detach_recurrence,
        )

    def outputs(self, readout: nn.Module, features_BTNd: Tensor, batch: Batch) -> Batch:
        return {"boxes": readout(features_BTNd, batch["query_boxes"])}

    def loss(self, outputs: Batch, batch: Batch) -> Tensor:
        valid = batch["valid"].float()
        error_BQT = (outputs["boxes"] - batch["boxes"]).abs().sum(-1)
        return 10 * (error_BQT * valid).sum() / valid.sum().clamp(min=1)

    def metrics(self, outputs: Batch, batch: Batch) -> dict[str, float]:
        # Frame 0 holds the query itself: score the frames after it.
        scored = batch["valid"][:, :, 1:].numpy()
        pred = outputs["boxes"][:, :, 1:].numpy()[scored]
        gt = batch["boxes"][:, :, 1:].numpy()[scored]
        return {"miou": float(box_iou(pred, gt).mean()) if len(gt) else 0.0, "scored_boxes": float(len(gt))}

    def config(self) -> dict[str, Any]:
        return _readout_config(
            self,
            "box_coordinate_query",
            self.width,
            streaming="recurrent: the box predicted at t-1 (frame-0 box at t=0), Fourier-encoded, attends to "
            "frame t's output tokens only -> box at t",
            all_frames="per (object, frame) query (frame-0 box + frame embedding) attends to all T*N output tokens",
        )


@dataclass(kw_only=True, slots=True)
class CameraPose:
    """Relative camera pose between consecutive frames: the background pan (pure translation)."""

    width: int = READOUT_WIDTH
    """Readout width E (the core's outputs are projected to it)."""
    num_queries: int = 4
    """Learned queries pooling a frame's tokens."""
    heads: int = 4
    """Attention heads of the pooling."""
    name: str = "camera_pose"
    primary: str = "rpe_trans"
    higher_is_better: bool = False
    built: list[str] = field(default_factory=list, init=False, repr=False, compare=False)
    """Readings this task has built a readout for ("streaming", "all_frames"), in order."""

    def __post_init__(self) -> None:
        _check_width(self.width, self.heads)

    def targets(self, truths: list[GroundTruth], grid: int) -> Batch:
        translation = np.stack([np.diff(t.camera_T2, axis=0) for t in truths])
        return {
            "translation": torch.from_numpy(translation).float(),
            # Pure pans: the true in-plane rotation is 0; the head predicts it anyway.
            "rotation": torch.zeros(translation.shape[:2]),
        }

    def build_readout(self, dim: int, grid: int, frames: int, streaming: bool) -> nn.Module:
        _record_build(self, streaming)
        return RelativePoseHead(
            dim, grid, frames, streaming=streaming, width=self.width, heads=self.heads, num_queries=self.num_queries
        )

    def outputs(self, readout: nn.Module, features_BTNd: Tensor, batch: Batch) -> Batch:
        pose_BS3 = readout(features_BTNd)
        return {"translation": pose_BS3[..., :2], "rotation": pose_BS3[..., 2]}

    def loss(self, outputs: Batch, batch: Batch) -> Tensor:
        return F.l1_loss(outputs["translation"], batch["translation"]) + F.l1_loss(
            outputs["rotation"], batch["rotation"]
        )

    def metrics(self, outputs: Batch, batch: Batch) -> dict[str, float]:
        return relative_pose_errors(
            outputs["translation"].reshape(-1, 2).numpy(),
            batch["translation"].reshape(-1, 2).numpy(),
            outputs["rotation"].reshape(-1).numpy(),
            batch["rotation"].reshape(-1).numpy(),
        )

    def config(self) -> dict[str, Any]:
        return {
            **_readout_config(
                self,
                "per_frame_pose_pool",
                self.width,
                streaming="learned queries pool frame t's output tokens only -> motion from t-1 to t "
                "(no pairing with frame t-1)",
                all_frames="per pair, learned queries + frame embedding attend to all T*N output tokens",
            ),
            "translation_unit": "video pixels per frame",
        }


TASKS: dict[str, Callable[..., Task]] = {
    "classification": Classification,
    "classify_speed": partial(Classification, label="speed", name="classify_speed"),
    "classify_order": partial(Classification, label="order", name="classify_order"),
    "depth": Depth,
    "point_tracking": PointTracking,
    "box_tracking": BoxTracking,
    "camera_pose": CameraPose,
}


def build_task(name: str, **overrides: Any) -> Task:
    """The task of that name; overrides set its fields (e.g. classes for a dataset's own labels)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name](**overrides)


def _fields(task: Any) -> dict[str, Any]:
    return {k: v for k, v in asdict(task).items() if k not in ("name", "primary", "higher_is_better", "built")}


def _check_width(width: int, heads: int) -> None:
    if heads < 1:
        raise ValueError(f"heads must be >= 1, got {heads}")
    if width < 1 or width % heads:
        raise ValueError(f"width must be a positive multiple of heads ({heads}), got {width}")


def _record_build(task: Any, streaming: bool) -> None:
    reading = "streaming" if streaming else "all_frames"
    if reading not in task.built:
        task.built.append(reading)


def _readout_config(task: Any, kind: str, width: int, *, streaming: str, all_frames: str) -> dict[str, Any]:
    """What a report records about a task's readout: both readings, their width and which ones ran."""
    return {
        "readout": kind,
        "readout_width": width,
        "readout_streaming": streaming,
        "readout_all_frames": all_frames,
        "readouts_built": list(task.built),
        **_fields(task),
    }


def point_tracks(truth: GroundTruth, points: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact tracks of points queried on frame 0: (queries (Q, 2), tracks (Q, T, 2), visible (Q, T)), normalized.

    Half the points lie on objects (which translate rigidly), half on the
    background (which moves by minus the camera offset). A point is visible
    where it is inside the frame and the surface it lies on is the one seen
    there (per-pixel masks of the generator).
    """
    if truth.masks_THW is None:
        raise ValueError("point tracking needs procedural videos generated with dense=True")
    rng = np.random.default_rng(truth.seed)
    masks_THW = truth.masks_THW
    T, H, W = masks_THW.shape
    queries, tracks, surfaces = [], [], []
    for q in range(points):
        surface = 1 + q % truth.num_objects if q < points // 2 else 0
        rows, cols = np.nonzero(masks_THW[0] == surface)
        if len(rows) == 0:
            surface = 0
            rows, cols = np.nonzero(masks_THW[0] == 0)
        pick = rng.integers(len(rows))
        start_2 = np.array([cols[pick] + 0.5, rows[pick] + 0.5])
        if surface:
            motion_T2 = truth.centers_OT2[surface - 1] - truth.centers_OT2[surface - 1, 0]
        else:
            motion_T2 = -(truth.camera_T2 - truth.camera_T2[0])
        queries.append(start_2)
        tracks.append(start_2 + motion_T2)
        surfaces.append(surface)
    tracks_QT2 = np.stack(tracks)
    x_QT, y_QT = tracks_QT2[..., 0], tracks_QT2[..., 1]
    inside_QT = (x_QT >= 0) & (x_QT < W) & (y_QT >= 0) & (y_QT < H)
    rows_QT = np.clip(np.floor(y_QT).astype(int), 0, H - 1)
    cols_QT = np.clip(np.floor(x_QT).astype(int), 0, W - 1)
    seen_QT = masks_THW[np.arange(T)[None, :], rows_QT, cols_QT] == np.array(surfaces)[:, None]
    scale_2 = np.array([W, H], np.float32)
    return np.stack(queries) / scale_2, tracks_QT2 / scale_2, inside_QT & seen_QT
