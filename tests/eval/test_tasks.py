"""Procedural targets are exact, and every task's readout trains on them (no encoder needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from data_shards import generate_video
from eval.readouts import box_patch_weights, patch_centers, sample_at
from eval.tasks import TASKS, build_task, point_tracks


@pytest.fixture(scope="module")
def truths(tmp_path_factory: pytest.TempPathFactory):
    directory = tmp_path_factory.mktemp("videos")
    return [
        generate_video(
            directory / f"v{i}.mp4", seed=i, frames=6, size=(32, 32), num_objects=3, dense=True, temporal_labels=True
        )
        for i in range(3)
    ]


def test_point_tracks_follow_their_surface(truths) -> None:
    truth = truths[0]
    H, W = truth.size
    T = truth.num_frames
    scale_2 = np.array([W, H])
    queries_Q2, tracks_QT2, visible_QT = point_tracks(truth, points=8)
    np.testing.assert_allclose(tracks_QT2[:, 0], queries_Q2)
    assert visible_QT[:, 0].all(), "queries are drawn from surfaces seen on frame 0"
    # The second half lies on the background, which moves by minus the camera offset, exactly.
    camera_shift_T2 = (truth.camera_T2 - truth.camera_T2[0]) / scale_2
    np.testing.assert_allclose(tracks_QT2[4:] - queries_Q2[4:, None], np.broadcast_to(-camera_shift_T2, (4, T, 2)))
    # Visible exactly where the generator's mask shows the query's surface at the track's pixel.
    pixels_QT2 = np.floor(tracks_QT2 * scale_2).astype(int)
    surface_Q = truth.masks_THW[0, pixels_QT2[:, 0, 1], pixels_QT2[:, 0, 0]]
    assert (surface_Q[4:] == 0).all()
    for q in range(8):
        for t in range(T):
            x, y = pixels_QT2[q, t]
            inside = 0 <= x < W and 0 <= y < H
            assert visible_QT[q, t] == (inside and truth.masks_THW[t, y, x] == surface_Q[q])


def test_patch_geometry() -> None:
    centers = patch_centers(2)
    np.testing.assert_allclose(centers.numpy(), [[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]])
    # Sampling exactly at a patch centre returns that patch's feature.
    features_BNd = torch.arange(4.0).view(1, 4, 1)
    np.testing.assert_allclose(sample_at(features_BNd, centers[None], 2)[0, :, 0].numpy(), [0, 1, 2, 3])
    # A box covering the left half weighs the two left patches equally.
    weights = box_patch_weights(torch.tensor([[[0.0, 0.0, 0.5, 1.0]]]), 2)
    np.testing.assert_allclose(weights[0, 0].numpy(), [0.5, 0, 0.5, 0])


@pytest.mark.parametrize("name", list(TASKS))
def test_task_readout_trains_on_exact_targets(truths, name: str) -> None:
    """Targets have one row per video, and a few steps of the readout lower the loss on random features."""
    torch.manual_seed(0)
    task = build_task(name)
    grid, dim = 4, 16
    targets = task.targets(truths, grid)
    assert all(len(v) == len(truths) for v in targets.values())
    T = truths[0].num_frames
    features_BTNd = torch.randn(len(truths), T, grid * grid, dim)
    readout = task.build_readout(dim, grid, T, streaming=True)
    optimizer = torch.optim.Adam(readout.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = task.loss(task.outputs(readout, features_BTNd, targets), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    with torch.no_grad():
        metrics = task.metrics(task.outputs(readout, features_BTNd, targets), targets)
    assert task.primary in metrics and all(np.isfinite(v) for v in metrics.values())


def test_classification_labels(truths, tmp_path: Path) -> None:
    """The three classification tasks read direction, speed bin and flash order of the same videos."""
    for name, field, classes in (
        ("classification", "label", 4),
        ("classify_speed", "speed_label", 2),
        ("classify_order", "order_label", 2),
    ):
        task = build_task(name)
        assert task.classes == classes
        assert task.targets(truths, 4)["label"].tolist() == [getattr(t, field) for t in truths]
    assert build_task("classification", classes=7).classes == 7
    plain = generate_video(tmp_path / "v.mp4", seed=0, frames=4, size=(32, 32))
    with pytest.raises(ValueError, match="temporal_labels"):
        build_task("classify_order").targets([plain], 4)
    with pytest.raises(ValueError, match="label"):
        build_task("classification", label="colour")


def test_point_tracking_needs_dense_truth(tmp_path: Path) -> None:
    truth = generate_video(tmp_path / "v.mp4", seed=0, frames=3, size=(32, 32))
    with pytest.raises(ValueError, match="dense=True"):
        point_tracks(truth, 4)
