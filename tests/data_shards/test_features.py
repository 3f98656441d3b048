"""Feature shards: a lossless bf16 round trip of the frozen encoder's tokens, the hash guard, the loader.

Shape legend: B clips, T frames, N = gh * gw tokens, D encoder width.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path

import pytest
import torch
import webdataset as wds

from data_shards.features import (
    FEATURES_FORMAT,
    ClipEncoder,
    EncoderMismatchError,
    FeatureBatch,
    FeatureBlob,
    VisibleSets,
    encode_clip_shards,
    feature_bytes_per_frame,
    feature_dir,
    feature_loader,
    features_from_bytes,
    frames_for_encoding,
    tokens_from_bytes,
    tokens_to_bytes,
    visible_count,
)
from data_shards.loader import CorruptSampleError, LoaderConfig
from pretrain.encoder import FrozenEncoder, load_encoder
from tests.data_shards.shard_fixtures import FixtureClip, real_clips, synthetic_frames, write_clip_shards

IMAGE_SIZE = 56


@pytest.fixture(scope="module")
def encoder() -> FrozenEncoder:
    return load_encoder("random", arch="vit_test", image_size=IMAGE_SIZE)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 shards: carphone and bikes clips of 6 frames, one shard with a garbage sample."""
    directory = tmp_path_factory.mktemp("clips")
    carphone = real_clips("carphone", clip_frames=6, num_clips=4)
    bikes = real_clips("bikes", clip_frames=6, num_clips=3)
    bad = FixtureClip(synthetic_frames(6, 32, 48, seed=0), source="bad", clip_index=0, mp4_override=b"not a video")
    write_clip_shards(directory, [carphone[:2], carphone[2:], bikes[:2], [bikes[2], bad]])
    return directory


@pytest.fixture(scope="module")
def feature_root(tmp_path_factory: pytest.TempPathFactory, clip_dir: Path, encoder: FrozenEncoder) -> Path:
    root = tmp_path_factory.mktemp("features")
    encode_clip_shards(clip_dir, root, encoder, batch_clips=3, visible_fraction=0.1, visible_sets=3)
    return root


@pytest.fixture(scope="module")
def plain_root(tmp_path_factory: pytest.TempPathFactory, clip_dir: Path, encoder: FrozenEncoder) -> Path:
    """Features without visible sets (visible_fraction=0), for grid crops."""
    root = tmp_path_factory.mktemp("plain")
    encode_clip_shards(clip_dir, root, encoder, visible_fraction=0)
    return root


def _samples(directory: Path, prefix: str) -> list[dict]:
    urls = [str(p) for p in sorted(directory.glob(f"{prefix}-*.tar"))]
    return list(wds.WebDataset(urls, shardshuffle=False))


def test_round_trip_is_bit_exact_in_bf16(clip_dir: Path, feature_root: Path, encoder: FrozenEncoder) -> None:
    out = feature_dir(feature_root, encoder.weights_hash)
    features = {s["__key__"]: s for s in _samples(out, "features")}
    clips = [s for s in _samples(clip_dir, "clips") if s["__key__"] in features]
    assert len(clips) == len(features) == 7
    for clip in clips:
        frames_TCHW = frames_for_encoding(clip["mp4"], IMAGE_SIZE)
        direct_TND = encoder.encode(frames_TCHW[None])[0].to(torch.bfloat16)
        stored = features[clip["__key__"]]
        tokens_TND = tokens_from_bytes(stored["safetensors"])
        assert tokens_TND.dtype == torch.bfloat16
        assert tokens_TND.shape == (6, encoder.num_tokens, encoder.embed_dim)
        assert torch.equal(tokens_TND.view(torch.int16), direct_TND.view(torch.int16))
        meta = json.loads(stored["json"])
        assert meta["encoder_hash"] == encoder.weights_hash
        assert meta["grid"] == [encoder.grid, encoder.grid] and meta["embed_dim"] == encoder.embed_dim
        assert meta["clip_index"] == json.loads(clip["json"])["clip_index"]


