"""Metric logging: a small interface, MLflow behind it on rank 0, a no-op elsewhere.

MLflow's default store here is a local SQLite file in the output directory;
``MLFLOW_TRACKING_URI`` (or ``tracking.tracking_uri``) wins. MLflow's usage
telemetry is switched off before mlflow is imported: runs must not reach out.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Protocol

from data_shards.io import atomic_path
from pretrain.config import Config, flatten

log = logging.getLogger(__name__)


class MetricLogger(Protocol):
    run_id: str | None
    """The MLflow run logged to (None: nothing is tracked)."""
    uri: str
    """Its store's tracking URI ('' when nothing is tracked)."""

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...
    def close(self, status: str = "FINISHED") -> None: ...

    @property
    def where(self) -> str: ...


class NullLogger:
    """Used on non-zero ranks and when tracking is disabled."""

    run_id: str | None = None
    uri: str = ""

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


RUN_DIR_TAG = "video_pretrain.run_dir"
RESUMED_FROM_TAG = "video_pretrain.resumed_from_run_id"
RESUMED_AT_TAG = "video_pretrain.resumed_at_step"


def create_sqlite_store(uri: str) -> None:
    """Create (and migrate) a new SQLite store under a temporary name, then rename it into place.

    MLflow builds a new database through a dozen schema migrations; a process
    killed half-way leaves a store that every later start fails to open
    ("table _alembic_tmp_experiments already exists"). Built aside, the store
    at ``uri`` is either absent or complete.
    """
    if not uri.startswith("sqlite:///"):
        return
    db = Path(uri.removeprefix("sqlite:///"))
    if db.exists():
        return
    from mlflow.tracking import MlflowClient

    db.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(db) as tmp:
        # Listing experiments forces the schema to be created and migrated to head.
        MlflowClient(f"sqlite:///{tmp}").search_experiments()
        _dispose_sqlalchemy_engines()
    log.info("created the MLflow store %s", db)


def _dispose_sqlalchemy_engines() -> None:
    """Close MLflow's cached connections to the temporary database before it is renamed."""
    try:
        from mlflow.tracking._tracking_service import utils as tracking_utils

        tracking_utils._tracking_store_registry._get_store_with_resolved_uri.cache_clear()
    except (ImportError, AttributeError):
        pass


def artifact_location(uri: str) -> str | None:
    """Artifacts of a SQLite store go beside its database file (MLflow's default is ./mlruns of the CWD)."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()


class MLflowLogger:
    """One MLflow run per training run; a resumed run continues its MLflow run when the store knows it."""

    def __init__(
        self, cfg: Config, resume_run_id: str | None = None, resume_step: int = 0, run_dir: Path | None = None
    ) -> None:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        os.environ.setdefault("DO_NOT_TRACK", "true")
        # A client bound to this store, not mlflow's process-global fluent API: set_tracking_uri
        # would also set MLFLOW_TRACKING_URI, and the next run in this process would log there.
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri(cfg)
        Path(cfg.run.out_dir).mkdir(parents=True, exist_ok=True)
        create_sqlite_store(self.uri)
        self._client = client = MlflowClient(self.uri)
        self.experiment_id = experiment_id(client, cfg.tracking.experiment, self.uri)
        run_dir_tag = str(Path(run_dir if run_dir is not None else cfg.run_dir).resolve())
        _mark_stale_runs_killed(client, self.experiment_id, run_dir_tag, keep=resume_run_id)
        # Steps already in the resumed MLflow run (a kill after them, before their checkpoint) are not logged twice.
        self.logged_through = 0
        self.run_id = None
        if resume_run_id is not None:
            try:
                client.update_run(resume_run_id, status="RUNNING")
                self.run_id = resume_run_id
                self.logged_through = _last_logged_step(client, resume_run_id)
            except MlflowException:
                log.warning(
                    "MLflow run %s (recorded in the checkpoint) is not in %s (was the run moved?): "
                    "logging to a new run tagged with the old id",
                    resume_run_id,
                    self.uri,
                )
        if self.run_id is None:
            tags = {RUN_DIR_TAG: run_dir_tag, "mlflow.runName": cfg.run.name}
            if resume_run_id is not None:
                tags |= {RESUMED_FROM_TAG: resume_run_id, RESUMED_AT_TAG: str(resume_step)}
            self.run_id = client.create_run(self.experiment_id, run_name=cfg.run.name, tags=tags).info.run_id
            self.log_params(flatten(cfg))

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        # MLflow caps a param value at a few thousand characters (config values are short) and
        # a batch at 100 params.
        items = [Param(k, str(v)) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self._client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if step <= self.logged_through:
            return
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        batch = [Metric(k, float(v), now_ms, step) for k, v in metrics.items()]
        self._client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if Path(path).is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path=artifact_path)
        else:
            self._client.log_artifact(self.run_id, str(path), artifact_path=artifact_path)

    def close(self, status: str = "FINISHED") -> None:
        self._client.set_terminated(self.run_id, status=status)

    @property
    def where(self) -> str:
        return f"MLflow run {self.run_id} in {self.uri}"


def experiment_id(client: Any, name: str, uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location(uri))


def _mark_stale_runs_killed(client: Any, experiment_id: str, run_dir_tag: str, keep: str | None) -> None:
    """Runs of this run directory still RUNNING belong to processes that died (kill -9, OOM): mark them KILLED."""
    for run in client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'"):
        if run.info.run_id != keep and run.data.tags.get(RUN_DIR_TAG) == run_dir_tag:
            client.set_terminated(run.info.run_id, status="KILLED")
            log.info(
                "MLflow run %s of %s was left RUNNING by a dead process: marked KILLED",
                run.info.run_id,
                run_dir_tag,
            )


def _last_logged_step(client: Any, run_id: str) -> int:
    history = client.get_metric_history(run_id, "loss")
    return max((m.step for m in history), default=0)


def build_logger(
    cfg: Config, rank: int = 0, resume_run_id: str | None = None, resume_step: int = 0, run_dir: Path | None = None
) -> MetricLogger:
    if rank != 0 or not cfg.tracking.enabled:
        return NullLogger()
    return MLflowLogger(cfg, resume_run_id, resume_step, run_dir)
