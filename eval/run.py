"""Evaluate one task on an export, against nothing or one baseline.

    python -m eval.run --export runs/tiny-cpu/export --task classification \\
        [--baseline identity|random] [--probe frozen|finetune] [--protocol streaming|clip] \\
        [--seed 0] [--steps 150] [--out runs/eval] [--no-mlflow]
    python -m eval.run --export DIR --task future --data VIDEO_DIR

    python -m eval.run --export DIR --task point_tracking --data tapvid:/data/tapvid_davis.pkl

Procedural tasks (``--data procedural``, the default): classification
(drift direction), classify_speed, classify_order, depth, point_tracking,
box_tracking, camera_pose. ``--data KIND:PATH`` reads a standard format
instead (ssv2, kinetics -> classification; tapvid -> point_tracking;
scannet -> depth; mot -> box_tracking; nuscenes -> camera_pose; see
eval.datasets); ``--frames`` then sets the clip length. ``future`` is the
self-supervised eval on any folder of real videos: held-out future-feature
error per offset against copy-last, and against the export's identity-core
control when it records one, with frames decoded and windowed in the
export's recorded clip geometry (see eval.selfsup); its --seed defaults to
the trainer's held-out mask seed (1234), --frames caps the frames per video.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from data_shards import VideoDecodeError
from eval.data import ClipSet, ProceduralConfig, load_procedural
from eval.datasets import FORMAT_TASKS, check_task, load_format, parse_data
from eval.features import (
    PROBES,
    PROTOCOLS,
    EncoderMismatchError,
    Export,
    Probe,
    Protocol,
    Variant,
    build_feature_path,
    export_summary,
    load_checked_encoder,
    read_export,
)
from eval.probe import FeatureCache, ReadoutConfig, train_and_evaluate
from eval.report import check_out_root, check_report_dir, log_to_mlflow, write_task_report
from eval.tasks import TASKS, build_task

log = logging.getLogger(__name__)

BASELINES: tuple[Variant, ...] = ("identity", "random")


@dataclass(kw_only=True, slots=True)
class EvalSettings:
    """Everything a task evaluation depends on besides the export and the data."""

    probe: Probe = "frozen"
    """frozen: only the readout trains; finetune: the adapter and core too."""
    protocol: Protocol = "streaming"
    """streaming: the core's step, frame by frame; clip: forward over the clip."""
    seed: int = 0
    """Readout init, batch order and the random baseline's weights."""
    readout: ReadoutConfig = dataclasses.field(default_factory=ReadoutConfig)
    """How readouts are trained."""

    def __post_init__(self) -> None:
        if self.probe not in PROBES:
            raise ValueError(f"probe must be one of {PROBES}, got {self.probe!r}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")