def test_visible_sets_are_encoded_from_their_patches_only(
    clip_dir: Path, feature_root: Path, encoder: FrozenEncoder
) -> None:
    """Stored sets: V = round(0.1 * 16) = 2 sorted distinct patches, M = 3 per frame, tokens = encode_subset."""
    features = {s["__key__"]: s for s in _samples(feature_dir(feature_root, encoder.weights_hash), "features")}
    for clip in _samples(clip_dir, "clips"):
        if clip["__key__"] not in features:
            continue
        tokens_TND, visible = features_from_bytes(features[clip["__key__"]]["safetensors"])
        assert visible is not None and visible.idx_TMV.shape == (6, 3, 2) and visible.idx_TMV.dtype == torch.int32
        assert visible.tokens_TMVD.shape == (6, 3, 2, encoder.embed_dim)
        idx = visible.idx_TMV.long()
        assert (idx[..., 1:] > idx[..., :-1]).all()
        frames_TCHW = frames_for_encoding(clip["mp4"], IMAGE_SIZE)
        direct_TMVD = encoder.encode_subset(frames_TCHW[:, None].expand(-1, 3, -1, -1, -1), idx).to(torch.bfloat16)
        assert torch.equal(visible.tokens_TMVD.view(torch.int16), direct_TMVD.view(torch.int16))
        # Encoded from the patches alone: not the full-frame tokens at those positions.
        D = encoder.embed_dim
        full_TMVD = tokens_TND[:, None].expand(-1, 3, -1, -1).gather(2, idx[..., None].expand(-1, -1, -1, D))
        assert not torch.equal(visible.tokens_TMVD, full_TMVD)
    # The sets of two frames (and of two sets) differ: they are drawn per frame.
    assert not torch.equal(visible.idx_TMV[0], visible.idx_TMV[1])


def test_tokens_are_stored_as_raw_bf16(feature_root: Path, encoder: FrozenEncoder) -> None:
    """The safetensors header says BF16: no fp16 (lossy) conversion on the way to disk."""
    blob = _samples(feature_dir(feature_root, encoder.weights_hash), "features")[0]["safetensors"]
    header_len = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8 : 8 + header_len])
    assert header["tokens"]["dtype"] == "BF16"


def test_manifest_records_the_encoder(feature_root: Path, encoder: FrozenEncoder) -> None:
    manifest = json.loads((feature_dir(feature_root, encoder.weights_hash) / "manifest.json").read_text())
    assert manifest["format"] == FEATURES_FORMAT
    assert manifest["encoder"] == encoder.identity()
    assert manifest["grid"] == [encoder.grid, encoder.grid]
    assert manifest["clips"] == 7 == sum(s["samples"] for s in manifest["shards"])
    assert [s["name"] for s in manifest["shards"]] == [f"features-{i:06d}.tar" for i in range(4)]
    assert manifest["skipped"] == {"decode_error": 1}
    assert manifest["visible_fraction"] == 0.1 and manifest["visible_sets"] == 3


def test_changed_visible_sets_are_not_reused(clip_dir: Path, feature_root: Path, encoder: FrozenEncoder) -> None:
    with pytest.raises(FileExistsError, match=r"visible_fraction=0\.1"):
        encode_clip_shards(clip_dir, feature_root, encoder, visible_fraction=0.2, visible_sets=3)


def test_encoding_in_groups_changes_no_token(
    clip_dir: Path, feature_root: Path, encoder: FrozenEncoder, tmp_path: Path
) -> None:
    single = encode_clip_shards(clip_dir, tmp_path, encoder, batch_clips=1, visible_fraction=0.1, visible_sets=3)
    grouped = feature_dir(feature_root, encoder.weights_hash)
    for a, b in zip(_samples(single, "features"), _samples(grouped, "features"), strict=True):
        assert a["__key__"] == b["__key__"]
        assert a["safetensors"] == b["safetensors"]


CLIP_ENCODER_MEMBERS = {name for name in vars(ClipEncoder) if not name.startswith("_")}


class _ClipEncoderOnly:
    """The members ClipEncoder declares, taken from a FrozenEncoder, and nothing else."""

    def __init__(self, inner: FrozenEncoder) -> None:
        for member in CLIP_ENCODER_MEMBERS:
            setattr(self, member, getattr(inner, member))


