"""Everyday use of ``python -m data_shards build``: defaults in --help, -v on either side of the command,
and the video-level held-out split (--holdout-videos).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from data_shards import BuildArgs, build_shards, file_sha256, generate_video
from data_shards import build as build_module
from data_shards.__main__ import main, parse_args
from data_shards.build import BuildArgsError
from data_shards.procedural import CorpusArgs
from tests.data_shards.test_build import _manifest, _samples

REPO_ROOT = Path(__file__).resolve().parents[2]
# 16 frames at 8 fps cut into 8-frame clips: two clips a video, a build of four in a second or two.
ARGS = BuildArgs(clip_frames=8, fps=8, short_side=64, holdout_videos=1)
CLI_ARGS = ["--clip-frames", "8", "--short-side", "64", "--workers", "0", "--no-progress"]


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Four distinct procedural videos, two clips each under ARGS."""
    folder = tmp_path_factory.mktemp("videos")
    paths = [folder / f"proc-{seed}.mp4" for seed in range(4)]
    for seed, path in enumerate(paths):
        generate_video(path, seed=seed, frames=16, size=(64, 64))
    return paths


def _help_text(command: str, capsys: pytest.CaptureFixture[str]) -> str:
    """The stdout of ``python -m data_shards COMMAND --help``."""
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    return capsys.readouterr().out


def _option_entries(help_text: str) -> dict[str, str]:
    """Each option of a --help's options section -> its entry (flags, metavar, help) on one line."""
    section = help_text.split("\noptions:\n", 1)[1]
    entries = re.split(r"\n  (?=-)", "\n" + section)
    return {entry.split()[0].rstrip(","): " ".join(entry.split()) for entry in entries if entry.strip()}


