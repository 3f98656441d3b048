"""Standard-format datasets as ``--data KIND:PATH``: frames and exact targets for one task, then frozen tokens.

Shape legend: V clips, T frames, N patch tokens, D encoder width, Q query
points or objects, U depth-map side, S = T - 1 frame pairs, C = 3 channels,
H x W pixels, 2 = (x, y), 4 = box (x0, y0, x1, y1).

Each kind maps onto one task and reuses that task's readout and metrics
through the same feature path as the procedural set:

| kind | PATH | task |
|---|---|---|
| ssv2 | root with labels.json, train.json, validation.json and the <id>.webm videos | classification |
| kinetics | a CSV (label, youtube_id, time_start, time_end[, split]); clips beside it or in videos/ | classification |
| tapvid | a TAP-Vid .pkl or .npz | point_tracking |
| scannet | a scene folder (color/, depth/) or a folder of scenes | depth |
| mot | a sequence folder (img1/*.jpg, gt/gt.txt) or a folder of sequences | box_tracking |
| nuscenes | a scene folder (ego_pose.json, frames/*.jpg in timestamp order) or a folder of scenes | camera_pose |

Videos are decoded with PyAV (``data_shards.decode_video``) and sampled to
T frames; every frame is resized to the export's image size before the
frozen encoder. Sequences (TAP-Vid, ScanNet, MOT, NuScenes) are cut into
non-overlapping clips of T frames (T shrinks to the shortest sequence). The
train/test split is the dataset's own where it ships one (SSv2 train /
validation, a Kinetics split column), else the last quarter of the clips.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from data_shards import decode_video
from eval.data import ClipSet, dataset_hash, frame_grid_sample
from eval.features import encode_frames
from eval.formats import (
    LabeledVideo,
    read_kinetics_csv,
    read_mot_boxes,
    read_nuscenes_poses,
    read_scannet_scene,
    read_ssv2,
    read_tapvid,
)
from eval.tasks import Depth, PointTracking
from pretrain.encoder import FrozenEncoder

log = logging.getLogger(__name__)

FORMAT_TASKS: dict[str, str] = {
    "ssv2": "classification",
    "kinetics": "classification",
    "tapvid": "point_tracking",
    "scannet": "depth",
    "mot": "box_tracking",
    "nuscenes": "camera_pose",
}
"""The task each standard format is evaluated on."""

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass(slots=True)
class FormatClips:
    """Equal-length clips of one format before encoding; the first num_train are the training split."""

    frames: list[np.ndarray]
    """Per clip: uint8 RGB frames_THWC (sizes may differ between clips)."""
    targets: dict[str, np.ndarray]
    """Task targets stacked over clips, in the task's batch layout."""
    num_train: int
    files: list[Path]
    """Every file read, for the dataset hash."""
    task_overrides: dict[str, Any]
    notes: dict[str, Any]


def parse_data(spec: str) -> tuple[str, Path] | None:
    """``KIND:PATH`` -> (kind, path); None for ``procedural``. Raises ValueError for an unknown kind."""
    if spec == "procedural":
        return None
    kind, sep, path = spec.partition(":")
    if not sep or kind not in FORMAT_TASKS or not path:
        raise ValueError(
            f"--data must be 'procedural' or KIND:PATH with KIND one of {', '.join(FORMAT_TASKS)}, got {spec!r}"
        )
    return kind, Path(path)


def check_task(kind: str, task: str) -> None:
    """A clear error when the task is not the one this format carries labels for."""
    if FORMAT_TASKS[kind] != task:
        raise ValueError(f"--data {kind}:... carries {FORMAT_TASKS[kind]} labels; it cannot run --task {task}")


