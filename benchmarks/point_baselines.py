"""What TAP-Vid AJ can read on the efficiency test set: trackers that need no features.

    python -m benchmarks.point_baselines [--test-videos 100] [--points 16]

Generates the point-tracking test set of ``eval.efficiency`` (the first
``--test-videos`` clips of its procedural seed sequence; no encoder needed)
and scores, with the task's own metric:

- ``stand-still``: every point stays at its query, always visible (what an
  untrained streaming point head does);
- ``patch-centres``: the exact tracks rounded to the centre of the patch of
  the export's grid (8 x 8 at 112 px) that holds them, with exact visibility:
  the best a tracker can do that only says which patch a point is in;
- ``exact``: the exact tracks and visibility (AJ 1 by construction, a check).

So a reader can place a variant's AJ between "does nothing" and "knows the
patch exactly". Prints a table; ``--out`` also writes it as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from data_shards import GroundTruth
from data_shards.io import write_text_atomic
from eval.data import _generate_once
from eval.efficiency import EfficiencyConfig, procedural_config
from eval.tasks import Batch, build_task


def baselines(targets: Batch, grid: int) -> dict[str, Batch]:
    """Outputs of the feature-free trackers for the task's targets."""
    queries_VQ2, tracks_VQT2, visible_VQT = targets["queries"], targets["tracks"], targets["visible"]
    T = tracks_VQT2.shape[2]
    exact_visibility = visible_VQT.float() * 2 - 1
    return {
        "stand-still": {
            "positions": queries_VQ2[:, :, None].expand(-1, -1, T, -1).clone(),
            "visibility_logits": torch.ones_like(exact_visibility),
        },
        "patch-centres": {
            "positions": (torch.floor(tracks_VQT2 * grid).clamp(0, grid - 1) + 0.5) / grid,
            "visibility_logits": exact_visibility,
        },
        "exact": {"positions": tracks_VQT2.clone(), "visibility_logits": exact_visibility},
    }


def run(test_videos: int, points: int, grid: int) -> dict[str, dict[str, float]]:
    cfg = procedural_config(EfficiencyConfig(test_videos=test_videos))
    # The test set is the first clips of the seed sequence: generate those only.
    cfg.train_videos, cfg.test_videos = test_videos, 1
    task = build_task("point_tracking", points=points)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "set"
        _generate_once(cfg, directory)
        truths = [GroundTruth.from_json(p.read_text()) for p in sorted(directory.glob("proc-*.json"))[:test_videos]]
    targets = task.targets(truths, grid)
    return {name: task.metrics(outputs, targets) for name, outputs in baselines(targets, grid).items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.point_baselines", description=__doc__.splitlines()[0])
    parser.add_argument("--test-videos", dest="test_videos", type=int, default=100)
    parser.add_argument("--points", type=int, default=16)
    parser.add_argument("--grid", type=int, default=8, help="patch grid side (DINOv2-S/14 at 112 px: 8)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        results = run(args.test_videos, args.points, args.grid)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"point-tracking baselines on the efficiency test set ({args.test_videos} clips, {args.points} points)")
    print(f"{'tracker':<14} {'AJ':>7} {'delta_avg':>9} {'OA':>6}")
    for name, m in results.items():
        print(f"{name:<14} {m['aj']:>7.4f} {m['delta_avg']:>9.4f} {m['oa']:>6.3f}")
    if args.out is not None:
        write_text_atomic(args.out, json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
