"""Readers for the standard datasets' label formats, into small typed records.

Shape legend: T frames, Q query points, H x W pixels, 2 = (x, y), 4 = box
(x0, y0, x1, y1) in pixels.

Each reader parses the files a benchmark ships (no download, no decoding of
videos it only names) and raises ValueError naming the file and the entry
it cannot read. Videos named by a record are decoded later with
``data_shards.decode_video``.

- SSv2: ``labels.json`` ({template: "index"}) + an annotation list
  ([{"id", "template" or "label"}]) + ``<id>.webm``.
- Kinetics: CSV with label, youtube_id, time_start, time_end[, split];
  clips named ``<youtube_id>_<start:06d>_<end:06d>.mp4``.
- TAP-Vid: pickled dict {name: {"video", "points", "occluded"}} (DAVIS
  layout; points normalized to [0, 1]) or a list of such records, or an .npz
  with the same keys. Pickles are read by ``SafeUnpickler``, which builds
  only builtin containers and numpy arrays: a crafted file cannot run code.
- ScanNet-style folders: ``<scene>/color/<i>.jpg`` + ``<scene>/depth/<i>.png``
  (uint16 millimetres).
- MOT-style boxes: ``gt.txt`` rows frame,id,x,y,w,h[,conf,class,visibility]
  (1-based frames), the layout Waymo's tracking labels are usually exported to.
- NuScenes-style poses: ``ego_pose.json`` [{"timestamp", "translation",
  "rotation" (w, x, y, z)}], turned into consecutive relative poses.
"""

from __future__ import annotations

import codecs
import csv
import json
import pickle
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

try:
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # numpy < 1.26 has no numpy._core
    from numpy.core import multiarray as _multiarray
    from numpy.core import numeric as _numeric


@dataclass(frozen=True, slots=True)
class LabeledVideo:
    """A video file and its class."""

    path: Path
    label: int
    label_name: str


def read_ssv2(annotations: Path, labels: Path, video_dir: Path) -> list[LabeledVideo]:
    """Something-Something v2: class indices from labels.json, one <id>.webm per annotation."""
    label_index = {name: int(index) for name, index in json.loads(Path(labels).read_text()).items()}
    samples = []
    for entry in json.loads(Path(annotations).read_text()):
        # SSv2's templates mark the object slots with brackets; labels.json keys drop them.
        name = entry.get("template", entry.get("label", "")).replace("[", "").replace("]", "")
        if name not in label_index:
            raise ValueError(f"{annotations}: video {entry.get('id')!r} has template {name!r}, not in {labels}")
        samples.append(LabeledVideo(Path(video_dir) / f"{entry['id']}.webm", label_index[name], name))
    return samples


