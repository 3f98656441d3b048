"""Streaming, resumable loader over WebDataset clip shards (and the machinery feature shards share).

Shape legend: B clips per batch, T sampled frames per clip, C = 3 colour
channels, H = W = image_size pixels, N tokens per frame, D token width.

How a rank's epoch is laid out (all of it deterministic given the seed, so a
test can simulate ranks and a resumed run can replay it):

- Shards are listed from the directory's ``manifest.json`` (or ``PREFIX-*.tar``
  when there is none) and sorted by name; or, for a URL pattern, ``pipe:``
  command or ``@list`` (``data_shards.sources``), taken in the spec's order.
  Remote shards are read with a per-read timeout and resumed retries; one
  that stays unreadable is a counted skip ("unreadable_shard").
- ``split`` mode (at least world_size * num_workers shards): every rank
  shuffles the list with the same (seed, epoch) generator; rank r takes
  shards[r::world_size] and its worker w takes every num_workers-th of those,
  from w. No sample is seen by two ranks (or two workers) in an epoch; ranks
  may differ in samples per epoch, which is harmless because iteration runs
  across epochs without a barrier.
- ``resampled`` mode (fewer shards than that, or asked for): each (rank,
  worker) draws shards with replacement from its own (seed, epoch, rank,
  worker) generator and stops after a fixed number of raw samples, so every
  rank has the same epoch length, ``samples_per_epoch``.
- Each worker then reads its shards' samples, shuffles them through a seeded
  buffer of ``shuffle_buffer`` samples, numbers them (the raw position),
  decodes them (PyAV, one thread, inside the worker), and batches them.
  The augmentation draw of a sample comes from a generator seeded by (seed,
  epoch, rank, worker, position), so it does not depend on timing either.

Corrupt samples (bad or truncated mp4 bytes, a frame count that disagrees
with the json, missing fields) raise ``CorruptSampleError`` inside the decode
step, which runs through webdataset's ``map(fn, handler=...)``: the handler
counts and skips them. Each batch carries its worker's running count, and the
main process sums them (``ShardLoader.corrupt_count``, ``corrupt_by_reason``).
Any other exception is a bug and propagates.

Resume: ``ShardLoader.state_dict()`` records, per worker, how many raw
samples (good and corrupt) the batches handed to the caller covered, which
workers had finished, which worker is due next, and the epoch. A loader
built from that state makes each worker replay its deterministic stream up
to that position WITHOUT decoding (tar bytes are read and pass through the
shuffle buffer only) and starts the round robin over workers at the worker
that was due. Resume bound: a resumed loader replays 0 and skips 0 samples;
it yields exactly the batches an uninterrupted run would have yielded next
(same keys, same augmentation), provided the shards, seed, batch size,
world size and num_workers are unchanged (a change raises ``ValueError``).
Batches the caller fetched but did not train on before saving (its own
prefetch) count as consumed: save the state the loader had when the last
trained batch was fetched.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import itertools
import json
import logging
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import av
import numpy as np
import torch
import webdataset as wds
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from data_shards.augment import CropBox, even_crop_box, random_resized_crop_box
from data_shards.sources import (
    DEFAULT_READ_TIMEOUT_S,
    DEFAULT_RETRIES,
    ShardEntry,
    resolve_shards,
    shard_name,
    shard_samples,
)

# Where shard specs are resolved now; imported from here by callers that predate data_shards.sources.
from data_shards.sources import list_shards as list_shards

logger = logging.getLogger(__name__)

SHARD_MODES = ("auto", "split", "resampled")
STATE_VERSION = 1
# The resume bound (see the module docstring), held by tests/data_shards/test_loader.py:
# samples a resumed loader yields again, and samples it never yields, compared with
# an uninterrupted run.
RESUME_MAX_REPLAYED_SAMPLES = 0
RESUME_MAX_SKIPPED_SAMPLES = 0
# Fewer batches per worker per epoch than this and the per-epoch restart of every
# worker's stream (tar open, shuffle-buffer fill, first decode, all workers at
# once) is a visible stall: the loader warns.
SHORT_EPOCH_BATCHES_PER_WORKER = 8


@dataclass(kw_only=True, slots=True)
class LoaderConfig:
    """Everything the clip and feature loaders read; pretrain's config maps onto it."""

    shards: str
    """Shard spec: a directory holding ``clips-*.tar`` (or ``features-*.tar``) and ``manifest.json``, a
    brace pattern (``https://host/clips-{000000..000099}.tar``), a ``pipe:`` command, an fsspec URL or
    ``@list`` file (see ``data_shards.sources``)."""
    batch_size: int = 8
    """B: clips per batch, per rank."""
    frames: int = 8
    """T: frames sampled per clip."""
    frame_stride: int = 1
    """Clip frames between consecutive sampled frames (1 = consecutive)."""
    image_size: int = 224
    """Output side H = W in pixels after the random resized crop (clip loader only)."""
    crop_scale: tuple[float, float] = (0.35, 1.0)
    """Random resized crop: range of the crop's area as a fraction of the frame's."""
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """Random resized crop: range of the crop's aspect ratio (width / height), drawn log-uniformly."""
    hflip_prob: float = 0.5
    """Probability of mirroring a clip (all its frames, or all its token grids, alike)."""
    crop_grid: int = 0
    """Feature loader: side of the random square sub-grid of tokens kept (0 = the whole grid)."""
    num_workers: int = 2
    """DataLoader worker processes per rank (0 decodes in the calling process)."""
    prefetch_factor: int = 2
    """Batches each worker prepares ahead (ignored with num_workers=0)."""
    shuffle_buffer: int = 64
    """Samples held by each worker's shuffle buffer (1 = no sample shuffle)."""
    seed: int = 0
    """Seed of shard order, resampling, sample shuffle and augmentation."""
    shard_mode: str = "auto"
    """'split' (each sample once per epoch across ranks), 'resampled' (fixed epoch
    length, shards drawn with replacement) or 'auto' (split when there are at least
    world_size * num_workers shards)."""
    samples_per_epoch: int = 0
    """Resampled mode: raw samples per rank per epoch (0 = total clips / world_size)."""
    drop_last: bool = False
    """Drop each worker's last partial batch of an epoch (every batch then has B clips)."""
    pin_memory: bool = True
    """Pin batches in page-locked memory when CUDA is available (ignored otherwise)."""
    fixed_start: int = -1
    """Evaluation: sample every clip from this frame instead of a random start (-1 = random);
    clips too short for it are skipped as too_short. Sweeping it enumerates all windows."""
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S
    """Remote shards (HTTP(S), fsspec): seconds an open or one read may block before it counts as a failure."""
    retries: int = DEFAULT_RETRIES
    """Remote shards: failed opens or reads retried per shard (resuming at the byte reached) before the
    rest of the shard is skipped and counted as unreadable_shard."""

    def __post_init__(self) -> None:
        _check(bool(self.shards), "shards", "must name a directory, URL pattern, pipe: command or @list")
        for name in ("batch_size", "frames", "frame_stride", "image_size", "prefetch_factor", "shuffle_buffer"):
            _check(getattr(self, name) > 0, name, "must be > 0")
        for name in ("num_workers", "crop_grid", "samples_per_epoch", "retries"):
            _check(getattr(self, name) >= 0, name, "must be >= 0")
        self.crop_scale = (float(self.crop_scale[0]), float(self.crop_scale[1]))
        self.crop_ratio = (float(self.crop_ratio[0]), float(self.crop_ratio[1]))
        _check(0 < self.crop_scale[0] <= self.crop_scale[1] <= 1, "crop_scale", "must satisfy 0 < lo <= hi <= 1")
        _check(0 < self.crop_ratio[0] <= self.crop_ratio[1], "crop_ratio", "must satisfy 0 < lo <= hi")
        _check(0.0 <= self.hflip_prob <= 1.0, "hflip_prob", "must be in [0, 1]")
        _check(self.shard_mode in SHARD_MODES, "shard_mode", f"must be one of {SHARD_MODES}")
        _check(self.fixed_start >= -1, "fixed_start", "must be >= -1 (-1 = random start)")
        _check(self.read_timeout_s > 0, "read_timeout_s", "must be > 0")

    @property
    def clip_span(self) -> int:
        """Clip frames covered by one sample: (T - 1) * stride + 1."""
        return (self.frames - 1) * self.frame_stride + 1


