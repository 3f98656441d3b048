"""Self-supervised eval on any folder of real videos: future-feature error per offset against copy-last.

Shape legend: B windows, S source frames, K = 1 target per window, N patch
tokens, D encoder width, C=3, H = W = the encoder's image size.

Every video is decoded at the export's frame rate and stride, center-cropped
to the encoder's image size and encoded once. Windows (S source frames, then
a target ``offset`` strided frames after the last source) are laid
end to end; the same windows are scored at every offset, so the offsets are
comparable. A video that cannot be decoded (empty, truncated, not a video)
is skipped, counted and named in the report; only a folder with no readable
video at all is an error. Scoring is the trainer's own held-out metric
(``pretrain.objective.evaluate_batches``): masked-position L1 of the
predicted layer-normed features, and of copy-last on the same positions.
A randomly initialized model is exactly copy-last (zero-initialized residual
head), so copy-last is this eval's baseline.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from data_shards import VideoDecodeError, decode_video, file_sha256
from eval.data import dataset_hash
from eval.features import Export, encode_frames, export_summary
from eval.report import log_to_mlflow, publish_report, skipped_lines
from pretrain.data import ClipBatch, center_crop_square
from pretrain.encoder import FrozenEncoder
from pretrain.objective import HeldoutResult, evaluate_batches

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v")


def find_videos(folder: Path) -> list[Path]:
    """The video files under ``folder`` (by suffix, recursively), or ``folder`` itself when it is a file."""
    if Path(folder).is_file():
        return [Path(folder)]
    videos = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES)
    if not videos:
        raise FileNotFoundError(f"no videos ({', '.join(VIDEO_SUFFIXES)}) under {folder}")
    return videos


def _video_name(path: Path, folder: Path) -> str:
    """``path`` relative to the dataset folder (its file name when the dataset is one file)."""
    return path.name if path == Path(folder) else str(path.relative_to(folder))


def window_starts(num_frames: int, source_frames: int, max_offset: int, stride: int) -> list[int]:
    """Starts of end-to-end windows that fit S sources and a target max_offset strided frames later."""
    span = (source_frames - 1 + max_offset) * stride + 1
    return list(range(0, num_frames - span + 1, span))


def future_batches(
    videos: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
    source_frames: int,
    offset: int,
    max_offset: int,
    stride: int,
    batch_size: int,
) -> Iterator[ClipBatch]:
    """ClipBatches of one target offset over (frames_TCHW, tokens_TND, blocks_TLND or None) videos.

    ``blocks_TLND``: the encoder.feature_layers blocks of an export trained on
    them (its core reads their adapted mean; targets stay final-block tokens).
    """
    sources, source_blocks, targets, target_frames = [], [], [], []
    for frames_TCHW, tokens_TND, blocks_TLND in videos:
        for start in window_starts(len(frames_TCHW), source_frames, max_offset, stride):
            src = [start + i * stride for i in range(source_frames)]
            tgt = start + (source_frames - 1 + offset) * stride
            sources.append(tokens_TND[src])
            if blocks_TLND is not None:
                source_blocks.append(blocks_TLND[src])
            targets.append(tokens_TND[tgt : tgt + 1])
            target_frames.append(frames_TCHW[tgt : tgt + 1])
    for i in range(0, len(sources), batch_size):
        n = len(sources[i : i + batch_size])
        yield ClipBatch(
            torch.stack(sources[i : i + batch_size]),
            torch.stack(targets[i : i + batch_size]),
            torch.stack(target_frames[i : i + batch_size]),
            torch.full((n, 1), offset, dtype=torch.long),
            source_layers_BSLND=torch.stack(source_blocks[i : i + batch_size]) if source_blocks else None,
        )


def source_and_target_tokens(
    encoder: FrozenEncoder, frames_TCHW: torch.Tensor, feature_layers: list[int]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Final-block tokens (T, N, D) and, for a feature_layers export, its blocks (T, L, N, D); float32 on CPU.

    The objective's targets are final-block tokens even when the export's core
    reads several blocks, so this asks the encoder for the plain tokens, not
    ``encode_frames`` (which returns the adapted mix for such exports).
    """
    if not feature_layers:
        return encode_frames(encoder, frames_TCHW[None])[0], None
    tokens_1TND, blocks_1TLND = encoder.encode_with_layers(frames_TCHW[None], list(feature_layers))
    return tokens_1TND[0].cpu(), blocks_1TLND[0].cpu()


VideoTokens = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
"""(frames_TCHW, tokens_TND, blocks_TLND or None) of one video, as ``future_batches`` reads them."""


