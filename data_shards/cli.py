"""Command-line layer of ``python -m data_shards build`` and ``procedural``: arguments, exit codes, output.

The library (``data_shards.build``, ``data_shards.procedural``) only logs; this
module may print. Exit codes: 0 done; 2 a request that cannot be carried out
as asked (bad arguments, an output directory that would lose files, nothing
to build), reported as one ``error:`` line on stderr with nothing written.

The encode pass over clip shards (``data_shards.features.encode_clip_shards``)
needs a model, so its command lives with the encoder; ``encode`` here only
says so, exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from data_shards.build import HELDOUT_DIR, BuildArgs, BuildArgsError, NoInputsError, build_shards
from data_shards.io import OutputDirError
from data_shards.procedural import ORDER_EVENTS, CorpusArgs, write_corpus

# Refusals of the build command: each message names the path and what to do.
_BUILD_REFUSALS = (BuildArgsError, NoInputsError, OutputDirError)


# Appended to an option's help so that --help shows its default (argparse fills it in).
_DEFAULT = " (default: %(default)s)"


def _add_encoding_arguments(parser: argparse.ArgumentParser, *, crf: int, max_samples_per_shard: int) -> None:
    """The options ``build`` and ``procedural`` share: worker processes, x264 quality, shard size."""
    parser.add_argument(
        "--workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="worker processes (0 = in this process) (default: min(4, CPU count) = %(default)s)",
    )
    parser.add_argument("--crf", type=int, default=crf, help="x264 constant rate factor" + _DEFAULT)
    parser.add_argument(
        "--max-samples-per-shard",
        type=int,
        default=max_samples_per_shard,
        help="at most this many clips per shard" + _DEFAULT,
    )


def add_build_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m data_shards build``; --help shows every default."""
    defaults = BuildArgs()
    parser.add_argument(
        "--input",
        nargs="+",
        action="extend",
        required=True,
        metavar="PATH",
        help="video files, directories (recursive), globs, or list files (@list.txt / *.txt, one path a line) "
        "(required)",
    )
    parser.add_argument(
        "--out", required=True, type=Path, help="output directory for shards and manifest.json (required)"
    )
    parser.add_argument("--clip-frames", type=int, default=defaults.clip_frames, help="frames per clip" + _DEFAULT)
    parser.add_argument("--fps", type=float, default=defaults.fps, help="output frame rate; 0 = native" + _DEFAULT)
    parser.add_argument(
        "--short-side",
        type=int,
        default=defaults.short_side,
        help="resize shorter side to this (even); 0 = no resize" + _DEFAULT,
    )
    parser.add_argument(
        "--stride", type=int, default=None, help="output frames between clip starts (default: clip frames)"
    )
    _add_encoding_arguments(parser, crf=defaults.crf, max_samples_per_shard=defaults.max_samples_per_shard)
    parser.add_argument(
        "--max-shard-bytes",
        type=int,
        default=defaults.max_shard_bytes,
        help="at most this many bytes per shard (a larger clip gets a shard of its own)" + _DEFAULT,
    )
    parser.add_argument(
        "--holdout-fraction",
        type=float,
        default=defaults.holdout_fraction,
        help="per input, clips in the last F of its frames go to OUT/heldout/ (boundary clips dropped); 0 = off"
        + _DEFAULT,
    )
    parser.add_argument(
        "--holdout-videos",
        type=_count_or_fraction,
        default=defaults.holdout_videos,
        metavar="N|FRACTION",
        help="every clip of N whole inputs (a whole number) or of that fraction of the inputs (a number in "
        "(0, 1), at least 1) goes to OUT/heldout/; chosen by content hash, so independent of input order; "
        "not with --holdout-fraction (default: off)",
    )
    parser.add_argument(
        "--skip-scene-cuts", action="store_true", help="drop clips that cross a detected hard scene cut" + _DEFAULT
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar" + _DEFAULT)


def _count_or_fraction(text: str) -> int | float:
    """``--holdout-videos``: a whole number is a count of videos, anything else a fraction (range checked by
    BuildArgs, so that a bad value is one ``error:`` line like every other refusal)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a whole number of videos or a fraction in (0, 1), got {text!r}"
        ) from None


def run_build(namespace: argparse.Namespace) -> int:
    """Run ``build`` from parsed arguments; prints a summary and returns the exit code."""
    try:
        args = BuildArgs(
            clip_frames=namespace.clip_frames,
            fps=namespace.fps,
            short_side=namespace.short_side,
            stride=namespace.stride,
            crf=namespace.crf,
            max_samples_per_shard=namespace.max_samples_per_shard,
            max_shard_bytes=namespace.max_shard_bytes,
            holdout_fraction=namespace.holdout_fraction,
            holdout_videos=namespace.holdout_videos,
            skip_scene_cuts=namespace.skip_scene_cuts,
        )
        if namespace.workers < 0:
            raise ValueError(f"--workers must be >= 0, got {namespace.workers}")
    except ValueError as e:
        return _refuse(e)
    try:
        result = build_shards(
            namespace.input, namespace.out, args, workers=namespace.workers, progress=not namespace.no_progress
        )
    except _BUILD_REFUSALS as e:
        return _refuse(e)
    manifest, stats = result.manifest, result.stats
    print(
        f"{manifest['clips']} clips ({manifest['total_duration_s']:.1f} s) in {len(manifest['shards'])} shards "
        f"from {manifest['ok_inputs']}/{manifest['inputs']} inputs -> {namespace.out}"
    )
    if result.heldout is not None:
        videos = result.heldout.get("heldout_videos")
        whole = "" if videos is None else f" (every clip of {len(videos)} video{'' if len(videos) == 1 else 's'})"
        print(f"{result.heldout['clips']} held-out clips{whole} -> {Path(namespace.out) / HELDOUT_DIR}")
    if manifest["clips_dropped_at_holdout"] or manifest["clips_dropped_at_cuts"]:
        print(
            f"dropped {manifest['clips_dropped_at_holdout']} clips at the holdout boundary, "
            f"{manifest['clips_dropped_at_cuts']} at scene cuts"
        )
    if manifest["skipped"]:
        print("skipped: " + ", ".join(f"{reason} {count}" for reason, count in manifest["skipped"].items()))
    print(
        f"{stats['input_duration_s']:.1f} s of video in {stats['wall_s']:.1f} s "
        f"({stats['input_s_per_wall_s']:.2f} video s per s); parts made {stats['parts_made']}, "
        f"reused {stats['parts_reused']}; shards written {stats['shards_written']}, kept {stats['shards_kept']}"
    )
    return 0


def _refuse(error: Exception) -> int:
    """Report a refused request as one ``error:`` line on stderr; returns exit code 2."""
    print(f"error: {error}", file=sys.stderr)
    return 2


ENCODE_MOVED = (
    "'python -m data_shards encode' moved to the encoder: run 'python -m pretrain.encode --config PRESET_OR_TOML "
    "[--section.key=value ...] --shards IN --out OUT' (encoder settings come from the config)"
)


def add_encode_arguments(parser: argparse.ArgumentParser) -> None:
    """``python -m data_shards encode`` takes any arguments (``any_arguments``): it only says where the command went."""
    parser.set_defaults(any_arguments=True)


def run_encode(namespace: argparse.Namespace) -> int:
    """The encode pass needs the model, which this package never imports: refuse with where to find it (exit 2)."""
    return _refuse(ValueError(ENCODE_MOVED))


def add_procedural_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m data_shards procedural``; --help shows every default."""
    defaults = CorpusArgs(videos=1)
    parser.add_argument(
        "--out", required=True, type=Path, help="output directory for shards and manifest.json (required)"
    )
    parser.add_argument("--videos", required=True, type=int, help="number of procedural videos (required)")
    parser.add_argument(
        "--seed",
        type=int,
        default=defaults.seed,
        help="corpus seed (its videos never repeat an eval set's)" + _DEFAULT,
    )
    parser.add_argument("--frames", type=int, default=defaults.frames, help="frames per video" + _DEFAULT)
    parser.add_argument(
        "--size", type=int, default=defaults.size, help="frame height and width in pixels (even)" + _DEFAULT
    )
    parser.add_argument("--clip-frames", type=int, default=defaults.clip_frames, help="frames per clip" + _DEFAULT)
    parser.add_argument("--fps", type=float, default=defaults.fps, help="frame rate written into the clips" + _DEFAULT)
    parser.add_argument(
        "--order-events",
        choices=ORDER_EVENTS,
        default=defaults.order_events,
        help="each video's two timed events: one-frame object flashes or whole-frame brightness changes" + _DEFAULT,
    )
    _add_encoding_arguments(parser, crf=defaults.crf, max_samples_per_shard=defaults.max_samples_per_shard)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar" + _DEFAULT)


def run_procedural(namespace: argparse.Namespace) -> int:
    """Run ``procedural`` from parsed arguments; prints a one-line summary and returns the exit code."""
    try:
        args = CorpusArgs(
            videos=namespace.videos,
            seed=namespace.seed,
            frames=namespace.frames,
            size=namespace.size,
            clip_frames=namespace.clip_frames,
            fps=namespace.fps,
            order_events=namespace.order_events,
            crf=namespace.crf,
            max_samples_per_shard=namespace.max_samples_per_shard,
        )
        if namespace.workers < 0:
            raise ValueError(f"--workers must be >= 0, got {namespace.workers}")
        result = write_corpus(namespace.out, args, workers=namespace.workers, progress=not namespace.no_progress)
    except (ValueError, OutputDirError) as e:
        return _refuse(e)
    manifest = result.manifest
    print(
        f"{args.videos} videos -> {manifest['clips']} clips ({manifest['total_duration_s']:.1f} s) "
        f"in {len(manifest['shards'])} shards, {result.bytes} bytes, {result.wall_s:.1f} s -> {namespace.out}"
        + (" (already there, nothing written)" if result.unchanged else "")
    )
    return 0