def test_the_encode_pass_needs_only_the_clip_encoder_protocol(
    clip_dir: Path, feature_root: Path, encoder: FrozenEncoder, tmp_path: Path
) -> None:
    """data_shards imports no model: whatever has ClipEncoder's members encodes exactly as the frozen ViT does."""
    assert {"weights_hash", "identity", "encode", "encode_with_layers", "encode_subset"} <= CLIP_ENCODER_MEMBERS
    only = _ClipEncoderOnly(encoder)
    out = encode_clip_shards(clip_dir, tmp_path, only, batch_clips=3, visible_fraction=0.1, visible_sets=3)
    assert out == feature_dir(tmp_path, encoder.weights_hash)
    reference = feature_dir(feature_root, encoder.weights_hash)
    for a, b in zip(_samples(out, "features"), _samples(reference, "features"), strict=True):
        assert (a["__key__"], a["safetensors"], a["json"]) == (b["__key__"], b["safetensors"], b["json"])


def test_existing_output_is_reused(clip_dir: Path, feature_root: Path, encoder: FrozenEncoder) -> None:
    out = feature_dir(feature_root, encoder.weights_hash)
    before = (out / "manifest.json").stat().st_mtime_ns
    assert encode_clip_shards(clip_dir, feature_root, encoder, visible_fraction=0.1, visible_sets=3) == out
    assert (out / "manifest.json").stat().st_mtime_ns == before


def test_encode_with_unexpected_hash_names_both(clip_dir: Path, encoder: FrozenEncoder, tmp_path: Path) -> None:
    with pytest.raises(EncoderMismatchError) as info:
        encode_clip_shards(clip_dir, tmp_path, encoder, expected_encoder_hash="f" * 64)
    assert encoder.weights_hash in str(info.value) and "f" * 64 in str(info.value)
    assert not list(tmp_path.iterdir())


def test_loader_with_mismatched_hash_names_both(feature_root: Path, encoder: FrozenEncoder) -> None:
    cfg = LoaderConfig(shards=str(feature_dir(feature_root, encoder.weights_hash)), num_workers=0)
    with pytest.raises(EncoderMismatchError) as info:
        feature_loader(cfg, 0, 1, expected_encoder_hash="0" * 64)
    assert encoder.weights_hash in str(info.value) and "0" * 64 in str(info.value)
    with pytest.raises(FileNotFoundError, match=encoder.weights_hash[:16]):
        feature_loader(LoaderConfig(shards=str(feature_root), num_workers=0), 0, 1, expected_encoder_hash="0" * 64)


def test_two_encoders_live_side_by_side(clip_dir: Path, feature_root: Path, encoder: FrozenEncoder) -> None:
    other = load_encoder("random", arch="vit_test", image_size=IMAGE_SIZE, seed=1)
    assert other.weights_hash != encoder.weights_hash
    encode_clip_shards(clip_dir, feature_root, other, visible_fraction=0)
    for enc in (encoder, other):
        loader = feature_loader(LoaderConfig(shards=str(feature_root), num_workers=0), 0, 1, enc.weights_hash)
        assert loader.manifest["encoder"]["weights_hash"] == enc.weights_hash


def test_feature_loader_batches_and_grid_augmentation(plain_root: Path, encoder: FrozenEncoder) -> None:
    """Each batch equals the stored tokens, subsampled in time, cropped and flipped as its meta reports."""
    cfg = LoaderConfig(
        shards=str(plain_root), batch_size=3, frames=3, frame_stride=2, crop_grid=3, num_workers=2, shuffle_buffer=3
    )
    stored = {
        s["__key__"]: tokens_from_bytes(s["safetensors"])
        for s in _samples(feature_dir(plain_root, encoder.weights_hash), "features")
    }
    loader = feature_loader(cfg, 0, 1, encoder.weights_hash)
    keys, flips = [], set()
    g, D = encoder.grid, encoder.embed_dim
    for batch in loader.iter_epoch():
        assert isinstance(batch, FeatureBatch)
        B = len(batch.keys)
        assert batch.tokens_BTND.shape == (B, 3, 9, D) and batch.tokens_BTND.dtype == torch.bfloat16
        assert batch.grid_hw == (3, 3)
        assert batch.visible_idx_BTV is None and batch.visible_tokens_BTVD is None
        for b, (key, meta) in enumerate(zip(batch.keys, batch.meta, strict=True)):
            top, left, h, w = meta["grid_crop"]
            grid_TGGD = stored[key][batch.frame_index_BT[b]].view(3, g, g, D)[:, top : top + h, left : left + w]
            if meta["flip"]:
                grid_TGGD = grid_TGGD.flip(2)
            assert torch.equal(batch.tokens_BTND[b], grid_TGGD.reshape(3, 9, D))
            flips.add(meta["flip"])
        keys += batch.keys
    assert sorted(keys) == sorted(stored) and flips == {True, False}


