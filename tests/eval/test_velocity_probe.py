"""The motion probe: ridge and R² on hand examples, and that it separates features that carry motion."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from eval.features import read_export
from eval.velocity_probe import (
    choose_alpha,
    markdown,
    point_r2,
    point_samples,
    r2,
    ridge_predict,
    run_order_probe,
    run_probe,
)


def test_ridge_recovers_a_linear_map_and_r2_scores_the_mean_as_zero() -> None:
    gen = torch.Generator().manual_seed(0)
    x_VF = torch.randn(120, 30, generator=gen, dtype=torch.float64)
    w_FK = torch.randn(30, 2, generator=gen, dtype=torch.float64)
    y_VK = (x_VF @ w_FK).numpy()
    alpha = choose_alpha(x_VF[:100], y_VK[:100])
    pred = ridge_predict(x_VF[:100], y_VK[:100], x_VF[100:], alpha)
    assert r2(pred, y_VK[100:]) > 0.95
    assert abs(r2(np.broadcast_to(y_VK[100:].mean(0), (20, 2)), y_VK[100:])) < 1e-12
    assert r2(-y_VK[100:], y_VK[100:]) < 0


def test_two_frames_carry_motion_that_one_frame_does_not(tiny_export: Path) -> None:
    """Targets built from the difference of the last two frames' tokens: the control reads them, one frame cannot."""
    spec = read_export(tiny_export).spec
    videos, frames, tokens = 80, 3, spec.grid_h * spec.grid_w
    gen = torch.Generator().manual_seed(1)
    # Tokens are a linear image of 4 latents per frame; the motion m moves the latents between the last
    # two frames and is independent of the last frame's latents, so only the pair of frames reveals it.
    basis_KF = torch.randn(4, tokens * spec.encoder_dim, generator=gen)
    latent_VTK = torch.randn(videos, frames, 4, generator=gen)
    motion_V2 = torch.randn(videos, 2, generator=gen)
    latent_VTK[:, -2, :2] = latent_VTK[:, -1, :2] - motion_V2
    noise = 0.01 * torch.randn(videos, frames, tokens * spec.encoder_dim, generator=gen)
    tokens_VTND = (latent_VTK @ basis_KF + noise).view(videos, frames, tokens, spec.encoder_dim)
    motion_V2 = motion_V2.numpy()
    truths = []
    for v in range(videos):
        centers_OT2 = np.zeros((1, frames, 2), dtype=np.float32)
        centers_OT2[0, -1] = motion_V2[v]
        camera_T2 = np.zeros((frames, 2), dtype=np.float32)
        camera_T2[-1] = np.random.default_rng(v).normal(size=2)
        truths.append(SimpleNamespace(centers_OT2=centers_OT2, camera_T2=camera_T2))
    clips = SimpleNamespace(tokens_VTND=tokens_VTND, truths=truths)
    results = run_probe(tiny_export, clips, torch.arange(20), torch.arange(20, videos), seeds=2)
    assert set(results) == {"encoder", "two-frames", "identity", "pretrained", "random"}
    assert len(results["random"]["objects"]["values"]) == 2
    assert results["two-frames"]["objects"]["r2"] > 0.5
    assert results["two-frames"]["objects"]["r2"] > results["encoder"]["objects"]["r2"] + 0.3
    # Noise nobody can see stays near or below zero for every feature set.
    assert all(per["camera"]["r2"] < 0.3 for per in results.values())