def load_format(
    kind: str, path: Path, task: str, encoder: FrozenEncoder, grid: int, frames: int | None = None
) -> ClipSet:
    """Read a standard-format dataset for ``task``, encode its clips and return them as a ClipSet."""
    check_task(kind, task)
    if not path.exists():
        raise FileNotFoundError(f"--data {kind}: {path} does not exist")
    clip_frames = frames if frames is not None else 16
    if clip_frames < 2:
        raise ValueError(f"frames must be >= 2, got {clip_frames}")
    clips = _READERS[kind](path, clip_frames, grid)
    if clips.num_train < 1 or clips.num_train >= len(clips.frames):
        raise ValueError(
            f"{kind}:{path}: need at least one training and one test clip, "
            f"got {clips.num_train} train of {len(clips.frames)}"
        )
    tokens_VTND = torch.stack([_encode(encoder, f) for f in clips.frames]).contiguous()
    data_hash = dataset_hash(clips.files)
    description = {
        "kind": kind,
        "path": str(path),
        "hash": data_hash,
        "train_videos": clips.num_train,
        "test_videos": len(clips.frames) - clips.num_train,
        "frames": int(tokens_VTND.shape[1]),
        "size": encoder.image_size,
        **clips.notes,
    }
    targets = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in clips.targets.items()}
    log.info("%s: %d clips of %d frames for %s", kind, len(clips.frames), tokens_VTND.shape[1], task)
    return ClipSet([], tokens_VTND, clips.num_train, data_hash, description, targets, task, clips.task_overrides)


def resize_frames(frames_THWC: np.ndarray, size: int) -> Tensor:
    """uint8 frames to (T, C, size, size) uint8, with the encoder's own resampling (bilinear, antialiased)."""
    frames_TCHW = torch.from_numpy(np.ascontiguousarray(frames_THWC)).permute(0, 3, 1, 2)
    if frames_TCHW.shape[-2:] == (size, size):
        return frames_TCHW
    x = F.interpolate(frames_TCHW.float(), size=(size, size), mode="bilinear", antialias=True)
    return x.round().clamp(0, 255).to(torch.uint8)


def _encode(encoder: FrozenEncoder, frames_THWC: np.ndarray) -> Tensor:
    return encode_frames(encoder, resize_frames(frames_THWC, encoder.image_size)[None])[0].to(torch.float16)


