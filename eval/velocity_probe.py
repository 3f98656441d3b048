"""What does the core carry through time? A linear probe of motion from one frame's features.

    python -m eval.velocity_probe --export DIR [--out FILE.json] [--pool 512] [--test-videos 100] [--points] [--order]

A direct look at what pre-training put into the core's state, without a
trained readout in the way: a ridge regression from the features of the
*last* frame of each procedural clip to that frame's motion, which one frame
alone cannot show:

- ``objects``: the objects' mean screen velocity over the last step (px/frame, x and y);
- ``camera``: the camera pan over the last step (px/frame, x and y).

Feature sets, each read at the last frame only (shape legend: V videos,
T frames, N tokens, D encoder width, d core width):

- ``encoder``: the frozen encoder's tokens (image only);
- ``identity``: the export's adapter on them (image only, the core's input);
- ``pretrained``: the export's core output (adapter + core over the clip);
- ``random``: a fresh core of the same shape (one per seed; the mean is reported);
- ``two-frames``: the encoder tokens of the last two frames side by side, the
  positive control (two frames do show motion linearly, up to the encoder).

Motion where a tracker needs it (``--points``, the streaming point head's
question): for each query point of the point-tracking task and each frame
t >= 2 where it is seen at t-1 and t, the token of frame t's features at
the patch where the point was at t-1, regressed (primal ridge) on the
point's step from t-1 to t (px/frame): ``point-objects`` for points on the
moving objects, ``point-background`` for points on the panning background.
Every feature set above (``two-frames``: the encoder tokens of frames t-1
and t at that patch) answers it; intervals come from a bootstrap over test
clips.

Memory of a discrete event (``--order``, the order-of-events task's question):
the same ridge, on the order label as +-1 (which of the two timed events came
first: by default whole-frame brightening and darkening, with
``--order-events object`` which of two objects flashed; the last frame shows
no trace of either event), scored by accuracy
(chance 0.5). Beside the last-frame feature sets, ``all-frames-pooled``
(each frame's encoder tokens averaged over patches, the T frames side by
side) is the positive control: it shows whether the clip itself tells the
order to a linear map, so that a last-frame set at chance means the state
kept no trace of the events, not that the task is unlearnable. The same
pooling over only the last 2, 4 or 8 frames (``last-K-pooled``) tells how
much history the answer needs: a state that keeps about K frames should
read the order about as well as ``last-K-pooled``.

The regression is the dual (kernel) form of ridge on the flattened tokens of
one frame, its penalty chosen by 5-fold cross-validation on the training pool
only; the score is R² on a fixed test set (the first ``--test-videos`` clips of
the efficiency experiment's seed sequence, so the cached tokens are shared),
with a 95% bootstrap interval over test clips.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from data_shards.io import write_text_atomic
from data_shards.procedural import DEFAULT_ORDER_EVENTS, ORDER_EVENTS
from eval.data import ClipSet, load_procedural
from eval.efficiency import EfficiencyConfig, procedural_config, split
from eval.features import build_feature_path, load_checked_encoder, read_export
from eval.probe import precompute_features
from eval.tasks import point_tracks

log = logging.getLogger(__name__)

FORMAT = "video-pretrain-velocity-probe/1"
ALPHAS = tuple(10.0**k for k in range(-3, 6))
TARGETS = {"objects": (0, 2), "camera": (2, 4)}
"""target name -> its columns in the (V, 4) motion matrix."""
POINT_TARGETS = ("point-objects", "point-background")
"""Per-point targets (--points): the step of a point on an object, on the background."""
POINTS = 16
"""Query points per clip, as the point-tracking task draws them (the first half on objects)."""
ORDER_TARGET = "order"
"""The --order target: which of the two timed events came first, as +-1, scored by accuracy."""


def motion_targets(clips: ClipSet) -> np.ndarray:
    """(V, 4): objects' mean screen velocity and the camera pan, both over the last frame step."""
    rows = []
    for truth in clips.truths:
        objects_2 = (truth.centers_OT2[:, -1] - truth.centers_OT2[:, -2]).mean(axis=0)
        camera_2 = truth.camera_T2[-1] - truth.camera_T2[-2]
        rows.append(np.concatenate([objects_2, camera_2]))
    return np.asarray(rows, dtype=np.float64)