@pytest.mark.parametrize(
    ("command", "clip_frames"), [("build", BuildArgs().clip_frames), ("procedural", CorpusArgs(videos=1).clip_frames)]
)
def test_help_shows_every_default(
    command: str, clip_frames: int, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    entries = _option_entries(_help_text(command, capsys))
    assert f"frames per clip (default: {clip_frames})" in entries["--clip-frames"]
    assert "--max-samples-per-shard" in entries
    del entries["-h"]
    # Every other option says its default, or that it has none to say.
    for option, entry in entries.items():
        assert "(default: " in entry or entry.endswith("(required)"), (option, entry)


def test_build_help_shows_the_build_defaults(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    entries = _option_entries(_help_text("build", capsys))
    defaults = BuildArgs()
    assert entries["--fps"].endswith(f"(default: {defaults.fps})")
    assert entries["--max-shard-bytes"].endswith(f"(default: {defaults.max_shard_bytes})")
    assert entries["--holdout-fraction"].endswith(f"(default: {defaults.holdout_fraction})")
    assert entries["--holdout-videos"].endswith("(default: off)")
    assert entries["--stride"].endswith("(default: clip frames)")


@pytest.mark.parametrize(
    "argv",
    [
        ["-v", "build", "--input", "x.mp4", "--out", "o"],
        ["--verbose", "build", "--input", "x.mp4", "--out", "o"],
        ["build", "--input", "x.mp4", "--out", "o", "-v"],
        ["build", "-v", "--input", "x.mp4", "--out", "o"],
        ["procedural", "--out", "o", "--videos", "1", "--verbose"],
    ],
)
def test_verbose_is_taken_before_and_after_the_command(argv: list[str]) -> None:
    assert parse_args(argv).verbose is True


def test_verbose_defaults_to_off() -> None:
    """The command's own (suppressed) -v must not overwrite the top-level default, nor add one of its own."""
    assert parse_args(["build", "--input", "x.mp4", "--out", "o"]).verbose is False


@pytest.mark.parametrize("where", ["before", "after"])
def test_verbose_logs_at_info_from_either_side(videos: list[Path], tmp_path: Path, where: str) -> None:
    """Through the real command line: INFO lines on stderr, and the held-out summary line on stdout."""
    build = ["build", "--input", *map(str, videos), "--out", str(tmp_path / "out"), *CLI_ARGS, "--holdout-videos", "1"]
    argv = ["-v", *build] if where == "before" else [*build, "-v"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "data_shards", *argv], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "INFO data_shards.build: building clips of 4 inputs" in result.stderr
    assert "INFO data_shards.build: holding out every clip of" in result.stderr
    assert "2 held-out clips (every clip of 1 video) ->" in result.stdout


def _sources(out: Path) -> list[str]:
    """source_sha256 of every sample of the shard set in ``out``."""
    return [json.loads(sample["json"])["source_sha256"] for sample in _samples(out)]


def test_holdout_videos_holds_out_whole_videos(videos: list[Path], tmp_path: Path) -> None:
    result = build_shards(videos, tmp_path, ARGS, workers=0, progress=False)
    manifest, heldout = result.manifest, result.heldout
    assert heldout is not None and heldout == _manifest(tmp_path / "heldout")
    # The held-out video is the one with the lowest content hash.
    shas = {file_sha256(path): str(path) for path in videos}
    chosen = min(shas)
    expected = [{"path": shas[chosen], "source_sha256": chosen}]
    assert manifest["heldout_videos"] == heldout["heldout_videos"] == expected
    assert manifest["args"]["holdout_videos"] == 1 and heldout["args"] == manifest["args"]
    assert _sources(tmp_path / "heldout") == [chosen, chosen]
    train = _sources(tmp_path)
    assert len(train) == 6 and chosen not in train and set(train) == set(shas) - {chosen}
    assert (manifest["clips"], heldout["clips"]) == (6, 2)
    assert manifest["clips_dropped_at_holdout"] == 0

    # Same arguments: nothing changes; any other value (or none) is refused, naming the argument.
    again = build_shards(videos, tmp_path, ARGS, workers=0, progress=False)
    assert again.stats["shards_written"] == 0 and again.heldout == heldout
    with pytest.raises(BuildArgsError, match="holdout_videos 1 -> 2"):
        build_shards(videos, tmp_path, dataclasses.replace(ARGS, holdout_videos=2), workers=0, progress=False)
    with pytest.raises(BuildArgsError, match="holdout_videos 1 -> None"):
        build_shards(videos, tmp_path, dataclasses.replace(ARGS, holdout_videos=None), workers=0, progress=False)


def test_holdout_videos_choice_ignores_input_order_and_workers(videos: list[Path], tmp_path: Path) -> None:
    """A quarter of four inputs is one video: the same one, and the same bytes, whatever the order and workers."""
    args = dataclasses.replace(ARGS, holdout_videos=0.25)
    first = build_shards(videos, tmp_path / "a", args, workers=0, progress=False)
    second = build_shards([str(p) for p in reversed(videos)], tmp_path / "b", args, workers=2, progress=False)
    assert first.manifest == second.manifest and first.heldout == second.heldout
    assert len(first.manifest["heldout_videos"]) == 1


def _result(path: str, sha256: str, reason: str | None = None) -> build_module._InputResult:
    return build_module._InputResult(
        path=path,
        sha256=sha256,
        reason=reason,
        detail="",
        part_name=None,
        clips=(),
        source_duration_s=0.0,
        reused=False,
    )


def test_choice_is_by_content_hash_among_used_inputs() -> None:
    results = [_result("/a", "c3"), _result("/b", "a1"), _result("/c", "b2"), _result("/d", "00", "truncated")]
    choose = build_module._choose_heldout_videos
    # The skipped input never takes a place, whatever its hash; order of the results does not matter.
    for order in (results, results[::-1]):
        assert [r.path for r in choose(order, dataclasses.replace(ARGS, holdout_videos=1))] == ["/b"]
        assert [r.path for r in choose(order, dataclasses.replace(ARGS, holdout_videos=0.5))] == ["/b", "/c"]
    assert choose(results, BuildArgs()) == []
    with pytest.raises(BuildArgsError, match="only 3 of the 4 inputs gave clips"):
        choose(results, dataclasses.replace(ARGS, holdout_videos=3))


def test_too_few_usable_inputs_after_decoding_writes_no_shards(videos: list[Path], tmp_path: Path) -> None:
    """Two inputs name enough videos to hold one out; when one of them is skipped, none would be left to train on."""
    empty = tmp_path / "empty.mp4"
    empty.touch()
    out = tmp_path / "out"
    with pytest.raises(BuildArgsError, match="only 1 of the 2 inputs gave clips"):
        build_shards([videos[0], empty], out, ARGS, workers=0, progress=False)
    assert not (out / "manifest.json").exists() and not (out / "heldout").exists()
    assert not list(out.glob("clips-*.tar"))


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--holdout-videos", "0"], "holdout_videos must be >= 1"),
        (["--holdout-videos", "-2"], "holdout_videos must be >= 1"),
        (["--holdout-videos", "1.0"], "must be in (0, 1)"),
        (["--holdout-videos", "1.5"], "must be in (0, 1)"),
        (["--holdout-videos", "nan"], "must be in (0, 1)"),
        (["--holdout-videos", "4"], "holds out 4 videos, but the inputs name 4"),
        (["--holdout-videos", "0.9"], "holds out 4 videos, but the inputs name 4"),
        (["--holdout-videos", "1", "--holdout-fraction", "0.1"], "(--holdout-videos, --holdout-fraction)"),
    ],
)
def test_bad_holdout_videos_is_one_error_line(
    videos: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], named: str
) -> None:
    out = tmp_path / "out"
    argv = ["build", "--input", *map(str, videos), "--out", str(out), *CLI_ARGS, *extra]
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], captured.err
    assert not captured.out and not out.exists()


def test_holdout_videos_that_is_no_number_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["build", "--input", "x.mp4", "--out", "o", "--holdout-videos", "half"])
    assert exited.value.code == 2
    assert "expected a whole number of videos or a fraction in (0, 1), got 'half'" in capsys.readouterr().err