class NoUsableSampleError(ValueError):
    """A whole epoch yielded no batch: every sample (or shard) is unreadable or too short."""


class CorruptSampleError(Exception):
    """A sample that cannot be used; ``reason`` names the kind, for counting."""

    def __init__(self, key: str, reason: str, detail: str) -> None:
        self.key = key
        self.reason = reason
        super().__init__(f"sample {key!r}: {reason}: {detail}")


@dataclass(slots=True)
class VideoBatch:
    """A batch of augmented clips from ``clip_loader``."""

    frames_BTCHW: Tensor
    """uint8 RGB, (B, T, 3, image_size, image_size); pinned when asked and CUDA is available.

    Channels-last in memory: a permuted view of a contiguous (B, T, H, W, 3)
    block, which is how FFmpeg writes pixels. Transposing to planar CHW on the
    CPU workers cost more than the crop and resize did; the device (or the
    encoder's first float conversion) does it instead."""
    frame_index_BT: Tensor
    """int64 index of each sampled frame within its clip (start + t * frame_stride)."""
    keys: list[str]
    """Sample keys, ``{source_sha256[:16]}-{clip_index:06d}``."""
    meta: list[dict[str, Any]]
    """The clip json plus the draw: "start_frame", "frame_stride", "crop" [top, left, h, w] (pixels), "flip"."""


