"""eval never loses a user's files: report directories are published whole and only over earlier reports.

Each writer (eval.run's OUT/<task>/<variant>, its OUT/future, eval.suite's
OUT/suite, the procedural cache) is pointed at a directory that holds an
unrelated file: the CLI answers with one ``error:`` line naming the path and
exit code 2, and the file is untouched. ``--out .`` and the home directory
are refused whatever they hold; an earlier report of the same tool is
replaced; a run that fails while writing leaves the earlier report as it was.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from data_shards import sample_video_path
from data_shards.io import OutputDirError
from eval.data import ProceduralConfig, _generate_once
from eval.run import main as run_main
from eval.suite import main as suite_main
from tests.eval.conftest import tiny_data_args


def _video_folder(tmp_path: Path) -> Path:
    videos = tmp_path / "videos"
    videos.mkdir(exist_ok=True)
    shutil.copy(sample_video_path("carphone"), videos / "carphone.mp4")
    return videos


def _argv(tool: str, tiny_export: Path, eval_cache: Path, tmp_path: Path, out: Path | str) -> list[str]:
    """The cheapest argv of each report writer: 'run' (depth), 'future' (one video), 'suite' (depth only)."""
    base = ["--export", str(tiny_export), "--out", str(out), "--steps=2"]
    if tool == "run":
        return [*base, "--task", "depth", *tiny_data_args(eval_cache)]
    if tool == "future":
        return [*base, "--task", "future", "--data", str(_video_folder(tmp_path)), "--frames=24", "--no-mlflow"]
    return [*base, "--tasks=depth", *tiny_data_args(eval_cache)]


# Where each tool publishes its report under OUT.
_REPORT_DIRS = {"run": "depth/pretrained", "future": "future", "suite": "suite"}
TOOLS = list(_REPORT_DIRS)


def _main(tool: str, argv: list[str]) -> int:
    return suite_main(argv) if tool == "suite" else run_main(argv)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("tool", TOOLS)
def test_report_dir_holding_other_files_is_refused(
    tiny_export: Path, eval_cache: Path, tmp_path: Path, capsys, tool: str
) -> None:
    out = tmp_path / "out"
    target = out / _REPORT_DIRS[tool]
    target.mkdir(parents=True)
    (target / "thesis.tex").write_text("years of work")
    assert _main(tool, _argv(tool, tiny_export, eval_cache, tmp_path, out)) == 2
    assert str(target) in _one_error_line(capsys)
    assert [p.name for p in target.iterdir()] == ["thesis.tex"]
    assert (target / "thesis.tex").read_text() == "years of work"
    # Nothing else was written either: no report, no temporary sibling, no MLflow store.
    assert sorted(p.name for p in out.rglob("*")) == sorted([*_REPORT_DIRS[tool].split("/"), "thesis.tex"])


@pytest.mark.parametrize("where", ["cwd", "home"])
@pytest.mark.parametrize("tool", TOOLS)
def test_out_dot_or_home_is_refused(
    tiny_export: Path, eval_cache: Path, tmp_path: Path, monkeypatch, capsys, tool: str, where: str
) -> None:
    root = tmp_path / where
    root.mkdir()
    if where == "cwd":
        monkeypatch.chdir(root)
        out = "."
    else:
        monkeypatch.setenv("HOME", str(root))
        out = str(root)
    argv = _argv(tool, tiny_export, eval_cache, tmp_path, out)
    assert _main(tool, argv) == 2
    line = _one_error_line(capsys)
    assert out in line and ("current directory" in line or "home directory" in line)
    assert list(root.iterdir()) == []


@pytest.mark.parametrize("tool", TOOLS)
def test_earlier_report_is_replaced(tiny_export: Path, eval_cache: Path, tmp_path: Path, tool: str) -> None:
    out = tmp_path / "out"
    argv = _argv(tool, tiny_export, eval_cache, tmp_path, out)
    assert _main(tool, argv) == 0
    target = out / _REPORT_DIRS[tool]
    first = json.loads((target / "report.json").read_text())
    (target / "stale.txt").write_text("left by the earlier report")
    assert _main(tool, [*argv, "--seed=1"]) == 0
    second = json.loads((target / "report.json").read_text())
    # The future task's default seed is the trainer's mask seed (1234); the others default to 0.
    assert second["seed"] == 1 and first["seed"] == (1234 if tool == "future" else 0)
    assert not (target / "stale.txt").exists()
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")]


def test_failed_run_keeps_the_earlier_report(tiny_export: Path, eval_cache: Path, tmp_path: Path, monkeypatch) -> None:
    """Writing report.json fails after report.md was written: the earlier report stays whole."""
    out = tmp_path / "out"
    argv = _argv("run", tiny_export, eval_cache, tmp_path, out)
    assert run_main(argv) == 0
    target = out / _REPORT_DIRS["run"]
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def disk_full(record, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("eval.report.write_json", disk_full)
    with pytest.raises(OSError, match="No space"):
        run_main([*argv, "--seed=1"])
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")]


def test_failed_suite_keeps_the_earlier_report(
    tiny_export: Path, eval_cache: Path, tmp_path: Path, monkeypatch
) -> None:
    """The bar chart fails after the tables are written: report.md and report.json stay the earlier ones."""
    out = tmp_path / "out"
    argv = _argv("suite", tiny_export, eval_cache, tmp_path, out)
    assert suite_main(argv) == 0
    target = out / "suite"
    before = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}

    def chart_fails(records, path, future=None):
        raise RuntimeError("matplotlib backend missing")

    monkeypatch.setattr("eval.suite.bar_chart", chart_fails)
    with pytest.raises(RuntimeError, match="matplotlib"):
        suite_main([*argv, "--seed=1"])
    assert {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()} == before
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


_TINY_SET = ProceduralConfig(train_videos=1, test_videos=1, frames=4, size=16)


def test_procedural_cache_is_published_whole_and_reused(tmp_path: Path) -> None:
    directory = tmp_path / "procedural" / "key"
    _generate_once(_TINY_SET, directory)
    assert (directory / "done").is_file() and len(list(directory.glob("proc-*.mp4"))) == 2
    stamps = {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}
    _generate_once(_TINY_SET, directory)
    assert {p.name: p.stat().st_mtime_ns for p in directory.iterdir()} == stamps
    assert [p.name for p in directory.parent.iterdir()] == ["key"]


def test_procedural_cache_refuses_a_directory_it_did_not_write(tmp_path: Path) -> None:
    """A non-empty directory without the ``done`` marker is not an unfinished cache to delete: it is refused."""
    directory = tmp_path / "procedural" / "key"
    directory.mkdir(parents=True)
    (directory / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirError, match=re.escape(str(directory))):
        _generate_once(_TINY_SET, directory)
    assert [p.name for p in directory.iterdir()] == ["notes.txt"]
    assert [p.name for p in directory.parent.iterdir()] == ["key"]
