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
from pretrain.export import read_export_config
from tests.conftest import tiny_overrides
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
    args = ["--export", str(tiny_export), "--out", str(tmp_path), "--steps=2", "--videos", str(videos), "--seeds=2"]
    assert suite_main([*args, *tiny_data_args(eval_cache)]) == 0
    out = capsys.readouterr().out
    assert "| task | metric | pretrained | identity | random | pretrained vs identity |" in out
    for task in TASKS:
        assert f"| {task} |" in out
    assert "future offset 4" in out
    summary = json.loads((tmp_path / "suite" / "report.json").read_text())
    assert len(summary["records"]) == 3 * len(TASKS)
    assert summary["seeds"] == [0, 1]
    for record in summary["records"]:
        # The mean and sd are of the two seeds' own readouts (the random core differs by seed too).
        for name, values in record["metrics_per_seed"].items():
            assert len(values) == 2
            assert record["metrics"][name] == pytest.approx(sum(values) / 2)
            assert record["metrics_sd"][name] == pytest.approx(abs(values[0] - values[1]) / 2**0.5)
    assert [r["offset"] for r in summary["future"]["results"]] == [1, 2, 4]
    assert (tmp_path / "suite" / "bars.png").stat().st_size > 0
    report = (tmp_path / "suite" / "report.md").read_text()
    assert summary["table"] in report and " ± " in summary["table"]
    assert "## Future-feature prediction on real video" in report and "| 4 |" in report


def test_suite_logs_means_sds_future_and_the_figure(
    tiny_export: Path, eval_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    videos = tmp_path / "videos"
    videos.mkdir()
    shutil.copy(sample_video_path("carphone"), videos / "carphone.mp4")
    data = [a for a in tiny_data_args(eval_cache) if a != "--no-mlflow"]
    args = ["--export", str(tiny_export), "--out", str(tmp_path), "--steps=2", "--videos", str(videos), "--seeds=2"]
    assert suite_main([*args, "--tasks=depth", *data]) == 0
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("video-pretrain-eval").experiment_id])
    metrics = run.data.metrics
    assert {"depth.pretrained.abs_rel", "depth.pretrained.abs_rel.sd", "future.gain_offset4"} <= set(metrics)
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"report.md", "report.json", "bars.png"}


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


@pytest.mark.slow
def test_eval_logs_under_the_training_run_in_its_store(
    eval_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    from pretrain.config import load_config
    from pretrain.trainer import Trainer

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    train_out = tmp_path / "train"
    Trainer(load_config("tiny-cpu", tiny_overrides(train_out, "--train.steps=2", "--tracking.enabled=true"))).train()
    export = train_out / "tiny-cpu" / "export"
    recorded = read_export_config(export).tracking
    assert recorded is not None and recorded.uri == f"sqlite:///{(train_out / 'mlflow.db').resolve()}"

    args = [a for a in tiny_data_args(eval_cache) if a != "--no-mlflow"]
    eval_out = tmp_path / "eval"
    assert run_main(["--export", str(export), "--out", str(eval_out), "--steps=2", "--task", "depth", *args]) == 0

    client = MlflowClient(recorded.uri)
    (run,) = client.search_runs(
        [client.get_experiment_by_name(recorded.experiment).experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{recorded.run_id}'",
    )
    assert run.data.tags["video_pretrain.training_run_id"] == recorded.run_id
    assert "abs_rel" in run.data.metrics
    # Artifacts beside the training store, not ./mlruns of the working directory; no store in the eval dir.
    assert run.info.artifact_uri.startswith((train_out / "mlartifacts").resolve().as_uri())
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"report.md", "report.json"}
    assert not (tmp_path / "mlruns").exists() and not (eval_out / "mlflow.db").exists()