class SampleDecoder(Protocol):
    """Turns one raw webdataset sample into a dict of per-sample outputs, or raises CorruptSampleError."""

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]: ...


def resolve_shard_mode(mode: str, num_shards: int, world_size: int, num_workers: int) -> str:
    """'split' or 'resampled' for a config value; 'split' needs a shard for every (rank, worker)."""
    slots = world_size * max(1, num_workers)
    if mode == "auto":
        return "split" if num_shards >= slots else "resampled"
    if mode == "split" and num_shards < slots:
        raise ValueError(
            f"shard_mode='split' needs at least world_size * num_workers = {slots} shards, found {num_shards}; "
            "use 'resampled' or 'auto'"
        )
    return mode


def split_shards(
    shards: list[str], *, seed: int, epoch: int, rank: int, world_size: int, worker: int, num_workers: int
) -> list[str]:
    """Split mode: the shards (rank, worker) reads in an epoch, in reading order.

    The permutation depends on (seed, epoch) only, so all ranks agree on it.
    """
    order = np.random.default_rng([seed, epoch]).permutation(len(shards))
    mine = [shards[i] for i in order][rank::world_size]
    return mine[worker :: max(1, num_workers)]


def resampled_shards(shards: list[str], *, seed: int, epoch: int, rank: int, worker: int) -> Iterator[str]:
    """Resampled mode: an endless draw with replacement, from a (seed, epoch, rank, worker) generator."""
    rng = np.random.default_rng([seed, epoch, rank, worker, 1])
    while True:
        yield shards[int(rng.integers(len(shards)))]


def worker_quota(samples_per_epoch: int, worker: int, num_workers: int) -> int:
    """Resampled mode: raw samples worker `worker` reads per epoch (the rank's total, spread evenly)."""
    W = max(1, num_workers)
    return samples_per_epoch // W + (worker < samples_per_epoch % W)


