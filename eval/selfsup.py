"""Self-supervised eval on any folder of real videos: future-feature error per offset against copy-last.

Shape legend: B windows, S source frames, K = 1 target per window, T frames
of a video, L encoder.feature_layers blocks, N patch tokens, D encoder width,
C=3, H = W = the encoder's image size.

Frames are cut from video with the export's clip geometry
(``pretrain.data.ClipGeometry``, config.json "clip_geometry"), the one the
trainer used: decoded at its frame rate with the short side resized as it
was, centre-cropped as the trainer's data path crops, resized to the
encoder's image size and encoded once. An offset then counts the same
strided frames at the same rate, i.e. the same time gap, as in training. (A
model trained on shards built at 8 fps with stride 3 predicts 3/8 s ahead
per offset; decoding a 30 fps video at its native rate asked it for 0.1 s.)
Windows (S source frames ``frame_stride`` apart, then a target ``offset``
strided frames after the last source) start at every frame and span the
largest offset, so the same windows are scored at every offset; with the
geometry's ``skip_scene_cuts`` windows that cross a detected cut are left
out. That is how the trainer scores the windows of its held-out clips, so a
folder holding a run's held-out clips is scored on the trainer's windows
(the visible patches differ: the trainer's come from the encode pass's
stored sets; with objective.visible_fraction 0 the numbers agree up to the
bf16 rounding of stored tokens).

Exports written before the geometry was recorded fall back on: the config
(data.source='videos': it is the whole geometry), else the training shards'
manifest when still on disk, else data.fps / data.frame_stride and a plain
resize to the image size, with a warning (for a shard-trained export these
may not be the rate and stride that defined its offsets).

A video that cannot be decoded (empty, truncated, not a video) is skipped,
counted and named in the report; only a folder with no readable video at all
is an error. Scoring is the trainer's own held-out metric
(``pretrain.objective.evaluate_batches``): masked-position L1 of the
predicted layer-normed features, and of copy-last on the same positions. A
randomly initialized model is exactly copy-last (zero-initialized residual
head), so copy-last is this eval's baseline. When the export names its
identity-core control (config.json "identity_control", written by
``train.identity_control``), that export is scored on the same windows too.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from data_shards import VideoDecodeError, cut_free_windows, decode_video, detect_scene_cuts, file_sha256
from data_shards.augment import center_crop_box, crop_resize_frames, even_crop_box
from eval.data import dataset_hash
from eval.features import Export, encode_frames, export_summary, read_export
from eval.report import log_to_mlflow, publish_report, skipped_lines
from pretrain.config import config_to_dict
from pretrain.data import ClipBatch, ClipGeometry, config_geometry, recorded_shard_geometry
from pretrain.encoder import FrozenEncoder
from pretrain.features import FeatureSettings
from pretrain.model.predictor import FuturePredictor
from pretrain.objective import HeldoutResult, evaluate_batches

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v")
HELDOUT_SEED = 1234
"""The trainer's held-out mask seed (``evaluate_batches``' default): the same windows get the same masks."""


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


def export_geometry(export: Export) -> tuple[ClipGeometry, str]:
    """The clip geometry the export was trained with, and where it was found (for the report)."""
    if export.config.clip_geometry is not None:
        return export.config.clip_geometry, "recorded by the export"
    training = export.config.training
    train_cfg = config_to_dict(training)
    if training.data.source == "videos":
        return config_geometry(train_cfg), "the export's config (written before clip_geometry)"
    try:
        geometry = recorded_shard_geometry(train_cfg, export.encoder_hash)
    except (OSError, ValueError, KeyError) as err:
        log.warning(
            "export %s records no clip geometry and its training shards %s are not readable (%s): decoding at "
            "data.fps=%s with data.frame_stride=%s, which may not be the rate and stride its offsets were "
            "trained at (the shard builder's --fps); re-export it with current code to record them",
            export.directory,
            training.data.shards,
            err,
            training.data.fps,
            training.data.frame_stride,
        )
        return config_geometry(train_cfg), "legacy data.fps/frame_stride (unverified for shards)"
    log.info("export %s records no clip geometry: read it from its training shards", export.directory)
    return geometry, f"the training shards' manifest ({training.data.shards})"


def crop_to_geometry(frames_THWC: Tensor, geometry: ClipGeometry) -> Tensor:
    """Decoded (T, H, W, C) uint8 -> the trainer's centred square at image size, (T, C, H, W) uint8.

    The box is the clip loader's evaluation crop (``center_crop_box``, edges
    rounded to even pixels for 'center_even'); the resize is antialiased
    bilinear, as the feature encode pass does it (the clip loader's FFmpeg
    bilinear agrees to about one grey level). With the short side already at
    image size the crop is taken as is.
    """
    _, H, W, _ = frames_THWC.shape
    box = center_crop_box(H, W)
    if geometry.crop == "center_even":
        box = even_crop_box(box)
    return crop_resize_frames(frames_THWC, box, geometry.image_size, flip=False).contiguous()


def decode_for_geometry(path: Path, geometry: ClipGeometry, max_frames: int | None) -> tuple[Tensor, list[int]]:
    """Frames (T, C, H, W) uint8 of a video as the trainer saw them, and its scene cuts (or [] when not skipped).

    Raises VideoDecodeError for an unreadable video.
    """
    frames_THWC, _ = decode_video(path, fps=geometry.fps, short_side=geometry.short_side, max_frames=max_frames)
    # Cuts on the resized, uncropped frames, where the trainer (and the shard builder) detect them.
    cuts = detect_scene_cuts(frames_THWC) if geometry.skip_scene_cuts else []
    return crop_to_geometry(torch.from_numpy(frames_THWC), geometry), cuts


def source_and_target_tokens(
    encoder: FrozenEncoder, frames_TCHW: Tensor, feature_layers: list[int]
) -> tuple[Tensor, Tensor | None]:
    """Final-block tokens (T, N, D) and, for a feature_layers export, its blocks (T, L, N, D); float32 on CPU.

    The objective's targets are final-block tokens even when the export's core
    reads several blocks, so this asks the encoder for the plain tokens, not
    ``encode_frames`` (which returns the adapted mix for such exports).
    """
    if not feature_layers:
        return encode_frames(encoder, frames_TCHW[None])[0], None
    tokens_1TND, blocks_1TLND = encoder.encode_with_layers(frames_TCHW[None], list(feature_layers))
    return tokens_1TND[0].cpu(), blocks_1TLND[0].cpu()


@dataclass(slots=True)
class FutureVideo:
    """One decoded, encoded video and the starts of its windows."""

    name: str
    path: Path
    frames_TCHW: Tensor
    tokens_TND: Tensor
    blocks_TLND: Tensor | None
    """The encoder.feature_layers blocks of an export trained on them, or None."""
    starts: list[int]
    """First frame of every window (every frame whose window fits and crosses no skipped cut)."""


@dataclass(slots=True)
class FutureData:
    """The windows of a folder under one export's geometry: what every model of the report is scored on."""

    geometry: ClipGeometry
    geometry_from: str
    videos: list[FutureVideo]
    dataset: dict[str, Any]
    """The report's dataset record."""


