"""Reports (markdown + JSON) and MLflow logging for eval runs.

MLflow's default store is a SQLite file in the output directory;
``MLFLOW_TRACKING_URI`` wins. Telemetry is switched off before mlflow is
imported, and mlflow is imported only when a run is logged.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

EXPERIMENT = "video-pretrain-eval"


def write_json(record: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return path


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


def write_task_report(record: dict[str, Any], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "report.md"
    md.write_text(task_markdown(record))
    return [md, write_json(record, out_dir / "report.json")]


def tracking_uri(out_dir: Path) -> str:
    """$MLFLOW_TRACKING_URI, else a SQLite file in the output directory."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(out_dir / 'mlflow.db').resolve()}"


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
) -> str:
    """One MLflow run with params, metrics and artifacts; returns where it went."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    import mlflow

    out_dir.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri(out_dir)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(EXPERIMENT)
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.log_params(flat_params(params))
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
        for path in artifacts:
            mlflow.log_artifact(str(path))
        run_id = run.info.run_id
    where = f"MLflow run {run_id} in {uri}"
    log.info("logged to %s", where)
    return where
