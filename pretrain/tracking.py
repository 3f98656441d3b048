"""Metric logging: a small interface, MLflow behind it on rank 0, a no-op elsewhere.

MLflow's default store here is a local SQLite file in the output directory;
``MLFLOW_TRACKING_URI`` (or ``tracking.tracking_uri``) wins. MLflow's usage
telemetry is switched off before mlflow is imported: runs must not reach out.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Protocol

from pretrain.config import Config, flatten

log = logging.getLogger(__name__)


class MetricLogger(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...
    def close(self, status: str = "FINISHED") -> None: ...

    @property
    def where(self) -> str: ...


class NullLogger:
    """Used on non-zero ranks and when tracking is disabled."""

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass

    def close(self, status: str = "FINISHED") -> None:
        pass

    @property
    def where(self) -> str:
        return "tracking disabled"


def tracking_uri(cfg: Config) -> str:
    """Config, then $MLFLOW_TRACKING_URI, then a SQLite file beside the runs."""
    if cfg.tracking.tracking_uri:
        return cfg.tracking.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    db = (Path(cfg.run.out_dir) / "mlflow.db").resolve()
    return f"sqlite:///{db}"


class MLflowLogger:
    def __init__(self, cfg: Config, resume_run_id: str | None = None) -> None:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        os.environ.setdefault("DO_NOT_TRACK", "true")
        import mlflow

        self._mlflow = mlflow
        self.uri = tracking_uri(cfg)
        Path(cfg.run.out_dir).mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(self.uri)
        experiment = mlflow.set_experiment(cfg.tracking.experiment)
        self.experiment_id = experiment.experiment_id
        run = mlflow.start_run(run_id=resume_run_id, run_name=None if resume_run_id else cfg.run.name)
        self.run_id = run.info.run_id
        if resume_run_id is None:
            self.log_params(flatten(cfg))

    def log_params(self, params: dict[str, Any]) -> None:
        # MLflow caps a param value at a few thousand characters; config values are short.
        self._mlflow.log_params({k: str(v) for k, v in params.items()})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if Path(path).is_dir():
            self._mlflow.log_artifacts(str(path), artifact_path=artifact_path)
        else:
            self._mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def close(self, status: str = "FINISHED") -> None:
        self._mlflow.end_run(status=status)

    @property
    def where(self) -> str:
        return f"MLflow run {self.run_id} in {self.uri}"


def build_logger(cfg: Config, rank: int = 0, resume_run_id: str | None = None) -> MetricLogger:
    if rank != 0 or not cfg.tracking.enabled:
        return NullLogger()
    return MLflowLogger(cfg, resume_run_id)