def future_batches(
    videos: list[FutureVideo], geometry: ClipGeometry, offset: int, batch_size: int
) -> Iterator[ClipBatch]:
    """ClipBatches of one target offset over every window of ``videos``, in video then start order.

    A batch carries the tokens of each window's strided frames (sources, then
    up to the largest offset) and their pixels, from which the trainer's stage
    (``pretrain.features.frozen_features``) encodes the visible target
    patches. Windows start at every frame, so a batch's tokens are gathered
    only when it is scored: all windows at once would hold ~T copies of every
    frame.
    """
    stride = geometry.frame_stride
    T = geometry.source_frames + max(geometry.target_offsets)
    windows = [(video, start) for video in videos for start in video.starts]
    for i in range(0, len(windows), batch_size):
        chunk = windows[i : i + batch_size]
        frames_BT = [[start + j * stride for j in range(T)] for _, start in chunk]
        videos_B = [video for video, _ in chunk]
        pairs = list(zip(videos_B, frames_BT, strict=True))
        blocks_BTLND = None
        if videos_B[0].blocks_TLND is not None:
            blocks_BTLND = torch.stack([v.blocks_TLND[idx] for v, idx in pairs])
        yield ClipBatch(
            torch.full((len(chunk), 1), offset, dtype=torch.long),
            frames_BTCHW=torch.stack([v.frames_TCHW[idx] for v, idx in pairs]),
            tokens_BTND=torch.stack([v.tokens_TND[idx] for v, idx in pairs]),
            layers_BTLND=blocks_BTLND,
        )


