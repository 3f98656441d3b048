"""Reports (markdown + JSON) and MLflow logging for eval runs.

Every report directory (``OUT/<task>/<variant>``, ``OUT/future``,
``OUT/suite``) is filled as a temporary sibling and published whole
(``data_shards.io.output_dir``): an existing directory is replaced only when
its ``report.json`` is an earlier report of the same kind, anything else is
refused with an ``OutputDirError`` (a ValueError) naming the path, and a
failed run leaves nothing behind. ``OUT`` itself may not be ``.``, a parent
of the working directory, the home directory or ``/``.

MLflow: ``MLFLOW_TRACKING_URI`` wins; else the store of the run that trained
the export (recorded in its config.json), the eval run nested under that
training run; else a SQLite file in the output directory. Telemetry is switched off before mlflow is
imported, and mlflow is imported only when a run is logged.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from data_shards.io import OutputDirError, check_output_dir, forbidden_output, output_dir, write_text_atomic
from pretrain.export import TrackingRecord

log = logging.getLogger(__name__)

EXPERIMENT = "video-pretrain-eval"
"""Experiment of eval runs not linked to a training run (tracking was off, or its store is not here)."""
TRAINING_RUN_TAG = "video_pretrain.training_run_id"


REPORT_JSON = "report.json"
"""The file that marks a directory as an eval report (and holds the record)."""


def write_json(record: dict[str, Any], path: Path) -> Path:
    return write_text_atomic(path, json.dumps(record, indent=2, sort_keys=True) + "\n")


def report_kind(key: str) -> Callable[[Path], bool]:
    """``is_ours`` for ``output_dir``: the directory's report.json is a JSON object with ``key``."""

    def is_report(directory: Path) -> bool:
        try:
            record = json.loads((directory / REPORT_JSON).read_text())
        except (OSError, ValueError):
            return False
        return isinstance(record, dict) and key in record

    return is_report


is_task_report = report_kind("task")
"""An earlier eval.run report (one task, or the future eval): its record names the task."""
is_suite_report = report_kind("records")
"""An earlier eval.suite report: its record holds every task's record."""


def check_out_root(out: Path) -> Path:
    """Refuse an ``--out`` that must never hold reports (``.``, home, ``/``, a parent of the working directory)."""
    why = forbidden_output(Path(out))
    if why is not None:
        raise OutputDirError(f"refusing to write eval reports under {out}: {why}; give a new directory")
    if Path(out).exists() and not Path(out).is_dir():
        raise OutputDirError(f"refusing to write eval reports under {out}: it exists and is not a directory")
    return Path(out)


def check_report_dir(out_dir: Path, is_ours: Callable[[Path], bool] = is_task_report) -> Path:
    """Refuse, before any work, a report directory that ``output_dir`` would refuse after it."""
    return check_output_dir(out_dir, is_ours=is_ours, what="eval report")


def format_metric(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:.0f}"


def task_markdown(record: dict[str, Any]) -> str:
    """One task run as markdown: what was evaluated, on what, and the numbers."""
    export = record["export"]
    lines = [
        f"# {record['task']}: {record['variant']} ({record['probe']} probe, {record['protocol']} protocol)",
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {name} | {format_metric(value)} |" for name, value in record["metrics"].items()),
        "",
        f"- export: `{export['dir']}` sha256 `{export['sha256']}` (step {export['step']})",
        f"- encoder: {export['encoder']} hash `{export['encoder_hash']}`",
        f"- dataset: {record['dataset']['kind']} hash `{record['dataset']['hash']}`",
        f"- seed: {record['seed']}",
        f"- readout: `{json.dumps(record['readout'], sort_keys=True)}`",
        f"- train: {record['train_seconds']:.1f} s, final loss {record['final_loss']:.4f}, "
        f"trainable parameters {record['trainable_parameters']}",
        "",
    ]
    return "\n".join(lines)


