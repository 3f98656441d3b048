"""eval.run --task future on unreadable videos: one error line when none is readable, skipped and counted otherwise."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from data_shards import sample_video_path
from eval.run import main as run_main

BAD_VIDEOS = {"empty": b"", "garbage": os.urandom(4096)}


def _future(tiny_export: Path, data: Path, out: Path) -> int:
    argv = ["--export", str(tiny_export), "--task", "future", "--data", str(data), "--frames=24"]
    return run_main([*argv, "--out", str(out), "--no-mlflow"])


@pytest.mark.parametrize("given", ["file", "folder"])
@pytest.mark.parametrize("kind", list(BAD_VIDEOS))
def test_unreadable_video_is_one_error_line(tiny_export: Path, tmp_path: Path, capsys, kind: str, given: str) -> None:
    folder = tmp_path / "videos"
    folder.mkdir()
    video = folder / f"{kind}.mp4"
    video.write_bytes(BAD_VIDEOS[kind])
    out = tmp_path / "out"
    assert _future(tiny_export, video if given == "file" else folder, out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert f"{kind}.mp4" in err[0] and ("empty_file" if kind == "empty" else "not_video") in err[0]
    assert not out.exists()


def test_unreadable_video_in_a_folder_is_skipped_and_reported(tiny_export: Path, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "videos"
    (folder / "broken").mkdir(parents=True)
    shutil.copy(sample_video_path("carphone"), folder / "carphone.mp4")
    (folder / "broken" / "empty.mp4").write_bytes(BAD_VIDEOS["empty"])
    (folder / "garbage.webm").write_bytes(BAD_VIDEOS["garbage"])
    assert _future(tiny_export, folder, tmp_path / "out") == 0
    record = json.loads((tmp_path / "out" / "future" / "report.json").read_text())
    assert [v["name"] for v in record["dataset"]["videos"]] == ["carphone.mp4"]
    skipped = {s["name"]: s["reason"] for s in record["dataset"]["skipped"]}
    assert skipped == {"broken/empty.mp4": "empty_file", "garbage.webm": "not_video"}
    assert all(r["windows"] > 0 for r in record["results"])
    assert "skipped 2 unreadable videos" in (tmp_path / "out" / "future" / "report.md").read_text()
    assert "skipped 2 unreadable videos" in capsys.readouterr().out
