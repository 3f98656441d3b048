"""Why no readout learns the order of flashes: is the cue in the tokens, and can a readout find it?

    python -m benchmarks.order_cue --export runs/procedural-cpu/export [--steps 150,1500] [--out FILE]

On the labelled procedural set of ``eval.efficiency`` (the same videos and
cached tokens), the order label says which of two objects, a disc and a
rect, flashes first. Telling it needs two things from the frozen tokens:
seeing each flash, and knowing which object is the disc. This measures both,
at the patches the flashing object covers (by the exact masks), for the raw
encoder tokens and for the export's adapter outputs (what every core reads):

- flash contrast: the norm of the tokens' second difference in time at the
  flash frame, against the same patches at a frame without a flash;
- shape: a ridge from the object's tokens to disc / rect, trained on the
  training pool's flashes and scored on the test clips' (with the majority
  answer beside it), read one frame before the flash and at the flash;
- the all-frames control readout (identity path, attentive probe over every
  frame's tokens) on all labels, at each ``--steps``: whether training it
  longer finds what 150 steps does not.

Prints a markdown table; ``--out`` also writes the record as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from data_shards.io import write_text_atomic
from eval.data import ClipSet, load_procedural
from eval.efficiency import EfficiencyConfig, labelled_subset, procedural_config, split
from eval.features import build_feature_path, load_checked_encoder, read_export
from eval.probe import ReadoutConfig, precompute_features, train_and_evaluate
from eval.tasks import build_task
from eval.velocity_probe import bootstrap_accuracy, choose_alpha, ridge_predict

COVERED = 0.3
"""A patch belongs to the flashing object when the object's mask covers at least this fraction of it."""


