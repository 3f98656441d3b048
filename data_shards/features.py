"""Feature shards: one frozen-encoder pass over clip shards, and a loader over its output.

Shape legend: B clips, T frames, N = gh * gw patch tokens per frame on a
gh x gw grid, D encoder width, C = 3, S = image_size pixels.

The encoder is frozen, so a clip's tokens never change: ``encode`` writes
them once and training reads them back without decoding video or running
the encoder.

Layout of ``OUT/<weights_hash[:16]>/`` (the output is keyed by the encoder's
weights hash, so features of two encoders never mix):

- ``features-000000.tar``, ...: one per clip shard, same sample keys. Each
  sample has ``safetensors`` (a safetensors blob holding "tokens", bf16
  (T, N, D): the encoder's float32 output rounded once to bf16 and stored
  as raw bf16 bytes, so reading it back is lossless; with visible sets also
  "visible_idx", int32 (T, M, V), and "visible_tokens", bf16 (T, M, V, D);
  with ``feature_layers`` also "layers", bf16 (T, L, N, D): the chosen
  encoder blocks, for a core that mixes them through trainable adapters)
  and ``json`` (the clip's json plus "encoder", "encoder_hash", "grid"
  [gh, gw], "embed_dim", "image_size").
- ``manifest.json``: "format" (FEATURES_FORMAT), "encoder" (``ClipEncoder.identity()``),
  "grid", "embed_dim", "image_size", "visible_fraction", "visible_sets",
  "feature_layers", "clips", "shards" [{name, bytes, samples, sha256}], "skipped" (clips that
  failed to decode, by reason), "source" (clip shard directory and a digest
  of its manifest), "args".

Visible sets: the default objective shows the predictor a few target tokens
encoded from their own patches only, which needs pixels. So the encode pass
also stores, per frame, M random subsets of V = max(1, round(F * N))
patches (sorted indices, seeded from the sample key and frame index) with
their tokens from ``encoder.encode_subset``; the feature loader hands each
sampled frame one of its M sets.

Frame policy of the encode pass: the centred square (side = the frame's
short side) resized to image_size x image_size with antialiased bilinear,
i.e. "resize the short side to image_size, centre-crop the square", up to
sub-pixel rounding; no random augmentation (the feature loader augments the
token grid instead).

Writing the output never loses files that are not ours (``data_shards.io``):
OUT must be new, empty, or hold earlier feature directories
(``is_feature_root``), and ``OUT/<hash[:16]>/`` is filled as a temporary
sibling and renamed into place whole, replacing only an earlier feature
directory (``is_feature_dir``). Local clip shards are checked to be whole tars
before anything is written; unreadable ones raise ClipShardError, and a
failed run leaves neither a temporary directory nor an OUT it created. The
clip shards may also be any spec of ``data_shards.sources`` (a URL pattern,
``pipe:``, ``@list``); remote ones are not checked ahead (that would read them
twice): a shard that stays unreadable is skipped and counted as
"unreadable_shard". OUT is always a local directory.

Feature shards are read from a local directory (or the root holding
``<hash[:16]>/``), or from a remote spec whose manifest.json sits beside the
tars (a directory URL, or a pattern of ``features-*.tar``).

This module imports no model code: the encode pass takes any encoder with
the interface of ``ClipEncoder`` from its caller (the command line is
``python -m pretrain.encode``, which loads the frozen ViT from a config).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Protocol

import numpy as np
import torch
import webdataset as wds
from safetensors.torch import save as save_safetensors_bytes
from torch import Tensor
from torch.utils.data import default_collate

from data_shards.augment import center_crop_box, crop_flip_tokens, crop_resize_frames, random_grid_crop_box
from data_shards.io import check_output_dir, output_dir, write_text_atomic
from data_shards.loader import (
    CorruptSampleError,
    LoaderConfig,
    ShardEntry,
    ShardLoader,
    decode_mp4_frames,
    draw_start,
    read_sample_json,
)
from data_shards.sources import has_braces, is_remote, resolve_shards, shard_name, shard_samples, spec_kind

logger = logging.getLogger(__name__)

FEATURES_FORMAT = "features-v1"
HASH_DIR_CHARS = 16
# Temporary and set-aside siblings of a feature directory (data_shards.io.output_dir,
# publish_dir) that a killed run can leave in OUT: still our own files.
_LEFTOVER_DIR = re.compile(r"\.(tmp|old)-[0-9a-f]+-")
# A tar ends with at least two zero blocks; without them it was cut short.
_TAR_END_BYTES = 2 * tarfile.BLOCKSIZE


class EncoderMismatchError(ValueError):
    """Feature shards (or an encode run) belong to a different encoder than expected."""


class ClipShardError(ValueError):
    """The clip shards to encode are missing or unreadable (no shards, a truncated or foreign tar)."""


class ClipEncoder(Protocol):
    """What the encode pass needs of a frozen per-frame encoder (the training package's frozen ViT is one).

    Frames go in as uint8 RGB of any size (the encoder resizes them to
    image_size x image_size); tokens come out float32, on any device, for a
    grid x grid patch grid. Frames are encoded independently, so how frames
    are grouped into calls changes no token.
    """

    @property
    def name(self) -> str:
        """Recorded in every feature sample's json ("encoder")."""
        ...

    @property
    def weights_hash(self) -> str:
        """Hex digest of the weights: keys the output directory, and every consumer checks it."""
        ...

    @property
    def image_size(self) -> int:
        """Side in pixels of the square frames the encoder sees."""
        ...

    @property
    def grid(self) -> int:
        """Patch grid side: N = grid * grid tokens per frame."""
        ...

    @property
    def num_tokens(self) -> int:
        """N, tokens per frame."""
        ...

    @property
    def embed_dim(self) -> int:
        """D, token width."""
        ...

    @property
    def depth(self) -> int:
        """Number of blocks: ``feature_layers`` must be indices in [0, depth)."""
        ...

    def identity(self) -> dict[str, object]:
        """What the manifest records as "encoder": at least "name" and "weights_hash"."""
        ...

    def encode(self, frames_BTCHW: Tensor) -> Tensor:
        """uint8 frames (B, T, 3, H, W) -> final-block tokens (B, T, N, D)."""
        ...

    def encode_with_layers(self, frames_BTCHW: Tensor, layers: list[int]) -> tuple[Tensor, Tensor]:
        """uint8 frames (B, T, 3, H, W) -> final tokens (B, T, N, D) and the given blocks (B, T, L, N, D)."""
        ...

    def encode_subset(self, frames_BKCHW: Tensor, keep_idx_BKV: Tensor) -> Tensor:
        """uint8 frames (B, K, 3, H, W), int64 patch indices (B, K, V) -> tokens of those patches computed
        from those patches only (B, K, V, D)."""
        ...


@dataclass(slots=True)
class FeatureBatch:
    """A batch of augmented token clips from ``feature_loader``."""

    tokens_BTND: Tensor
    """bf16 tokens as stored (cast on the device: bf16 -> float32 is exact); N = grid_hw[0] * grid_hw[1]."""
    grid_hw: tuple[int, int]
    """Token grid (rows, columns) after the crop; tokens are row-major over it."""
    frame_index_BT: Tensor
    """int64 index of each sampled frame within its clip."""
    keys: list[str]
    """Sample keys, as in the clip shards."""
    meta: list[dict[str, Any]]
    """Feature json plus the draw: "start_frame", "frame_stride", "grid_crop" [top, left, h, w] or None, "flip"."""
    visible_idx_BTV: Tensor | None = None
    """int64 visible patch indices of each frame (one stored set, drawn per frame), or None without visible sets."""
    visible_tokens_BTVD: Tensor | None = None
    """bf16 tokens of those patches, encoded from those patches only, or None without visible sets."""
    layers_BTLND: Tensor | None = None
    """bf16 tokens of the stored encoder blocks (manifest "feature_layers"), cropped and flipped
    with the grid, or None when the loader was not asked for them."""


@dataclass(slots=True)
class VisibleSets:
    """M stored visible subsets per frame of one clip."""

    idx_TMV: Tensor
    """int32 sorted patch indices."""
    tokens_TMVD: Tensor
    """bf16 tokens of those patches, encoded from those patches only."""


def tokens_to_bytes(tokens_TND: Tensor, visible: VisibleSets | None = None, layers_TLND: Tensor | None = None) -> bytes:
    """A safetensors blob of bf16 tokens (exact bytes, no conversion beyond the one to bf16 already done)."""
    if tokens_TND.dtype != torch.bfloat16:
        raise ValueError(f"feature tokens must be bf16, got {tokens_TND.dtype}")
    tensors = {"tokens": tokens_TND.contiguous()}
    if layers_TLND is not None:
        T, N, D = tokens_TND.shape
        if layers_TLND.dtype != torch.bfloat16 or layers_TLND.dim() != 4 or layers_TLND.shape[::2] != (T, N):
            raise ValueError(
                f"layers must be bf16 (T, L, N, D) = ({T}, L, {N}, {D}), got {layers_TLND.dtype} "
                f"{tuple(layers_TLND.shape)}"
            )
        tensors["layers"] = layers_TLND.contiguous()
    if visible is not None:
        if visible.idx_TMV.dtype != torch.int32 or visible.tokens_TMVD.dtype != torch.bfloat16:
            raise ValueError(
                f"visible sets must be int32 / bf16, got {visible.idx_TMV.dtype} / {visible.tokens_TMVD.dtype}"
            )
        tensors["visible_idx"] = visible.idx_TMV.contiguous()
        tensors["visible_tokens"] = visible.tokens_TMVD.contiguous()
    return save_safetensors_bytes(tensors)


def tokens_from_bytes(blob: bytes, *, key: str = "?") -> Tensor:
    """bf16 (T, N, D) tokens from a feature sample's safetensors blob, or CorruptSampleError."""
    return features_from_bytes(blob, key=key)[0]


def features_from_bytes(
    blob: bytes, *, key: str = "?", frames: Sequence[int] | None = None
) -> tuple[Tensor, VisibleSets | None]:
    """bf16 tokens and visible sets (None when not stored) of a feature sample, or CorruptSampleError.

    ``frames`` (indices into the clip; None = all) selects frames: only their
    bytes are copied out of the blob, so a loader sampling 8 frames of a
    64-frame clip reads an eighth of it.
    """
    stored = FeatureBlob(blob, key=key)
    index = list(range(stored.num_frames)) if frames is None else list(frames)
    return stored.tokens(index), stored.visible(index)


# safetensors dtypes this module writes, with the numpy dtype that reads their bytes as they are.
_RAW_DTYPES = {"BF16": (np.uint16, torch.bfloat16), "I32": (np.int32, torch.int32)}


class FeatureBlob:
    """A feature sample's safetensors blob, parsed without copying its tensors.

    The safetensors layout is an 8-byte little-endian header length, a JSON
    header (per tensor: dtype, shape, [begin, end) byte offsets into the data
    that follows) and the raw data. Reading the header gives the frame count
    before any tensor is touched; ``tokens(frames)`` / ``visible(frames)``
    then copy just those frames out (the stored bytes are the tensors' exact
    bytes, so this is lossless). Anything malformed raises CorruptSampleError
    ("decode_error").
    """

    def __init__(self, blob: bytes, *, key: str = "?") -> None:
        self.blob = blob
        self.key = key
        header, data_start = self._header()
        self._arrays = {name: self._array(name, entry, data_start) for name, entry in header.items()}
        if "tokens" not in self._arrays:
            self._corrupt("no 'tokens' tensor")
        tokens = self._arrays["tokens"]
        if tokens[1] is not torch.bfloat16 or tokens[0].ndim != 3:
            self._corrupt(f"tokens are {tokens[1]} {tokens[0].shape}, not bf16 3-D")
        self.num_frames, self.num_tokens, self.dim = tokens[0].shape
        self.has_visible = "visible_idx" in self._arrays
        if self.has_visible:
            self._check_visible()
        self.num_layers = 0
        if "layers" in self._arrays:
            layers, dtype = self._arrays["layers"]
            if dtype is not torch.bfloat16 or layers.ndim != 4 or layers.shape[::2] != tokens[0].shape[:2]:
                self._corrupt(f"layers {dtype} {layers.shape} do not fit tokens {tokens[0].shape}")
            if layers.shape[3] != self.dim:
                self._corrupt(f"layers {layers.shape} do not fit tokens {tokens[0].shape}")
            self.num_layers = layers.shape[1]

    def tokens(self, frames: Sequence[int]) -> Tensor:
        """bf16 (len(frames), N, D) tokens of the given frames (a copy)."""
        return self._take("tokens", frames)

    def visible(self, frames: Sequence[int]) -> VisibleSets | None:
        """The stored visible sets of the given frames (copies), or None when the blob has none."""
        if not self.has_visible:
            return None
        return VisibleSets(self._take("visible_idx", frames), self._take("visible_tokens", frames))

    def layers(self, frames: Sequence[int]) -> Tensor | None:
        """bf16 (len(frames), L, N, D) stored encoder blocks of the given frames (a copy), or None when absent."""
        return self._take("layers", frames) if self.num_layers else None

    def _take(self, name: str, frames: Sequence[int]) -> Tensor:
        array, dtype = self._arrays[name]
        index = np.asarray(frames, dtype=np.int64)
        if index.size and (index.min() < 0 or index.max() >= self.num_frames):
            raise IndexError(f"frames {list(frames)} out of range for a {self.num_frames}-frame clip {self.key}")
        # Fancy indexing copies: the result owns its memory, independent of the blob.
        return torch.from_numpy(array[index]).view(dtype)

    def _header(self) -> tuple[dict[str, Any], int]:
        if len(self.blob) < 8:
            self._corrupt(f"{len(self.blob)} bytes, too short for a safetensors header")
        size = int.from_bytes(self.blob[:8], "little")
        if size > len(self.blob) - 8:
            self._corrupt(f"header of {size} bytes does not fit in {len(self.blob)}")
        try:
            header = json.loads(self.blob[8 : 8 + size])
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            self._corrupt(f"unreadable header: {e}")
        if not isinstance(header, dict):
            self._corrupt("header is not a JSON object")
        header.pop("__metadata__", None)
        return header, 8 + size

    def _array(self, name: str, entry: Any, data_start: int) -> tuple[np.ndarray, torch.dtype]:
        try:
            np_dtype, dtype = _RAW_DTYPES[entry["dtype"]]
            shape = tuple(int(n) for n in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            self._corrupt(f"tensor {name!r}: bad header entry {entry!r} ({type(e).__name__}: {e})")
        count = math.prod(shape)
        if end - begin != count * np.dtype(np_dtype).itemsize or begin < 0 or data_start + end > len(self.blob):
            self._corrupt(f"tensor {name!r} {shape}: bytes [{begin}, {end}) do not fit the blob")
        array = np.frombuffer(self.blob, dtype=np_dtype, count=count, offset=data_start + begin)
        return array.reshape(shape), dtype

    def _check_visible(self) -> None:
        idx, idx_dtype = self._arrays["visible_idx"]
        vis = self._arrays.get("visible_tokens")
        ok = (
            vis is not None
            and idx_dtype is torch.int32
            and idx.ndim == 3
            and idx.shape[0] == self.num_frames
            and vis[1] is torch.bfloat16
            and vis[0].shape == (*idx.shape, self.dim)
            and bool(((idx >= 0) & (idx < self.num_tokens)).all())
        )
        if not ok:
            shapes = (idx.shape, None if vis is None else vis[0].shape)
            tokens = (self.num_frames, self.num_tokens, self.dim)
            self._corrupt(f"visible sets {shapes} do not fit tokens {tokens}")

    def _corrupt(self, detail: str) -> NoReturn:
        raise CorruptSampleError(self.key, "decode_error", f"unreadable tokens: {detail}")


def visible_set_seed(key: str, frame: int) -> int:
    """Seed of a frame's visible sets: a digest of (sample key, frame index), independent of batching and order."""
    return int.from_bytes(hashlib.sha256(f"{key}|{frame}".encode()).digest()[:8], "little")


def draw_visible_idx(key: str, num_frames: int, num_tokens: int, num_visible: int, num_sets: int) -> Tensor:
    """Sorted visible patch indices for every frame of a clip, int32 (T, M, V)."""
    idx_TMV = np.empty((num_frames, num_sets, num_visible), dtype=np.int32)
    for t in range(num_frames):
        rng = np.random.default_rng(visible_set_seed(key, t))
        for m in range(num_sets):
            idx_TMV[t, m] = np.sort(rng.permutation(num_tokens)[:num_visible])
    return torch.from_numpy(idx_TMV)


def visible_count(num_tokens: int, fraction: float) -> int:
    """V = max(1, round(fraction * N)) visible patches per set (0 when fraction is 0), as the objective counts them."""
    return 0 if fraction <= 0 else max(1, round(fraction * num_tokens))


def feature_bytes_per_frame(num_tokens: int, dim: int, visible_sets: int, num_visible: int, layers: int) -> int:
    """Tensor bytes one frame adds to a feature sample's safetensors blob (``tokens_to_bytes``).

    Per frame: "tokens" N x D bf16, "layers" L x N x D bf16, and per visible
    set V = ``num_visible`` (``visible_count``) int32 indices ("visible_idx")
    plus V x D bf16 tokens ("visible_tokens"). Excluded, since they are per clip and not per frame:
    the blob's JSON header (a few hundred bytes), the clip's json member and
    the tar headers.
    """
    bf16, int32 = 2, 4
    grid_bytes = num_tokens * dim * bf16 * (1 + layers)
    visible_bytes = visible_sets * num_visible * (int32 + dim * bf16)
    return grid_bytes + visible_bytes


@dataclass(frozen=True, slots=True)
class EncodePlan:
    """What an encode run is about to write; handed to ``encode_clip_shards``'s ``on_start`` before the first clip."""

    clips: int | None
    """Clips in the clip shards, from the manifest's per-shard sample counts (None when a shard's is unknown)."""
    clip_frames: int | None
    """Frames per clip, the manifest's args.clip_frames (None when it records none)."""
    bytes_per_frame: int
    """``feature_bytes_per_frame`` for this encoder and these settings."""

    @property
    def frames(self) -> int | None:
        """Frames of the corpus (None when unknown); clips that fail to decode count too, so an upper bound."""
        return None if self.clips is None or self.clip_frames is None else self.clips * self.clip_frames

    @property
    def total_bytes(self) -> int | None:
        """Feature tensor bytes of the whole corpus (None when the frame count is unknown)."""
        return None if self.frames is None else self.frames * self.bytes_per_frame


def _encode_plan(
    entries: list[ShardEntry],
    clip_manifest: dict[str, Any] | None,
    encoder: ClipEncoder,
    visible_fraction: float,
    visible_sets: int,
    feature_layers: Sequence[int],
) -> EncodePlan:
    counts = [entry.samples for entry in entries]
    # Summed over the shards being encoded, not the manifest's "clips": a pattern may name a subset.
    clips = None if any(n is None for n in counts) else sum(n for n in counts if n is not None)
    args = (clip_manifest or {}).get("args")
    clip_frames = args.get("clip_frames") if isinstance(args, dict) else None
    V = visible_count(encoder.num_tokens, visible_fraction)
    per_frame = feature_bytes_per_frame(encoder.num_tokens, encoder.embed_dim, visible_sets, V, len(feature_layers))
    return EncodePlan(
        clips=clips, clip_frames=clip_frames if isinstance(clip_frames, int) else None, bytes_per_frame=per_frame
    )


def frames_for_encoding(mp4: bytes, image_size: int, *, key: str = "?", expected_frames: int | None = None) -> Tensor:
    """All frames of clip bytes, centre square resized to image_size: uint8 (T, 3, S, S)."""
    frames_THWC = decode_mp4_frames(mp4, None, key=key, expected_frames=expected_frames)
    box = center_crop_box(frames_THWC.shape[1], frames_THWC.shape[2])
    return crop_resize_frames(frames_THWC, box, image_size, flip=False)


def feature_dir(root: str | Path, encoder_hash: str) -> Path:
    """The feature-shard directory for an encoder under ``root``: ``root/<hash[:16]>``."""
    return Path(root) / encoder_hash[:HASH_DIR_CHARS]


def resolve_feature_dir(path: str | Path, expected_encoder_hash: str) -> tuple[Path | str, dict[str, Any]]:
    """The directory (or remote spec) and manifest of feature shards for ``expected_encoder_hash``.

    ``path`` is a feature-shard directory (holding manifest.json), the
    root an encode run wrote into (holding ``<hash[:16]>/``), or a remote
    spec (``data_shards.sources``) with a manifest.json beside its tars;
    a directory URL may also be such a root. Raises EncoderMismatchError
    naming both hashes when the shards found belong to another encoder,
    FileNotFoundError when there are none.
    """
    if is_remote(path):
        return _resolve_remote_features(str(path), expected_encoder_hash)
    path = Path(path)
    candidates = [path, feature_dir(path, expected_encoder_hash)]
    for directory in candidates:
        manifest_path = directory / "manifest.json"
        if manifest_path.is_file():
            manifest = json.loads(manifest_path.read_text())
            _check_feature_manifest(manifest, str(manifest_path), directory, expected_encoder_hash)
            return directory, manifest
    present = sorted(p.parent.name for p in path.glob("*/manifest.json"))
    raise FileNotFoundError(
        f"no feature shards for encoder hash {expected_encoder_hash} in {path}"
        + (f" (found feature dirs for hashes starting {present})" if present else "")
    )


def _resolve_remote_features(spec: str, expected_encoder_hash: str) -> tuple[str, dict[str, Any]]:
    candidates = [spec]
    if spec_kind(spec) in ("http", "fsspec") and not has_braces(spec) and not spec.endswith(".tar"):
        candidates.append(spec.rstrip("/") + "/" + expected_encoder_hash[:HASH_DIR_CHARS])
    for candidate in candidates:
        try:
            _, manifest = resolve_shards(candidate, "features")
        except FileNotFoundError:
            continue
        if manifest is not None:
            _check_feature_manifest(manifest, f"the manifest beside {candidate}", candidate, expected_encoder_hash)
            return candidate, manifest
    raise FileNotFoundError(
        f"no feature shards for encoder hash {expected_encoder_hash} at {spec}: remote feature shards need "
        "their manifest.json beside the tars (a directory URL, or a pattern of features-*.tar in one directory)"
    )


def _check_feature_manifest(manifest: dict[str, Any], where: str, shards: Path | str, expected_hash: str) -> None:
    found = manifest.get("encoder", {}).get("weights_hash")
    if manifest.get("format") != FEATURES_FORMAT:
        raise ValueError(f"{where} is not a feature-shard manifest (format {manifest.get('format')!r})")
    if found != expected_hash:
        raise EncoderMismatchError(
            f"feature shards in {shards} were encoded with encoder hash {found} "
            f"({manifest['encoder'].get('name')}), but encoder hash {expected_hash} was expected"
        )


def is_feature_dir(path: Path) -> bool:
    """Whether ``path`` holds feature shards written by an encode run (its manifest has FEATURES_FORMAT)."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FEATURES_FORMAT


def is_feature_root(path: Path) -> bool:
    """Whether ``path`` is an OUT an encode run wrote into: a feature directory, or what a killed run left."""
    return any(
        child.is_dir() and (is_feature_dir(child) or _LEFTOVER_DIR.match(child.name) is not None)
        for child in path.iterdir()
    )


def check_feature_root(out_root: str | Path) -> Path:
    """Refuse an encode OUT that holds anything but earlier feature output (OutputDirError); returns it."""
    return check_output_dir(out_root, is_ours=is_feature_root, what="feature shards")


def read_clip_shards(shards_dir: str | Path) -> tuple[list[ShardEntry], dict[str, Any] | None]:
    """The clip shards of a spec and its manifest, local ones each checked to be a whole tar; ClipShardError if not.

    Reads tar headers only (and each shard's size against the manifest), so
    the check costs a seek per sample, not a read of the data. Remote shards
    (URLs, ``pipe:``) are not checked: that would read them twice.
    """
    try:
        entries, manifest = resolve_shards(shards_dir, "clips")
    except FileNotFoundError as e:
        raise ClipShardError(f"nothing to encode: {e}") from e
    except (OSError, ValueError, KeyError, TypeError, ImportError) as e:
        raise ClipShardError(f"cannot list the clip shards of {shards_dir}: {type(e).__name__}: {e}") from e
    listed_bytes = {s.get("name"): s.get("bytes") for s in (manifest or {}).get("shards", []) if isinstance(s, dict)}
    for entry in entries:
        if not is_remote(entry.path):
            path = Path(entry.path)
            _check_whole_tar(path, listed_bytes.get(path.name))
    return entries, manifest


def _check_whole_tar(path: Path, expected_bytes: int | None) -> None:
    """Raise ClipShardError unless ``path`` is a complete uncompressed tar (of ``expected_bytes``, when known)."""
    size = path.stat().st_size
    if expected_bytes is not None and size != expected_bytes:
        raise ClipShardError(
            f"clip shard {path} is {size} bytes but its manifest says {expected_bytes}: truncated or changed"
        )
    try:
        with tarfile.open(path, "r:") as archive:
            for _ in archive:
                pass
            # tarfile stops quietly at a cut or garbled header after the first member: what follows
            # the last member must be the end-of-archive zero blocks.
            end = archive.offset
    except (tarfile.TarError, OSError) as e:
        raise ClipShardError(f"clip shard {path} is not a readable tar ({e})") from e
    with open(path, "rb") as f:
        f.seek(end)
        tail = f.read()
    if len(tail) < _TAR_END_BYTES or tail.count(0) != len(tail):
        raise ClipShardError(f"clip shard {path} is truncated or damaged after byte {end} (no end-of-archive marker)")


def encode_clip_shards(
    shards_dir: str | Path,
    out_root: str | Path,
    encoder: ClipEncoder,
    *,
    batch_clips: int = 8,
    visible_fraction: float = 0.05,
    visible_sets: int = 2,
    feature_layers: Sequence[int] = (),
    expected_encoder_hash: str | None = None,
    args: dict[str, Any] | None = None,
    on_start: Callable[[EncodePlan], None] | None = None,
    on_clip: Callable[[int], None] | None = None,
) -> Path:
    """Encode every clip of ``shards_dir`` with the frozen ``encoder``; returns the feature directory.

    Writes ``out_root/<hash[:16]>/`` atomically (a temporary directory, then
    a rename). If that directory already holds features of the same encoder
    for the same clip shards it is kept and returned; with another image
    size, other visible sets or other blocks, FileExistsError. ``out_root`` must be
    new, empty or hold earlier feature directories, and the feature
    directory new, empty or an earlier one (OutputDirError otherwise,
    nothing written). Clip shards that are missing or not whole tars raise
    ClipShardError before anything is written. Clips that fail to
    decode are skipped, counted in the manifest's "skipped" and logged.
    ``batch_clips`` clips are encoded per encoder call (their frames
    concatenated; the encoder is per-frame, so grouping changes no token).
    ``visible_fraction`` F > 0 also stores ``visible_sets`` M visible subsets
    of V = max(1, round(F * N)) patches per frame, encoded from those patches
    only (see the module docstring); F = 0 stores none. ``feature_layers``
    (block indices) also stores those blocks' tokens, in the same forward, for
    training with ``encoder.feature_layers``.

    Raises EncoderMismatchError when ``expected_encoder_hash`` is given and
    differs from the encoder's, or when the output directory holds features
    of another encoder.

    Progress, for a caller that shows it (this module prints nothing):
    ``on_start`` gets the ``EncodePlan`` once every refusal has passed, just
    before the first clip is decoded (not called when existing features are
    reused); ``on_clip`` gets each written clip's frame count.
    """
    if batch_clips < 1:
        raise ValueError(f"batch_clips must be >= 1, got {batch_clips}")
    if not 0.0 <= visible_fraction < 1.0:
        raise ValueError(f"visible_fraction must be in [0, 1), got {visible_fraction}")
    if visible_fraction > 0 and visible_sets < 1:
        raise ValueError(f"visible_sets must be >= 1 with visible_fraction > 0, got {visible_sets}")
    visible_sets = visible_sets if visible_fraction > 0 else 0
    feature_layers = [int(i) for i in feature_layers]
    depth = encoder.depth
    if len(set(feature_layers)) != len(feature_layers) or any(not 0 <= i < depth for i in feature_layers):
        raise ValueError(f"feature_layers {feature_layers} must be distinct block indices in [0, {depth})")
    identity = encoder.identity()
    weights_hash = str(identity["weights_hash"])
    if expected_encoder_hash is not None and expected_encoder_hash != weights_hash:
        raise EncoderMismatchError(
            f"encoder {identity['name']} has weights hash {weights_hash}, "
            f"but encoder hash {expected_encoder_hash} was expected"
        )
    # Every refusal comes before the first write.
    root = check_feature_root(out_root)
    entries, clip_manifest = read_clip_shards(shards_dir)
    source_digest = _source_digest(shards_dir, entries, clip_manifest)
    final = feature_dir(root, weights_hash)
    if (final / "manifest.json").is_file():
        existing = json.loads((final / "manifest.json").read_text())
        found = existing.get("encoder", {}).get("weights_hash")
        if found != weights_hash:
            raise EncoderMismatchError(
                f"{final} holds features of encoder hash {found}, this encoder's hash is {weights_hash}"
            )
        if existing.get("source", {}).get("digest") != source_digest:
            raise FileExistsError(f"{final} holds features of other clip shards; remove it or choose another --out")
        stored = (
            existing.get("image_size"),
            existing.get("visible_fraction", 0.0),
            existing.get("visible_sets", 0),
            existing.get("feature_layers", []),
        )
        if stored != (encoder.image_size, visible_fraction, visible_sets, feature_layers):
            raise FileExistsError(
                f"{final} holds features of these clip shards with image_size={stored[0]}, "
                f"visible_fraction={stored[1]}, visible_sets={stored[2]}, feature_layers={stored[3]}; "
                f"remove it or choose another --out for image_size={encoder.image_size}, "
                f"visible_fraction={visible_fraction}, visible_sets={visible_sets}, feature_layers={feature_layers}"
            )
        logger.info("features of %s by encoder %s already in %s", shards_dir, weights_hash[:16], final)
        return final

    with (
        _removed_if_left_empty(root),
        output_dir(final, is_ours=is_feature_dir, what="feature shards") as tmp,
    ):
        if on_start is not None:
            on_start(_encode_plan(entries, clip_manifest, encoder, visible_fraction, visible_sets, feature_layers))
        shard_docs, skipped, clips = [], Counter(), 0
        for i, entry in enumerate(entries):
            name = f"features-{i:06d}.tar"
            written = _encode_one_shard(
                entry.path,
                tmp / name,
                encoder,
                batch_clips,
                skipped,
                visible_fraction,
                visible_sets,
                feature_layers,
                on_clip,
            )
            data_digest, size = _file_digest(tmp / name)
            shard_docs.append({"name": name, "bytes": size, "samples": written, "sha256": data_digest})
            clips += written
            logger.info("encoded %s -> %s (%d clips)", shard_name(entry.path), name, written)
        manifest = {
            "format": FEATURES_FORMAT,
            "encoder": identity,
            "grid": [encoder.grid, encoder.grid],
            "embed_dim": encoder.embed_dim,
            "image_size": encoder.image_size,
            "tokens_dtype": "bfloat16",
            "visible_fraction": visible_fraction,
            "visible_sets": visible_sets,
            "feature_layers": feature_layers,
            "clips": clips,
            "shards": shard_docs,
            "skipped": dict(skipped),
            "source": {"shards": str(shards_dir), "digest": source_digest, "clips": (clip_manifest or {}).get("clips")},
            "args": args or {},
        }
        write_text_atomic(tmp / "manifest.json", json.dumps(manifest, indent=1))
    logger.info("wrote %d clips of features to %s (skipped: %s)", clips, final, dict(skipped) or "none")
    return final


@contextlib.contextmanager
def _removed_if_left_empty(directory: Path) -> Iterator[None]:
    """Create ``directory`` (and missing parents); if the body raises, remove those it created that are empty."""
    created = [path for path in (directory, *directory.parents) if not path.exists()]
    directory.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        # Innermost first: a parent is empty only once its child is gone.
        for path in created:
            with contextlib.suppress(OSError):
                path.rmdir()
        raise


def _encode_one_shard(
    src: str,
    dst: Path,
    encoder: ClipEncoder,
    batch_clips: int,
    skipped: Counter[str],
    visible_fraction: float,
    visible_sets: int,
    feature_layers: list[int],
    on_clip: Callable[[int], None] | None = None,
) -> int:
    """Encode one clip shard into one feature shard; returns the number of clips written (each also to ``on_clip``)."""
    written = 0
    with wds.TarWriter(str(dst)) as sink, _unreadable_tar_is_clip_shard_error(src):
        for group in _decoded_groups(src, encoder.image_size, batch_clips, skipped):
            encoded = _encode_group(group, encoder, visible_fraction, visible_sets, feature_layers)
            for key, meta, tokens_TND, visible, layers_TLND in zip(*encoded, strict=True):
                sample_meta = {
                    **meta,
                    "encoder": encoder.name,
                    "encoder_hash": encoder.weights_hash,
                    "grid": [encoder.grid, encoder.grid],
                    "embed_dim": encoder.embed_dim,
                    "image_size": encoder.image_size,
                }
                sink.write(
                    {
                        "__key__": key,
                        "safetensors": tokens_to_bytes(tokens_TND, visible, layers_TLND),
                        "json": json.dumps(sample_meta),
                    }
                )
                written += 1
                if on_clip is not None:
                    on_clip(tokens_TND.shape[0])
    return written


@contextlib.contextmanager
def _unreadable_tar_is_clip_shard_error(src: str) -> Iterator[None]:
    """Report a tar that fails while it is read (after passing read_clip_shards) as ClipShardError."""
    try:
        yield
    except tarfile.TarError as e:
        raise ClipShardError(f"clip shard {src} became unreadable while encoding ({e})") from e


def _decoded_groups(
    src: str, image_size: int, batch_clips: int, skipped: Counter[str]
) -> Iterator[list[tuple[str, dict[str, Any], Tensor]]]:
    """Groups of up to batch_clips (key, json, frames_TCHW) from one clip shard, in shard order."""

    def count(exn: Exception) -> bool:
        reason = exn.reason if isinstance(exn, CorruptSampleError) else "unreadable_shard"
        if not isinstance(exn, CorruptSampleError | OSError | ValueError):
            raise exn
        skipped[reason] += 1
        logger.warning("encode: skipping %s", exn)
        return True

    def decode(sample: dict[str, Any]) -> tuple[str, dict[str, Any], Tensor]:
        key = str(sample.get("__key__"))
        meta = read_sample_json(sample)
        if "mp4" not in sample:
            raise CorruptSampleError(key, "missing_field", "no mp4 member")
        frames_TCHW = frames_for_encoding(sample["mp4"], image_size, key=key, expected_frames=meta.get("frames"))
        return key, meta, frames_TCHW

    samples = shard_samples([src], handler=count)
    group: list[tuple[str, dict[str, Any], Tensor]] = []
    for item in wds.map(decode, handler=count)(samples):
        group.append(item)
        if len(group) == batch_clips:
            yield group
            group = []
    if group:
        yield group


def _encode_group(
    group: list[tuple[str, dict[str, Any], Tensor]],
    encoder: ClipEncoder,
    visible_fraction: float = 0.0,
    visible_sets: int = 0,
    feature_layers: Sequence[int] = (),
) -> tuple[list[str], list[dict[str, Any]], list[Tensor], list[VisibleSets | None], list[Tensor | None]]:
    """Encode the frames of several clips in one call, on the CPU, per clip: bf16 (T, N, D) tokens,
    visible sets (or None) and bf16 (T, L, N, D) feature_layers blocks (or None)."""
    keys, metas, frames = zip(*group, strict=True)
    lengths = [f.shape[0] for f in frames]
    frames_TCHW = torch.cat(frames)
    layers: list[Tensor | None] = [None] * len(keys)
    if feature_layers:
        tokens_1TND, layers_1TLND = encoder.encode_with_layers(frames_TCHW[None], list(feature_layers))
        tokens_TND = tokens_1TND[0].to("cpu", torch.bfloat16)
        layers = list(layers_1TLND[0].to("cpu", torch.bfloat16).split(lengths))
    else:
        tokens_TND = encoder.encode(frames_TCHW[None])[0].to("cpu", torch.bfloat16)
    visible: list[VisibleSets | None] = [None] * len(keys)
    V = visible_count(encoder.num_tokens, visible_fraction)
    if V:
        idx_TMV = torch.cat(
            [draw_visible_idx(k, n, encoder.num_tokens, V, visible_sets) for k, n in zip(keys, lengths)]
        )
        # One encode_subset call for every set of every frame of the group: the M sets of
        # a frame are M rows over the same frame (expand, no copy until preprocessing).
        frames_TMCHW = frames_TCHW[:, None].expand(-1, visible_sets, *frames_TCHW.shape[1:])
        tokens_TMVD = encoder.encode_subset(frames_TMCHW, idx_TMV.long()).to("cpu", torch.bfloat16)
        visible = [VisibleSets(i, v) for i, v in zip(idx_TMV.split(lengths), tokens_TMVD.split(lengths), strict=True)]
    return list(keys), list(metas), list(tokens_TND.split(lengths)), visible, layers


def _source_digest(spec: str | Path, entries: list[ShardEntry], manifest: dict[str, Any] | None) -> str:
    if is_remote(spec) or has_braces(str(spec)):
        # Not a local directory: the fetched manifest (canonical JSON), else the shard names.
        doc: Any = manifest if manifest is not None else [shard_name(e.path) for e in entries]
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
    manifest_path = Path(spec) / "manifest.json"
    if manifest_path.is_file():
        return hashlib.sha256(manifest_path.read_bytes()).hexdigest()
    listing = [(Path(e.path).name, Path(e.path).stat().st_size) for e in entries]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def _file_digest(path: Path) -> tuple[str, int]:
    data = path.read_bytes()
    return hashlib.sha256(data).hexdigest(), len(data)


@dataclass(slots=True)
class FeatureDecoder:
    """Decode step of the feature loader: T frames at a stride, one grid crop and flip for all.

    With ``visible`` set, each sampled frame also gets one of its stored
    visible sets (drawn from the sample's rng); without it they are ignored.
    """

    cfg: LoaderConfig
    visible: bool = False
    layers: bool = False
    """Also return the stored encoder blocks ("layers"), cropped and flipped like the tokens."""

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        key = str(sample.get("__key__"))
        meta = read_sample_json(sample)
        if "safetensors" not in sample:
            raise CorruptSampleError(key, "missing_field", "no safetensors member")
        stored = FeatureBlob(sample["safetensors"], key=key)
        if self.visible and not stored.has_visible:
            raise CorruptSampleError(key, "missing_field", "no visible sets, the manifest says there are")
        if self.layers and not stored.num_layers:
            raise CorruptSampleError(key, "missing_field", "no encoder blocks, the manifest says there are")
        grid = meta.get("grid")
        if not (isinstance(grid, list) and len(grid) == 2):
            raise CorruptSampleError(key, "bad_json", f"json field 'grid' is {grid!r}")
        num_frames = stored.num_frames
        if meta.get("frames") != num_frames:
            raise CorruptSampleError(key, "frame_count", f"{num_frames} token frames, json says {meta.get('frames')}")
        span = self.cfg.clip_span
        if num_frames < span:
            raise CorruptSampleError(key, "too_short", f"{num_frames} frames, sampling needs {span}")
        start = draw_start(self.cfg, num_frames, rng, key)
        index_T = list(range(start, start + span, self.cfg.frame_stride))
        box = random_grid_crop_box(tuple(grid), self.cfg.crop_grid, rng) if self.cfg.crop_grid else None
        flip = bool(rng.random() < self.cfg.hflip_prob)
        extra_fields: dict[str, Tensor] = {}
        if self.visible:
            visible_T = stored.visible(index_T)
            assert visible_T is not None
            extra_fields = pick_visible_sets(visible_T, list(range(len(index_T))), grid[1], flip, rng)
        try:
            tokens_TND = crop_flip_tokens(stored.tokens(index_T), (grid[0], grid[1]), box, flip=flip)
            if self.layers:
                blocks_TLND = stored.layers(index_T)
                assert blocks_TLND is not None
                T, L = blocks_TLND.shape[:2]
                cropped = crop_flip_tokens(blocks_TLND.flatten(0, 1), (grid[0], grid[1]), box, flip=flip)
                extra_fields["layers_TLND"] = cropped.view(T, L, *cropped.shape[1:])
        except (ValueError, RuntimeError) as e:
            raise CorruptSampleError(key, "bad_json", f"tokens do not fit grid {grid}: {e}") from e
        draw = {
            "start_frame": start,
            "frame_stride": self.cfg.frame_stride,
            "grid_crop": None if box is None else list(dataclasses.astuple(box)),
            "flip": flip,
        }
        grid_hw = (grid[0], grid[1]) if box is None else (box.height, box.width)
        return {
            "tokens_TND": tokens_TND,
            "grid_hw": grid_hw,
            "frame_index_T": torch.tensor(index_T, dtype=torch.int64),
            "key": key,
            "meta": {**meta, **draw},
            **extra_fields,
        }


def pick_visible_sets(
    visible: VisibleSets, index_T: list[int], grid_w: int, flip: bool, rng: np.random.Generator
) -> dict[str, Tensor]:
    """One stored visible set per sampled frame, mirrored with the grid: int64 (T, V) indices, bf16 (T, V, D) tokens.

    Mirroring maps column c to grid_w - 1 - c but keeps the stored tokens:
    the same approximation ``crop_flip_tokens`` makes for the full grid (a
    token of a mirrored patch is not the mirrored token). The indices are
    re-sorted, their tokens moved with them, so sets stay sorted.
    """
    T = len(index_T)
    set_T = torch.from_numpy(rng.integers(0, visible.idx_TMV.shape[1], size=T))
    frames_T = torch.tensor(index_T)
    idx_TV = visible.idx_TMV[frames_T, set_T].long()
    tokens_TVD = visible.tokens_TMVD[frames_T, set_T]
    if flip:
        row_TV, col_TV = idx_TV // grid_w, idx_TV % grid_w
        idx_TV, order_TV = (row_TV * grid_w + (grid_w - 1 - col_TV)).sort(dim=-1)
        tokens_TVD = tokens_TVD.gather(1, order_TV[..., None].expand_as(tokens_TVD))
    return {"visible_idx_TV": idx_TV, "visible_tokens_TVD": tokens_TVD.contiguous()}


def collate_features(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack token clips into the fields of FeatureBatch (all clips of a shard dir share one grid)."""
    grids = {s["grid_hw"] for s in samples}
    if len(grids) != 1:
        raise ValueError(f"feature samples in one batch have different grids {sorted(grids)}")
    with_visible = {"visible_idx_TV" in s for s in samples}
    if len(with_visible) != 1:
        raise ValueError("feature samples in one batch differ in carrying visible sets")
    visible = with_visible.pop()
    return {
        "tokens_BTND": default_collate([s["tokens_TND"] for s in samples]),
        "grid_hw": grids.pop(),
        "frame_index_BT": torch.stack([s["frame_index_T"] for s in samples]),
        "keys": [s["key"] for s in samples],
        "meta": [s["meta"] for s in samples],
        "visible_idx_BTV": torch.stack([s["visible_idx_TV"] for s in samples]) if visible else None,
        "visible_tokens_BTVD": torch.stack([s["visible_tokens_TVD"] for s in samples]) if visible else None,
        "layers_BTLND": torch.stack([s["layers_TLND"] for s in samples]) if "layers_TLND" in samples[0] else None,
    }


def _to_feature_batch(fields: dict[str, Any]) -> FeatureBatch:
    fields = dict(fields)
    fields["grid_hw"] = (int(fields["grid_hw"][0]), int(fields["grid_hw"][1]))
    return FeatureBatch(**fields)


def feature_loader(
    cfg: LoaderConfig,
    rank: int,
    world_size: int,
    expected_encoder_hash: str,
    state: dict[str, Any] | None = None,
    *,
    visible: bool = True,
    layers: bool = False,
) -> ShardLoader:
    """A rank's stream of ``FeatureBatch`` over feature shards (splitting, shuffle, resume: see ShardLoader).

    ``cfg.shards`` is a feature directory or the root an encode run wrote
    into; the shards must come from the encoder with ``expected_encoder_hash``
    (EncoderMismatchError otherwise, naming both hashes). ``cfg.image_size``,
    ``crop_scale`` and ``crop_ratio`` are not used; ``crop_grid`` is.
    Batches carry the shards' visible sets when they have them and
    ``visible`` is true (``visible=False`` ignores them); visible sets and
    ``crop_grid > 0`` do not go together (ValueError). ``layers=True``
    adds the stored encoder blocks (``FeatureBatch.layers_BTLND``); shards
    encoded without ``feature_layers`` raise ValueError.
    """
    directory, manifest = resolve_feature_dir(cfg.shards, expected_encoder_hash)
    grid = manifest["grid"]
    if cfg.crop_grid > min(grid):
        raise ValueError(f"LoaderConfig.crop_grid={cfg.crop_grid} exceeds the feature grid {grid[0]}x{grid[1]}")
    visible = visible and manifest.get("visible_sets", 0) > 0
    if visible and cfg.crop_grid:
        # A crop changes N and the patch numbering; the stored sets were drawn on the full grid.
        raise ValueError(
            f"LoaderConfig.crop_grid={cfg.crop_grid}: feature shards in {directory} carry visible sets, "
            "which are only supported on the full grid (crop_grid=0, or load with visible=False)"
        )
    if layers and not manifest.get("feature_layers"):
        raise ValueError(
            f"feature shards in {directory} store no encoder blocks (encode them with encoder.feature_layers set)"
        )
    return ShardLoader(
        dataclasses.replace(cfg, shards=str(directory)),
        rank=rank,
        world_size=world_size,
        prefix="features",
        decode=FeatureDecoder(cfg, visible=visible, layers=layers),
        collate=collate_features,
        to_batch=_to_feature_batch,
        state=state,
    )