def _standardize(train_VF: Tensor, test_VF: Tensor) -> tuple[Tensor, Tensor]:
    mean, std = train_VF.mean(0), train_VF.std(0).clamp_min(1e-6)
    return (train_VF - mean) / std, (test_VF - mean) / std


def ridge_predict(train_VF: Tensor, y_train_VK: np.ndarray, test_VF: Tensor, alpha: float) -> np.ndarray:
    """Kernel ridge with a linear kernel (dual form: V x V, cheap for wide features), centred targets."""
    train_VF, test_VF = _standardize(train_VF.double(), test_VF.double())
    y = torch.from_numpy(y_train_VK)
    y_mean = y.mean(0)
    gram_VV = train_VF @ train_VF.T / train_VF.shape[1]
    weights_VK = torch.linalg.solve(gram_VV + alpha * torch.eye(len(gram_VV), dtype=gram_VV.dtype), y - y_mean)
    return ((test_VF @ train_VF.T / train_VF.shape[1]) @ weights_VK + y_mean).numpy()


def r2(pred_VK: np.ndarray, y_VK: np.ndarray) -> float:
    """R² averaged over target columns (1 is perfect, 0 is predicting the test mean)."""
    residual = ((pred_VK - y_VK) ** 2).sum(0)
    total = ((y_VK - y_VK.mean(0)) ** 2).sum(0)
    return float(np.mean(1.0 - residual / np.maximum(total, 1e-12)))


def choose_alpha(features_VF: Tensor, y_VK: np.ndarray, folds: int = 5) -> float:
    """The penalty with the best mean cross-validated R² on the training pool."""
    order = np.random.default_rng(0).permutation(len(y_VK))
    parts = np.array_split(order, folds)
    scores = {}
    for alpha in ALPHAS:
        fold_scores = []
        for k in range(folds):
            held = parts[k]
            kept = np.concatenate([parts[j] for j in range(folds) if j != k])
            pred = ridge_predict(features_VF[kept], y_VK[kept], features_VF[held], alpha)
            fold_scores.append(r2(pred, y_VK[held]))
        scores[alpha] = float(np.mean(fold_scores))
    return max(scores, key=scores.__getitem__)


def bootstrap_r2(pred_VK: np.ndarray, y_VK: np.ndarray, draws: int = 1000) -> tuple[float, float]:
    rng = np.random.default_rng(0)
    values = [r2(pred_VK[idx], y_VK[idx]) for idx in rng.integers(0, len(y_VK), size=(draws, len(y_VK)))]
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def last_frame_features(export_dir: Path, clips: ClipSet, seeds: int) -> dict[str, list[Tensor]]:
    """Feature set name -> one (V, F) matrix per seed (several only for ``random``)."""
    export = read_export(export_dir)
    tokens_VTND = clips.tokens_VTND
    out: dict[str, list[Tensor]] = {
        "encoder": [tokens_VTND[:, -1].float().flatten(1)],
        "two-frames": [tokens_VTND[:, -2:].float().flatten(1)],
    }
    for name, variant, runs in (
        ("identity", "identity", 1),
        ("pretrained", "pretrained", 1),
        ("random", "random", seeds),
    ):
        out[name] = []
        for seed in range(runs):
            path = build_feature_path(export, variant, "clip", "frozen", seed)
            out[name].append(precompute_features(path, tokens_VTND, 8)[:, -1].flatten(1))
    return out


def run_probe(export_dir: Path, clips: ClipSet, test_idx: Tensor, pool_idx: Tensor, seeds: int = 3) -> dict[str, Any]:
    """R² with interval per (feature set, target)."""
    y_VK = motion_targets(clips)
    features = last_frame_features(export_dir, clips, seeds)
    train, test = pool_idx.numpy(), test_idx.numpy()
    results: dict[str, Any] = {}
    for name, matrices in features.items():
        for target, (lo, hi) in TARGETS.items():
            scores, intervals = [], []
            for features_VF in matrices:
                alpha = choose_alpha(features_VF[train], y_VK[train, lo:hi])
                pred = ridge_predict(features_VF[train], y_VK[train, lo:hi], features_VF[test], alpha)
                scores.append(r2(pred, y_VK[test, lo:hi]))
                intervals.append(bootstrap_r2(pred, y_VK[test, lo:hi]))
            results.setdefault(name, {})[target] = {
                "r2": float(np.mean(scores)),
                "values": scores,
                "ci95": [float(np.mean([i[0] for i in intervals])), float(np.mean([i[1] for i in intervals]))],
                "features": int(matrices[0].shape[1]),
            }
            log.info("%s %s: R2 %.3f", name, target, results[name][target]["r2"])
    return results