def object_patches(mask_HW: np.ndarray, grid: int) -> np.ndarray:
    """Boolean (grid*grid,) of the patches (row-major) the mask covers by at least COVERED."""
    H, W = mask_HW.shape
    cover_GG = mask_HW[: H - H % grid, : W - W % grid].reshape(grid, H // grid, grid, W // grid).mean((1, 3))
    return cover_GG.reshape(-1) >= COVERED


def flash_samples(clips: ClipSet, features_VTNd: Tensor, grid: int) -> dict[str, np.ndarray]:
    """One sample per flash whose object covers a patch: its clip, shape, token means and contrasts.

    ``before`` / ``at``: the mean token over the object's patches one frame
    before the flash and at it; ``contrast`` / ``calm``: the norm of the
    second difference in time there, at the flash and at the first inner
    frame without a flash.
    """
    clip, disc, before, at, contrast, calm = [], [], [], [], [], []
    T = features_VTNd.shape[1]
    for v, truth in enumerate(clips.truths):
        flashes = truth.flash_frames_O
        if flashes is None or truth.masks_THW is None:
            raise ValueError("order_cue needs procedural clips with temporal labels and masks")
        quiet = next(t for t in range(1, T - 1) if t not in flashes)
        for o in np.flatnonzero(flashes >= 0):
            t = int(flashes[o])
            patches = torch.from_numpy(object_patches(truth.masks_THW[t] == o + 1, grid))
            if not patches.any():
                continue
            mean_T_d = features_VTNd[v][:, patches].float().mean(1)
            second_T_d = mean_T_d[1:-1] - 0.5 * (mean_T_d[:-2] + mean_T_d[2:])
            clip.append(v)
            disc.append(truth.shapes[o] == "disc")
            before.append(mean_T_d[t - 1].numpy())
            at.append(mean_T_d[t].numpy())
            contrast.append(float(second_T_d[t - 1].norm()))
            calm.append(float(second_T_d[quiet - 1].norm()))
    return {
        "clip": np.array(clip),
        "disc": np.array(disc),
        "before": np.array(before),
        "at": np.array(at),
        "contrast": np.array(contrast),
        "calm": np.array(calm),
    }


def shape_accuracy(samples: dict[str, np.ndarray], where: str, test_clips: np.ndarray) -> dict[str, Any]:
    """Ridge disc / rect from the tokens ``where`` ("before" or "at"): test accuracy with its interval."""
    test = np.isin(samples["clip"], test_clips)
    X = torch.from_numpy(samples[where]).double()
    y_S1 = np.where(samples["disc"], 1.0, -1.0)[:, None]
    alpha = choose_alpha(X[~test], y_S1[~test])
    pred_S1 = ridge_predict(X[~test], y_S1[~test], X[test], alpha)
    correct = (np.sign(pred_S1[:, 0]) == y_S1[test, 0]).astype(np.float64)
    majority = max(samples["disc"][test].mean(), 1 - samples["disc"][test].mean())
    return {"accuracy": float(correct.mean()), "ci95": list(bootstrap_accuracy(correct)), "majority": float(majority)}


def control_accuracy(export_dir: Path, clips: ClipSet, cfg: EfficiencyConfig, steps: int, seeds: int) -> dict[str, Any]:
    """The all-frames control (identity path, attentive probe on every frame) on all labels, ``steps`` steps."""
    export = read_export(export_dir)
    task = build_task("classify_order")
    targets = task.targets(clips.truths, export.spec.grid_h)
    test_idx, pool_idx = split(clips, cfg)
    path = build_feature_path(export, "identity", "clip", "frozen", 0)
    features = precompute_features(path, clips.tokens_VTND, 16)
    scores, losses, start = [], [], time.perf_counter()
    for seed in range(seeds):
        train_idx = pool_idx[labelled_subset(seed, len(pool_idx), len(pool_idx))]
        result = train_and_evaluate(
            task,
            path,
            clips.tokens_VTND,
            targets,
            train_idx,
            test_idx,
            export.spec.grid_h,
            ReadoutConfig(steps=steps, finetune_lr=cfg.readout.finetune_lr),
            seed,
            features,
            streaming=False,
        )
        scores.append(result.metrics["top1"])
        losses.append(result.final_loss)
    return {
        "steps": steps,
        "top1": scores,
        "final_loss": losses,
        "labels": len(pool_idx),
        "seconds": time.perf_counter() - start,
    }


def run(export_dir: Path, cfg: EfficiencyConfig, steps: Sequence[int], seeds: int, cache_dir: Path | None) -> dict:
    export = read_export(export_dir)
    clips = load_procedural(procedural_config(cfg), load_checked_encoder(export), cache_dir)
    grid = export.spec.grid_h
    test_idx, _ = split(clips, cfg)
    adapter = precompute_features(build_feature_path(export, "identity", "clip", "frozen", 0), clips.tokens_VTND, 16)
    record: dict[str, Any] = {"dataset_hash": clips.dataset_hash, "export_sha256": export.sha256, "features": {}}
    for name, features in (("encoder", clips.tokens_VTND), ("adapter", adapter)):
        samples = flash_samples(clips, features, grid)
        record["features"][name] = {
            "flashes": len(samples["clip"]),
            "contrast_median": float(np.median(samples["contrast"])),
            "calm_median": float(np.median(samples["calm"])),
            "shape_before": shape_accuracy(samples, "before", test_idx.numpy()),
            "shape_at": shape_accuracy(samples, "at", test_idx.numpy()),
        }
    record["control"] = [control_accuracy(export_dir, clips, cfg, s, seeds) for s in steps]
    return record


def markdown(record: dict[str, Any]) -> str:
    lines = [
        f"Dataset hash `{record['dataset_hash'][:12]}`, export sha256 `{record['export_sha256'][:12]}`.",
        "",
        "| tokens | flashes | contrast at flash / without (median) | shape before flash | shape at flash |",
        "|---|---|---|---|---|",
    ]
    for name, f in record["features"].items():

        def acc(r: dict[str, Any]) -> str:
            return f"{r['accuracy']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] (majority {r['majority']:.3f})"

        lines.append(
            f"| {name} | {f['flashes']} | {f['contrast_median']:.1f} / {f['calm_median']:.1f} | "
            f"{acc(f['shape_before'])} | {acc(f['shape_at'])} |"
        )
    lines += ["", "| all-frames control, all labels | top-1 per seed | final loss | wall |", "|---|---|---|---|"]
    for c in record["control"]:
        tops = " / ".join(f"{t:.2f}" for t in c["top1"])
        loss = " / ".join(f"{x:.2f}" for x in c["final_loss"])
        lines.append(f"| {c['steps']} steps, {c['labels']} labels | {tops} | {loss} | {c['seconds']:.0f} s |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.order_cue", description=__doc__.splitlines()[0])
    parser.add_argument("--export", type=Path, required=True)
    parser.add_argument("--steps", default="150,1500", help="control readout steps, comma-separated")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--budgets", default=None, help="the efficiency ladder whose set to read (default full)")
    parser.add_argument("--test-videos", dest="test_videos", type=int, default=None)
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="also write the record as JSON")
    args = parser.parse_args(argv)
    fields: dict[str, Any] = {}
    if args.budgets:
        fields["budgets"] = tuple(int(b) for b in args.budgets.split(","))
    for name in ("test_videos", "frames", "size"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    try:
        # The question here is about one-frame object flashes (which object, at its patches): that set.
        cfg = EfficiencyConfig(order_events="object", **fields)
        steps = [int(s) for s in args.steps.split(",")]
        record = run(args.export, cfg, steps, args.seeds, args.cache_dir)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(markdown(record))
    if args.out is not None:
        write_text_atomic(args.out, json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
