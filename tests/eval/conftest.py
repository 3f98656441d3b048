"""A tiny export (random 2-layer ViT at 56 px, gmmix core of width 32) and a tiny procedural set, once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from eval.data import ProceduralConfig
from tests.conftest import tiny_overrides

TINY_DATA = ProceduralConfig(train_videos=6, test_videos=3, frames=6, size=32)
"""Procedural set of the CLI tests: seconds to generate and encode."""


def tiny_data_args(cache: Path) -> list[str]:
    """eval.run / eval.suite arguments for TINY_DATA, sharing the session's cache."""
    return [
        f"--cache={cache}",
        f"--train-videos={TINY_DATA.train_videos}",
        f"--test-videos={TINY_DATA.test_videos}",
        f"--frames={TINY_DATA.frames}",
        f"--size={TINY_DATA.size}",
        "--no-mlflow",
    ]


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Train the tiny-cpu preset for two steps on carphone and return its export directory.

    Only the tests import the trainer: eval itself reads the export's files.
    """
    from pretrain.config import load_config
    from pretrain.trainer import Trainer

    out = tmp_path_factory.mktemp("tiny-run")
    overrides = tiny_overrides(out, "--train.steps=2")
    Trainer(load_config("tiny-cpu", overrides)).train()
    return out / "tiny-cpu" / "export"


@pytest.fixture(scope="session")
def eval_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Procedural videos and token caches shared by every test of the session."""
    return tmp_path_factory.mktemp("eval-cache")