def _last_quarter_split(n: int) -> int:
    """Training clips when the data ships no split: all but the last quarter (at least one test clip)."""
    return n - max(1, n // 4)


def _windows(length: int, frames: int) -> list[int]:
    """Starts of the non-overlapping windows of ``frames`` frames in a sequence of ``length``."""
    return list(range(0, length - frames + 1, frames))


def _clip_length(lengths: list[int], frames: int, source: Path) -> int:
    shortest = min(lengths)
    if shortest < 2:
        raise ValueError(f"{source}: a sequence has {shortest} frame(s); need at least 2")
    if shortest < frames:
        log.warning("%s: clips shortened to %d frames (the shortest sequence)", source, shortest)
    return min(frames, shortest)


def _sequence_dirs(path: Path, marker: Callable[[Path], bool]) -> list[Path]:
    """The path itself when it is one sequence (marker true), else its sub-folders that are, sorted."""
    if marker(path):
        return [path]
    found = sorted(p for p in path.iterdir() if p.is_dir() and marker(p))
    if not found:
        raise ValueError(f"{path}: neither a sequence folder nor a folder of them")
    return found


def _images(folder: Path) -> list[Path]:
    images = [p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES]
    # Numeric names sort by number (ScanNet writes 0.jpg ... 10.jpg), others by name.
    return sorted(images, key=lambda p: (int(p.stem), "") if p.stem.isdigit() else (float("inf"), p.name))


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def _sample_video(path: Path, frames: int) -> np.ndarray:
    """T frames evenly spread over the whole video (repeating frames of a shorter one)."""
    frames_THWC, _ = decode_video(path)
    if len(frames_THWC) == 0:
        raise ValueError(f"{path}: no frames decoded")
    pick = np.linspace(0, len(frames_THWC) - 1, frames).round().astype(int)
    return frames_THWC[pick]


def _labeled_videos(samples: list[LabeledVideo], num_train: int, frames: int, files: list[Path]) -> FormatClips:
    """Classification clips from labelled videos; missing files are skipped with a warning (Kinetics loses some)."""
    kept, kept_train = [], 0
    for index, sample in enumerate(samples):
        if not sample.path.is_file():
            log.warning("skipping %s: file not found", sample.path)
            continue
        kept.append(sample)
        kept_train += index < num_train
    if not kept:
        raise FileNotFoundError(f"none of the {len(samples)} videos named by the annotations exist")
    classes = 1 + max(s.label for s in samples)
    return FormatClips(
        frames=[_sample_video(s.path, frames) for s in kept],
        targets={"label": np.array([s.label for s in kept], np.int64)},
        num_train=kept_train,
        files=[*files, *(s.path for s in kept)],
        task_overrides={"classes": max(classes, 2)},
        notes={"classes": classes},
    )


def _read_ssv2(root: Path, frames: int, grid: int) -> FormatClips:
    labels_dir = root / "labels" if (root / "labels" / "labels.json").is_file() else root
    video_dir = next(
        (d for d in (root / "20bn-something-something-v2", root / "videos") if d.is_dir()),
        root,
    )
    labels = labels_dir / "labels.json"
    train, test = labels_dir / "train.json", labels_dir / "validation.json"
    for needed in (labels, train, test):
        if not needed.is_file():
            raise FileNotFoundError(f"ssv2: {needed} not found (root needs labels.json, train.json, validation.json)")
    train_samples = read_ssv2(train, labels, video_dir)
    test_samples = read_ssv2(test, labels, video_dir)
    return _labeled_videos([*train_samples, *test_samples], len(train_samples), frames, [labels, train, test])


def _read_kinetics(csv_path: Path, frames: int, grid: int) -> FormatClips:
    video_dir = csv_path.parent / "videos" if (csv_path.parent / "videos").is_dir() else csv_path.parent
    samples = read_kinetics_csv(csv_path, video_dir)
    with open(csv_path, newline="") as f:
        splits = [row.get("split") for row in csv.DictReader(f)]
    if any(s == "train" for s in splits) and any(s not in ("train", None) for s in splits):
        # Class indices come from every row, so train and test agree on them.
        order = sorted(range(len(samples)), key=lambda i: splits[i] != "train")
        samples = [samples[i] for i in order]
        num_train = sum(s == "train" for s in splits)
    else:
        num_train = _last_quarter_split(len(samples))
    return _labeled_videos(samples, num_train, frames, [csv_path])


def _read_tapvid(path: Path, frames: int, grid: int) -> FormatClips:
    videos = read_tapvid(path)
    T = _clip_length([len(v.frames_THWC) for v in videos], frames, path)
    wanted = PointTracking().points
    clips = []
    for video in videos:
        for start in _windows(len(video.frames_THWC), T):
            tracks_QT2 = video.tracks_QT2[:, start : start + T]
            visible_QT = video.visible_QT[:, start : start + T]
            # The readout queries on frame 0 of the clip: keep the points visible there.
            queried = visible_QT[:, 0]
            if queried.any():
                clips.append((video.frames_THWC[start : start + T], tracks_QT2[queried], visible_QT[queried]))
    if not clips:
        raise ValueError(f"{path}: no clip has a point visible on its first frame")
    Q = min(wanted, *(len(c[1]) for c in clips))
    return FormatClips(
        frames=[c[0] for c in clips],
        targets={
            "queries": np.stack([c[1][:Q, 0] for c in clips]).astype(np.float32),
            "tracks": np.stack([c[1][:Q] for c in clips]).astype(np.float32),
            "visible": np.stack([c[2][:Q] for c in clips]),
        },
        num_train=_last_quarter_split(len(clips)),
        files=[path],
        task_overrides={"points": Q},
        notes={"points": Q, "query_frame": 0},
    )


def _read_scannet(path: Path, frames: int, grid: int) -> FormatClips:
    scenes = [read_scannet_scene(d) for d in _sequence_dirs(path, lambda p: (p / "color").is_dir())]
    T = _clip_length([len(s.color_paths) for s in scenes], frames, path)
    up = Depth().up
    clip_frames, depths, files = [], [], []
    for scene in scenes:
        files += [*scene.color_paths, *scene.depth_paths]
        for start in _windows(len(scene.color_paths), T):
            index = range(start, start + T)
            clip_frames.append(np.stack([scene.color(i) for i in index]))
            depth_THW = np.stack([scene.depth_m(i) for i in index])
            depths.append(frame_grid_sample(depth_THW, grid * up))
    return FormatClips(
        frames=clip_frames,
        targets={"depth": np.stack(depths).astype(np.float32)},
        num_train=_last_quarter_split(len(clip_frames)),
        files=files,
        task_overrides={},
        notes={"depth_unit": "metres", "invalid_depth": "0 (no loss, not scored)"},
    )


def _mot_gt(sequence: Path) -> Path:
    return sequence / "gt" / "gt.txt" if (sequence / "gt" / "gt.txt").is_file() else sequence / "gt.txt"


def _read_mot(path: Path, frames: int, grid: int) -> FormatClips:
    sequences = _sequence_dirs(path, lambda p: (p / "img1").is_dir() and _mot_gt(p).is_file())
    images = {s: _images(s / "img1") for s in sequences}
    T = _clip_length([len(v) for v in images.values()], frames, path)
    clips, files = [], []
    for sequence in sequences:
        files += [_mot_gt(sequence), *images[sequence]]
        tracks = read_mot_boxes(_mot_gt(sequence), num_frames=len(images[sequence]))
        for start in _windows(len(images[sequence]), T):
            frames_THWC = np.stack([_read_image(p) for p in images[sequence][start : start + T]])
            H, W = frames_THWC.shape[1:3]
            scale_4 = np.array([W, H, W, H], np.float32)
            # Objects of the clip: the tracks with a box on its first frame (the query).
            boxes = [b[start : start + T] / scale_4 for b in tracks.values() if not np.isnan(b[start]).any()]
            if boxes:
                clips.append((frames_THWC, np.clip(np.stack(boxes), 0, 1)))
    if not clips:
        raise ValueError(f"{path}: no clip has a box on its first frame")
    max_objects = max(len(c[1]) for c in clips)
    boxes_VOT4 = np.zeros((len(clips), max_objects, T, 4), np.float32)
    # Padding objects query the whole frame and are never scored.
    boxes_VOT4[..., 2:] = 1.0
    present_VOT = np.zeros((len(clips), max_objects, T), bool)
    for v, (_, boxes_OT4) in enumerate(clips):
        seen_OT = ~np.isnan(boxes_OT4).any(-1)
        boxes_VOT4[v, : len(boxes_OT4)][seen_OT] = boxes_OT4[seen_OT]
        present_VOT[v, : len(boxes_OT4)] = seen_OT
    area_VOT = (boxes_VOT4[..., 2] > boxes_VOT4[..., 0]) & (boxes_VOT4[..., 3] > boxes_VOT4[..., 1])
    return FormatClips(
        frames=[c[0] for c in clips],
        targets={"query_boxes": boxes_VOT4[:, :, 0], "boxes": boxes_VOT4, "valid": present_VOT & area_VOT},
        num_train=_last_quarter_split(len(clips)),
        files=files,
        task_overrides={},
        notes={"max_objects": max_objects},
    )


def _read_nuscenes(path: Path, frames: int, grid: int) -> FormatClips:
    scenes = _sequence_dirs(path, lambda p: (p / "ego_pose.json").is_file() and (p / "frames").is_dir())
    images = {s: _images(s / "frames") for s in scenes}
    T = _clip_length([len(v) for v in images.values()], frames, path)
    clip_frames, translations, rotations, files = [], [], [], []
    for scene in scenes:
        poses = read_nuscenes_poses(scene / "ego_pose.json")
        if len(poses.rotation_deg_S) + 1 != len(images[scene]):
            raise ValueError(
                f"{scene}: {len(poses.rotation_deg_S) + 1} ego poses but {len(images[scene])} images in frames/"
            )
        files += [scene / "ego_pose.json", *images[scene]]
        for start in _windows(len(images[scene]), T):
            clip_frames.append(np.stack([_read_image(p) for p in images[scene][start : start + T]]))
            # The pose head predicts planar motion: (x, y) in the previous frame's ego axes and the turn.
            translations.append(poses.translation_S3[start : start + T - 1, :2])
            rotations.append(poses.rotation_deg_S[start : start + T - 1])
    return FormatClips(
        frames=clip_frames,
        targets={
            "translation": np.stack(translations).astype(np.float32),
            "rotation": np.stack(rotations).astype(np.float32),
        },
        num_train=_last_quarter_split(len(clip_frames)),
        files=files,
        task_overrides={},
        notes={"translation_unit": "metres (ego x, y)", "rotation_unit": "degrees"},
    )


_READERS: dict[str, Callable[[Path, int, int], FormatClips]] = {
    "ssv2": _read_ssv2,
    "kinetics": _read_kinetics,
    "tapvid": _read_tapvid,
    "scannet": _read_scannet,
    "mot": _read_mot,
    "nuscenes": _read_nuscenes,
}