class _CorruptCounter:
    """Worker-local count of skipped samples by reason; also webdataset's exception handler."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()

    def skip_sample(self, exn: Exception) -> bool:
        """Handler for the decode map: count and skip CorruptSampleError, re-raise anything else."""
        if not isinstance(exn, CorruptSampleError):
            raise exn
        self.counts[exn.reason] += 1
        logger.warning("skipping corrupt sample: %s", exn)
        return True

    def skip_shard_rest(self, exn: Exception) -> bool:
        """Handler for tar reading: an unreadable tar (or its damaged tail) is skipped and counted."""
        self.counts["unreadable_shard"] += 1
        logger.warning("skipping unreadable shard data: %s", exn)
        return True


@dataclass(slots=True)
class _EpochPlan:
    """What the workers of one rank need to produce (the rest of) an epoch; pickled into workers."""

    shards: list[str]
    mode: str
    seed: int
    epoch: int
    rank: int
    world_size: int
    num_workers: int
    samples_per_epoch: int
    shuffle_buffer: int
    batch_size: int
    drop_last: bool
    read_timeout_s: float
    retries: int
    start_positions: list[int]
    finished: list[bool]
    rotation: int


def encode_position(epoch: int, rotation: int, positions: list[int], finished: list[bool], out_I: Tensor) -> None:
    """Write where an epoch starts into ``out_I`` (int64, 2 + 2 * workers): epoch, rotation, positions, finished."""
    W = len(positions)
    out_I[0], out_I[1] = epoch, rotation
    out_I[2 : 2 + W] = torch.tensor(positions, dtype=torch.int64)
    out_I[2 + W : 2 + 2 * W] = torch.tensor([int(f) for f in finished], dtype=torch.int64)


def decode_position(plan: _EpochPlan, position_I: Tensor) -> _EpochPlan:
    """``plan`` with the epoch, rotation, start positions and finished flags read from ``position_I``."""
    W = len(plan.start_positions)
    values = position_I.tolist()
    return dataclasses.replace(
        plan,
        epoch=values[0],
        rotation=values[1],
        start_positions=values[2 : 2 + W],
        finished=[bool(f) for f in values[2 + W : 2 + 2 * W]],
    )


class _ShardStream(IterableDataset):
    """The worker side: one rank's epoch, split over DataLoader workers, yielding batch payloads.

    A payload is a dict: "worker" (logical worker id), "pos" (raw samples of
    this epoch the worker has consumed through this payload), "corrupt" (the
    worker's skip counts since it started), "last" (this worker's final
    payload of the epoch), and "batch" (the collated batch, or None for the
    final bookkeeping payload when no samples are left).
    """

    def __init__(
        self,
        plan: _EpochPlan,
        decode: SampleDecoder,
        collate: Callable[[list[dict]], dict],
        position_I: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.plan = plan
        self.decode = decode
        self.collate = collate
        self.position_I = position_I
        """Shared memory holding the epoch-dependent part of the plan (``encode_position``), read
        at the start of every iteration: persistent workers get each epoch's plan without a re-fork."""

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.position_I is not None:
            self.plan = decode_position(self.plan, self.position_I)
        info = get_worker_info()
        physical, W = (info.id, info.num_workers) if info is not None else (0, 1)
        if max(1, self.plan.num_workers) != W:
            raise RuntimeError(f"DataLoader runs {W} workers, the epoch plan has {self.plan.num_workers}")
        # Rotating the logical ids makes the DataLoader's round robin start at the
        # worker that was due when the state was saved.
        worker = (physical + self.plan.rotation) % W
        if self.plan.finished[worker]:
            return
        yield from self._worker_payloads(worker)

    def _raw_samples(self, worker: int, counter: _CorruptCounter) -> Iterator[dict[str, Any]]:
        p = self.plan
        if p.mode == "split":
            urls: Iterable[str] = split_shards(
                p.shards,
                seed=p.seed,
                epoch=p.epoch,
                rank=p.rank,
                world_size=p.world_size,
                worker=worker,
                num_workers=p.num_workers,
            )
        else:
            urls = resampled_shards(p.shards, seed=p.seed, epoch=p.epoch, rank=p.rank, worker=worker)
        samples = shard_samples(
            urls, handler=counter.skip_shard_rest, read_timeout_s=p.read_timeout_s, retries=p.retries
        )
        if p.mode == "resampled":
            samples = itertools.islice(samples, worker_quota(p.samples_per_epoch, worker, p.num_workers))
        rng = random.Random(f"{p.seed}-{p.epoch}-{p.rank}-{worker}-shuffle")
        # initial = bufsize: the buffer fills before the first pick, so the order
        # depends on the seed only, not on how fast tars are read.
        return wds.shuffle(p.shuffle_buffer, initial=p.shuffle_buffer, rng=rng)(iter(samples))

    def _worker_payloads(self, worker: int) -> Iterator[dict[str, Any]]:
        p = self.plan
        counter = _CorruptCounter()
        consumed = [p.start_positions[worker]]

        def positioned() -> Iterator[dict[str, Any]]:
            # Fast-forward before the decode map: skipped samples cost a tar read, no decode.
            numbered = itertools.islice(enumerate(self._raw_samples(worker, counter)), p.start_positions[worker], None)
            for pos, sample in numbered:
                consumed[0] = pos + 1
                sample["__pos__"] = pos
                yield sample

        def decode(sample: dict[str, Any]) -> dict[str, Any]:
            rng = np.random.default_rng([p.seed, p.epoch, p.rank, worker, sample["__pos__"]])
            out = self.decode(sample, rng)
            out["__pos__"] = sample["__pos__"]
            return out

        decoded = wds.map(decode, handler=counter.skip_sample)(positioned())
        batch: list[dict[str, Any]] = []
        for sample in decoded:
            batch.append(sample)
            if len(batch) == p.batch_size:
                yield self._payload(worker, batch[-1]["__pos__"] + 1, counter, batch, last=False)
                batch = []
        if batch and not p.drop_last:
            yield self._payload(worker, consumed[0], counter, batch, last=True)
        else:
            yield self._payload(worker, consumed[0], counter, [], last=True)

    def _payload(
        self, worker: int, pos: int, counter: _CorruptCounter, batch: list[dict[str, Any]], *, last: bool
    ) -> dict[str, Any]:
        return {
            "worker": worker,
            "pos": pos,
            "corrupt": dict(counter.counts),
            "last": last,
            "batch": self.collate(batch) if batch else None,
        }