def test_order_probe_reads_an_early_event_from_a_long_enough_history_not_from_the_last(tiny_export: Path) -> None:
    """The label is written into frame 1 of 5 only: the pooled last 4 frames and all frames tell it; the
    last 2 frames and every last-frame set cannot."""
    spec = read_export(tiny_export).spec
    videos, frames, tokens = 80, 5, spec.grid_h * spec.grid_w
    gen = torch.Generator().manual_seed(2)
    labels_V = torch.randint(0, 2, (videos,), generator=gen)
    tokens_VTND = torch.randn(videos, frames, tokens, spec.encoder_dim, generator=gen)
    tokens_VTND[:, 1, :, :4] += 3.0 * (2.0 * labels_V[:, None, None] - 1.0)
    truths = [SimpleNamespace(order_label=int(label)) for label in labels_V]
    clips = SimpleNamespace(tokens_VTND=tokens_VTND, truths=truths)
    results = run_order_probe(tiny_export, clips, torch.arange(30), torch.arange(30, videos), seeds=2)
    assert set(results) == {
        "encoder",
        "two-frames",
        "identity",
        "pretrained",
        "random",
        "last-2-pooled",
        "last-4-pooled",
        "all-frames-pooled",
    }
    for name in ("last-4-pooled", "all-frames-pooled"):
        assert results[name]["order"]["accuracy"] > 0.9, (name, results[name])
    for name in ("encoder", "two-frames", "identity", "last-2-pooled"):
        assert results[name]["order"]["accuracy"] < 0.8, (name, results[name])
    record = {"export": "x", "test_videos": 30, "pool": 50, "results": results}
    assert "| all-frames-pooled | " in markdown(record)
    assert "| last-4-pooled | " in markdown(record)


def _drifting_points(gen: torch.Generator, videos: int, points: int, frames: int) -> np.ndarray:
    start_VQ12 = 0.25 + 0.5 * torch.rand(videos, points, 1, 2, generator=gen, dtype=torch.float64)
    velocity_VQ12 = 0.08 * (torch.rand(videos, points, 1, 2, generator=gen, dtype=torch.float64) - 0.5)
    return (start_VQ12 + torch.arange(frames, dtype=torch.float64)[:, None] * velocity_VQ12).numpy()


def test_point_probe_reads_the_step_at_the_point_previous_patch() -> None:
    """Frame t's token where the point was at t-1 carries its step: R² near 1; noise features: near 0."""
    videos, points, frames, grid, dim = 60, 2, 5, 4, 8
    gen = torch.Generator().manual_seed(0)
    tracks_VQT2 = _drifting_points(gen, videos, points, frames)
    visible_VQT = np.ones((videos, points, frames), bool)
    noise_VTNd = 0.05 * torch.randn(videos, frames, grid * grid, dim, generator=gen)
    carrying_VTNd = noise_VTNd.clone()
    for v in range(videos):
        for t in range(1, frames):
            for q in range(points):
                x, y = np.clip((tracks_VQT2[v, q, t - 1] * grid).astype(int), 0, grid - 1)
                step_2 = tracks_VQT2[v, q, t] - tracks_VQT2[v, q, t - 1]
                carrying_VTNd[v, t, y * grid + x, 2 * q : 2 * q + 2] += torch.from_numpy(step_2).float() * 20
    X, steps_S2, clips_S, on_object_S = point_samples(carrying_VTNd, tracks_VQT2, visible_VQT, grid)
    # Frames t >= 2 only (frame 1's step is the first the core could have seen), every point, every clip.
    assert X.shape == (videos * points * (frames - 2), dim) and steps_S2.shape == (len(X), 2)
    assert on_object_S.sum() == videos * (frames - 2)
    test = np.arange(15)
    for on in (True, False):
        keep = on_object_S == on
        carried = point_r2(X[torch.from_numpy(keep)], steps_S2[keep], clips_S[keep], test, draws=50)
        assert carried["r2"] > 0.9 and carried["ci95"][0] > 0.8
    X_noise = point_samples(noise_VTNd, tracks_VQT2, visible_VQT, grid)[0]
    assert point_r2(X_noise, steps_S2, clips_S, test, draws=50)["r2"] < 0.1


def test_point_probe_skips_points_not_seen_on_both_frames() -> None:
    gen = torch.Generator().manual_seed(1)
    tracks_VQT2 = _drifting_points(gen, 3, 2, 4)
    visible_VQT = np.ones((3, 2, 4), bool)
    visible_VQT[0, 1, 2] = False  # drops the (t=2) and (t=3) samples of that point
    X = point_samples(torch.randn(3, 4, 16, 5, generator=gen), tracks_VQT2, visible_VQT, 4)[0]
    assert len(X) == 3 * 2 * 2 - 2