def point_samples(
    features_VTNd: Tensor, tracks_VQT2: np.ndarray, visible_VQT: np.ndarray, grid: int
) -> tuple[Tensor, np.ndarray, np.ndarray, np.ndarray]:
    """(X (S, d), steps (S, 2) normalized, clip (S,), on_object (S,)) over every seen (point, t >= 2).

    X is frame t's token at the patch holding the point at t-1: what a
    streaming tracker that last put the point there reads to move it.
    """
    Q = tracks_VQT2.shape[1]
    seen_VQT = visible_VQT[:, :, 2:] & visible_VQT[:, :, 1:-1]
    v, q, s = np.nonzero(seen_VQT)
    t = s + 2
    before_S2, after_S2 = tracks_VQT2[v, q, t - 1], tracks_VQT2[v, q, t]
    cell_S2 = np.clip((before_S2 * grid).astype(int), 0, grid - 1)
    patch_S = cell_S2[:, 1] * grid + cell_S2[:, 0]
    X = features_VTNd[torch.from_numpy(v), torch.from_numpy(t), torch.from_numpy(patch_S)].double()
    return X, after_S2 - before_S2, v, q < Q // 2


def primal_ridge(train_SF: Tensor, y_train_SK: np.ndarray, test_SF: Tensor, alpha: float) -> np.ndarray:
    """Ridge in the primal (F x F: many samples, narrow features), standardized inputs, centred targets."""
    train_SF, test_SF = _standardize(train_SF, test_SF)
    y = torch.from_numpy(y_train_SK).double()
    y_mean = y.mean(0)
    gram_FF = train_SF.T @ train_SF / len(train_SF)
    eye = torch.eye(len(gram_FF), dtype=gram_FF.dtype)
    weights_FK = torch.linalg.solve(gram_FF + alpha * eye, train_SF.T @ (y - y_mean) / len(train_SF))
    return (test_SF @ weights_FK + y_mean).numpy()


def _clip_folds(clips_S: np.ndarray, folds: int) -> list[np.ndarray]:
    order = np.random.default_rng(0).permutation(np.unique(clips_S))
    return [np.isin(clips_S, part) for part in np.array_split(order, folds)]


def point_r2(X: Tensor, y_SK: np.ndarray, clips_S: np.ndarray, test: np.ndarray, draws: int = 400) -> dict[str, Any]:
    """R² on the test clips' samples, the penalty cross-validated over training clips, a clip bootstrap."""
    is_test = np.isin(clips_S, test)
    train_X, train_y, train_clips = X[~is_test], y_SK[~is_test], clips_S[~is_test]
    scores = {}
    for alpha in ALPHAS:
        fold_scores = []
        for held in _clip_folds(train_clips, 5):
            held_t = torch.from_numpy(held)
            pred = primal_ridge(train_X[~held_t], train_y[~held], train_X[held_t], alpha)
            fold_scores.append(r2(pred, train_y[held]))
        scores[alpha] = float(np.mean(fold_scores))
    alpha = max(scores, key=scores.__getitem__)
    pred = primal_ridge(train_X, train_y, X[torch.from_numpy(is_test)], alpha)
    y_test, clips_test = y_SK[is_test], clips_S[is_test]
    rng = np.random.default_rng(0)
    rows_of = [np.flatnonzero(clips_test == c) for c in np.unique(clips_test)]
    values = []
    for _ in range(draws):
        rows = np.concatenate([rows_of[i] for i in rng.integers(0, len(rows_of), len(rows_of))])
        values.append(r2(pred[rows], y_test[rows]))
    return {
        "r2": r2(pred, y_test),
        "ci95": [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))],
        "samples": len(y_test),
        "alpha": alpha,
    }


def order_targets(clips: ClipSet) -> np.ndarray:
    """(V, 1): the order label as -1 / +1."""
    return np.array([[2.0 * truth.order_label - 1.0] for truth in clips.truths])


