"""Training from clip shards named by a URL pattern (HTTP on loopback) or a pipe: command, with exact resume."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from pretrain.config import ConfigError, load_config
from pretrain.data import loader_config
from pretrain.trainer import Trainer
from tests.conftest import tiny_overrides
from tests.data_shards.shard_fixtures import real_clips, serve_directory, write_clip_shards

PATTERN = "clips-{000000..000003}.tar"


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 4 shards of 6 real carphone clips, 64 px short side, 10 frames each (window = 4 + 4 frames).
    directory = tmp_path_factory.mktemp("clips")
    clips = real_clips("carphone", clip_frames=10, num_clips=6, short_side=64)
    write_clip_shards(directory, [clips[i::4] for i in range(4)])
    return directory


@pytest.fixture(scope="module")
def http_url(clip_dir: Path) -> Iterator[str]:
    with serve_directory(clip_dir) as url:
        yield url


def _overrides(out: Path, shards: str, *extra: str) -> list[str]:
    return tiny_overrides(
        out,
        "--data.source=clips",
        f"--data.shards={shards}",
        "--data.num_workers=1",
        "--data.shuffle_buffer=4",
        *extra,
    )


def test_train_two_steps_from_an_http_pattern(tmp_path: Path, http_url: str) -> None:
    spec = f"{http_url}/{PATTERN}"
    overrides = _overrides(tmp_path, spec, f"--data.eval_shards={spec}", "--train.steps=2")
    trainer = Trainer(load_config("tiny-cpu", overrides))
    # The manifest beside the shards was fetched: the loader knows every shard's sample count.
    assert trainer.sampler.loader.manifest is not None
    result = trainer.train()
    assert result.step == 2 and len(trainer.state.history) == 2
    # 6 clips of 10 frames, windows of 8 frames: every one of the 3 starts per clip is evaluated, over HTTP.
    assert result.heldout and all(r.windows == 6 * 3 for r in result.heldout)
    assert trainer.sampler.skipped_samples == 0


@pytest.mark.parametrize("kind", ["http", "pipe"])
def test_resume_from_remote_shards_is_exact(tmp_path: Path, clip_dir: Path, http_url: str, kind: str) -> None:
    spec = f"{http_url}/{PATTERN}" if kind == "http" else f"pipe:cat {clip_dir}/{PATTERN}"
    straight = Trainer(load_config("tiny-cpu", _overrides(tmp_path / "a", spec, "--train.steps=4")))
    straight.train(finalize=False)

    first = Trainer(load_config("tiny-cpu", _overrides(tmp_path / "b", spec, "--train.steps=4")))
    first.train(stop_at=2)
    resumed = Trainer(load_config("tiny-cpu", _overrides(tmp_path / "b", spec, "--train.steps=4")))
    resumed.train(finalize=False)
    assert len(straight.state.history) == 4
    assert resumed.state.history == straight.state.history
    for key, value in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_read_timeout_and_retries_reach_both_loaders(tmp_path: Path) -> None:
    cfg = load_config("tiny-cpu", tiny_overrides(tmp_path, "--data.read_timeout_s=0.5", "--data.retries=0"))
    for evaluation in (False, True):
        loader_cfg = loader_config(cfg, "http://127.0.0.1:1/clips-{0..1}.tar", evaluation=evaluation)
        assert (loader_cfg.read_timeout_s, loader_cfg.retries) == (0.5, 0)
    with pytest.raises(ConfigError, match=r"data\.read_timeout_s"):
        load_config("tiny-cpu", tiny_overrides(tmp_path, "--data.read_timeout_s=0"))