def skipped_lines(skipped: list[dict[str, str]]) -> list[str]:
    """Markdown list item naming the unreadable videos, or nothing when every video was read."""
    if not skipped:
        return []
    names = ", ".join(f"`{s['name']}` ({s['reason']})" for s in skipped)
    return [f"- skipped {len(skipped)} unreadable videos: {names}"]


def write_report_files(record: dict[str, Any], markdown: str, directory: Path) -> list[Path]:
    """report.md and report.json in ``directory``; returns their paths."""
    md = write_text_atomic(directory / "report.md", markdown)
    return [md, write_json(record, directory / REPORT_JSON)]


def publish_report(record: dict[str, Any], markdown: str, out_dir: Path) -> list[Path]:
    """Write report.md + report.json as the whole of ``out_dir`` (replacing only an earlier task report)."""
    with output_dir(out_dir, is_ours=is_task_report, what="eval report") as tmp:
        names = [p.name for p in write_report_files(record, markdown, tmp)]
    return [out_dir / name for name in names]


def write_task_report(record: dict[str, Any], out_dir: Path) -> list[Path]:
    """One task run's report directory; returns (report.md, report.json)."""
    return publish_report(record, task_markdown(record), out_dir)


def tracking_uri(out_dir: Path, training: TrackingRecord | None = None) -> str:
    """$MLFLOW_TRACKING_URI, else the training run's store (when this machine can reach it), else a SQLite file
    in the output directory."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if training is not None and _reachable(training.uri):
        return training.uri
    return f"sqlite:///{(out_dir / 'mlflow.db').resolve()}"


def _reachable(uri: str) -> bool:
    """A SQLite store counts when its file is here (an export copied to another machine falls back)."""
    return not uri.startswith("sqlite:///") or Path(uri.removeprefix("sqlite:///")).is_file()


def flat_params(record: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dict -> {"a.b": "value"}, values as strings (MLflow params)."""
    flat: dict[str, str] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_params(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


def log_to_mlflow(
    out_dir: Path,
    run_name: str,
    params: dict[str, Any],
    metrics: dict[str, float],
    artifacts: Iterable[Path],
    training: TrackingRecord | None = None,
) -> str:
    """One MLflow run with params, metrics and artifacts; returns where it went.

    With ``training`` (the export's record of the run that trained it), the
    run goes into that run's store and experiment, nested under it
    (``mlflow.parentRunId``) and tagged with its id, so the UI shows a model's
    evaluations under its training run. Artifacts of a SQLite store live
    beside its database file, never in ``./mlruns`` of the working directory.
    """
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    # The trainer's store helpers, imported only when a run is logged (eval modules never load tracking).
    from pretrain.tracking import create_sqlite_store, experiment_id

    out_dir.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri(out_dir, training)
    linked = training is not None and uri == training.uri
    create_sqlite_store(uri)
    client = MlflowClient(uri)
    experiment = experiment_id(client, training.experiment if linked else EXPERIMENT, uri)
    tags = {TRAINING_RUN_TAG: training.run_id, "mlflow.parentRunId": training.run_id} if linked else {}
    run_id = client.create_run(experiment, run_name=run_name, tags=tags).info.run_id
    now = int(time.time() * 1000)
    entities = [Param(k, v) for k, v in flat_params(params).items()]
    entities += [Metric(k, float(v), now, 0) for k, v in metrics.items()]
    # MLflow takes at most 100 params per batch request.
    for start in range(0, len(entities), 100):
        chunk = entities[start : start + 100]
        client.log_batch(
            run_id,
            metrics=[e for e in chunk if isinstance(e, Metric)],
            params=[e for e in chunk if isinstance(e, Param)],
        )
    for path in artifacts:
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id)
    where = f"MLflow run {run_id} in {uri}" + (f" (under training run {training.run_id})" if linked else "")
    log.info("logged to %s", where)
    return where
