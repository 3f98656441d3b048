"""The streaming clip loader: shapes, per-clip augmentation, rank/worker splits, corrupt samples, resume.

Shape legend: B clips, T frames, C = 3, S = image_size pixels, H x W source pixels.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from data_shards.augment import CropBox, crop_resize_frames, even_crop_box
from data_shards.loader import (
    RESUME_MAX_REPLAYED_SAMPLES,
    RESUME_MAX_SKIPPED_SAMPLES,
    ClipDecoder,
    LoaderConfig,
    NoUsableSampleError,
    ShardLoader,
    VideoBatch,
    clip_loader,
    collate_clips,
    decode_mp4_crop_resize,
    decode_mp4_frames,
)
from tests.data_shards.shard_fixtures import (
    FixtureClip,
    encode_mp4,
    real_clips,
    synthetic_clip_shards,
    synthetic_frames,
    write_clip_shards,
)


@pytest.fixture(scope="module")
def syn4(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """4 shards x 3 synthetic clips of 8 frames, 32x48."""
    directory = tmp_path_factory.mktemp("syn4")
    return directory, synthetic_clip_shards(directory, num_shards=4, clips_per_shard=3)


@pytest.fixture(scope="module")
def syn2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """2 shards x 3 synthetic clips: fewer shards than 2 ranks x 2 workers."""
    directory = tmp_path_factory.mktemp("syn2")
    return directory, synthetic_clip_shards(directory, num_shards=2, clips_per_shard=3)


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """carphone (176x144 -> 78x64) and bikes (640x272 -> 150x64) clips of 8 frames at 15 fps, 3 shards."""
    directory = tmp_path_factory.mktemp("real")
    carphone = real_clips("carphone", clip_frames=8, num_clips=4)
    bikes = real_clips("bikes", clip_frames=8, num_clips=2)
    return directory, write_clip_shards(directory, [carphone[:2], carphone[2:], bikes])


@pytest.fixture(scope="module")
def corrupt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], list[str]]:
    """2 shards: good clips plus garbage mp4, truncated mp4, missing json, wrong json frame count."""
    directory = tmp_path_factory.mktemp("corrupt")

    def clip(i: int, **kwargs: object) -> FixtureClip:
        return FixtureClip(synthetic_frames(8, 32, 48, seed=i), source="corrupt-src", clip_index=i, **kwargs)

    good_mp4 = encode_mp4(synthetic_frames(8, 32, 48, seed=99))
    shards = [
        [clip(0), clip(1, mp4_override=b"\x00garbage, not an mp4" * 20), clip(2), clip(3, drop=("json",))],
        [clip(4), clip(5, mp4_override=good_mp4[: len(good_mp4) // 2]), clip(6, json_frames=20), clip(7)],
    ]
    keys = write_clip_shards(directory, shards)
    good = [keys[i] for i in (0, 2, 4, 7)]
    return directory, keys, good


def _cfg(directory: Path, **kwargs: object) -> LoaderConfig:
    defaults: dict[str, object] = {
        "shards": str(directory),
        "batch_size": 2,
        "frames": 4,
        "frame_stride": 2,
        "image_size": 32,
        "num_workers": 2,
        "shuffle_buffer": 4,
    }
    return LoaderConfig(**{**defaults, **kwargs})


def _epoch_keys(loader: ShardLoader) -> list[str]:
    return [key for batch in loader.iter_epoch() for key in batch.keys]


@pytest.mark.parametrize("dataset", ["synthetic", "real"])
def test_batch_shapes_and_dtypes(dataset: str, syn4: tuple[Path, list[str]], real: tuple[Path, list[str]]) -> None:
    directory, keys = syn4 if dataset == "synthetic" else real
    # pin_memory=True must be harmless on CPU-only torch.
    loader = clip_loader(_cfg(directory, batch_size=3, image_size=40, pin_memory=True), rank=0, world_size=1)
    batches = list(loader.iter_epoch())
    assert sorted(k for b in batches for k in b.keys) == sorted(keys)
    for batch in batches:
        assert isinstance(batch, VideoBatch)
        B = len(batch.keys)
        assert 1 <= B <= 3
        assert batch.frames_BTCHW.shape == (B, 4, 3, 40, 40)
        assert batch.frames_BTCHW.dtype == torch.uint8
        # Channels-last: a permuted view of one contiguous (B, T, H, W, 3) block.
        assert batch.frames_BTCHW.permute(0, 1, 3, 4, 2).is_contiguous()
        assert batch.frame_index_BT.dtype == torch.int64
        starts = batch.frame_index_BT[:, :1]
        assert torch.equal(batch.frame_index_BT, starts + torch.arange(4) * 2)
        for meta, start in zip(batch.meta, starts[:, 0].tolist(), strict=True):
            assert meta["start_frame"] == start
            assert 0 <= start <= meta["frames"] - 7
            assert {"source", "source_sha256", "clip_index", "fps", "crop", "flip"} <= meta.keys()
    assert loader.corrupt_count == 0


def test_every_frame_gets_the_same_crop_and_flip(real: tuple[Path, list[str]]) -> None:
    """Each output frame is the source frame cropped with the (even) box and flip the meta reports.

    The loader crops, scales and converts to RGB in one FFmpeg pass; the
    reference decodes full RGB frames and crops/resizes them in torch. They
    agree to about a grey level; the wrong flip, or the box of another
    sample, is far off.
    """
    directory, _ = real
    loader = clip_loader(_cfg(directory, num_workers=0, frame_stride=1, frames=5), rank=0, world_size=1)
    crops, flips = set(), set()
    mp4_by_key = _mp4_by_key(directory)
    for batch in loader.iter_epoch():
        for b, (key, meta) in enumerate(zip(batch.keys, batch.meta, strict=True)):
            box = CropBox(*meta["crop"])
            assert all(v % 2 == 0 for v in meta["crop"]), meta["crop"]
            source_THWC = decode_mp4_frames(mp4_by_key[key], batch.frame_index_BT[b].tolist())
            got_TCHW = batch.frames_BTCHW[b].float()
            expected_TCHW = crop_resize_frames(source_THWC, box, 32, flip=meta["flip"]).float()
            mirrored_TCHW = crop_resize_frames(source_THWC, box, 32, flip=not meta["flip"]).float()
            error = (got_TCHW - expected_TCHW).abs()
            assert error.mean() < 2.0 and error.max() < 40, (error.mean(), error.max())
            assert (got_TCHW - mirrored_TCHW).abs().mean() > 3 * error.mean()
            crops.add(tuple(meta["crop"]))
            flips.add(meta["flip"])
    assert len(crops) > 3 and flips == {True, False}


def test_fused_crop_resize_matches_torch_on_a_still(tmp_path: Path) -> None:
    """On a smooth still, FFmpeg's crop -> scale -> RGB pass and torch's resize agree within codec error."""
    yy, xx = np.meshgrid(np.linspace(0, 1, 48), np.linspace(0, 1, 64), indexing="ij")
    still_HWC = np.stack([200 * yy + 20, 200 * xx + 20, 120 + 80 * yy * xx], axis=-1).astype(np.uint8)
    mp4 = encode_mp4(np.stack([still_HWC] * 3))
    reference_THWC = decode_mp4_frames(mp4, [0, 2])
    for box in (CropBox(0, 0, 48, 64), CropBox(6, 10, 30, 40), CropBox(20, 2, 28, 28)):
        got_THWC, used = decode_mp4_crop_resize(mp4, [0, 2], lambda h, w, box=box: box, 24)
        assert used == box and got_THWC.shape == (2, 24, 24, 3) and got_THWC.dtype == torch.uint8
        got_TCHW = got_THWC.permute(0, 3, 1, 2)
        expected_TCHW = crop_resize_frames(reference_THWC, box, 24, flip=False)
        error = (got_TCHW.float() - expected_TCHW.float()).abs()
        assert error.mean() < 2.5 and error.max() <= 8, (box, error.mean(), error.max())


def test_even_crop_box_moves_edges_at_most_one_pixel() -> None:
    for box in (CropBox(3, 5, 7, 9), CropBox(0, 0, 1, 1), CropBox(2, 4, 6, 8), CropBox(1, 1, 2, 2)):
        even = even_crop_box(box)
        assert all(v % 2 == 0 for v in (even.top, even.left, even.height, even.width))
        assert even.height >= 2 and even.width >= 2
        assert abs(even.top - box.top) <= 1 and abs(even.left - box.left) <= 1
        assert abs(even.top + even.height - box.top - box.height) <= 1
        assert abs(even.left + even.width - box.left - box.width) <= 1
    assert even_crop_box(CropBox(2, 4, 6, 8)) == CropBox(2, 4, 6, 8)


def test_identical_frames_stay_identical(tmp_path: Path) -> None:
    """A clip of one repeated (asymmetric) frame: augmented frames are all equal, for every draw."""
    rng = np.random.default_rng(0)
    still_HWC = np.repeat(np.repeat(rng.integers(0, 256, (8, 12, 3), dtype=np.uint8), 4, 0), 4, 1)
    clips = [FixtureClip(np.stack([still_HWC] * 6), source="still", clip_index=i) for i in range(8)]
    write_clip_shards(tmp_path, [clips])
    decoded_THWC = decode_mp4_frames(encode_mp4(clips[0].frames_THWC), None)
    assert (decoded_THWC == decoded_THWC[:1]).all(), "precondition: the codec kept the frames identical"
    loader = clip_loader(_cfg(tmp_path, num_workers=0, frame_stride=1, frames=6, batch_size=4), rank=0, world_size=1)
    outputs = [(frames_TCHW, meta) for b in loader.iter_epoch() for frames_TCHW, meta in zip(b.frames_BTCHW, b.meta)]
    for frames_TCHW, _ in outputs:
        assert (frames_TCHW == frames_TCHW[:1]).all()
    # The draws differ between clips, so equality is not an accident of one crop.
    assert len({tuple(m["crop"]) for _, m in outputs}) > 1
    assert {m["flip"] for _, m in outputs} == {True, False}


def test_split_is_disjoint_across_two_ranks_and_two_workers(syn4: tuple[Path, list[str]]) -> None:
    directory, keys = syn4
    per_rank = []
    for rank in range(2):
        loader = clip_loader(_cfg(directory), rank=rank, world_size=2)
        assert loader.mode == "split"
        rank_keys = _epoch_keys(loader)
        assert len(rank_keys) == len(set(rank_keys)) == 6
        per_rank.append(set(rank_keys))
    assert not per_rank[0] & per_rank[1]
    assert per_rank[0] | per_rank[1] == set(keys)


def test_split_changes_with_epoch_but_stays_disjoint(syn4: tuple[Path, list[str]]) -> None:
    directory, keys = syn4
    loaders = [clip_loader(_cfg(directory), rank=rank, world_size=2) for rank in range(2)]
    epochs = [[set(_epoch_keys(loader)) for loader in loaders] for _ in range(3)]
    for rank0, rank1 in epochs:
        assert not rank0 & rank1 and rank0 | rank1 == set(keys)
    assert len({frozenset(e[0]) for e in epochs}) > 1, "the shard shuffle should move shards between ranks"


def test_resampled_mode_gives_equal_epoch_lengths(syn2: tuple[Path, list[str]]) -> None:
    directory, keys = syn2
    lengths, orders = [], []
    for rank in range(2):
        loader = clip_loader(_cfg(directory, samples_per_epoch=10), rank=rank, world_size=2)
        assert loader.mode == "resampled"
        for _ in range(2):
            epoch_keys = _epoch_keys(loader)
            lengths.append(len(epoch_keys))
            orders.append(epoch_keys)
            assert set(epoch_keys) <= set(keys)
    assert lengths == [10, 10, 10, 10]
    assert len({tuple(o) for o in orders}) == 4


def test_resampled_default_epoch_is_clips_over_world(syn2: tuple[Path, list[str]]) -> None:
    directory, _ = syn2
    loader = clip_loader(_cfg(directory), rank=1, world_size=2)
    assert loader.samples_per_epoch == 3
    assert len(_epoch_keys(loader)) == 3


def test_split_mode_with_too_few_shards_is_an_error(syn2: tuple[Path, list[str]]) -> None:
    with pytest.raises(ValueError, match="at least world_size \\* num_workers = 4 shards, found 2"):
        clip_loader(_cfg(syn2[0], shard_mode="split"), rank=0, world_size=2)


def test_without_manifest_shards_are_globbed(tmp_path: Path) -> None:
    keys = synthetic_clip_shards(tmp_path, num_shards=2, clips_per_shard=2, manifest=False)
    assert sorted(_epoch_keys(clip_loader(_cfg(tmp_path), rank=0, world_size=1))) == sorted(keys)
    with pytest.raises(ValueError, match="samples_per_epoch"):
        clip_loader(_cfg(tmp_path, num_workers=4), rank=0, world_size=1)


def test_corrupt_samples_are_skipped_and_counted(corrupt: tuple[Path, list[str], list[str]]) -> None:
    directory, _, good = corrupt
    loader = clip_loader(_cfg(directory, frames=4, frame_stride=1), rank=0, world_size=1)
    assert sorted(_epoch_keys(loader)) == sorted(good)
    expected = {"decode_error": 2, "missing_field": 1, "frame_count": 1}
    assert loader.corrupt_by_reason == expected
    assert loader.corrupt_count == 4
    # Counts accumulate across epochs and survive a resume.
    _epoch_keys(loader)
    assert loader.corrupt_count == 8
    resumed = clip_loader(_cfg(directory, frames=4, frame_stride=1), rank=0, world_size=1, state=loader.state_dict())
    _epoch_keys(resumed)
    assert resumed.corrupt_by_reason == {k: 3 * v for k, v in expected.items()}


def test_too_short_clips_are_skipped(syn2: tuple[Path, list[str]]) -> None:
    loader = clip_loader(_cfg(syn2[0], frames=5, frame_stride=2, num_workers=0), rank=0, world_size=1)
    with pytest.raises(NoUsableSampleError, match="produced no batch"):
        next(iter(loader))
    assert loader.corrupt_by_reason == {"too_short": 6}


def test_non_corrupt_errors_propagate(syn2: tuple[Path, list[str]]) -> None:
    """A bug in the decode step is not silently counted as a corrupt sample."""

    def broken(sample: dict, rng: np.random.Generator) -> dict:
        raise TypeError("bug")

    loader = ShardLoader(
        _cfg(syn2[0], num_workers=0),
        rank=0,
        world_size=1,
        prefix="clips",
        decode=broken,
        collate=list,
        to_batch=list,
    )
    with pytest.raises(TypeError, match="bug"):
        next(iter(loader))


def _run_keys(loader: ShardLoader, num_batches: int) -> list[tuple[str, int]]:
    """(key, frame checksum) of the next num_batches batches, across epochs."""
    out = []
    for _, batch in zip(range(num_batches), loader, strict=False):
        sums = batch.frames_BTCHW.flatten(1).sum(1, dtype=torch.int64).tolist()
        out.extend(zip(batch.keys, sums, strict=True))
    return out


def _replayed_and_skipped(expected: list, got: list) -> tuple[int, int]:
    """Samples yielded again / never yielded by a resumed run, compared with an uninterrupted one."""
    missing = Counter(expected) - Counter(got)
    extra = Counter(got) - Counter(expected)
    return sum(extra.values()), sum(missing.values())


@pytest.mark.parametrize(
    ("dataset", "world_size", "num_workers", "stop_after"),
    [
        ("syn4", 2, 2, 1),
        ("syn4", 2, 2, 4),
        ("syn4", 1, 2, 3),
        ("syn4", 2, 0, 2),
        ("syn2", 2, 2, 3),
        ("corrupt", 2, 2, 3),
        ("corrupt", 1, 2, 5),
    ],
    ids=[
        "split-w2-k1",
        "split-w2-k4-epoch-edge",
        "split-world1-w2-k3-mid-epoch",
        "split-w0-k2",
        "resampled-w2-k3",
        "corrupt-w2-k3",
        "corrupt-world1-w2-k5",
    ],
)
def test_resume_continues_like_an_uninterrupted_run(
    dataset: str, world_size: int, num_workers: int, stop_after: int, request: pytest.FixtureRequest
) -> None:
    """Consume k batches, save, build a fresh loader from the (JSON round-tripped) state, continue:
    the batches (keys and augmented pixels) equal the uninterrupted run's, across an epoch boundary."""
    directory = request.getfixturevalue(dataset)[0]
    cfg = _cfg(directory, num_workers=num_workers, samples_per_epoch=7 if dataset == "syn2" else 0, frame_stride=1)
    rank = world_size - 1
    total = 9
    uninterrupted = _run_keys(clip_loader(cfg, rank=rank, world_size=world_size), total)

    first = clip_loader(cfg, rank=rank, world_size=world_size)
    head = _run_keys(first, stop_after)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = clip_loader(cfg, rank=rank, world_size=world_size, state=state)
    tail = _run_keys(resumed, total - stop_after)

    assert head == uninterrupted[: len(head)]
    replayed, skipped = _replayed_and_skipped(uninterrupted[len(head) :], tail)
    assert replayed <= RESUME_MAX_REPLAYED_SAMPLES
    assert skipped <= RESUME_MAX_SKIPPED_SAMPLES
    assert head + tail == uninterrupted