def read_kinetics_csv(csv_path: Path, video_dir: Path, split: str | None = None) -> list[LabeledVideo]:
    """Kinetics-style CSV; classes are indexed in sorted order of the labels present."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    missing = {"label", "youtube_id", "time_start", "time_end"} - set(rows[0] if rows else {})
    if missing:
        raise ValueError(f"{csv_path}: missing columns {sorted(missing)}")
    if split is not None:
        rows = [r for r in rows if r.get("split") == split]
    names = sorted({r["label"] for r in rows})
    return [
        LabeledVideo(
            Path(video_dir) / f"{r['youtube_id']}_{int(r['time_start']):06d}_{int(r['time_end']):06d}.mp4",
            names.index(r["label"]),
            r["label"],
        )
        for r in rows
    ]


@dataclass(frozen=True, slots=True)
class PointTrackVideo:
    name: str
    frames_THWC: np.ndarray
    """uint8 RGB frames."""
    tracks_QT2: np.ndarray
    """float32 point positions normalized to [0, 1] (x, y)."""
    visible_QT: np.ndarray
    """bool: the point is visible."""


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle names a global that is not plain data (a function or class that could run code)."""


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as protocol 2 uses it for bytes (array buffers); any other codec is refused."""
    if encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"_codecs.encode with encoding {encoding!r}; only latin1 (bytes) is plain data")
    return codecs.encode(text, encoding)


# numpy 1.x pickles arrays under numpy.core, numpy 2.x under numpy._core; both
# names map to this numpy's objects, so numpy.core (a deprecated alias in 2.x)
# is never imported. _frombuffer is what protocol 5 uses for contiguous arrays.
_NUMPY_CORE_GLOBALS: dict[tuple[str, str], Any] = {
    ("multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("multiarray", "scalar"): _multiarray.scalar,
    ("numeric", "_frombuffer"): _numeric._frombuffer,
}
_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    **{
        (f"{package}.{module}", name): obj
        for package in ("numpy.core", "numpy._core")
        for (module, name), obj in _NUMPY_CORE_GLOBALS.items()
    },
    ("_codecs", "encode"): _latin1_encode,
    # Protocols 0-2 name builtins by their Python 2 module, __builtin__.
    **{
        (module, builtin.__name__): builtin
        for module in ("builtins", "__builtin__")
        for builtin in (set, frozenset, complex, bytearray)
    },
    ("collections", "OrderedDict"): OrderedDict,
}
"""Every global a pickle of builtin containers, scalars and numpy arrays needs (protocols 2 to 5)."""


class SafeUnpickler(pickle.Unpickler):
    """An Unpickler that builds plain data only: builtin containers and scalars, numpy arrays and dtypes.

    ``pickle.load`` calls whatever callable a file names, so a crafted file runs
    code as the user. Dicts, lists, tuples, strings, numbers and bytes need no
    global at all; numpy arrays need the few in ``_SAFE_GLOBALS``, none of
    which reads or writes files or imports modules. Any other global (os.system,
    eval, a class with a custom ``__reduce__``) raises ``UnsafePickleError``
    before it is called.
    """

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to load global {module}.{name}: only builtin containers and numpy arrays are read"
            ) from None


def safe_load_pickle(f: BinaryIO, source: Path) -> Any:
    """Unpickle plain data from ``f``; any failure is a ValueError naming ``source``."""
    try:
        return SafeUnpickler(f).load()
    except UnsafePickleError as err:
        raise ValueError(f"{source}: not a plain-data pickle ({err}); it was not loaded") from err
    # A file that is not a pickle fails in many ways (bad opcode, EOF, wrong
    # argument types for the allowed constructors); none of them ran code.
    except Exception as err:
        raise ValueError(f"{source}: not a readable pickle ({type(err).__name__}: {err})") from err


def _tapvid_record(name: str, record: Any, source: Path) -> PointTrackVideo:
    if not isinstance(record, dict):
        raise ValueError(f"{source}: video {name!r} is a {type(record).__name__}, not a dict of arrays")
    for key in ("video", "points", "occluded"):
        if key not in record:
            raise ValueError(f"{source}: video {name!r} lacks {key!r} (has {sorted(record)})")
    frames = np.asarray(record["video"], np.uint8)
    tracks = np.asarray(record["points"], np.float32)
    occluded = np.asarray(record["occluded"], bool)
    if tracks.shape[:2] != occluded.shape or tracks.shape[1] != len(frames):
        raise ValueError(
            f"{source}: video {name!r}: points {tracks.shape}, occluded {occluded.shape}, {len(frames)} frames"
        )
    return PointTrackVideo(name, frames, tracks, ~occluded)


def read_tapvid(path: Path) -> list[PointTrackVideo]:
    """TAP-Vid DAVIS-style pickle ({name: record} or a list of records) or .npz of one video.

    Pickles are read with ``SafeUnpickler`` (plain data only); .npz files with
    ``allow_pickle=False``.
    """
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            return [_tapvid_record(path.stem, dict(data), path)]
    with open(path, "rb") as f:
        data = safe_load_pickle(f, path)
    if isinstance(data, dict):
        items = data.items()
    elif isinstance(data, list | tuple):
        items = ((str(i), r) for i, r in enumerate(data))
    else:
        raise ValueError(f"{path}: holds a {type(data).__name__}, not a dict or list of TAP-Vid videos")
    return [_tapvid_record(str(name), record, path) for name, record in items]


@dataclass(frozen=True, slots=True)
class DepthFrames:
    scene: str
    color_paths: list[Path]
    depth_paths: list[Path]

    def depth_m(self, index: int) -> np.ndarray:
        """Depth of one frame in metres, (H, W) float32; 0 where the sensor has no reading."""
        from PIL import Image

        return np.asarray(Image.open(self.depth_paths[index]), np.float32) / 1000.0

    def color(self, index: int) -> np.ndarray:
        """One frame, (H, W, 3) uint8 RGB."""
        from PIL import Image

        return np.asarray(Image.open(self.color_paths[index]).convert("RGB"))


def read_scannet_scene(scene_dir: Path) -> DepthFrames:
    """Paired color/<i>.jpg and depth/<i>.png, in numeric frame order."""
    scene_dir = Path(scene_dir)
    colors = {int(p.stem): p for p in (scene_dir / "color").glob("*.jpg")}
    depths = {int(p.stem): p for p in (scene_dir / "depth").glob("*.png")}
    unpaired = sorted(set(colors) ^ set(depths))
    if unpaired:
        raise ValueError(f"{scene_dir}: frames {unpaired[:5]} have a color image or a depth map but not both")
    if not colors:
        raise ValueError(f"{scene_dir}: no color/*.jpg frames")
    order = sorted(colors)
    return DepthFrames(scene_dir.name, [colors[i] for i in order], [depths[i] for i in order])


def read_mot_boxes(gt_txt: Path, num_frames: int | None = None) -> dict[int, np.ndarray]:
    """Per track id: boxes_T4 (x0, y0, x1, y1) in pixels over 0-based frames, NaN where the track is absent."""
    rows = np.loadtxt(gt_txt, delimiter=",", ndmin=2)
    if rows.shape[1] < 6:
        raise ValueError(f"{gt_txt}: need at least 6 columns (frame,id,x,y,w,h), got {rows.shape[1]}")
    frames = rows[:, 0].astype(int) - 1
    T = num_frames if num_frames is not None else int(frames.max()) + 1
    tracks: dict[int, np.ndarray] = {}
    for frame, track_id, x, y, w, h in zip(frames, rows[:, 1].astype(int), *rows[:, 2:6].T, strict=True):
        boxes_T4 = tracks.setdefault(int(track_id), np.full((T, 4), np.nan, np.float32))
        boxes_T4[frame] = (x, y, x + w, y + h)
    return tracks


@dataclass(frozen=True, slots=True)
class RelativePoses:
    translation_S3: np.ndarray
    """Translation of frame t in the frame of t-1 (metres), for S = T-1 pairs."""
    rotation_deg_S: np.ndarray
    """Angle of the relative rotation between t-1 and t, degrees."""


def quaternion_matrix(q_wxyz: np.ndarray) -> np.ndarray:
    """Rotation matrix (3, 3) of a unit quaternion (w, x, y, z)."""
    w, x, y, z = np.asarray(q_wxyz, float) / np.linalg.norm(q_wxyz)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def read_nuscenes_poses(ego_pose_json: Path) -> RelativePoses:
    """Consecutive relative poses from NuScenes-style ego poses, in timestamp order."""
    poses = sorted(json.loads(Path(ego_pose_json).read_text()), key=lambda p: p["timestamp"])
    if len(poses) < 2:
        raise ValueError(f"{ego_pose_json}: need at least 2 poses, got {len(poses)}")
    rotations = [quaternion_matrix(np.array(p["rotation"])) for p in poses]
    positions = [np.array(p["translation"], float) for p in poses]
    translation, angle = [], []
    for prev_R, prev_p, R, p in zip(rotations[:-1], positions[:-1], rotations[1:], positions[1:], strict=True):
        translation.append(prev_R.T @ (p - prev_p))
        relative = prev_R.T @ R
        angle.append(np.degrees(np.arccos(np.clip((np.trace(relative) - 1) / 2, -1.0, 1.0))))
    return RelativePoses(np.array(translation, np.float32), np.array(angle, np.float32))