def load_videos(
    export: Export,
    encoder: FrozenEncoder,
    paths: list[Path],
    folder: Path,
    *,
    fps: float | None,
    max_frames: int | None,
) -> tuple[list[tuple[Path, VideoTokens]], list[dict[str, str]]]:
    """Decode, crop and encode every readable video; the others become {"name", "reason", "detail"} records.

    Raises ValueError naming the first few failures when no video is readable.
    """
    loaded, skipped = [], []
    for path in paths:
        try:
            frames_THWC, _ = decode_video(path, fps=fps, short_side=encoder.image_size, max_frames=max_frames)
        except VideoDecodeError as err:
            skipped.append({"name": _video_name(path, folder), "reason": err.reason, "detail": err.detail})
            continue
        frames_TCHW = center_crop_square(torch.from_numpy(frames_THWC), encoder.image_size)
        tokens = source_and_target_tokens(encoder, frames_TCHW, export.spec.feature_layers)
        loaded.append((path, (frames_TCHW, *tokens)))
    if not loaded:
        shown = "; ".join(f"{s['name']}: {s['reason']} ({s['detail']})" for s in skipped[:3])
        more = f"; and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        raise ValueError(f"no readable video in {folder}: {shown}{more}")
    if skipped:
        names = ", ".join(f"{s['name']} ({s['reason']})" for s in skipped)
        log.warning("skipped %d unreadable videos in %s: %s", len(skipped), folder, names)
    return loaded, skipped


def future_prediction_eval(
    export: Export,
    encoder: FrozenEncoder,
    folder: Path,
    max_frames: int | None = None,
    batch_size: int = 16,
    seed: int = 1234,
) -> tuple[list[HeldoutResult], dict[str, Any]]:
    """Held-out future-feature L1 of the export and of copy-last per offset, and the dataset record.

    ``folder`` is a folder of videos or one video file; unreadable videos are
    skipped and listed in the record's ``skipped``.
    """
    train_cfg = export.config["config"]
    fps = train_cfg["data"]["fps"] or None
    stride = train_cfg["data"]["frame_stride"]
    offsets = sorted(export.config["objective"]["target_offsets"])
    source_frames = export.spec.max_source_frames
    loaded, skipped = load_videos(export, encoder, find_videos(folder), folder, fps=fps, max_frames=max_frames)
    paths = [path for path, _ in loaded]
    videos = [video for _, video in loaded]
    by_offset = {
        offset: future_batches(videos, source_frames, offset, offsets[-1], stride, batch_size) for offset in offsets
    }
    results = evaluate_batches(
        export.model, encoder, by_offset, export.config["objective"]["visible_fraction"], seed=seed
    )
    if not results:
        raise ValueError(f"videos under {folder} are too short for {source_frames} sources + offset {offsets[-1]}")
    dataset = {
        "kind": "video_folder",
        "dir": str(folder),
        "videos": [{"name": _video_name(p, folder), "sha256": file_sha256(p)} for p in paths],
        "skipped": skipped,
        "hash": dataset_hash(paths),
        "fps": fps,
        "frame_stride": stride,
        "max_frames": max_frames,
    }
    return results, dataset


def future_markdown(results: list[HeldoutResult], record: dict[str, Any]) -> str:
    lines = [
        "# future-feature prediction (held-out, masked positions, L1 on layer-normed features)",
        "",
        "| offset | windows | export L1 | copy-last L1 | gain vs copy-last |",
        "|---|---|---|---|---|",
        *(
            f"| {r.offset} | {r.windows} | {r.model_l1:.4f} | {r.copy_last_l1:.4f} | {100 * r.gain:+.1f}% |"
            for r in results
        ),
        "",
        f"- export: `{record['export']['dir']}` sha256 `{record['export']['sha256']}`",
        f"- dataset: {record['dataset']['dir']} hash `{record['dataset']['hash']}` "
        f"({len(record['dataset']['videos'])} videos)",
        *skipped_lines(record["dataset"]["skipped"]),
        f"- seed (visible-patch masks): {record['seed']}",
        "",
    ]
    return "\n".join(lines)


def run_future_eval(export: Export, encoder: FrozenEncoder, args: argparse.Namespace) -> tuple[Path, str | None]:
    """The ``--task future`` branch of eval.run: score, write reports, log; (report.md, MLflow location or None)."""
    start = time.perf_counter()
    results, dataset = future_prediction_eval(export, encoder, Path(args.data), max_frames=args.frames, seed=args.seed)
    record = {
        "task": "future",
        "seed": args.seed,
        "export": export_summary(export),
        "dataset": dataset,
        "results": [{**asdict(r), "gain": r.gain} for r in results],
        "wall_seconds": time.perf_counter() - start,
    }
    paths = publish_report(record, future_markdown(results, record), args.out / "future")
    md = paths[0]
    if args.no_mlflow:
        return md, None
    metrics = {f"{k}_offset{r.offset}": v for r in results for k, v in (("l1", r.model_l1), ("gain", r.gain))}
    params = {k: v for k, v in record.items() if k not in ("results", "dataset")}
    return md, log_to_mlflow(args.out, "future", params, metrics, paths)
