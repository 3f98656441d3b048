"""Metrics on examples small enough to check by hand."""

from __future__ import annotations

import numpy as np
import pytest

from eval.metrics import box_iou, depth_metrics, relative_pose_errors, tapvid_metrics, topk_accuracy


def test_topk_accuracy() -> None:
    logits_VC = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.5], [0.2, 0.3, 0.1]])
    labels_V = np.array([1, 2, 2])
    assert topk_accuracy(logits_VC, labels_V, 1) == pytest.approx(1 / 3)
    assert topk_accuracy(logits_VC, labels_V, 2) == pytest.approx(2 / 3)
    assert topk_accuracy(logits_VC, labels_V, 5) == 1.0


def test_depth_metrics_by_hand() -> None:
    pred = np.array([1.0, 2.0, 4.0, 5.0])
    gt = np.array([1.0, 1.0, 4.0, 0.0])  # the last pixel has no depth: ignored
    metrics = depth_metrics(pred, gt)
    # |2-1|/1 on one of three valid pixels; its ratio 2 fails δ1.
    assert metrics["abs_rel"] == pytest.approx(1 / 3)
    assert metrics["delta1"] == pytest.approx(2 / 3)


def _one_track(gt_xy: list[list[float]], pred_xy: list[list[float]], gt_vis: list[bool], pred_vis: list[bool]):
    return dict(
        query_frame_VQ=np.zeros((1, 1), int),
        gt_occluded_VQT=~np.array(gt_vis)[None, None],
        gt_tracks_VQT2=np.array(gt_xy, float)[None, None],
        pred_occluded_VQT=~np.array(pred_vis)[None, None],
        pred_tracks_VQT2=np.array(pred_xy, float)[None, None],
    )


def test_tapvid_position_errors_by_hand() -> None:
    # Frame 0 is the query frame: never scored, however wrong. Frame 1 exact, frame 2 off by 3 px.
    args = _one_track(
        gt_xy=[[10, 10], [20, 20], [30, 30]],
        pred_xy=[[200, 200], [20, 20], [33, 30]],
        gt_vis=[True, True, True],
        pred_vis=[False, True, True],
    )
    metrics = tapvid_metrics(**args)
    # δ at thresholds 1, 2, 4, 8, 16: frame 2 (3 px) counts from 4 px on.
    assert metrics["delta_avg"] == pytest.approx(np.mean([0.5, 0.5, 1, 1, 1]))
    # Jaccard: TP / (GT visible + FP); below 4 px frame 2 is a false positive and a miss: 1 / (2 + 1).
    assert metrics["aj"] == pytest.approx(np.mean([1 / 3, 1 / 3, 1, 1, 1]))
    assert metrics["oa"] == 1.0


def test_tapvid_occlusion_errors_by_hand() -> None:
    # Frame 2 is occluded but predicted visible: an occlusion error and a false positive.
    args = _one_track(
        gt_xy=[[10, 10], [20, 20], [30, 30]],
        pred_xy=[[10, 10], [20, 20], [30, 30]],
        gt_vis=[True, True, False],
        pred_vis=[True, True, True],
    )
    metrics = tapvid_metrics(**args)
    assert metrics["oa"] == pytest.approx(0.5)
    assert metrics["delta_avg"] == pytest.approx(1.0)  # only visible points count for δ
    assert metrics["aj"] == pytest.approx(0.5)  # TP 1 / (GT 1 + FP 1)


def test_tapvid_averages_per_video_not_per_point() -> None:
    # Video 0: one scored frame, correct. Video 1: three scored frames, all wrong by 100 px.
    T = 4
    gt = np.zeros((2, 1, T, 2))
    pred = np.zeros((2, 1, T, 2))
    pred[1, 0, 1:] = 100.0
    query_frame = np.array([[2], [0]])
    metrics = tapvid_metrics(query_frame, np.zeros((2, 1, T), bool), gt, np.zeros((2, 1, T), bool), pred)
    # Per video: 1 and 0 -> mean 0.5 (pooling the points would give 1/4).
    assert metrics["delta_avg"] == pytest.approx(0.5)
    assert metrics["aj"] == pytest.approx(0.5)


def test_box_iou() -> None:
    a = np.array([[0, 0, 2, 2], [0, 0, 1, 1], [0, 0, 0, 0]], float)
    b = np.array([[1, 1, 3, 3], [0, 0, 1, 1], [0, 0, 0, 0]], float)
    np.testing.assert_allclose(box_iou(a, b), [1 / 7, 1.0, 0.0])


def test_relative_pose_errors() -> None:
    metrics = relative_pose_errors(
        np.array([[3.0, 4.0], [1.0, 1.0]]), np.array([[0.0, 0.0], [1.0, 1.0]]), np.array([350.0, 5.0]), np.zeros(2)
    )
    assert metrics["rpe_trans"] == pytest.approx(2.5)
    # 350 degrees is 10 degrees away from 0.
    assert metrics["rpe_rot_deg"] == pytest.approx(7.5)
