"""The motion probe: ridge and R² on hand examples, and that it separates features that carry motion."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from eval.features import read_export
from eval.velocity_probe import choose_alpha, r2, ridge_predict, run_probe


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
