"""Procedural targets are exact, and every task's readout trains on them (no encoder needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from data_shards import generate_video
from eval.probe import ReadoutConfig
from eval.readouts import Pointer, patch_centers
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
    # A query that matches exactly one patch's key is read off at that patch's centre (the tracking
    # heads' positions; they no longer sample or pool features at the query, see test_readouts.py).
    pointer = Pointer(4, 2)
    with torch.no_grad():
        pointer.q.weight.copy_(torch.eye(4))
        pointer.q.bias.zero_()
        pointer.log_scale.fill_(5.0)
    keys_BNE = torch.eye(4)[None]
    with torch.no_grad():
        positions_BQ2, _ = pointer(keys_BNE, keys_BNE)
    np.testing.assert_allclose(positions_BQ2[0].numpy(), centers.numpy(), atol=1e-4)


@pytest.mark.parametrize("streaming", [True, False], ids=["streaming", "all_frames"])
@pytest.mark.parametrize("name", list(TASKS))
def test_task_readout_trains_on_exact_targets(truths, name: str, streaming: bool) -> None:
    """Targets have one row per video, and a few steps of either readout lower the loss on random features."""
    torch.manual_seed(0)
    task = build_task(name)
    grid, dim = 4, 16
    targets = task.targets(truths, grid)
    assert all(len(v) == len(truths) for v in targets.values())
    T = truths[0].num_frames
    features_BTNd = torch.randn(len(truths), T, grid * grid, dim)
    readout = task.build_readout(dim, grid, T, streaming=streaming)
    # The learning rate readouts train with (eval.probe); the attention heads oscillate at 1e-2.
    optimizer = torch.optim.Adam(readout.parameters(), lr=ReadoutConfig().lr)
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