def bootstrap_accuracy(correct_V: np.ndarray, draws: int = 1000) -> tuple[float, float]:
    rng = np.random.default_rng(0)
    values = correct_V[rng.integers(0, len(correct_V), size=(draws, len(correct_V)))].mean(1)
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


ORDER_HISTORY: tuple[int, ...] = (2, 4, 8)
"""The --order probe's history controls: the encoder tokens of the last K frames, each averaged over
patches, side by side (``last-K-pooled``). They tell how far back a state must remember to answer:
a whole-frame event may end one frame before the last, so two frames already tell some clips' order."""


def history_features(tokens_VTND: Tensor) -> dict[str, list[Tensor]]:
    """The pooled-history feature sets of the --order probe: the last K frames (K in ORDER_HISTORY, K < T)
    and all T frames (``all-frames-pooled``, the positive control), each frame averaged over patches."""
    pooled_VTD = tokens_VTND.float().mean(2)
    frames = pooled_VTD.shape[1]
    sets = {f"last-{k}-pooled": [pooled_VTD[:, -k:].flatten(1)] for k in ORDER_HISTORY if k < frames}
    sets["all-frames-pooled"] = [pooled_VTD.flatten(1)]
    return sets


def run_order_probe(
    export_dir: Path, clips: ClipSet, test_idx: Tensor, pool_idx: Tensor, seeds: int = 3
) -> dict[str, dict[str, Any]]:
    """Accuracy with interval of the order label per feature set (the last frame's, and history_features)."""
    if min(truth.order_label for truth in clips.truths) < 0:
        raise ValueError("--order needs procedural clips generated with temporal labels (order_label is -1)")
    y_V1 = order_targets(clips)
    features = last_frame_features(export_dir, clips, seeds)
    features.update(history_features(clips.tokens_VTND))
    train, test = pool_idx.numpy(), test_idx.numpy()
    results: dict[str, dict[str, Any]] = {}
    for name, matrices in features.items():
        scores, intervals = [], []
        for features_VF in matrices:
            alpha = choose_alpha(features_VF[train], y_V1[train])
            pred_V1 = ridge_predict(features_VF[train], y_V1[train], features_VF[test], alpha)
            correct_V = (np.sign(pred_V1[:, 0]) == y_V1[test, 0]).astype(np.float64)
            scores.append(float(correct_V.mean()))
            intervals.append(bootstrap_accuracy(correct_V))
        results[name] = {
            ORDER_TARGET: {
                "accuracy": float(np.mean(scores)),
                "values": scores,
                "ci95": [float(np.mean([i[0] for i in intervals])), float(np.mean([i[1] for i in intervals]))],
                "features": int(matrices[0].shape[1]),
            }
        }
        log.info("%s order: accuracy %.3f", name, results[name][ORDER_TARGET]["accuracy"])
    return results


def run_point_probe(
    export_dir: Path, clips: ClipSet, test_idx: Tensor, pool_idx: Tensor, seeds: int = 3
) -> dict[str, Any]:
    """R² with interval per (feature set, point target); a random core's is the mean over seeds."""
    export = read_export(export_dir)
    grid = export.spec.grid_h
    used = np.concatenate([test_idx.numpy(), pool_idx.numpy()])
    per_video = [point_tracks(clips.truths[v], POINTS) for v in used]
    tracks_VQT2 = np.stack([p[1] for p in per_video])
    visible_VQT = np.stack([p[2] for p in per_video])
    test = np.arange(len(test_idx))
    tokens_VTND = clips.tokens_VTND[torch.from_numpy(used)]
    feature_sets: dict[str, list[Tensor]] = {"encoder": [tokens_VTND.float()]}
    for name, variant, runs in (
        ("identity", "identity", 1),
        ("pretrained", "pretrained", 1),
        ("random", "random", seeds),
    ):
        feature_sets[name] = [
            precompute_features(build_feature_path(export, variant, "clip", "frozen", seed), tokens_VTND, 8)
            for seed in range(runs)
        ]
    samples = {
        name: [point_samples(f, tracks_VQT2, visible_VQT, grid) for f in fs] for name, fs in feature_sets.items()
    }
    # The pair control: the same patch of frames t-1 and t (the step between them shows in the pair).
    previous_VTND = torch.cat([tokens_VTND[:, :1], tokens_VTND[:, :-1]], dim=1).float()
    X_t, steps, clips_S, on_object = samples["encoder"][0]
    samples["two-frames"] = [
        (
            torch.cat([X_t, point_samples(previous_VTND, tracks_VQT2, visible_VQT, grid)[0]], 1),
            steps,
            clips_S,
            on_object,
        )
    ]
    results: dict[str, Any] = {}
    for name, runs in samples.items():
        for target, on in zip(POINT_TARGETS, (True, False), strict=True):
            scored = []
            for X, steps_S2, clips_S, on_object in runs:
                keep = on_object == on
                scored.append(point_r2(X[torch.from_numpy(keep)], steps_S2[keep], clips_S[keep], test))
            results.setdefault(name, {})[target] = {
                "r2": float(np.mean([s["r2"] for s in scored])),
                "values": [s["r2"] for s in scored],
                "ci95": [float(np.mean([s["ci95"][i] for s in scored])) for i in (0, 1)],
                "samples": scored[0]["samples"],
            }
            log.info("%s %s: R2 %.3f", name, target, results[name][target]["r2"])
    return results


