"""Procedural eval videos with exact labels, and their frozen tokens, cached once.

Shape legend: V videos, T frames, N patch tokens per frame, D encoder width,
C=3 channels, H x W pixels.

The dataset is a function of its ``ProceduralConfig``; it is written once
under the cache directory, and its hash (over the files' bytes) goes into
every report. Encoder tokens are cached per (dataset hash, encoder hash,
image size), so every task and every variant of a suite reads the same
tokens and the encoder runs once per dataset.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from data_shards import GroundTruth, decode_video, file_sha256, generate_dataset
from data_shards.io import output_dir, write_bytes_atomic, write_text_atomic
from data_shards.procedural import check_order_events
from eval.features import encode_frames
from pretrain.encoder import FrozenEncoder
from pretrain.encoder.weights import default_cache_root

log = logging.getLogger(__name__)

# Bump when the way videos are generated or tokens are stored changes.
_CACHE_VERSION = "eval-procedural-v2"


def default_cache_dir() -> Path:
    """`$PRETRAIN_CACHE/eval`, else `~/.cache/pretrain-video/eval`."""
    return default_cache_root() / "eval"


@dataclass(kw_only=True, slots=True)
class ProceduralConfig:
    """Size of the procedural eval set; the demo budget's defaults encode 1024 frames."""

    train_videos: int = 48
    """Videos the readouts are trained on."""
    test_videos: int = 16
    """Held-out videos the metrics are computed on."""
    frames: int = 16
    """Frames per video (T)."""
    size: int = 112
    """Frame height and width in pixels (even); the encoder resizes to its image size."""
    num_objects: int = 3
    """Moving objects per video."""
    seed: int = 1000
    """Dataset seed (independent of the readout seed, so seeds vary the readout, not the data)."""
    temporal_labels: bool = True
    """Vary speed and flash order inside the same videos, for the classify_speed / classify_order tasks."""
    anchor_frame: str = "middle"
    """Frame at which object positions are drawn uniformly: "middle" or "last" (then no late frame tells
    direction or speed: the data-efficiency experiment's setting)."""
    pan_speed: tuple[float, float] = (0.5, 1.5)
    """Camera pan speed range, pixels per frame."""
    order_events: str = "object"
    """The two ordered events of classify_order: "object" flashes or whole-"frame" brightness events
    (data_shards.procedural.ORDER_EVENTS)."""

    def __post_init__(self) -> None:
        for name in ("train_videos", "test_videos", "num_objects"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.frames < 2:
            raise ValueError(f"frames must be >= 2 (pose and tracking need pairs), got {self.frames}")
        if self.size < 16 or self.size % 2:
            raise ValueError(f"size must be even and >= 16, got {self.size}")
        check_order_events(self.order_events)
        if self.temporal_labels and (self.frames < 4 or self.num_objects < 2):
            raise ValueError(
                f"temporal_labels needs frames >= 4 and num_objects >= 2, got {self.frames} and {self.num_objects}"
            )


@dataclass(slots=True)
class ClipSet:
    """Videos with exact ground truth and their frozen tokens; the first num_train are the training split."""

    truths: list[GroundTruth]
    tokens_VTND: Tensor
    """Frozen encoder tokens, float16 (as cached; cast to float32 per batch)."""
    num_train: int
    dataset_hash: str
    description: dict[str, Any]
    targets: dict[str, Tensor] | None = None
    """Ready targets of a dataset read from a standard format (truths is then empty); None for procedural."""
    task: str | None = None
    """The one task a format dataset's targets are for; None: any procedural task."""
    task_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Task fields the data fixes (e.g. the number of classes)."""

    @property
    def train_idx(self) -> Tensor:
        return torch.arange(self.num_train)

    @property
    def test_idx(self) -> Tensor:
        return torch.arange(self.num_train, len(self.tokens_VTND))


# Fields added after caches existed: part of the key only when set, so earlier caches stay valid.
_LATER_FIELDS = {"anchor_frame": "middle", "pan_speed": (0.5, 1.5), "order_events": "object"}


def _config_defaults(cfg: ProceduralConfig) -> set[str]:
    """The later fields of cfg left at their defaults (not passed on, so old videos are reproduced)."""
    return {
        name
        for name, default in _LATER_FIELDS.items()
        if (tuple(getattr(cfg, name)) if isinstance(default, tuple) else getattr(cfg, name)) == default
    }


def _config_key(cfg: ProceduralConfig) -> str:
    fields = dataclasses.asdict(cfg)
    for name in _config_defaults(cfg):
        del fields[name]
    record = json.dumps({**fields, "version": _CACHE_VERSION}, sort_keys=True)
    return hashlib.sha256(record.encode()).hexdigest()[:16]


def _is_generated(directory: Path) -> bool:
    """A finished procedural set: its ``done`` file is written last, inside the unpublished directory."""
    return (directory / "done").is_file()


def _generate_once(cfg: ProceduralConfig, directory: Path) -> None:
    """Write the dataset into directory once, published whole (``data_shards.io.output_dir``)."""
    if _is_generated(directory):
        return
    with output_dir(directory, is_ours=_is_generated, what="procedural eval set") as tmp:
        generate_dataset(
            tmp,
            cfg.train_videos + cfg.test_videos,
            cfg.seed,
            frames=cfg.frames,
            size=(cfg.size, cfg.size),
            num_objects=cfg.num_objects,
            dense=True,
            temporal_labels=cfg.temporal_labels,
            **{name: getattr(cfg, name) for name in _LATER_FIELDS if name not in _config_defaults(cfg)},
        )
        write_text_atomic(tmp / "done", json.dumps(dataclasses.asdict(cfg)) + "\n")


def dataset_hash(paths: list[Path]) -> str:
    """SHA-256 over the names and bytes of every file of a dataset."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(f"{path.name}:{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def cached_tokens(videos: list[Path], data_hash: str, encoder: FrozenEncoder, cache_dir: Path) -> Tensor:
    """Frozen tokens of equally long videos, (V, T, N, D) float16, encoded once per (dataset, encoder)."""
    path = cache_dir / "tokens" / f"{data_hash[:16]}-{encoder.weights_hash}-{encoder.image_size}.safetensors"
    if path.is_file():
        log.info("tokens of %d videos from cache %s", len(videos), path)
        return load_file(path)["tokens"]
    log.info("encoding %d videos with %s (cached afterwards in %s)", len(videos), encoder.name, path)
    tokens = []
    for video in videos:
        frames_THWC, _ = decode_video(video)
        frames_1TCHW = torch.from_numpy(frames_THWC).permute(0, 3, 1, 2)[None]
        tokens.append(encode_frames(encoder, frames_1TCHW)[0].to(torch.float16))
    tokens_VTND = torch.stack(tokens).contiguous()
    meta = {"dataset_hash": data_hash, "encoder": encoder.name, "encoder_hash": encoder.weights_hash}
    write_bytes_atomic(path, safetensors_bytes({"tokens": tokens_VTND}, metadata=meta))
    return tokens_VTND


def load_procedural(cfg: ProceduralConfig, encoder: FrozenEncoder, cache_dir: Path | None = None) -> ClipSet:
    """Generate (once) the procedural set of ``cfg`` and return it with its frozen tokens."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    directory = cache_dir / "procedural" / _config_key(cfg)
    _generate_once(cfg, directory)
    videos = sorted(directory.glob("proc-*.mp4"))
    expected = cfg.train_videos + cfg.test_videos
    if len(videos) != expected:
        raise ValueError(f"{directory} holds {len(videos)} videos, expected {expected}; delete it to regenerate")
    truths = [GroundTruth.from_json(v.with_suffix(".json").read_text()) for v in videos]
    data_hash = dataset_hash([*videos, *(v.with_suffix(".json") for v in videos)])
    tokens_VTND = cached_tokens(videos, data_hash, encoder, cache_dir)
    description = {"kind": "procedural", **dataclasses.asdict(cfg), "dir": str(directory), "hash": data_hash}
    return ClipSet(truths, tokens_VTND, cfg.train_videos, data_hash, description)


def frame_grid_sample(array_THW: np.ndarray, resolution: int) -> np.ndarray:
    """Nearest samples of a per-pixel map at the centres of a resolution x resolution grid, (T, R, R)."""
    _, H, W = array_THW.shape
    rows = np.minimum(((np.arange(resolution) + 0.5) * H / resolution).astype(int), H - 1)
    cols = np.minimum(((np.arange(resolution) + 0.5) * W / resolution).astype(int), W - 1)
    return array_THW[:, rows][:, :, cols]
