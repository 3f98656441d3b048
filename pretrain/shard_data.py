"""Training batches from clip shards or feature shards (data.source = 'clips' | 'features').

Shape legend: B clips, T = S + max offset sampled frames, S source frames,
K target frames, L chosen encoder blocks (encoder.feature_layers), N patches,
D encoder width, C=3, H=W=image_size.

Both sources turn a loader batch into the same ``ClipBatch`` the in-memory
path produces, so the objective and the trainer do not care where clips come
from. A clip of T frames at data.frame_stride is sampled by the loader; the
first S frames are the sources and the targets sit at the drawn offsets after
the last source frame. In clip mode only the S + K frames that are used get
encoded. In feature mode there are no pixels: visible target tokens come
from the visible sets the encode pass stored (``check_feature_shards`` holds
their fraction to objective.visible_fraction), or there are none
(objective.visible_fraction = 0, pure forecasting).

What an offset means in time is set by the shard builder's frame rate
(manifest "args" "fps") and the loader's data.frame_stride, and the pixels by
the builder's short side and the loader's centred crop; ``shard_summary``
records that as the run's clip geometry (``pretrain.data.ClipGeometry``),
which the export carries to ``eval.selfsup``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from data_shards import FeatureBatch, LoaderConfig, VideoBatch, clip_loader, feature_loader
from data_shards.features import resolve_feature_dir
from data_shards.loader import list_shards
from pretrain.config import Config, ConfigError, config_to_dict
from pretrain.data import ClipBatch, ClipGeometry, config_geometry
from pretrain.encoder import (
    FrozenEncoder,
    compare_encoder_settings,
    describe_settings_mismatch,
    encoder_settings,
    recorded_encoder_settings,
)

log = logging.getLogger(__name__)


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
    )


def draw_offsets(cfg: Config, batch: int, generator: torch.Generator) -> Tensor:
    """targets_per_clip sorted offsets per clip from objective.target_offsets, (B, K) int64."""
    offsets = torch.tensor(cfg.objective.target_offsets)
    k = cfg.objective.targets_per_clip
    picks = [offsets[torch.randperm(len(offsets), generator=generator)[:k]].sort().values for _ in range(batch)]
    return torch.stack(picks)


def _target_index(cfg: Config, offsets_BK: Tensor) -> Tensor:
    return cfg.objective.source_frames - 1 + offsets_BK


def clip_batch_from_frames(
    cfg: Config, encoder: FrozenEncoder, frames_BTCHW: Tensor, offsets_BK: Tensor, device: torch.device
) -> ClipBatch:
    """Encode the source frames and the target frames a batch uses; keep target pixels for visible tokens."""
    S = cfg.objective.source_frames
    frames_BTCHW = frames_BTCHW.to(device, non_blocking=True)
    offsets_BK = offsets_BK.to(device)
    index_BK = _target_index(cfg, offsets_BK)
    gather = index_BK[:, :, None, None, None].expand(-1, -1, *frames_BTCHW.shape[2:])
    targets_BKCHW = frames_BTCHW.gather(1, gather)
    layers = cfg.encoder.feature_layers
    source_layers_BSLND = None
    if layers:
        source_BSND, source_layers_BSLND = encoder.encode_with_layers(frames_BTCHW[:, :S], layers)
    else:
        source_BSND = encoder.encode(frames_BTCHW[:, :S])
    target_tokens_BKND = encoder.encode(targets_BKCHW)
    return ClipBatch(
        source_BSND, target_tokens_BKND, targets_BKCHW, offsets_BK, source_layers_BSLND=source_layers_BSLND
    )


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


def clip_batch_from_tokens(
    cfg: Config, batch: FeatureBatch, offsets_BK: Tensor, device: torch.device, *, visible: bool
) -> ClipBatch:
    """Split stored tokens into sources and targets; no pixels, visible target tokens from the stored sets."""
    S = cfg.objective.source_frames
    tokens_BTND = batch.tokens_BTND.to(device, non_blocking=True).float()
    offsets_BK = offsets_BK.to(device)
    index_BK = _target_index(cfg, offsets_BK)
    gather = index_BK[:, :, None, None].expand(-1, -1, *tokens_BTND.shape[2:])
    B, K = offsets_BK.shape
    no_pixels = torch.zeros(B, K, 3, 0, 0, dtype=torch.uint8, device=device)
    out = ClipBatch(tokens_BTND[:, :S], tokens_BTND.gather(1, gather), no_pixels, offsets_BK)
    if batch.layers_BTLND is not None:
        out.source_layers_BSLND = batch.layers_BTLND[:, :S].to(device, non_blocking=True).float()
    if visible:
        if batch.visible_idx_BTV is None or batch.visible_tokens_BTVD is None:
            raise ValueError("objective.visible_fraction > 0 but the feature batch carries no visible sets")
        idx_BTV = batch.visible_idx_BTV.to(device, non_blocking=True)
        vis_BTVD = batch.visible_tokens_BTVD.to(device, non_blocking=True).float()
        out.visible_idx_BKV = idx_BTV.gather(1, index_BK[:, :, None].expand(-1, -1, idx_BTV.shape[2]))
        out.visible_tokens_BKVD = vis_BTVD.gather(1, index_BK[:, :, None, None].expand(-1, -1, *vis_BTVD.shape[2:]))
    return out


class ShardBatchSource:
    """Draws training batches from a shard loader; resumable (loader position + offset RNG)."""

    def __init__(self, cfg: Config, encoder: FrozenEncoder, device: torch.device, rank: int, world_size: int) -> None:
        self.cfg = cfg
        self.encoder = encoder
        self.device = device
        self.features = cfg.data.source == "features"
        self.visible = cfg.objective.visible_fraction > 0
        loader_cfg = loader_config(cfg, cfg.data.shards)
        if self.features:
            self.loader = feature_loader(
                loader_cfg,
                rank,
                world_size,
                expected_encoder_hash=encoder.weights_hash,
                visible=self.visible,
                layers=bool(cfg.encoder.feature_layers),
            )
        else:
            self.loader = clip_loader(loader_cfg, rank, world_size)
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
        if batch_size != self.loader.cfg.batch_size:
            raise ValueError(f"shard loader batches hold {self.loader.cfg.batch_size} clips, asked for {batch_size}")
        if self._iter is None:
            self._iter = iter(self.loader)
        batch = next(self._iter)
        if self.features:
            assert isinstance(batch, FeatureBatch)
            offsets = draw_offsets(self.cfg, batch.tokens_BTND.shape[0], self.generator)
            return clip_batch_from_tokens(self.cfg, batch, offsets, self.device, visible=self.visible)
        assert isinstance(batch, VideoBatch)
        offsets = draw_offsets(self.cfg, batch.frames_BTCHW.shape[0], self.generator)
        return clip_batch_from_frames(self.cfg, self.encoder, batch.frames_BTCHW, offsets, self.device)


def eval_batches(cfg: Config, encoder: FrozenEncoder, device: torch.device, offset: int) -> Iterator[ClipBatch]:
    """Every window of every clip of data.eval_shards, unaugmented, with one target at ``offset``.

    The loader is swept over window starts 0, 1, ... (``fixed_start``) up to the
    last start the clips allow, read from the clips' own frame counts.
    """
    visible = cfg.objective.visible_fraction > 0
    base = loader_config(cfg, cfg.data.eval_shards, evaluation=True)
    start, last_start = 0, 0
    while start <= last_start:
        loader_cfg = dataclasses.replace(base, fixed_start=start)
        if cfg.data.source == "features":
            loader = feature_loader(
                loader_cfg,
                0,
                1,
                expected_encoder_hash=encoder.weights_hash,
                visible=visible,
                layers=bool(cfg.encoder.feature_layers),
            )
        else:
            loader = clip_loader(loader_cfg, 0, 1)
        for batch in loader.iter_epoch():
            if start == 0:
                last_start = max(last_start, max(int(m["frames"]) for m in batch.meta) - base.clip_span)
            if isinstance(batch, FeatureBatch):
                offsets = torch.full((batch.tokens_BTND.shape[0], 1), offset, dtype=torch.long)
                yield clip_batch_from_tokens(cfg, batch, offsets, device, visible=visible)
            else:
                offsets = torch.full((batch.frames_BTCHW.shape[0], 1), offset, dtype=torch.long)
                yield clip_batch_from_frames(cfg, encoder, batch.frames_BTCHW, offsets, device)
        start += 1


def shard_summary(cfg: Config, loader: Any) -> dict[str, Any]:
    """What an export records about the shards it was trained on, with their clip geometry."""
    geometry = shard_geometry(config_to_dict(cfg), loader.manifest, loader.shards[0])
    return {
        "source": cfg.data.source,
        "shards": cfg.data.shards,
        "shard_mode": loader.mode,
        "samples_per_epoch": loader.samples_per_epoch,
        "clip_geometry": geometry.to_dict(),
    }


def shard_geometry(config: dict[str, Any], manifest: dict[str, Any] | None, first_shard: str | Path) -> ClipGeometry:
    """The clip geometry of training from these shards (``config``: a resolved config, ``config_to_dict``).

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
    args = _build_args(source, manifest)
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
        entries, manifest = list_shards(directory, "features")
    else:
        entries, manifest = list_shards(directory, "clips")
    return shard_geometry(config, manifest, entries[0].path)


def _build_args(source: str, manifest: dict[str, Any] | None) -> dict[str, Any]:
    """The clip builder's arguments behind these shards ({} when unknown)."""
    if manifest is None:
        return {}
    if source != "features":
        return dict(manifest.get("args") or {})
    clip_manifest = Path(str(manifest.get("source", {}).get("shards", ""))) / "manifest.json"
    if not clip_manifest.is_file():
        return {}
    return dict(json.loads(clip_manifest.read_text()).get("args") or {})


def first_sample_json(shard: str | Path) -> dict[str, Any] | None:
    """The json member of the first sample of a shard (clip or feature shards carry the clip's json).

    None when the shard cannot be read or holds no readable json: a junk or
    truncated shard is the loader's to count, not a start-up crash.
    """
    try:
        with tarfile.open(shard, "r:") as archive:
            for member in archive:
                if member.name.endswith(".json"):
                    data = archive.extractfile(member)
                    if data is not None:
                        return json.loads(data.read())
    except (tarfile.TarError, OSError, ValueError):
        return None
    return None