def test_resume_with_a_different_layout_is_refused(syn4: tuple[Path, list[str]]) -> None:
    loader = clip_loader(_cfg(syn4[0]), rank=0, world_size=1)
    _run_keys(loader, 1)
    with pytest.raises(ValueError, match=r"num_workers=2.*has 1"):
        clip_loader(_cfg(syn4[0], num_workers=1), rank=0, world_size=1, state=loader.state_dict())


@pytest.mark.parametrize(
    ("field", "value"),
    [("batch_size", 0), ("crop_scale", (0.5, 0.2)), ("hflip_prob", 1.5), ("shard_mode", "nope")],
)
def test_config_validation_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"LoaderConfig.{field}"):
        LoaderConfig(shards="x", **{field: value})


def _mp4_by_key(directory: Path) -> dict[str, bytes]:
    import webdataset as wds

    urls = [str(p) for p in sorted(directory.glob("clips-*.tar"))]
    return {s["__key__"]: s["mp4"] for s in wds.WebDataset(urls, shardshuffle=False)}


def test_short_epochs_with_workers_are_warned_about(syn2: tuple[Path, list[str]], caplog) -> None:
    """Every epoch starts fresh workers; an epoch of a batch or two per worker gets a warning naming the fix."""
    directory, _ = syn2
    with caplog.at_level(logging.WARNING, logger="data_shards.loader"):
        clip_loader(_cfg(directory, num_workers=2), rank=0, world_size=1)
    assert "data.num_workers" in caplog.text and "data.samples_per_epoch" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="data_shards.loader"):
        clip_loader(_cfg(directory, num_workers=0), rank=0, world_size=1)
        clip_loader(_cfg(directory, shard_mode="resampled", samples_per_epoch=64), rank=0, world_size=1)
    assert caplog.text == ""