def test_feature_loader_visible_sets_follow_frames_and_flip(feature_root: Path, encoder: FrozenEncoder) -> None:
    """Each frame gets one of its stored sets; a flip mirrors the indices' columns and keeps the tokens."""
    cfg = LoaderConfig(shards=str(feature_root), batch_size=2, frames=3, frame_stride=2, num_workers=2, hflip_prob=0.5)
    stored = {
        s["__key__"]: features_from_bytes(s["safetensors"])[1]
        for s in _samples(feature_dir(feature_root, encoder.weights_hash), "features")
    }
    g = encoder.grid
    flips, sets_used = set(), set()
    for batch in feature_loader(cfg, 0, 1, encoder.weights_hash).iter_epoch():
        assert batch.visible_idx_BTV is not None and batch.visible_tokens_BTVD is not None
        B = len(batch.keys)
        assert batch.visible_idx_BTV.shape == (B, 3, 2) and batch.visible_tokens_BTVD.dtype == torch.bfloat16
        for b, (key, meta) in enumerate(zip(batch.keys, batch.meta, strict=True)):
            flips.add(meta["flip"])
            for t, frame in enumerate(batch.frame_index_BT[b].tolist()):
                idx_V = batch.visible_idx_BTV[b, t]
                assert (idx_V[1:] > idx_V[:-1]).all()
                unflipped_V = idx_V // g * g + (g - 1 - idx_V % g) if meta["flip"] else idx_V
                order = unflipped_V.argsort()
                matches = [
                    m
                    for m in range(3)
                    if torch.equal(stored[key].idx_TMV[frame, m].long(), unflipped_V[order])
                    and torch.equal(stored[key].tokens_TMVD[frame, m], batch.visible_tokens_BTVD[b, t][order])
                ]
                assert matches
                sets_used.add(matches[0])
    assert flips == {True, False} and len(sets_used) > 1


def test_visible_sets_refuse_grid_crops(feature_root: Path, encoder: FrozenEncoder) -> None:
    cfg = LoaderConfig(shards=str(feature_root), frames=2, crop_grid=3, num_workers=0)
    with pytest.raises(ValueError, match="crop_grid=3"):
        feature_loader(cfg, 0, 1, encoder.weights_hash)
    batch = next(iter(feature_loader(cfg, 0, 1, encoder.weights_hash, visible=False)))
    assert batch.grid_hw == (3, 3) and batch.visible_idx_BTV is None


def test_feature_loader_split_and_resume(feature_root: Path, encoder: FrozenEncoder) -> None:
    cfg = LoaderConfig(shards=str(feature_root), batch_size=1, frames=2, num_workers=2, shuffle_buffer=2)
    rank_keys = [
        {k for b in feature_loader(cfg, r, 2, encoder.weights_hash).iter_epoch() for k in b.keys} for r in range(2)
    ]
    assert not rank_keys[0] & rank_keys[1] and len(rank_keys[0] | rank_keys[1]) == 7

    def run(loader: object, n: int) -> list[tuple[str, float, list[int], float]]:
        return [
            (
                b.keys[0],
                b.tokens_BTND.float().sum().item(),
                b.visible_idx_BTV.flatten().tolist(),
                b.visible_tokens_BTVD.float().sum().item(),
            )
            for _, b in zip(range(n), loader, strict=False)
        ]

    uninterrupted = run(feature_loader(cfg, 0, 1, encoder.weights_hash), 10)
    first = feature_loader(cfg, 0, 1, encoder.weights_hash)
    head = run(first, 3)
    resumed = feature_loader(cfg, 0, 1, encoder.weights_hash, state=first.state_dict())
    assert head + run(resumed, 7) == uninterrupted


def test_crop_grid_larger_than_grid_is_an_error(feature_root: Path, encoder: FrozenEncoder) -> None:
    with pytest.raises(ValueError, match="crop_grid=5"):
        feature_loader(LoaderConfig(shards=str(feature_root), crop_grid=5), 0, 1, encoder.weights_hash)