def load_videos(
    export: Export,
    encoder: FrozenEncoder,
    paths: list[Path],
    folder: Path,
    geometry: ClipGeometry,
    max_frames: int | None,
) -> tuple[list[FutureVideo], list[dict[str, str]]]:
    """Decode, crop and encode every readable video; the others become {"name", "reason", "detail"} records.

    Raises ValueError naming the first few failures when no video is readable.
    """
    loaded, skipped = [], []
    for path in paths:
        name = _video_name(path, folder)
        try:
            frames_TCHW, cuts = decode_for_geometry(path, geometry, max_frames)
        except VideoDecodeError as err:
            skipped.append({"name": name, "reason": err.reason, "detail": err.detail})
            continue
        tokens_TND, blocks_TLND = source_and_target_tokens(encoder, frames_TCHW, export.spec.feature_layers)
        starts = cut_free_windows(len(frames_TCHW), cuts, geometry.window_frames)
        loaded.append(FutureVideo(name, path, frames_TCHW, tokens_TND, blocks_TLND, starts))
    if not loaded:
        shown = "; ".join(f"{s['name']}: {s['reason']} ({s['detail']})" for s in skipped[:3])
        more = f"; and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        raise ValueError(f"no readable video in {folder}: {shown}{more}")
    if skipped:
        names = ", ".join(f"{s['name']} ({s['reason']})" for s in skipped)
        log.warning("skipped %d unreadable videos in %s: %s", len(skipped), folder, names)
    return loaded, skipped


def prepare_future(export: Export, encoder: FrozenEncoder, folder: Path, max_frames: int | None = None) -> FutureData:
    """Decode and encode a folder (or one video) with the export's geometry; raises ValueError when no window fits."""
    geometry, geometry_from = export_geometry(export)
    log.info("clip geometry (%s): %s", geometry_from, geometry)
    videos, skipped = load_videos(export, encoder, find_videos(folder), folder, geometry, max_frames)
    if not any(v.starts for v in videos):
        raise ValueError(
            f"videos under {folder} are too short for {geometry.source_frames} sources + offset "
            f"{max(geometry.target_offsets)} at stride {geometry.frame_stride} ({geometry.window_frames} frames "
            f"at {_rate(geometry)})"
        )
    paths = [v.path for v in videos]
    dataset = {
        "kind": "video_folder",
        "dir": str(folder),
        "videos": [
            {"name": v.name, "sha256": file_sha256(v.path), "frames": len(v.frames_TCHW), "windows": len(v.starts)}
            for v in videos
        ],
        "skipped": skipped,
        "hash": dataset_hash(paths),
        "fps": geometry.fps,
        "frame_stride": geometry.frame_stride,
        "clip_geometry": geometry.to_dict(),
        "clip_geometry_from": geometry_from,
        "max_frames": max_frames,
    }
    return FutureData(geometry, geometry_from, videos, dataset)