def evaluate_task(
    task_name: str,
    variant: Variant,
    export: Export,
    clips: ClipSet,
    settings: EvalSettings,
    cache: FeatureCache | None = None,
) -> dict[str, Any]:
    """Train and score one task's readout on one variant; returns the report record."""
    if clips.task is not None and clips.task != task_name:
        raise ValueError(f"dataset {clips.description.get('kind')!r} has targets for {clips.task!r}, not {task_name!r}")
    task = build_task(task_name, **clips.task_overrides)
    path = build_feature_path(export, variant, settings.protocol, settings.probe, settings.seed)
    features = None
    if not path.trainable:
        # The random core depends on the seed; the pretrained one does not.
        key = (variant, settings.protocol, str(settings.seed) if variant == "random" else "")
        cache = cache if cache is not None else FeatureCache()
        features = cache.get(key, path, clips.tokens_VTND, settings.readout.eval_batch_size)
    grid = export.spec.grid_h
    targets = clips.targets if clips.targets is not None else task.targets(clips.truths, grid)
    result = train_and_evaluate(
        task,
        path,
        clips.tokens_VTND,
        targets,
        clips.train_idx,
        clips.test_idx,
        grid,
        settings.readout,
        settings.seed,
        features,
    )
    log.info("%s / %s: %s", task_name, variant, result.metrics)
    return {
        "task": task_name,
        "variant": variant,
        "probe": settings.probe,
        "protocol": settings.protocol,
        "seed": settings.seed,
        "export": export_summary(export),
        "dataset": {k: v for k, v in clips.description.items() if k != "dir"},
        "readout": {**task.config(), **dataclasses.asdict(settings.readout)},
        "metrics": result.metrics,
        "primary": task.primary,
        "higher_is_better": task.higher_is_better,
        "final_loss": result.final_loss,
        "train_seconds": result.train_seconds,
        "trainable_parameters": result.trainable_parameters,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Arguments shared by eval.run and eval.suite."""
    parser.add_argument("--export", type=Path, required=True, help="export directory (model.safetensors + config.json)")
    parser.add_argument("--encoder", default=None, help="encoder weights source, when the recorded one is not here")
    parser.add_argument("--probe", choices=PROBES, default="frozen")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="streaming")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="readout optimizer steps")
    parser.add_argument("--out", type=Path, default=Path("runs/eval"))
    parser.add_argument("--cache", type=Path, default=None, help="procedural videos and token cache")
    parser.add_argument("--train-videos", type=int, default=None)
    parser.add_argument("--test-videos", type=int, default=None)
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--size", type=int, default=None, help="procedural frame size in pixels")
    parser.add_argument("--no-mlflow", action="store_true", help="write reports only")
    parser.add_argument("-v", "--verbose", action="store_true")


def settings_from_args(args: argparse.Namespace) -> EvalSettings:
    readout = ReadoutConfig() if args.steps is None else ReadoutConfig(steps=args.steps)
    return EvalSettings(probe=args.probe, protocol=args.protocol, seed=args.seed, readout=readout)


def procedural_from_args(args: argparse.Namespace) -> ProceduralConfig:
    overrides = {
        "train_videos": args.train_videos,
        "test_videos": args.test_videos,
        "frames": args.frames,
        "size": args.size,
    }
    return ProceduralConfig(**{k: v for k, v in overrides.items() if v is not None})


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


def report_dir(args: argparse.Namespace) -> Path:
    """Where eval.run publishes its report: OUT/future, else OUT/<task>/<variant>."""
    if args.task == "future":
        return args.out / "future"
    return args.out / args.task / (args.baseline or "pretrained")


def _main(args: argparse.Namespace) -> int:
    # Check the data against the task, and the output, before anything heavy is loaded.
    data_format = None if args.task == "future" else parse_data(args.data)
    if data_format is not None:
        check_task(data_format[0], args.task)
    check_out_root(args.out)
    check_report_dir(report_dir(args))
    export = read_export(args.export)
    encoder = load_checked_encoder(export, args.encoder)
    if args.task == "future":
        from eval.selfsup import run_future_eval

        report, where = run_future_eval(export, encoder, args)
        print(report.read_text())
        if where is not None:
            print(f"logged to {where}")
        return 0
    if data_format is None:
        clips = load_procedural(procedural_from_args(args), encoder, args.cache)
    else:
        kind, path = data_format
        clips = load_format(kind, path, args.task, encoder, export.spec.grid_h, args.frames)
    settings = settings_from_args(args)
    variant: Variant = args.baseline or "pretrained"
    start = time.perf_counter()
    record = evaluate_task(args.task, variant, export, clips, settings)
    record["wall_seconds"] = time.perf_counter() - start
    out_dir = report_dir(args)
    paths = write_task_report(record, out_dir)
    print(paths[0].read_text())
    if not args.no_mlflow:
        where = log_to_mlflow(
            args.out, f"{args.task}-{variant}", record, record["metrics"], paths, training=export.config.tracking
        )
        print(f"logged to {where}")
    print(f"reports in {out_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.run", description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--task", choices=[*TASKS, "future"], required=True)
    parser.add_argument(
        "--data",
        default="procedural",
        help="'procedural'; KIND:PATH for a standard format "
        f"({', '.join(f'{k} -> {t}' for k, t in FORMAT_TASKS.items())}; see eval.datasets); "
        "or a folder of videos for --task future",
    )
    parser.add_argument("--baseline", choices=BASELINES, default=None, help="evaluate a baseline instead")
    # --task future defaults to the trainer's held-out mask seed, so that on the same windows
    # it reproduces the trainer's numbers; the readout tasks default to 0.
    parser.set_defaults(seed=None)
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = 0
        if args.task == "future":
            from eval.selfsup import HELDOUT_SEED

            args.seed = HELDOUT_SEED
    setup_logging(args.verbose)
    try:
        return _main(args)
    except (EncoderMismatchError, FileNotFoundError, ValueError, VideoDecodeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
