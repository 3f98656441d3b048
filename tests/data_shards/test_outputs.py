"""Never lose a user's files: `data_shards build` and `pretrain.encode` refuse outputs not theirs, and fail cleanly.

Each refusal is checked through the real command line (a subprocess): one
``error:`` line on stderr, exit code 2, and every file that was there before
still there, byte for byte, with nothing added.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from data_shards import build_shards, generate_video
from data_shards.build import BuildArgs, is_build_dir
from data_shards.features import check_feature_root, encode_clip_shards, feature_dir, is_feature_root
from data_shards.io import OutputDirError
from pretrain.encoder import load_encoder
from tests.data_shards.shard_fixtures import real_clips, write_clip_shards

REPO_ROOT = Path(__file__).resolve().parents[2]
# A 2-clip build and a 28-pixel random encoder keep every command here to a few seconds.
BUILD_ARGS = ["--clip-frames", "8", "--short-side", "64", "--workers", "0", "--no-progress"]
# The encode command lives with the encoder (python -m pretrain.encode); its settings come from a config.
ENCODE = ["--config", "tiny-cpu", "--encoder.source=random", "--encoder.arch=vit_test", "--encoder.image_size=28"]
ENCODE_ARGS = ["--run.device=cpu", "--batch", "2"]


def _cli(
    *argv: str, cwd: Path = REPO_ROOT, home: Path | None = None, module: str = "data_shards"
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m MODULE ARGV`` (default: data_shards) as a user would."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    if home is not None:
        env["HOME"] = str(home)
    command = [sys.executable, "-m", module, *argv]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _encode(*argv: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m pretrain.encode`` with the random test encoder's config and ARGV."""
    return _cli(*ENCODE, *argv, module="pretrain.encode")


def _assert_refused(result: subprocess.CompletedProcess[str], *named: str) -> None:
    """Exit code 2 and exactly one stderr line, an ``error:`` naming each of ``named``."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for text in named:
        assert text in lines[0], lines[0]


def _snapshot(root: Path) -> dict[str, tuple[str, bytes | None, int]]:
    """Every path under ``root``: kind, content and mtime. Equal snapshots: nothing touched, nothing added."""
    tree = {}
    for path in sorted(root.rglob("*")):
        stat = path.lstat()
        content = path.read_bytes() if path.is_file() else None
        tree[str(path.relative_to(root))] = ("dir" if path.is_dir() else "file", content, stat.st_mtime_ns)
    return tree


def _unrelated_files(directory: Path) -> Path:
    """A user's directory: a note and a subdirectory with data."""
    (directory / "sub").mkdir(parents=True)
    (directory / "notes.txt").write_text("my notes\n")
    (directory / "sub" / "data.bin").write_bytes(bytes(range(256)))
    return directory


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 s at 8 fps: two 8-frame clips."""
    path = tmp_path_factory.mktemp("video") / "proc.mp4"
    generate_video(path, seed=3, frames=16, size=(64, 64))
    return path


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two shards of 6-frame carphone clips, with a manifest."""
    directory = tmp_path_factory.mktemp("clips")
    clips = real_clips("carphone", clip_frames=6, num_clips=3)
    write_clip_shards(directory, [clips[:2], clips[2:]])
    return directory


def test_build_refuses_a_directory_of_unrelated_files(video: Path, tmp_path: Path) -> None:
    out = _unrelated_files(tmp_path / "mine")
    before = _snapshot(out)
    result = _cli("build", "--input", str(video), "--out", str(out), *BUILD_ARGS)
    _assert_refused(result, str(out))
    assert _snapshot(out) == before


@pytest.mark.parametrize("where", ["cwd", "home"])
def test_build_refuses_the_current_and_home_directories(video: Path, tmp_path: Path, where: str) -> None:
    """'.' and the home directory are never an output, even empty (HOME points at a scratch directory here)."""
    cwd, home = tmp_path / "work", tmp_path / "home"
    cwd.mkdir()
    home.mkdir()
    out = "." if where == "cwd" else str(home)
    result = _cli("build", "--input", str(video), "--out", out, *BUILD_ARGS, cwd=cwd, home=home)
    _assert_refused(result, out)
    assert not list(cwd.iterdir()) and not list(home.iterdir())


@pytest.mark.parametrize("inputs", ["missing_files", "empty_folder"])
def test_build_with_nothing_to_build_writes_nothing(tmp_path: Path, inputs: str) -> None:
    (tmp_path / "empty").mkdir()
    specs = [str(tmp_path / "gone.mp4"), str(tmp_path / "gone.mkv")] if inputs == "missing_files" else []
    specs = specs or [str(tmp_path / "empty")]
    out = tmp_path / "out"
    result = _cli("build", "--input", *specs, "--out", str(out), *BUILD_ARGS)
    _assert_refused(result, "nothing to build")
    assert not out.exists()


