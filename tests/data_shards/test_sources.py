"""Shard specs beyond a local directory: brace patterns, @list files, pipe:, fsspec URLs, and HTTP shards read
with a timeout, resumed at their byte offset and skipped (counted) when they stay unreadable."""

from __future__ import annotations

import json
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from webdataset.handlers import reraise_exception as reraise

from data_shards.features import encode_clip_shards, feature_loader, resolve_feature_dir
from data_shards.loader import LoaderConfig, ShardLoader, clip_loader
from data_shards.sources import list_shards, open_shard, resolve_shards, shard_name, shard_samples
from pretrain.data import first_sample_json
from pretrain.encoder import load_encoder
from tests.data_shards.shard_fixtures import ShardHTTPHandler, serve_directory, synthetic_clip_shards

PATTERN = "clips-{000000..000003}.tar"


@pytest.fixture(scope="module")
def syn4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 shards x 3 synthetic clips of 8 frames, 32x48, with a manifest."""
    directory = tmp_path_factory.mktemp("syn4")
    synthetic_clip_shards(directory, num_shards=4, clips_per_shard=3)
    return directory


@pytest.fixture(scope="module")
def server(syn4: Path) -> Iterator[str]:
    with serve_directory(syn4) as url:
        yield url


def _cfg(shards: str | Path, **kwargs: object) -> LoaderConfig:
    defaults: dict[str, object] = {
        "shards": str(shards),
        "batch_size": 2,
        "frames": 4,
        "image_size": 32,
        "num_workers": 0,
        "shuffle_buffer": 4,
        "pin_memory": False,
    }
    return LoaderConfig(**{**defaults, **kwargs})


def _epoch(loader: ShardLoader) -> tuple[list[str], list[torch.Tensor]]:
    keys, frames = [], []
    for batch in loader.iter_epoch():
        keys += batch.keys
        frames.append(batch.frames_BTCHW)
    return keys, frames


# ---- spec resolution ----


def test_a_local_directory_is_resolved_as_before(syn4: Path, tmp_path: Path) -> None:
    assert resolve_shards(syn4, "clips") == list_shards(syn4, "clips")
    with pytest.raises(FileNotFoundError, match=r"no clips-\*\.tar shards in"):
        resolve_shards(tmp_path, "clips")


def test_a_local_brace_pattern_keeps_its_order_and_reads_the_manifest(syn4: Path) -> None:
    entries, manifest = resolve_shards(f"{syn4}/clips-{{000003,{{000000..000001}}}}.tar", "clips")
    assert [Path(e.path).name for e in entries] == ["clips-000003.tar", "clips-000000.tar", "clips-000001.tar"]
    assert manifest == json.loads((syn4 / "manifest.json").read_text())
    assert [e.samples for e in entries] == [3, 3, 3]
    with pytest.raises(FileNotFoundError, match=r"6 of the 10 shards .*clips-000004\.tar"):
        resolve_shards(f"{syn4}/clips-{{000000..000009}}.tar", "clips")


def test_a_list_file_skips_comments_and_resolves_relative_paths(syn4: Path, tmp_path: Path) -> None:
    copy = tmp_path / "shards"
    shutil.copytree(syn4, copy)
    listing = tmp_path / "lists" / "shards.txt"
    listing.parent.mkdir()
    listing.write_text(
        "# training shards\n"
        "\n"
        "../shards/clips-000002.tar   # relative to the list file\n"
        f"{copy / 'clips-000000.tar'}\n"
        "   \n"
        "https://example.invalid/clips-000009.tar\n"
    )
    entries, manifest = resolve_shards(f"@{listing}", "clips")
    assert [e.path for e in entries] == [
        str(listing.parent / "../shards/clips-000002.tar"),
        str(copy / "clips-000000.tar"),
        "https://example.invalid/clips-000009.tar",
    ]
    # No manifest beside the list: no counts.
    assert manifest is None and {e.samples for e in entries} == {None}

    beside = copy / "shards.txt"
    beside.write_text("clips-000001.tar\nclips-000003.tar\n")
    entries, manifest = resolve_shards(f"@{beside}", "clips")
    assert manifest is not None and [e.samples for e in entries] == [3, 3]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_shards(f"@{tmp_path / 'missing.txt'}", "clips")


def test_a_pipe_command_is_expanded_into_one_command_per_shard(syn4: Path) -> None:
    entries, manifest = resolve_shards(f"pipe:cat {syn4}/{PATTERN}", "clips")
    assert [e.path for e in entries] == [f"pipe:cat {syn4}/clips-{i:06d}.tar" for i in range(4)]
    assert [shard_name(e.path) for e in entries] == [f"clips-{i:06d}.tar" for i in range(4)]
    assert manifest is None and {e.samples for e in entries} == {None}


def test_fsspec_urls_without_fsspec_name_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes `import fsspec` raise ImportError, installed or not.
    monkeypatch.setitem(sys.modules, "fsspec", None)
    with pytest.raises(ImportError, match=r"video-pretrain\[remote\].*s3fs"):
        resolve_shards(f"s3://bucket/shards/{PATTERN}", "clips")


def test_an_fsspec_url_reads_the_same_samples_as_the_directory(syn4: Path) -> None:
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    for path in syn4.iterdir():
        fs.pipe_file(f"/syn4/{path.name}", path.read_bytes())
    try:
        local = _epoch(clip_loader(_cfg(syn4), 0, 1))
        for spec in (f"memory://syn4/{PATTERN}", "memory://syn4/"):
            entries, manifest = resolve_shards(spec, "clips")
            assert manifest is not None and [e.samples for e in entries] == [3, 3, 3, 3]
            keys, frames = _epoch(clip_loader(_cfg(spec), 0, 1))
            assert keys == local[0]
            assert all(torch.equal(a, b) for a, b in zip(frames, local[1], strict=True))
    finally:
        fs.rm("/syn4", recursive=True)


# ---- HTTP ----


def test_http_pattern_reads_the_same_samples_as_the_directory(syn4: Path, server: str) -> None:
    spec = f"{server}/{PATTERN}"
    entries, manifest = resolve_shards(spec, "clips")
    assert manifest == json.loads((syn4 / "manifest.json").read_text())
    assert [e.samples for e in entries] == [3, 3, 3, 3]
    # Split mode over two workers: the split, shuffle and augmentation act on the same list.
    local = _epoch(clip_loader(_cfg(syn4, num_workers=2), 0, 1))
    remote_loader = clip_loader(_cfg(spec, num_workers=2), 0, 1)
    assert remote_loader.mode == "split" and remote_loader.manifest == manifest
    keys, frames = _epoch(remote_loader)
    assert sorted(keys) == sorted(local[0]) and len(keys) == 12
    assert keys == local[0]
    assert all(torch.equal(a, b) for a, b in zip(frames, local[1], strict=True))
    assert remote_loader.corrupt_count == 0


def test_an_http_directory_needs_its_manifest(syn4: Path, server: str, tmp_path: Path) -> None:
    entries, _ = resolve_shards(f"{server}/", "clips")
    assert [shard_name(e.path) for e in entries] == [f"clips-{i:06d}.tar" for i in range(4)]
    with pytest.raises(FileNotFoundError, match=r"brace pattern"):
        resolve_shards(f"{server}/nowhere/", "clips")


def test_http_resume_continues_like_an_uninterrupted_run(server: str) -> None:
    cfg = _cfg(f"{server}/{PATTERN}", num_workers=2, batch_size=1)
    uninterrupted = _epoch(clip_loader(cfg, 0, 1))[0]
    first = clip_loader(cfg, 0, 1)
    head = [key for _, batch in zip(range(5), first, strict=False) for key in batch.keys]
    resumed = clip_loader(cfg, 0, 1, state=json.loads(json.dumps(first.state_dict())))
    assert head + _epoch(resumed)[0] == uninterrupted


def test_without_a_manifest_resampled_mode_takes_samples_per_epoch(tmp_path: Path) -> None:
    synthetic_clip_shards(tmp_path, num_shards=2, clips_per_shard=3, manifest=False)
    with serve_directory(tmp_path) as url:
        spec = f"{url}/clips-{{000000..000001}}.tar"
        with pytest.raises(ValueError, match=r"data\.samples_per_epoch"):
            clip_loader(_cfg(spec, shard_mode="resampled"), 0, 1)
        keys, _ = _epoch(clip_loader(_cfg(spec, shard_mode="resampled", samples_per_epoch=5), 0, 1))
    assert len(keys) == 5


def test_a_missing_shard_is_a_counted_skip(syn4: Path, server: str) -> None:
    # clips-000004.tar does not exist: 404 on every try.
    loader = clip_loader(_cfg(f"{server}/clips-{{000000..000004}}.tar", retries=1), 0, 1)
    keys, _ = _epoch(loader)
    assert len(keys) == 12
    assert loader.corrupt_by_reason == {"unreadable_shard": 1}


class _StallingHandler(ShardHTTPHandler):
    """Sends the headers of clips-000001.tar, then nothing until released."""

    release = threading.Event()

    def send_body(self, name: str, start: int, body: bytes) -> None:
        if name == "clips-000001.tar":
            self.release.wait(30)
            return
        super().send_body(name, start, body)


def test_a_stalled_shard_times_out_and_is_a_counted_skip(syn4: Path) -> None:
    with serve_directory(syn4, _StallingHandler) as url:
        try:
            loader = clip_loader(_cfg(f"{url}/{PATTERN}", read_timeout_s=0.5, retries=1), 0, 1)
            start = time.perf_counter()
            keys, _ = _epoch(loader)
            elapsed = time.perf_counter() - start
        finally:
            _StallingHandler.release.set()
    assert len(keys) == 9 and loader.corrupt_by_reason == {"unreadable_shard": 1}
    # Two reads of 0.5 s and one 0.5 s backoff, plus reading and decoding 9 tiny clips.
    assert elapsed < 6.0


class _DroppingHandler(ShardHTTPHandler):
    """Closes the connection halfway through the first response for clips-000002.tar."""

    requests: ClassVar[list[tuple[str, int]]] = []
    ranges = True

    def do_GET(self) -> None:
        if not self.ranges:
            del self.headers["Range"]
        super().do_GET()

    def send_body(self, name: str, start: int, body: bytes) -> None:
        self.requests.append((name, start))
        if name == "clips-000002.tar" and [r[0] for r in self.requests].count(name) == 1:
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
            return
        super().send_body(name, start, body)


@pytest.mark.parametrize("ranges", [True, False], ids=["range-requests", "no-range-support"])
def test_a_dropped_connection_resumes_at_the_byte_reached(syn4: Path, ranges: bool) -> None:
    handler = type("Handler", (_DroppingHandler,), {"requests": [], "ranges": ranges})
    local = _epoch(clip_loader(_cfg(syn4), 0, 1))
    with serve_directory(syn4, handler) as url:
        loader = clip_loader(_cfg(f"{url}/{PATTERN}", retries=1), 0, 1)
        keys, frames = _epoch(loader)
    retried = [start for name, start in handler.requests if name == "clips-000002.tar"]
    half = (syn4 / "clips-000002.tar").stat().st_size // 2
    assert len(retried) == 2 and retried[0] == 0
    # With ranges the retry asks for the bytes after the cut; without, the server resends from 0.
    assert retried[1] == (half if ranges else 0)
    assert loader.corrupt_count == 0 and keys == local[0]
    assert all(torch.equal(a, b) for a, b in zip(frames, local[1], strict=True))


def test_first_sample_json_reads_urls_and_pipes(syn4: Path, server: str) -> None:
    local = first_sample_json(syn4 / "clips-000000.tar")
    assert local is not None and local["frames"] == 8
    assert first_sample_json(f"{server}/clips-000000.tar") == local
    assert first_sample_json(f"pipe:cat {syn4}/clips-000000.tar") == local
    with open_shard(f"{server}/clips-000001.tar") as stream:
        assert stream.read() == (syn4 / "clips-000001.tar").read_bytes()


# ---- feature shards ----


def test_encode_from_http_and_read_features_over_http(syn4: Path, server: str, tmp_path: Path) -> None:
    encoder = load_encoder("random", arch="vit_test", image_size=56)
    local = encode_clip_shards(syn4, tmp_path / "local", encoder, visible_fraction=0)
    remote = encode_clip_shards(f"{server}/{PATTERN}", tmp_path / "remote", encoder, visible_fraction=0)
    names = sorted(p.name for p in local.glob("features-*.tar"))
    assert names == sorted(p.name for p in remote.glob("features-*.tar")) and len(names) == 4

    def members(directory: Path) -> list[dict]:
        urls = [str(directory / name) for name in names]
        return [{k: v for k, v in s.items() if k != "__url__"} for s in shard_samples(urls, handler=reraise)]

    # Same samples, same tokens (the tar headers differ only in their times).
    assert members(local) == members(remote) and len(members(local)) == 12

    with serve_directory(tmp_path / "local") as url:
        pattern = f"{url}/{local.name}/features-{{000000..000003}}.tar"
        # The pattern itself; the root holding <hash[:16]>/, as a local root does.
        for spec, expected in ((pattern, pattern), (f"{url}/", f"{url}/{local.name}")):
            found, manifest = resolve_feature_dir(spec, encoder.weights_hash)
            assert found == expected and manifest["encoder"]["weights_hash"] == encoder.weights_hash
            loader = feature_loader(_cfg(spec), 0, 1, encoder.weights_hash)
            keys = [k for batch in loader.iter_epoch() for k in batch.keys]
            assert len(keys) == 12 and loader.corrupt_count == 0