def _collate_with_pid(samples: list[dict]) -> dict:
    return {**collate_clips(samples), "pid": os.getpid()}


def test_workers_persist_across_epochs(syn4: tuple[Path, list[str]]) -> None:
    """Epochs reuse the same worker processes (no fork per epoch) and still cover every sample once each."""
    directory, keys = syn4
    cfg = _cfg(directory, num_workers=2, shard_mode="split")
    loader = ShardLoader(
        cfg, rank=0, world_size=1, prefix="clips", decode=ClipDecoder(cfg), collate=_collate_with_pid, to_batch=dict
    )
    pids, epochs = set(), []
    for _ in range(3):
        batches = list(loader.iter_epoch())
        pids |= {b["pid"] for b in batches}
        epochs.append(sorted(k for b in batches for k in b["keys"]))
    assert len(pids) == 2 and os.getpid() not in pids
    assert epochs == [sorted(keys)] * 3


def test_rewinding_a_live_loader_replays_exactly(syn4: tuple[Path, list[str]]) -> None:
    """load_state_dict on a loader whose persistent workers are mid-epoch: the next batches are the saved ones."""
    loader = clip_loader(_cfg(syn4[0], num_workers=2, frame_stride=1), rank=0, world_size=1)
    _run_keys(loader, 2)
    state = loader.state_dict()
    after_save = _run_keys(loader, 5)  # runs into the next epoch
    loader.load_state_dict(state)
    assert _run_keys(loader, 5) == after_save
