"""The procedural pre-training corpus: seeds apart from the eval sets', deterministic shards the loader reads.

Shape legend: B clips, T frames, C = 3, S = image size in pixels.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from data_shards.__main__ import main
from data_shards.io import OutputDirError
from data_shards.loader import LoaderConfig, clip_loader, decode_mp4_frames
from data_shards.procedural import CorpusArgs, corpus_seeds, dataset_seeds, render_video, write_corpus

# 6 videos of 8 frames at 32 px, 2 clips each, 5 clips a shard: 3 shards, the last one short.
_TINY_KWARGS = {"videos": 6, "frames": 8, "size": 32, "clip_frames": 4, "max_samples_per_shard": 5}
_TINY = CorpusArgs(**_TINY_KWARGS)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("corpus") / "tiny"
    write_corpus(out, _TINY)
    return out


def _shard_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_corpus_seeds_never_repeat_an_eval_video() -> None:
    """The eval generates with generate_dataset(seed=1000) and the tests with seeds in 0..10."""
    eval_seeds = set()
    for seed in (1000, *range(11)):
        eval_seeds.update(dataset_seeds(5000, seed))
    for corpus_seed in (0, 1, 1000):
        seeds = corpus_seeds(5000, corpus_seed)
        assert len(set(seeds)) == 5000
        assert not eval_seeds & set(seeds)
        # By construction, not by luck: corpus seeds have the top bit of 64, eval seeds fit in 32 bits.
        assert min(seeds) >= 1 << 63
    assert max(eval_seeds) < 1 << 32
    # A longer corpus extends a shorter one with the same seed.
    assert corpus_seeds(10, 0) == corpus_seeds(5000, 0)[:10]


def test_corpus_layout_and_manifest(tiny: Path) -> None:
    manifest = json.loads((tiny / "manifest.json").read_text())
    assert sorted(p.name for p in tiny.iterdir()) == [
        "clips-000000.tar",
        "clips-000001.tar",
        "clips-000002.tar",
        "manifest.json",
    ]
    assert [s["samples"] for s in manifest["shards"]] == [5, 5, 2]
    assert manifest["clips"] == 12 and manifest["inputs"] == manifest["ok_inputs"] == 6
    assert manifest["args"]["procedural"]["anchor_frame"] == "last"
    assert manifest["args"]["procedural"]["speed_change"] is True
    assert manifest["args"]["procedural"]["pan_speed"] == [2.0, 6.0]
    for shard in manifest["shards"]:
        assert (tiny / shard["name"]).stat().st_size == shard["bytes"]


def test_corpus_is_deterministic(tiny: Path, tmp_path: Path) -> None:
    """Same arguments, another directory and worker processes: the same bytes."""
    result = write_corpus(tmp_path / "again", _TINY, workers=2)
    assert not result.unchanged
    assert _shard_bytes(tmp_path / "again") == _shard_bytes(tiny)
    other = write_corpus(tmp_path / "other", CorpusArgs(**{**_TINY_KWARGS, "seed": 1}))
    assert other.manifest["shards"][0]["sha256"] != result.manifest["shards"][0]["sha256"]


def test_rerun_into_the_same_directory(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "c"
    write_corpus(out, _TINY)
    before = {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in out.iterdir()}
    again = write_corpus(out, _TINY)
    assert again.unchanged
    assert {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in out.iterdir()} == before
    # A damaged shard is made again, to the same bytes.
    (out / "clips-000001.tar").write_bytes(b"damaged")
    assert not write_corpus(out, _TINY).unchanged
    assert _shard_bytes(out) == _shard_bytes(tiny)
    # Other arguments replace the corpus whole.
    smaller = write_corpus(out, CorpusArgs(**{**_TINY_KWARGS, "videos": 2}))
    assert sorted(p.name for p in out.iterdir()) == ["clips-000000.tar", "manifest.json"]
    assert smaller.manifest["clips"] == 4


def test_refuses_a_directory_that_is_not_a_corpus(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirError):
        write_corpus(foreign, _TINY)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign"]


def test_clips_are_the_rendered_videos(tiny: Path) -> None:
    """Each sample's json has the build's fields; its mp4 decodes to the rendered frames (up to x264)."""
    import webdataset as wds

    seeds = corpus_seeds(6, 0)
    samples = list(wds.WebDataset(str(tiny / "clips-00000{0..2}.tar"), shardshuffle=False))
    assert len(samples) == 12
    for index, sample in enumerate(samples):
        meta = json.loads(sample["json"])
        assert {"source", "source_sha256", "clip_index", "start_s", "fps", "frames", "width", "height", "crf"} <= set(
            meta
        )
        video, clip = divmod(index, 2)
        assert meta["source"] == f"procedural:{seeds[video]}" and meta["clip_index"] == clip
        assert sample["__key__"] == f"{meta['source_sha256'][:16]}-{clip:06d}"
        assert meta["start_s"] == pytest.approx(clip * 4 / 8)
        frames_THWC = decode_mp4_frames(sample["mp4"], None, expected_frames=4)
        assert frames_THWC.shape == (4, 32, 32, 3)
        if index in (0, 11):
            rendered_THWC, _ = render_video(seed=seeds[video], **_TINY.video_kwargs())
            error = np.abs(frames_THWC.astype(float) - rendered_THWC[clip * 4 : clip * 4 + 4]).mean()
            assert error < 8, error


def test_clip_loader_reads_the_corpus(tiny: Path) -> None:
    cfg = LoaderConfig(
        shards=str(tiny), batch_size=3, frames=4, frame_stride=1, image_size=32, num_workers=0, shuffle_buffer=4
    )
    loader = clip_loader(cfg, rank=0, world_size=1)
    batches = list(loader.iter_epoch())
    assert sum(len(batch.keys) for batch in batches) == 12
    for batch in batches:
        assert batch.frames_BTCHW.shape == (len(batch.keys), 4, 3, 32, 32)
        assert batch.frames_BTCHW.dtype == torch.uint8
    assert loader.corrupt_count == 0


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "cli"
    argv = ["procedural", "--out", str(out), "--videos", "2", "--frames", "8", "--size", "32", "--clip-frames", "4"]
    assert main([*argv, "--workers", "0", "--no-progress"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("2 videos -> 4 clips (2.0 s) in 1 shards, ") and line.endswith(f"-> {out}")
    assert main([*argv, "--workers", "0", "--no-progress"]) == 0
    assert "nothing written" in capsys.readouterr().out

    for bad in (["--size", "33"], ["--clip-frames", "16"], ["--workers", "-1"], ["--videos", "0"]):
        assert main([*argv, *bad, "--no-progress"]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.startswith("error: ") and captured.err.count("\n") == 1
    # The current directory is never an output.
    monkeypatch.chdir(tmp_path)
    assert main(["procedural", "--out", ".", *argv[3:], "--no-progress"]) == 2
    assert "error: refusing" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kwargs",
    [
        {"videos": 0},
        {"frames": 3, "clip_frames": 2},
        {"frames": 8, "clip_frames": 16},
        {"size": 30 + 1},
        {"crf": 60},
        {"order_events": "global"},
    ],
)
def test_invalid_corpus_args(kwargs: dict[str, int | str]) -> None:
    with pytest.raises(ValueError):
        CorpusArgs(**{"videos": 1, **kwargs})


def test_frame_order_events_brighten_and_darken_whole_corpus_frames(tmp_path: Path) -> None:
    """The default events: each video gets one brightened and one darkened stretch of whole frames."""
    args = CorpusArgs(videos=2, frames=16, size=32, clip_frames=16)
    assert args.order_events == "frame" and args.video_kwargs()["order_events"] == "frame"
    seed = corpus_seeds(1, 0)[0]
    framed_THWC, truth = render_video(seed=seed, **args.video_kwargs())
    flashes = CorpusArgs(videos=2, frames=16, size=32, clip_frames=16, order_events="object")
    plain_THWC, _ = render_video(seed=seed, **flashes.video_kwargs())
    brightness_T = framed_THWC.astype(float).mean(axis=(1, 2, 3)) - plain_THWC.astype(float).mean(axis=(1, 2, 3))
    starts = sorted(int(t) for t in truth.flash_frames_O if t >= 0)
    assert len(starts) == 2
    # Both events move a whole frame's mean by tens of levels, one up and one down; frame 0 and the last are untouched.
    assert {np.sign(brightness_T[t]) for t in starts} == {-1.0, 1.0}
    assert min(abs(brightness_T[t]) for t in starts) > 20
    assert brightness_T[0] == 0 and brightness_T[-1] == 0

    argv = ["procedural", "--out", str(tmp_path / "f"), "--videos", "1", "--frames", "8", "--size", "32"]
    assert main([*argv, "--clip-frames", "8", "--order-events", "object", "--workers", "0", "--no-progress"]) == 0
    manifest = json.loads((tmp_path / "f" / "manifest.json").read_text())
    assert manifest["args"]["procedural"]["order_events"] == "object"
