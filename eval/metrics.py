"""Task metrics, as the benchmarks define them; numpy in, floats out.

Shape legend: V videos, Q query points (or objects), T frames, C classes,
2 = (x, y), 4 = box (x0, y0, x1, y1).

Point tracking follows TAP-Vid's ``compute_tapvid_metrics`` ("first" query
mode): positions in pixels of a 256 x 256 frame, thresholds 1, 2, 4, 8, 16
px, only frames strictly after the query frame count, sums per video, then
the mean over videos.
"""

from __future__ import annotations

import numpy as np

TAPVID_THRESHOLDS_PX: tuple[int, ...] = (1, 2, 4, 8, 16)
"""Distance thresholds of TAP-Vid's δ and Jaccard, in pixels at 256 x 256."""
DELTA1_RATIO = 1.25
"""Depth δ1: fraction of pixels with max(pred/gt, gt/pred) below this."""


def topk_accuracy(logits_VC: np.ndarray, labels_V: np.ndarray, k: int) -> float:
    """Fraction of videos whose label is among the k highest logits."""
    k = min(k, logits_VC.shape[1])
    topk_Vk = np.argsort(-logits_VC, axis=1, kind="stable")[:, :k]
    return float((topk_Vk == labels_V[:, None]).any(axis=1).mean())


def depth_metrics(pred_M: np.ndarray, gt_M: np.ndarray) -> dict[str, float]:
    """AbsRel = mean |pred - gt| / gt and δ1 over M valid pixels (gt > 0, pred clamped positive)."""
    valid = gt_M > 0
    pred = np.maximum(pred_M[valid], 1e-6)
    gt = gt_M[valid]
    ratio = np.maximum(pred / gt, gt / pred)
    return {"abs_rel": float(np.mean(np.abs(pred - gt) / gt)), "delta1": float(np.mean(ratio < DELTA1_RATIO))}


def tapvid_metrics(
    query_frame_VQ: np.ndarray,
    gt_occluded_VQT: np.ndarray,
    gt_tracks_VQT2: np.ndarray,
    pred_occluded_VQT: np.ndarray,
    pred_tracks_VQT2: np.ndarray,
) -> dict[str, float]:
    """TAP-Vid AJ, δ_avg (``average_pts_within_thresh``) and OA, query-first mode.

    Tracks are in pixels of a 256 x 256 frame. For each video: OA is the
    accuracy of the predicted occlusion flags; per threshold, δ is the share
    of visible points predicted within the threshold and the Jaccard is
    TP / (GT visible + FP), where FP are points predicted visible that are
    occluded or too far. AJ and δ_avg average over the thresholds; every
    metric is then averaged over videos.
    """
    T = gt_occluded_VQT.shape[-1]
    # Only frames strictly after each query's frame are scored.
    evaluated_VQT = np.arange(T)[None, None, :] > query_frame_VQ[..., None]
    visible = ~gt_occluded_VQT.astype(bool)
    pred_visible = ~pred_occluded_VQT.astype(bool)
    axes = (1, 2)
    occlusion_acc_V = np.sum((visible == pred_visible) & evaluated_VQT, axis=axes) / np.sum(evaluated_VQT, axis=axes)
    distance2_VQT = np.sum(np.square(pred_tracks_VQT2 - gt_tracks_VQT2), axis=-1)
    within_list, jaccard_list = [], []
    for threshold in TAPVID_THRESHOLDS_PX:
        within = distance2_VQT < threshold**2
        correct = within & visible
        gt_positives_V = np.sum(visible & evaluated_VQT, axis=axes)
        within_list.append(_safe_ratio(np.sum(correct & evaluated_VQT, axis=axes), gt_positives_V))
        true_positives_V = np.sum(correct & pred_visible & evaluated_VQT, axis=axes)
        false_positives_V = np.sum(((~visible) | (~within)) & pred_visible & evaluated_VQT, axis=axes)
        jaccard_list.append(_safe_ratio(true_positives_V, gt_positives_V + false_positives_V))
    return {
        "aj": float(np.mean(np.stack(jaccard_list, axis=1).mean(axis=1))),
        "delta_avg": float(np.mean(np.stack(within_list, axis=1).mean(axis=1))),
        "oa": float(np.mean(occlusion_acc_V)),
    }


def _safe_ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    # A video with nothing to score counts as 0, as TAP-Vid's evaluation does.
    return np.divide(numerator, denominator, out=np.zeros(numerator.shape, float), where=denominator != 0)


def box_iou(a_M4: np.ndarray, b_M4: np.ndarray) -> np.ndarray:
    """IoU of paired boxes (x0, y0, x1, y1), (M,); 0 where the union is empty."""
    low = np.maximum(a_M4[:, :2], b_M4[:, :2])
    high = np.minimum(a_M4[:, 2:], b_M4[:, 2:])
    inter = np.prod(np.clip(high - low, 0, None), axis=1)
    area_a = np.prod(np.clip(a_M4[:, 2:] - a_M4[:, :2], 0, None), axis=1)
    area_b = np.prod(np.clip(b_M4[:, 2:] - b_M4[:, :2], 0, None), axis=1)
    union = area_a + area_b - inter
    return np.divide(inter, union, out=np.zeros(inter.shape, float), where=union > 0)


def relative_pose_errors(
    pred_translation_M2: np.ndarray,
    gt_translation_M2: np.ndarray,
    pred_rotation_M: np.ndarray,
    gt_rotation_M: np.ndarray,
) -> dict[str, float]:
    """RPE over M consecutive-frame pairs: mean translation error (input units) and rotation error (degrees).

    Rotations are in-plane angles in degrees; the error wraps to [0, 180].
    """
    translation = np.linalg.norm(pred_translation_M2 - gt_translation_M2, axis=1)
    rotation = np.abs((pred_rotation_M - gt_rotation_M + 180.0) % 360.0 - 180.0)
    return {"rpe_trans": float(translation.mean()), "rpe_rot_deg": float(rotation.mean())}