class ShardLoader:
    """A rank's endless, resumable stream of batches over the shards of a spec (``data_shards.sources``).

    Iterating yields batches across epochs without end (``iter_epoch`` yields
    the rest of the current epoch only). One ``torch.utils.data.DataLoader``
    with persistent workers serves every epoch (see ``_start_epoch``). ``state_dict()`` /
    ``load_state_dict()`` save and restore the position (see the module
    docstring for the resume guarantee); ``corrupt_count`` and
    ``corrupt_by_reason`` are the samples skipped so far on this rank,
    including those counted before a resume.
    """

    def __init__(
        self,
        cfg: LoaderConfig,
        *,
        rank: int,
        world_size: int,
        prefix: str,
        decode: SampleDecoder,
        collate: Callable[[list[dict]], dict],
        to_batch: Callable[[dict], Any],
        state: dict[str, Any] | None = None,
    ) -> None:
        if not (0 <= rank < world_size):
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.decode = decode
        self.collate = collate
        self.to_batch = to_batch
        entries, self.manifest = resolve_shards(cfg.shards, prefix, timeout_s=cfg.read_timeout_s)
        self.shards = [e.path for e in entries]
        self.mode = resolve_shard_mode(cfg.shard_mode, len(self.shards), world_size, cfg.num_workers)
        self.samples_per_epoch = self._samples_per_epoch(entries) if self.mode == "resampled" else 0
        self.num_slots = max(1, cfg.num_workers)
        self.epoch = 0
        self._positions = [0] * self.num_slots
        self._finished = [False] * self.num_slots
        self._next_worker = 0
        self._corrupt_before: collections.Counter[str] = collections.Counter()
        self._corrupt_live: list[dict[str, int]] = [{} for _ in range(self.num_slots)]
        self._loader: DataLoader | None = None
        self._position_I = torch.zeros(2 + 2 * self.num_slots, dtype=torch.int64).share_memory_()
        # Evaluation sweeps build one loader per window start: say it once, at debug level.
        logger.log(
            logging.DEBUG if cfg.fixed_start >= 0 else logging.INFO,
            "rank %d/%d: %d shards in %s, %s mode%s, %d workers",
            rank,
            world_size,
            len(self.shards),
            cfg.shards,
            self.mode,
            f" ({self.samples_per_epoch} samples per epoch)" if self.mode == "resampled" else "",
            cfg.num_workers,
        )
        self._warn_if_epochs_are_short(entries)
        if state is not None:
            self.load_state_dict(state)

    def _warn_if_epochs_are_short(self, entries: list[ShardEntry]) -> None:
        """Every epoch restarts each worker's stream: with a few batches per worker that stall shows. Say so."""
        if self.cfg.num_workers == 0 or self.cfg.fixed_start >= 0:
            return
        if self.mode == "resampled":
            samples = self.samples_per_epoch
        elif all(e.samples is not None for e in entries):
            samples = sum(e.samples or 0 for e in entries) // self.world_size
        else:
            return
        batches_per_worker = samples / (self.cfg.batch_size * self.cfg.num_workers)
        if batches_per_worker < SHORT_EPOCH_BATCHES_PER_WORKER:
            logger.warning(
                "rank %d: an epoch is %d samples, %.1f batches per worker; each epoch restarts the streams "
                "of all %d workers at once (tar open, shuffle-buffer fill, first decode), a stall per epoch. "
                "Use fewer workers (data.num_workers) or, in resampled mode, a longer epoch "
                "(data.samples_per_epoch)",
                self.rank,
                samples,
                batches_per_worker,
                self.cfg.num_workers,
            )

    def _samples_per_epoch(self, entries: list[ShardEntry]) -> int:
        if self.cfg.samples_per_epoch:
            return self.cfg.samples_per_epoch
        counts = [e.samples for e in entries]
        if any(c is None for c in counts):
            unknown = [shard_name(e.path) for e in entries if e.samples is None]
            raise ValueError(
                f"{self.cfg.shards}: resampled mode needs the samples per epoch, and no manifest.json gives the "
                f"sample counts of {len(unknown)} shards ({unknown[:3]}): set LoaderConfig.samples_per_epoch "
                "(data.samples_per_epoch in a training config)"
            )
        return max(1, sum(counts) // self.world_size)

    @property
    def corrupt_by_reason(self) -> dict[str, int]:
        """Samples skipped on this rank so far, by reason."""
        total = collections.Counter(self._corrupt_before)
        for counts in self._corrupt_live:
            total.update(counts)
        return dict(total)

    @property
    def corrupt_count(self) -> int:
        """Samples (and unreadable shard tails) skipped on this rank so far."""
        return sum(self.corrupt_by_reason.values())

    def __iter__(self) -> Iterator[Any]:
        while True:
            fresh = not any(self._positions) and not any(self._finished)
            delivered = 0
            for batch in self.iter_epoch():
                delivered += 1
                yield batch
            # A whole epoch without a batch would loop forever: every sample is unusable.
            if fresh and delivered == 0:
                raise NoUsableSampleError(
                    f"epoch {self.epoch - 1} of {self.cfg.shards} on rank {self.rank} produced no batch: "
                    "every sample was skipped (unreadable or truncated shards, or clips too short) "
                    f"(skipped so far: {self.corrupt_by_reason})"
                )

    def iter_epoch(self) -> Iterator[Any]:
        """Yield the rest of the current epoch's batches, then advance to the next epoch."""
        yield from self._consume_epoch(self._start_epoch())

    def _start_epoch(self) -> Iterator[dict[str, Any]]:
        """The payload iterator of the current epoch, from the current positions.

        The DataLoader is built once and its workers persist across epochs:
        forking a trainer process that holds gigabytes every epoch made the
        trainer pay copy-on-write page faults on its whole working set after
        each fork (measured: 3.4x slower steps with epochs of a batch or two per
        worker). Each epoch's plan reaches the live workers through shared
        memory (``position_I``), read when the DataLoader restarts their
        iteration; batches and saved state are those of a fresh DataLoader per
        epoch.
        """
        encode_position(self.epoch, self._next_worker, self._positions, self._finished, self._position_I)
        if self._loader is None:
            plan = _EpochPlan(
                shards=self.shards,
                mode=self.mode,
                seed=self.cfg.seed,
                epoch=self.epoch,
                rank=self.rank,
                world_size=self.world_size,
                num_workers=self.num_slots,
                samples_per_epoch=self.samples_per_epoch,
                shuffle_buffer=self.cfg.shuffle_buffer,
                batch_size=self.cfg.batch_size,
                drop_last=self.cfg.drop_last,
                read_timeout_s=self.cfg.read_timeout_s,
                retries=self.cfg.retries,
                start_positions=list(self._positions),
                finished=list(self._finished),
                rotation=self._next_worker,
            )
            workers = self.cfg.num_workers
            self._loader = DataLoader(
                _ShardStream(plan, self.decode, self.collate, self._position_I),
                batch_size=None,
                num_workers=workers,
                prefetch_factor=self.cfg.prefetch_factor if workers else None,
                persistent_workers=workers > 0,
                # Pinning needs a CUDA runtime; CPU-only torch would warn or fail.
                pin_memory=self.cfg.pin_memory and torch.cuda.is_available(),
            )
        return iter(self._loader)

    def _consume_epoch(self, payloads: Iterator[dict[str, Any]]) -> Iterator[Any]:
        """Track positions over an epoch's payloads and yield its batches; then advance the epoch."""
        self._fold_live_counts()
        for payload in payloads:
            worker = payload["worker"]
            self._positions[worker] = payload["pos"]
            self._finished[worker] = payload["last"]
            self._corrupt_live[worker] = payload["corrupt"]
            self._next_worker = (worker + 1) % self.num_slots
            if payload["batch"] is not None:
                yield self.to_batch(payload["batch"])
        self._fold_live_counts()
        self.epoch += 1
        self._positions = [0] * self.num_slots
        self._finished = [False] * self.num_slots
        self._next_worker = 0

    def _fold_live_counts(self) -> None:
        # Each epoch's worker streams count from zero again: bank what they reported.
        for counts in self._corrupt_live:
            self._corrupt_before.update(counts)
        self._corrupt_live = [{} for _ in range(self.num_slots)]

    def state_dict(self) -> dict[str, Any]:
        """The position after the last batch handed out (plain Python types, JSON-serialisable)."""
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "positions": list(self._positions),
            "finished": list(self._finished),
            "next_worker": self._next_worker,
            "corrupt_by_reason": self.corrupt_by_reason,
            "layout": self._layout(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; raises ValueError if the shards or the worker layout changed."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')} != {STATE_VERSION}")
        saved, now = state["layout"], self._layout()
        for key in now:
            if saved.get(key) != now[key]:
                raise ValueError(
                    f"loader state was saved with {key}={saved.get(key)!r}, this loader has {now[key]!r}; "
                    "an exact resume needs the same shards, seed, batch size, world size and workers"
                )
        self.epoch = int(state["epoch"])
        self._positions = [int(p) for p in state["positions"]]
        self._finished = [bool(f) for f in state["finished"]]
        self._next_worker = int(state["next_worker"])
        self._corrupt_before = collections.Counter(state["corrupt_by_reason"])
        self._corrupt_live = [{} for _ in range(self.num_slots)]

    def _layout(self) -> dict[str, Any]:
        return {
            # Names, not URLs: a resume may read the same shards from another host or mirror.
            "shards": [shard_name(s) for s in self.shards],
            "mode": self.mode,
            "samples_per_epoch": self.samples_per_epoch,
            "seed": self.cfg.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.num_slots,
            "batch_size": self.cfg.batch_size,
            "shuffle_buffer": self.cfg.shuffle_buffer,
            "drop_last": self.cfg.drop_last,
        }


def clip_loader(cfg: LoaderConfig, rank: int, world_size: int, state: dict[str, Any] | None = None) -> ShardLoader:
    """A rank's stream of ``VideoBatch`` over the clip shards in ``cfg.shards`` (see ShardLoader)."""
    return ShardLoader(
        cfg,
        rank=rank,
        world_size=world_size,
        prefix="clips",
        decode=ClipDecoder(cfg),
        collate=collate_clips,
        to_batch=lambda b: VideoBatch(**b),
        state=state,
    )


@dataclass(slots=True)
class ClipDecoder:
    """Decode step of the clip loader: T frames at a stride from a random start, one crop and flip for all."""

    cfg: LoaderConfig

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        key = str(sample.get("__key__"))
        meta = read_sample_json(sample)
        if "mp4" not in sample:
            raise CorruptSampleError(key, "missing_field", "no mp4 member")
        num_frames = _meta_int(key, meta, "frames")
        span = self.cfg.clip_span
        if num_frames < span:
            raise CorruptSampleError(key, "too_short", f"{num_frames} frames, sampling needs {span}")
        start = draw_start(self.cfg, num_frames, rng, key)
        index_T = list(range(start, start + span, self.cfg.frame_stride))

        def draw_box(height: int, width: int) -> CropBox:
            box = random_resized_crop_box(height, width, scale=self.cfg.crop_scale, ratio=self.cfg.crop_ratio, rng=rng)
            return even_crop_box(box)

        frames_THWC, box = decode_mp4_crop_resize(
            sample["mp4"], index_T, draw_box, self.cfg.image_size, key=key, expected_frames=num_frames
        )
        flip = bool(rng.random() < self.cfg.hflip_prob)
        if flip:
            frames_THWC = frames_THWC.flip(2)
        draw = {"start_frame": start, "frame_stride": self.cfg.frame_stride, "crop": dataclasses.astuple(box)}
        return {
            "frames_THWC": frames_THWC,
            "frame_index_T": torch.tensor(index_T, dtype=torch.int64),
            "key": key,
            "meta": {**meta, **draw, "crop": list(draw["crop"]), "flip": flip},
        }


def draw_start(cfg: LoaderConfig, num_frames: int, rng: np.random.Generator, key: str) -> int:
    """First sampled frame: random, or cfg.fixed_start when set (evaluation sweeps)."""
    span = cfg.clip_span
    if cfg.fixed_start < 0:
        return int(rng.integers(0, num_frames - span + 1))
    if cfg.fixed_start + span > num_frames:
        raise CorruptSampleError(key, "too_short", f"{num_frames} frames, start {cfg.fixed_start} needs {span} more")
    return cfg.fixed_start


def collate_clips(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack decoded clips into the fields of VideoBatch."""
    return {
        # default_collate stacks straight into shared memory inside a worker,
        # saving the copy that sending a private tensor to the main process costs.
        "frames_BTCHW": default_collate([s["frames_THWC"] for s in samples]).permute(0, 1, 4, 2, 3),
        "frame_index_BT": torch.stack([s["frame_index_T"] for s in samples]),
        "keys": [s["key"] for s in samples],
        "meta": [s["meta"] for s in samples],
    }


def read_sample_json(sample: dict[str, Any]) -> dict[str, Any]:
    """The sample's json member as a dict, or CorruptSampleError("missing_field" / "bad_json")."""
    key = str(sample.get("__key__"))
    raw = sample.get("json")
    if raw is None:
        raise CorruptSampleError(key, "missing_field", "no json member")
    try:
        meta = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptSampleError(key, "bad_json", str(e)) from e
    if not isinstance(meta, dict):
        raise CorruptSampleError(key, "bad_json", f"json is a {type(meta).__name__}, not an object")
    return meta


def _meta_int(key: str, meta: dict[str, Any], name: str) -> int:
    value = meta.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise CorruptSampleError(key, "bad_json", f"json field {name!r} is {value!r}, not a count")
    return value


def decode_mp4_frames(
    mp4: bytes, index_T: list[int] | None, *, key: str = "?", expected_frames: int | None = None
) -> np.ndarray:
    """Decode the frames at sorted indices ``index_T`` (None = all) of in-memory video bytes: uint8 (T, H, W, 3).

    One decoder thread: the loader's workers already occupy the cores, and
    all PyAV objects live and die inside this call (never shared with a
    forked worker). Decoding stops after the last wanted frame. When
    ``expected_frames`` is given, the container's frame count must match it
    and the stream must hold every wanted frame; else CorruptSampleError
    ("frame_count"). Undecodable bytes raise CorruptSampleError("decode_error").
    """
    wanted = None if index_T is None else set(index_T)
    last = None if index_T is None else index_T[-1]
    frames: list[np.ndarray] = []
    try:
        with av.open(io.BytesIO(mp4), mode="r") as container:
            stream = _single_thread_video_stream(container, key, expected_frames)
            for i, frame in enumerate(container.decode(stream)):
                if wanted is None or i in wanted:
                    frames.append(frame.to_ndarray(format="rgb24"))
                if last is not None and i >= last:
                    break
    except av.FFmpegError as e:
        raise CorruptSampleError(key, "decode_error", f"{type(e).__name__}: {e}") from e
    needed = None if index_T is None else len(index_T)
    if not frames or (needed is not None and len(frames) < needed):
        raise CorruptSampleError(key, "frame_count", f"decoded {len(frames)} wanted frames, need {needed or 1}")
    return np.stack(frames)


def decode_mp4_crop_resize(
    mp4: bytes,
    index_T: list[int],
    draw_box: Callable[[int, int], CropBox],
    size: int,
    *,
    key: str = "?",
    expected_frames: int | None = None,
) -> tuple[Tensor, CropBox]:
    """Decode the frames at sorted ``index_T``, crop each to one box and resize: uint8 (T, size, size, 3).

    ``draw_box(height, width)`` picks the box once the stream's size is known
    (before any frame is decoded). Crop, resize and the YUV -> RGB conversion
    run as one FFmpeg filter graph (crop -> scale -> rgb24), so the colour
    conversion touches only the size x size output pixels instead of every
    decoded pixel; decoding to full RGB first and resizing in torch spent
    more time converting than decoding. The scale filter is bilinear, which
    FFmpeg widens when shrinking (antialiased, like torch's antialias=True);
    outputs agree with ``crop_resize_frames`` on full RGB frames to about
    one grey level on average. Boxes should be even (``even_crop_box``):
    4:2:0 chroma cannot be cut at odd rows or columns. Errors as in
    ``decode_mp4_frames``. Returns the frames and the box.
    """
    if not index_T:
        raise ValueError("index_T must name at least one frame")
    wanted, last = set(index_T), index_T[-1]
    frames: list[np.ndarray] = []
    try:
        with av.open(io.BytesIO(mp4), mode="r") as container:
            stream = _single_thread_video_stream(container, key, expected_frames)
            box = draw_box(stream.codec_context.height, stream.codec_context.width)
            graph = _crop_scale_graph(stream, box, size)
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    graph.push(frame)
                    frames.append(graph.pull().to_ndarray())
                if i >= last:
                    break
    except av.FFmpegError as e:
        raise CorruptSampleError(key, "decode_error", f"{type(e).__name__}: {e}") from e
    if len(frames) < len(index_T):
        raise CorruptSampleError(key, "frame_count", f"decoded {len(frames)} wanted frames, need {len(index_T)}")
    return torch.from_numpy(np.stack(frames)), box


def _single_thread_video_stream(
    container: av.container.InputContainer, key: str, expected_frames: int | None
) -> av.video.stream.VideoStream:
    """The first video stream, set to decode on one thread; its frame count checked against the json."""
    if not container.streams.video:
        raise CorruptSampleError(key, "decode_error", "no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "NONE"
    stream.codec_context.thread_count = 1
    if expected_frames is not None and stream.frames not in (0, expected_frames):
        raise CorruptSampleError(key, "frame_count", f"container has {stream.frames}, json {expected_frames}")
    return stream


def _crop_scale_graph(stream: av.video.stream.VideoStream, box: CropBox, size: int) -> av.filter.Graph:
    """buffer -> crop(box) -> scale(size x size, bilinear) -> rgb24 -> sink, for this stream's frames."""
    graph = av.filter.Graph()
    # One thread, like the decoder: the loader's workers already occupy the cores
    # (0 would start a thread per core in every worker).
    graph.threads = 1
    nodes = [
        graph.add_buffer(template=stream),
        graph.add("crop", f"w={box.width}:h={box.height}:x={box.left}:y={box.top}:exact=1"),
        graph.add("scale", f"w={size}:h={size}:flags=bilinear"),
        graph.add("format", "rgb24"),
        graph.add("buffersink"),
    ]
    for upstream, downstream in itertools.pairwise(nodes):
        upstream.link_to(downstream)
    graph.configure()
    return graph


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"LoaderConfig.{name} {message}")