def test_encode_command(clip_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m pretrain.encode`` (the command lives with the encoder): encoder settings from the config."""
    from pretrain.encode import main as encode_main

    overrides = ["--encoder.source=random", "--encoder.arch=vit_test", "--encoder.image_size=28", "--run.device=cpu"]
    argv = ["--config", "tiny-cpu", *overrides, "--shards", str(clip_dir), "--out", str(tmp_path)]
    assert encode_main([*argv, "--batch", "2"]) == 0
    out = Path(capsys.readouterr().out.strip())
    manifest = json.loads((out / "manifest.json").read_text())
    assert out.parent == tmp_path and out.name == manifest["encoder"]["weights_hash"][:16]
    assert manifest["image_size"] == 28 and manifest["grid"] == [2, 2] and manifest["clips"] == 7
    assert manifest["args"]["batch"] == 2


def test_data_shards_encode_says_where_the_command_went(capsys: pytest.CaptureFixture[str]) -> None:
    """data_shards imports no model code, so its old encode command refuses with one line naming the new one."""
    from data_shards.__main__ import main as data_shards_main

    assert data_shards_main(["encode", "--shards", "in", "--out", "out", "--encoder", "random"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "python -m pretrain.encode --config" in lines[0]


def test_frame_subsets_read_only_those_frames_exactly() -> None:
    """Reading frames [4, 1, 6] of a blob equals indexing the full tensors; visible sets follow."""
    g = torch.Generator().manual_seed(0)
    tokens_TND = torch.randn(8, 6, 5, generator=g).to(torch.bfloat16)
    idx_TMV = torch.randint(0, 6, (8, 2, 3), generator=g, dtype=torch.int32)
    vis_TMVD = torch.randn(8, 2, 3, 5, generator=g).to(torch.bfloat16)
    blob = tokens_to_bytes(tokens_TND, VisibleSets(idx_TMV, vis_TMVD))
    frames = [4, 1, 6]
    sub_TND, visible = features_from_bytes(blob, frames=frames)
    assert torch.equal(sub_TND.view(torch.int16), tokens_TND[frames].view(torch.int16))
    assert visible is not None
    assert torch.equal(visible.idx_TMV, idx_TMV[frames])
    assert torch.equal(visible.tokens_TMVD.view(torch.int16), vis_TMVD[frames].view(torch.int16))
    stored = FeatureBlob(blob)
    assert (stored.num_frames, stored.num_tokens, stored.dim, stored.has_visible) == (8, 6, 5, True)
    with pytest.raises(IndexError, match="out of range"):
        stored.tokens([8])
    # The copy owns its memory: writing it leaves the blob's bytes alone.
    sub_TND.zero_()
    assert torch.equal(tokens_from_bytes(blob).view(torch.int16), tokens_TND.view(torch.int16))


def _blob_of_zeros(T: int, N: int, D: int, M: int, V: int, L: int) -> bytes:
    """The feature blob of a T-frame clip with that layout (zeros: only the sizes matter)."""
    visible = VisibleSets(torch.zeros(T, M, V, dtype=torch.int32), torch.zeros(T, M, V, D).bfloat16()) if M else None
    layers_TLND = torch.zeros(T, L, N, D).bfloat16() if L else None
    return tokens_to_bytes(torch.zeros(T, N, D).bfloat16(), visible, layers_TLND)


@pytest.mark.parametrize(
    ("N", "D", "M", "V", "L"),
    [(16, 8, 0, 0, 0), (16, 8, 3, 2, 0), (16, 8, 0, 0, 2), (16, 8, 2, 1, 2), (256, 384, 2, 13, 0)],
    ids=["tokens", "visible", "layers", "visible+layers", "vits14-224"],
)
def test_bytes_per_frame_estimate_is_the_blob_size_less_its_header(N: int, D: int, M: int, V: int, L: int) -> None:
    """The storage estimate the encode command prints: T frames of it are the real blob but for its JSON header."""
    T = 3
    per_frame = feature_bytes_per_frame(N, D, M, V, L)
    blob = _blob_of_zeros(T, N, D, M, V, L)
    header = 8 + int.from_bytes(blob[:8], "little")
    assert len(blob) == header + T * per_frame
    assert header < 400


def test_bytes_per_frame_of_vits14_at_224_with_two_visible_sets() -> None:
    """ViT-S/14 at 224 px: 256 tokens of width 384, 2 sets of 13 (F = 0.05): about 217 kB a frame."""
    assert visible_count(256, 0.05) == 13
    assert feature_bytes_per_frame(256, 384, 2, 13, 0) == 256 * 384 * 2 + 2 * 13 * (4 + 384 * 2) == 216_680


@pytest.mark.parametrize(
    "damage",
    ["empty", "short_header", "not_json", "truncated_data", "wrong_dtype", "no_tokens", "bad_visible"],
)
def test_malformed_feature_blobs_are_corrupt_samples(damage: str) -> None:
    tokens_TND = torch.zeros(4, 6, 5, dtype=torch.bfloat16)
    good = tokens_to_bytes(tokens_TND)
    size = int.from_bytes(good[:8], "little")
    header = json.loads(good[8 : 8 + size])

    def with_header(h: dict) -> bytes:
        raw = json.dumps(h).encode()
        return len(raw).to_bytes(8, "little") + raw + good[8 + size :]

    blob = {
        "empty": b"",
        "short_header": (10**6).to_bytes(8, "little") + b"{}",
        "not_json": (4).to_bytes(8, "little") + b"\xff\xfe{]" + good[8 + size :],
        "truncated_data": good[:-10],
        "wrong_dtype": with_header({**header, "tokens": {**header["tokens"], "dtype": "F64"}}),
        "no_tokens": with_header({"other": header["tokens"]}),
        "bad_visible": tokens_to_bytes(
            tokens_TND, VisibleSets(torch.full((4, 1, 2), 9, dtype=torch.int32), torch.zeros(4, 1, 2, 5).bfloat16())
        ),
    }[damage]
    with pytest.raises(CorruptSampleError, match="unreadable tokens") as info:
        features_from_bytes(blob, key="k")
    assert info.value.reason == "decode_error"


def test_encoder_blocks_round_trip_and_follow_crop_and_flip(clip_dir: Path, encoder: FrozenEncoder, tmp_path) -> None:
    """--feature-layers stores blocks equal to encode_layers (bf16); the loader crops and mirrors them like tokens."""
    root = encode_clip_shards(clip_dir, tmp_path / "blocks", encoder, visible_fraction=0, feature_layers=[1, 0])
    assert json.loads((root / "manifest.json").read_text())["feature_layers"] == [1, 0]
    clips = {s["__key__"]: s for s in _samples(clip_dir, "clips")}
    for sample in _samples(root, "features"):
        stored = FeatureBlob(sample["safetensors"])
        frames = list(range(stored.num_frames))
        blocks_TLND = stored.layers(frames)
        assert blocks_TLND is not None and blocks_TLND.shape == (6, 2, encoder.num_tokens, encoder.embed_dim)
        frames_TCHW = frames_for_encoding(clips[sample["__key__"]]["mp4"], IMAGE_SIZE)
        direct = encoder.encode_layers(frames_TCHW[None], [1, 0])
        for i in range(2):
            assert torch.equal(blocks_TLND[:, i].view(torch.int16), direct[i][0].to(torch.bfloat16).view(torch.int16))
    cfg = LoaderConfig(shards=str(root), batch_size=2, frames=3, num_workers=0, crop_grid=2, hflip_prob=0.5)
    loader = feature_loader(cfg, 0, 1, expected_encoder_hash=encoder.weights_hash, layers=True)
    flips = set()
    for batch in loader.iter_epoch():
        assert batch.layers_BTLND is not None and batch.layers_BTLND.shape[2] == 2
        for b, meta in enumerate(batch.meta):
            stored = FeatureBlob(
                next(s for s in _samples(root, "features") if s["__key__"] == batch.keys[b])["safetensors"]
            )
            index = batch.frame_index_BT[b].tolist()
            top, left, h, w = meta["grid_crop"]
            grid = encoder.grid
            expect = stored.layers(index).view(3, 2, grid, grid, -1)[:, :, top : top + h, left : left + w]
            if meta["flip"]:
                expect = expect.flip(3)
            assert torch.equal(
                batch.layers_BTLND[b].view(torch.int16), expect.reshape(3, 2, h * w, -1).view(torch.int16)
            )
            flips.add(meta["flip"])
    assert flips == {True, False}
    plain = encode_clip_shards(clip_dir, tmp_path / "plain", encoder, visible_fraction=0)
    with pytest.raises(ValueError, match="store no encoder blocks"):
        feature_loader(
            dataclasses.replace(cfg, shards=str(plain)), 0, 1, expected_encoder_hash=encoder.weights_hash, layers=True
        )
    with pytest.raises(ValueError, match="feature_layers"):
        encode_clip_shards(clip_dir, tmp_path / "bad", encoder, feature_layers=[encoder.arch.depth])
