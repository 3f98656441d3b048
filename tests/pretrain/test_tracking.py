"""MLflow: a tiny run's params and metrics read back through MLflow's own client."""

from __future__ import annotations

from pathlib import Path

import pytest

from pretrain.config import load_config
from pretrain.tracking import NullLogger, build_logger, tracking_uri
from pretrain.trainer import Trainer
from tests.conftest import tiny_overrides


def test_mlflow_records_params_metrics_and_artifacts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config("tiny-cpu", tiny_overrides(tmp_path, "--tracking.enabled=true", "--tracking.experiment=t"))
    result = Trainer(cfg).train()
    assert (tmp_path / "mlflow.db").is_file()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("t")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["core.kind"] == "gmmix"
    assert run.data.params["train.steps"] == "6"
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in losses] == list(range(1, 7))
    assert all(m.value > 0 for m in losses)
    for key in ("lr", "clips_per_s", "grad_norm", "skipped_steps", "heldout_l1_offset1"):
        assert key in run.data.metrics, key
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "export", "loss_curve.png"} <= artifacts
    assert run.info.run_id in result.tracking


def test_resumed_run_continues_the_same_mlflow_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    overrides = tiny_overrides(tmp_path, "--tracking.enabled=true")
    Trainer(load_config("tiny-cpu", overrides)).train(stop_at=3)
    Trainer(load_config("tiny-cpu", overrides)).train(finalize=False)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("video-pretrain").experiment_id])
    assert len(runs) == 1
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")] == list(range(1, 7))


def test_tracking_uri_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config("tiny-cpu", [f"--run.out_dir={tmp_path}"])
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(cfg) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere.db")
    assert tracking_uri(cfg) == "sqlite:////elsewhere.db"
    cfg = load_config("tiny-cpu", [f"--run.out_dir={tmp_path}", "--tracking.tracking_uri=file:///x"])
    assert tracking_uri(cfg) == "file:///x"


def test_disabled_and_nonzero_rank_use_null_logger(tmp_path: Path) -> None:
    cfg = load_config("tiny-cpu", [f"--run.out_dir={tmp_path}"])
    assert isinstance(build_logger(cfg, rank=1), NullLogger)
    cfg = load_config("tiny-cpu", [f"--run.out_dir={tmp_path}", "--tracking.enabled=false"])
    assert isinstance(build_logger(cfg, rank=0), NullLogger)
    assert not (tmp_path / "mlflow.db").exists()


def test_store_is_created_aside_so_a_kill_cannot_leave_half_a_schema(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kill during MLflow's schema migrations once left a store no later start could open."""
    from mlflow.tracking import MlflowClient

    from pretrain.tracking import create_sqlite_store

    db = tmp_path / "mlflow.db"
    original = MlflowClient.search_experiments

    def killed(self, *args, **kwargs):
        raise KeyboardInterrupt  # stands in for the kill, after the migrations started

    monkeypatch.setattr(MlflowClient, "search_experiments", killed)
    with pytest.raises(KeyboardInterrupt):
        create_sqlite_store(f"sqlite:///{db}")
    assert not db.exists() and not list(tmp_path.iterdir())
    monkeypatch.setattr(MlflowClient, "search_experiments", original)
    create_sqlite_store(f"sqlite:///{db}")
    assert db.is_file()
    assert MlflowClient(f"sqlite:///{db}").search_experiments()[0].name == "Default"