def markdown(record: dict[str, Any]) -> str:
    targets = list(dict.fromkeys(t for per_target in record["results"].values() for t in per_target))
    lines = [
        f"# Motion probe: {record['export']}",
        "",
        f"Ridge from one frame's features to motion; R² on {record['test_videos']} test clips "
        f"(trained on {record['pool']}), 95% bootstrap interval over test clips. objects / camera: the last "
        "frame's tokens -> the last step's mean object velocity / camera pan; point-*: frame t's token where "
        "a tracked point was at t-1 -> its step; order: accuracy (chance 0.5) of which timed event came first "
        "(last-K-pooled / all-frames-pooled: the encoder's last K / all frames, each averaged over patches).",
        "",
        "| features | " + " | ".join(targets) + " |",
        "|---|" + "---|" * len(targets),
    ]
    for name, per_target in record["results"].items():
        cells = [_cell(per_target.get(target)) for target in targets]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(result: dict[str, Any] | None) -> str:
    if result is None:
        return "-"
    value = result["accuracy"] if "accuracy" in result else result["r2"]
    return f"{value:.3f} [{result['ci95'][0]:.3f}, {result['ci95'][1]:.3f}]"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.velocity_probe", description=__doc__.splitlines()[0])
    parser.add_argument("--export", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=None, help="write the record as JSON here")
    parser.add_argument("--pool", type=int, default=512, help="training clips of the probe")
    parser.add_argument("--test-videos", dest="test_videos", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=3, help="fresh cores for the random control")
    parser.add_argument("--points", action="store_true", help="also probe motion at tracked points")
    parser.add_argument("--order", action="store_true", help="also probe the order of two timed events (memory)")
    parser.add_argument(
        "--order-events",
        choices=ORDER_EVENTS,
        default=DEFAULT_ORDER_EVENTS,
        help="the set's timed events, as eval.efficiency --order-events (default: %(default)s)",
    )
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--encoder", default=None)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        cfg = EfficiencyConfig(
            budgets=(args.pool,), test_videos=args.test_videos, seeds=2, order_events=args.order_events
        )
        export = read_export(args.export)
        encoder = load_checked_encoder(export, args.encoder)
        clips = load_procedural(procedural_config(cfg), encoder, args.cache_dir)
        test_idx, pool_idx = split(clips, cfg)
        results = run_probe(args.export, clips, test_idx, pool_idx, args.seeds)
        if args.points:
            for name, per_target in run_point_probe(args.export, clips, test_idx, pool_idx, args.seeds).items():
                results[name].update(per_target)
        if args.order:
            for name, per_target in run_order_probe(args.export, clips, test_idx, pool_idx, args.seeds).items():
                results.setdefault(name, {}).update(per_target)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    record = {
        "format": FORMAT,
        "export": str(args.export),
        "export_sha256": export.sha256,
        "dataset_hash": clips.dataset_hash,
        "pool": len(pool_idx),
        "test_videos": len(test_idx),
        "results": results,
    }
    print(markdown(record))
    if args.out is not None:
        write_text_atomic(args.out, json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