def test_build_resumes_into_its_own_directories(video: Path, tmp_path: Path) -> None:
    """An unfinished build (parts only) and a finished one whose parts were deleted are both still ours."""
    args = BuildArgs(clip_frames=8, short_side=64)
    out = tmp_path / "out"
    reference = build_shards([video], out, args, workers=0, progress=False).manifest
    (out / "manifest.json").unlink()
    assert is_build_dir(out)
    assert build_shards([video], out, args, workers=0, progress=False).manifest == reference
    shutil.rmtree(out / ".parts")
    assert is_build_dir(out)
    assert build_shards([video], out, args, workers=0, progress=False).manifest == reference
    foreign = _unrelated_files(tmp_path / "foreign")
    (foreign / "manifest.json").write_text(json.dumps({"format": "something else", "shards": []}))
    assert not is_build_dir(foreign)
    with pytest.raises(OutputDirError, match="foreign"):
        build_shards([video], foreign, args, workers=0, progress=False)


def test_encode_refuses_a_directory_of_unrelated_files(clip_dir: Path, tmp_path: Path) -> None:
    out = _unrelated_files(tmp_path / "mine")
    before = _snapshot(out)
    result = _encode("--shards", str(clip_dir), "--out", str(out), *ENCODE_ARGS)
    _assert_refused(result, str(out))
    assert _snapshot(out) == before


def test_encode_refuses_to_replace_an_unrelated_feature_directory(clip_dir: Path, tmp_path: Path) -> None:
    """OUT holds features of another encoder (so it is ours), but OUT/<this hash>/ holds a user's files."""
    root = tmp_path / "features"
    encode_clip_shards(clip_dir, root, load_encoder("random", arch="vit_test", image_size=28, seed=1))
    squatted = _unrelated_files(feature_dir(root, load_encoder("random", arch="vit_test", image_size=28).weights_hash))
    before = _snapshot(root)
    result = _encode("--shards", str(clip_dir), "--out", str(root), *ENCODE_ARGS)
    _assert_refused(result, str(squatted))
    assert _snapshot(root) == before


def _damage(clip_dir: Path, target: Path, how: str) -> None:
    """A copy of ``clip_dir`` at ``target`` with its first shard damaged as ``how`` says."""
    shutil.copytree(clip_dir, target)
    shard = target / "clips-000000.tar"
    data = shard.read_bytes()
    if how == "empty":
        shutil.rmtree(target)
        target.mkdir()
    elif how == "junk":
        shard.write_bytes(os.urandom(len(data)))
    else:
        # Cut inside the second sample's mp4: the first sample is whole, the rest is gone.
        shard.write_bytes(data[: len(data) // 2 + 100])
        if how == "truncated_no_manifest":
            (target / "manifest.json").unlink()


@pytest.mark.parametrize("how", ["truncated", "truncated_no_manifest", "junk", "empty"])
def test_encode_of_unreadable_clip_shards_fails_cleanly(clip_dir: Path, tmp_path: Path, how: str) -> None:
    shards = tmp_path / "clips"
    _damage(clip_dir, shards, how)
    outs = tmp_path / "outs"
    outs.mkdir()
    result = _encode("--shards", str(shards), "--out", str(outs / "features"), *ENCODE_ARGS)
    _assert_refused(result, str(shards))
    # No output directory, no temporary directory.
    assert not list(outs.iterdir())


def test_encode_publishes_with_the_umask_permissions_and_reuses(clip_dir: Path, tmp_path: Path) -> None:
    encoder = load_encoder("random", arch="vit_test", image_size=28)
    root = tmp_path / "features"
    old_umask = os.umask(0o022)
    try:
        out = encode_clip_shards(clip_dir, root, encoder, batch_clips=2)
    finally:
        os.umask(old_umask)
    assert out.stat().st_mode & 0o777 != 0o700
    assert {p.stat().st_mode & 0o777 for p in [root, out]} == {0o755}
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o644}
    assert [p.name for p in root.iterdir()] == [out.name]
    before = _snapshot(root)
    assert encode_clip_shards(clip_dir, root, encoder, batch_clips=2) == out
    assert _snapshot(root) == before


def test_encode_root_with_what_a_killed_run_left_is_ours(tmp_path: Path) -> None:
    (tmp_path / ".tmp-d05f44d9f55cc72a-k3j2x_1a").mkdir()
    assert is_feature_root(tmp_path)
    assert check_feature_root(tmp_path) == tmp_path
    (tmp_path / ".tmp-d05f44d9f55cc72a-k3j2x_1a").rmdir()
    (tmp_path / ".tmp-mine").mkdir()
    with pytest.raises(OutputDirError, match="refusing to replace"):
        check_feature_root(tmp_path)