def score_future(
    model: FuturePredictor,
    encoder: FrozenEncoder,
    data: FutureData,
    visible_fraction: float,
    batch_size: int = 16,
    seed: int = HELDOUT_SEED,
) -> list[HeldoutResult]:
    """Masked-position L1 of ``model`` and of copy-last per offset over every window of ``data``."""
    offsets = sorted(data.geometry.target_offsets)
    by_offset = {o: future_batches(data.videos, data.geometry, o, batch_size) for o in offsets}
    settings = FeatureSettings(source_frames=data.geometry.source_frames, visible_fraction=visible_fraction)
    return evaluate_batches(model, encoder, by_offset, settings, seed=seed)


def future_prediction_eval(
    export: Export,
    encoder: FrozenEncoder,
    folder: Path,
    max_frames: int | None = None,
    batch_size: int = 16,
    seed: int = HELDOUT_SEED,
) -> tuple[list[HeldoutResult], dict[str, Any]]:
    """Held-out future-feature L1 of the export and of copy-last per offset, and the dataset record.

    ``folder`` is a folder of videos or one video file; unreadable videos are
    skipped and listed in the record's ``skipped``.
    """
    data = prepare_future(export, encoder, folder, max_frames)
    visible_fraction = export.config.training.objective.visible_fraction
    return score_future(export.model, encoder, data, visible_fraction, batch_size, seed), data.dataset


@dataclass(slots=True)
class IdentityControl:
    """The export's identity-core control as recorded in its config.json, and the control export when readable."""

    recorded_dir: str | None
    """config.json "identity_control" "export", or None when no control was recorded."""
    export: Export | None = None
    problem: str = ""
    """Why a recorded control is not scored (not found, another encoder, ...)."""


def identity_control(export: Export) -> IdentityControl:
    """Read the identity-core control export a trained export names (config.json "identity_control").

    The recorded path is tried as written, then as a sibling run of the
    export's own run (``<runs>/<name>-identity/export``), which still works
    after a runs folder was moved. The control must use the same encoder.
    """
    recorded = export.config.identity_control
    if recorded is None or not recorded.export:
        return IdentityControl(None)
    written = Path(recorded.export)
    sibling = export.directory.parent.parent / written.parent.name / written.name
    found = next((p for p in (written, sibling) if (p / "config.json").is_file()), None)
    if found is None:
        problem = f"recorded at {written} but not found (nor at {sibling})"
        log.warning("identity-core control of %s %s", export.directory, problem)
        return IdentityControl(str(written), problem=problem)
    control = read_export(found)
    if control.encoder_hash != export.encoder_hash:
        problem = f"{found} was trained on encoder hash {control.encoder_hash}, not {export.encoder_hash}"
        log.warning("identity-core control not scored: %s", problem)
        return IdentityControl(str(written), problem=problem)
    return IdentityControl(str(written), control)


def _rate(geometry: ClipGeometry) -> str:
    return "the native rate" if geometry.fps is None else f"{geometry.fps:g} fps"


def geometry_line(geometry: ClipGeometry, geometry_from: str) -> str:
    """One markdown list item saying what an offset means and which pixels the model saw."""
    gap = "" if geometry.fps is None else f" (offset 1 = {geometry.frame_stride / geometry.fps:.3g} s)"
    short = "stored size" if geometry.short_side is None else f"short side {geometry.short_side} px"
    return (
        f"- clip geometry ({geometry_from}): {_rate(geometry)}, stride {geometry.frame_stride}{gap}; {short}, "
        f"{geometry.crop} square -> {geometry.image_size} px; {geometry.source_frames} source frames, "
        f"offsets {list(geometry.target_offsets)}"
        + ("; windows across scene cuts skipped" if geometry.skip_scene_cuts else "")
    )


