"""eval.run and eval.suite end to end on a tiny export: reports, table, determinism, MLflow."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from data_shards import sample_video_path
from eval.run import main as run_main
from eval.suite import main as suite_main
from eval.tasks import TASKS
from tests.eval.conftest import tiny_data_args


def _run(tiny_export: Path, eval_cache: Path, out: Path, *extra: str) -> int:
    return run_main(["--export", str(tiny_export), "--out", str(out), "--steps=3", *tiny_data_args(eval_cache), *extra])


@pytest.mark.parametrize("task", list(TASKS))
def test_run_writes_a_reproducible_report(tiny_export: Path, eval_cache: Path, tmp_path: Path, task: str) -> None:
    assert _run(tiny_export, eval_cache, tmp_path, "--task", task) == 0
    record = json.loads((tmp_path / task / "pretrained" / "report.json").read_text())
    assert (tmp_path / task / "pretrained" / "report.md").is_file()
    assert record["seed"] == 0 and record["variant"] == "pretrained"
    assert len(record["export"]["sha256"]) == 64 and len(record["dataset"]["hash"]) == 64
    assert record["readout"]["steps"] == 3 and record["readout"]["readout"]
    assert record["primary"] in record["metrics"]


def test_same_seed_same_numbers(tiny_export: Path, eval_cache: Path, tmp_path: Path) -> None:
    """Finetune mode (the path with the most randomness in it), run twice, then with another seed."""

    def metrics(out: Path, seed: int) -> dict[str, float]:
        args = ("--task", "box_tracking", "--probe", "finetune", "--baseline", "random", f"--seed={seed}")
        assert _run(tiny_export, eval_cache, out, *args) == 0
        return json.loads((out / "box_tracking" / "random" / "report.json").read_text())["metrics"]

    first = metrics(tmp_path / "a", 1)
    assert metrics(tmp_path / "b", 1) == first
    assert metrics(tmp_path / "c", 2) != first


def test_clip_protocol_and_baselines(tiny_export: Path, eval_cache: Path, tmp_path: Path) -> None:
    for baseline in ("identity", "random"):
        args = ("--task", "classification", "--protocol", "clip", "--baseline", baseline)
        assert _run(tiny_export, eval_cache, tmp_path, *args) == 0
        record = json.loads((tmp_path / "classification" / baseline / "report.json").read_text())
        assert record["protocol"] == "clip" and record["variant"] == baseline


def test_suite_prints_one_comparison_table(tiny_export: Path, eval_cache: Path, tmp_path: Path, capsys) -> None:
    videos = tmp_path / "videos"
    videos.mkdir()
    shutil.copy(sample_video_path("carphone"), videos / "carphone.mp4")
    args = ["--export", str(tiny_export), "--out", str(tmp_path), "--steps=2", "--videos", str(videos)]
    assert suite_main([*args, *tiny_data_args(eval_cache)]) == 0
    out = capsys.readouterr().out
    assert "| task | metric | pretrained | identity | random | pretrained vs identity |" in out
    for task in TASKS:
        assert f"| {task} |" in out
    assert "future offset 4" in out
    summary = json.loads((tmp_path / "suite" / "report.json").read_text())
    assert len(summary["records"]) == 3 * len(TASKS)
    assert [r["offset"] for r in summary["future"]["results"]] == [1, 2, 4]
    assert (tmp_path / "suite" / "bars.png").stat().st_size > 0
    assert summary["table"] in (tmp_path / "suite" / "report.md").read_text()


def test_future_feature_eval_on_a_video_folder(tiny_export: Path, tmp_path: Path, capsys) -> None:
    videos = tmp_path / "videos"
    videos.mkdir()
    shutil.copy(sample_video_path("carphone"), videos / "carphone.mp4")
    args = ["--export", str(tiny_export), "--task", "future", "--data", str(videos), "--frames=24"]
    assert run_main([*args, "--out", str(tmp_path / "out"), "--no-mlflow"]) == 0
    record = json.loads((tmp_path / "out" / "future" / "report.json").read_text())
    assert [r["offset"] for r in record["results"]] == [1, 2, 4]
    assert all(r["copy_last_l1"] > 0 and r["windows"] > 0 for r in record["results"])
    assert "copy-last" in capsys.readouterr().out


@pytest.mark.slow
def test_run_logs_to_mlflow(tiny_export: Path, eval_cache: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    args = [a for a in tiny_data_args(eval_cache) if a != "--no-mlflow"]
    argv = ["--export", str(tiny_export), "--out", str(tmp_path), "--steps=2", "--task", "depth", *args]
    assert run_main(argv) == 0
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["video-pretrain-eval"])
    assert len(runs) == 1 and "metrics.abs_rel" in runs.columns