def control_line(record: dict[str, Any] | None) -> str:
    if record is None:
        return "- identity-core control: no identity-core control recorded"
    if "results" not in record:
        return f"- identity-core control: not scored: {record['problem']}"
    return f"- identity-core control: `{record['export']['dir']}` sha256 `{record['export']['sha256']}`"


def future_markdown(results: list[HeldoutResult], record: dict[str, Any]) -> str:
    control = record.get("identity_control")
    identity = {r["offset"]: r for r in control["results"]} if control and "results" in control else {}
    head = "| offset | windows | export L1 | copy-last L1 | gain vs copy-last |"
    rule = "|---|---|---|---|---|"
    if identity:
        head += " identity L1 | vs identity |"
        rule += "---|---|"

    def row(r: HeldoutResult) -> str:
        line = f"| {r.offset} | {r.windows} | {r.model_l1:.4f} | {r.copy_last_l1:.4f} | {100 * r.gain:+.1f}% |"
        if r.offset in identity:
            ident = identity[r.offset]["model_l1"]
            line += f" {ident:.4f} | {100 * (1 - r.model_l1 / ident):+.1f}% |"
        return line

    dataset = record["dataset"]
    lines = [
        "# future-feature prediction (held-out, masked positions, L1 on layer-normed features)",
        "",
        head,
        rule,
        *(row(r) for r in results),
        "",
        f"- export: `{record['export']['dir']}` sha256 `{record['export']['sha256']}`",
        control_line(control),
        f"- dataset: {dataset['dir']} hash `{dataset['hash']}` ({len(dataset['videos'])} videos, "
        f"{sum(v['frames'] for v in dataset['videos'])} frames)",
        geometry_line(ClipGeometry.from_dict(dataset["clip_geometry"]), dataset["clip_geometry_from"]),
        *skipped_lines(dataset["skipped"]),
        f"- seed (visible-patch masks): {record['seed']}",
        "",
    ]
    return "\n".join(lines)


def control_record(
    control: IdentityControl, encoder: FrozenEncoder, data: FutureData, visible_fraction: float, seed: int
) -> dict[str, Any] | None:
    """The report's "identity_control": None (none recorded), a problem, or its results on the same windows."""
    if control.recorded_dir is None:
        return None
    if control.export is None:
        return {"recorded": control.recorded_dir, "problem": control.problem}
    results = score_future(control.export.model, encoder, data, visible_fraction, seed=seed)
    return {
        "recorded": control.recorded_dir,
        "export": export_summary(control.export),
        "results": [{**asdict(r), "gain": r.gain} for r in results],
    }


def run_future_eval(export: Export, encoder: FrozenEncoder, args: argparse.Namespace) -> tuple[Path, str | None]:
    """The ``--task future`` branch of eval.run: score, write reports, log; (report.md, MLflow location or None)."""
    start = time.perf_counter()
    data = prepare_future(export, encoder, Path(args.data), args.frames)
    visible_fraction = export.config.training.objective.visible_fraction
    results = score_future(export.model, encoder, data, visible_fraction, seed=args.seed)
    control = control_record(identity_control(export), encoder, data, visible_fraction, args.seed)
    record = {
        "task": "future",
        "seed": args.seed,
        "export": export_summary(export),
        "dataset": data.dataset,
        "results": [{**asdict(r), "gain": r.gain} for r in results],
        "identity_control": control,
        "wall_seconds": time.perf_counter() - start,
    }
    paths = publish_report(record, future_markdown(results, record), args.out / "future")
    md = paths[0]
    if args.no_mlflow:
        return md, None
    metrics = {f"{k}_offset{r.offset}": v for r in results for k, v in (("l1", r.model_l1), ("gain", r.gain))}
    if control is not None and "results" in control:
        metrics.update({f"identity_l1_offset{r['offset']}": r["model_l1"] for r in control["results"]})
    params = {k: v for k, v in record.items() if k not in ("results", "dataset", "identity_control")}
    return md, log_to_mlflow(args.out, "future", params, metrics, paths, training=export.config.tracking)
