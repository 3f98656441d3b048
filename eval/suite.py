"""Every procedural task x {pretrained, identity, random}: one comparison table, reports, a bar chart.

    python -m eval.suite --export runs/tiny-cpu/export [--out runs/eval] [--seed 0] [--seeds 3] [--steps 150]
        [--tasks classification,depth] [--videos VIDEO_DIR] [--no-mlflow]

Each readout is trained with ``--seeds`` seeds (seed, seed+1, ...): the table
and report give mean ± sd over them, the bar chart ±1 sd error bars.

The encoder runs once per procedural dataset (tokens cached on disk), the
frozen feature paths once per variant (shared by all tasks); every readout
gets the same training budget. The three classification tasks
(classification = drift direction, classify_speed, classify_order) read
labels of the same videos, so they add readout training only. ``--videos`` adds the self-supervised
future-feature eval on a folder of real videos.

Everything is written at the end, as one directory ``OUT/suite`` published
whole (``eval.report``): an earlier suite report there is replaced, any
other non-empty directory is refused before the suite starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from data_shards import VideoDecodeError
from data_shards.io import atomic_path, output_dir, write_text_atomic
from eval.data import load_procedural
from eval.features import VARIANTS, EncoderMismatchError, load_checked_encoder, read_export
from eval.probe import FeatureCache
from eval.report import (
    check_out_root,
    check_report_dir,
    format_metric,
    is_suite_report,
    log_to_mlflow,
    skipped_lines,
    task_markdown,
    write_json,
    write_report_files,
)
from eval.run import add_common_args, evaluate_task, procedural_from_args, settings_from_args, setup_logging
from eval.tasks import TASKS

log = logging.getLogger(__name__)


def comparison_table(records: list[dict[str, Any]]) -> str:
    """Markdown: one row per (task, metric), one column per variant (mean ± sd over seeds), and whether
    pretrained beats identity by more than the seeds' spread."""
    by_task: dict[str, dict[str, dict[str, Any]]] = {}
    for record in records:
        by_task.setdefault(record["task"], {})[record["variant"]] = record
    lines = [
        "| task | metric | pretrained | identity | random | pretrained vs identity |",
        "|---|---|---|---|---|---|",
    ]
    for task, variants in by_task.items():
        first = next(iter(variants.values()))
        for metric in first["metrics"]:
            present = [v for v in VARIANTS if v in variants]
            means = {v: variants[v]["metrics"][metric] for v in present}
            sds = {v: variants[v].get("metrics_sd", {}).get(metric) for v in present}
            cells = [_cell(means[v], sds[v]) if v in means else "-" for v in VARIANTS]
            if metric in _UNRANKED:
                arrow, verdict = "", ""
            else:
                higher = metric not in _LOWER_IS_BETTER
                arrow, verdict = ("↑" if higher else "↓"), _verdict(means, sds, higher)
            lines.append(f"| {task} | {metric} {arrow} | {' | '.join(cells)} | {verdict} |")
    return "\n".join(lines)


def _cell(mean: float, sd: float | None) -> str:
    return format_metric(mean) if sd is None else f"{format_metric(mean)} ± {format_metric(sd)}"


# Counts describe the test set, not a model; every other metric is ranked in its own direction.
_UNRANKED = frozenset({"scored_boxes"})
_LOWER_IS_BETTER = frozenset({"abs_rel", "rpe_trans", "rpe_rot_deg"})


def _verdict(means: dict[str, float], sds: dict[str, float | None], higher_is_better: bool) -> str:
    if "pretrained" not in means or "identity" not in means:
        return ""
    diff = means["pretrained"] - means["identity"]
    if diff == 0:
        return "tie"
    verdict = f"{'better' if (diff > 0) == higher_is_better else 'worse'} ({diff:+.4f})"
    spread = max((sd for sd in (sds.get("pretrained"), sds.get("identity")) if sd is not None), default=None)
    # With seeds, a difference inside one standard deviation of either variant is not read as a result.
    if spread is not None and abs(diff) <= spread:
        verdict += ", within 1 sd"
    return verdict


def aggregate_seeds(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """One task x variant over readout seeds: the first seed's record with metrics replaced by their means,
    plus ``seeds``, ``metrics_per_seed`` and ``metrics_sd`` (sample standard deviation; none for one seed)."""
    record = dict(per_seed[0])
    names = list(per_seed[0]["metrics"])
    values = {m: [float(r["metrics"][m]) for r in per_seed] for m in names}
    record["seeds"] = [r["seed"] for r in per_seed]
    record["metrics"] = {m: float(np.mean(v)) for m, v in values.items()}
    record["metrics_per_seed"] = values
    if len(per_seed) > 1:
        record["metrics_sd"] = {m: float(np.std(v, ddof=1)) for m, v in values.items()}
    return record


def bar_chart(records: list[dict[str, Any]], path: Path, future: dict[str, Any] | None = None) -> Path:
    """One panel per task: its primary metric for each variant, error bars ±1 sd over seeds; with ``future``,
    a last panel of the held-out future-prediction gain over copy-last per offset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in records))
    panels = len(tasks) + (future is not None)
    fig, axes = plt.subplots(1, panels, figsize=(3.2 * panels, 3.4), squeeze=False)
    colors = {"pretrained": "tab:blue", "identity": "tab:gray", "random": "tab:orange"}
    for ax, task in zip(axes[0], tasks, strict=False):
        rows = {r["variant"]: r for r in records if r["task"] == task}
        variants = [v for v in VARIANTS if v in rows]
        primary = rows[variants[0]]["primary"]
        values = [rows[v]["metrics"][primary] for v in variants]
        errors = [rows[v].get("metrics_sd", {}).get(primary, 0.0) for v in variants]
        ax.bar(variants, values, yerr=errors, capsize=4, color=[colors[v] for v in variants])
        arrow = "higher" if rows[variants[0]]["higher_is_better"] else "lower"
        seeds = len(rows[variants[0]].get("seeds", [0]))
        spread = f", ±1 sd over {seeds} seeds" if seeds > 1 else ", 1 seed"
        ax.set_title(f"{task}\n{primary} ({arrow} is better{spread})", fontsize=8)
        ax.tick_params(axis="x", labelsize=8, rotation=20)
    if future is not None:
        ax = axes[0][-1]
        results = future["results"]
        ax.bar([str(r["offset"]) for r in results], [100 * r["gain"] for r in results], color="tab:blue")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xlabel("offset (frames)", fontsize=8)
        ax.set_title("future prediction on real video\n% L1 below copy-last (higher is better)", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        # The temporary name ends in .tmp, so the format cannot come from it.
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path


def run_suite(args: argparse.Namespace) -> dict[str, Any]:
    out_dir = args.out / "suite"
    check_out_root(args.out)
    check_report_dir(out_dir, is_suite_report)
    start = time.perf_counter()
    export = read_export(args.export)
    encoder = load_checked_encoder(export, args.encoder)
    clips = load_procedural(procedural_from_args(args), encoder, args.cache)
    data_seconds = time.perf_counter() - start
    settings = settings_from_args(args)
    cache = FeatureCache()
    records = []
    seeds = [settings.seed + k for k in range(args.seeds)]
    for task in args.tasks:
        for variant in VARIANTS:
            per_seed = [
                evaluate_task(task, variant, export, clips, dataclasses.replace(settings, seed=seed), cache)
                for seed in seeds
            ]
            record = aggregate_seeds(per_seed)
            records.append(record)
            print(f"{task:>15} {variant:>10}: {_cells(record)}", flush=True)
    future = None
    if args.videos is not None:
        from eval.selfsup import future_prediction_eval

        results, dataset = future_prediction_eval(export, encoder, args.videos, max_frames=None, seed=args.seed)
        future = {
            "dataset": dataset,
            "results": [
                {"offset": r.offset, "l1": r.model_l1, "copy_last_l1": r.copy_last_l1, "gain": r.gain} for r in results
            ],
        }
    table = comparison_table(records)
    wall = time.perf_counter() - start
    summary = {
        "export": records[0]["export"],
        "dataset": records[0]["dataset"],
        "probe": settings.probe,
        "protocol": settings.protocol,
        "seed": settings.seed,
        "seeds": seeds,
        "readout_steps": settings.readout.steps,
        "records": records,
        "future": future,
        "table": table,
        "wall_seconds": wall,
        "data_seconds": data_seconds,
    }
    artifacts = write_suite_report(summary, out_dir)
    print(table)
    if future is not None:
        for r in future["results"]:
            gain = 100 * r["gain"]
            print(f"future offset {r['offset']}: L1 {r['l1']:.4f} vs copy-last {r['copy_last_l1']:.4f} ({gain:+.1f}%)")
        for line in skipped_lines(future["dataset"]["skipped"]):
            print(f"future: {line.removeprefix('- ')}")
    print(f"suite wall time {wall:.0f} s (data and tokens {data_seconds:.0f} s); reports in {out_dir}")
    if not args.no_mlflow:
        params = {k: summary[k] for k in ("export", "dataset", "probe", "protocol", "seeds", "readout_steps")}
        where = log_to_mlflow(
            args.out, "suite", params, suite_metrics(summary), artifacts, training=export.config.tracking
        )
        print(f"logged to {where}")
    return summary


def _cells(record: dict[str, Any]) -> str:
    sds = record.get("metrics_sd", {})
    return ", ".join(f"{m} {_cell(v, sds.get(m))}" for m, v in record["metrics"].items())


def suite_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """MLflow metrics: TASK.VARIANT.METRIC (mean over seeds), .sd beside it, future.gain/l1 per offset."""
    metrics: dict[str, float] = {}
    for r in summary["records"]:
        for name, value in r["metrics"].items():
            metrics[f"{r['task']}.{r['variant']}.{name}"] = value
        for name, value in r.get("metrics_sd", {}).items():
            metrics[f"{r['task']}.{r['variant']}.{name}.sd"] = value
    for r in (summary.get("future") or {}).get("results", []):
        metrics[f"future.gain_offset{r['offset']}"] = r["gain"]
        metrics[f"future.l1_offset{r['offset']}"] = r["l1"]
        metrics[f"future.copy_last_l1_offset{r['offset']}"] = r["copy_last_l1"]
    return metrics


def write_suite_report(summary: dict[str, Any], out_dir: Path) -> list[Path]:
    """Publish OUT/suite whole: per-task reports, report.md, report.json, bars.png; returns the last three."""
    with output_dir(out_dir, is_ours=is_suite_report, what="eval suite report") as tmp:
        for record in summary["records"]:
            write_report_files(record, task_markdown(record), tmp / record["task"] / record["variant"])
        write_text_atomic(tmp / "report.md", _summary_markdown(summary))
        write_json(summary, tmp / "report.json")
        bar_chart(summary["records"], tmp / "bars.png", summary.get("future"))
    return [out_dir / "report.md", out_dir / "report.json", out_dir / "bars.png"]


def _summary_markdown(summary: dict[str, Any]) -> str:
    export, dataset = summary["export"], summary["dataset"]
    seeds = summary["seeds"]
    spread = f"mean ± sd over readout seeds {seeds}" if len(seeds) > 1 else f"readout seed {seeds[0]}"
    lines = [
        f"# Eval suite: {summary['probe']} probe, {summary['protocol']} protocol, {spread}",
        "",
        summary["table"],
        "",
        "![per task: pretrained / identity / random](bars.png)",
        "",
        *_future_markdown(summary.get("future")),
        f"- export: `{export['dir']}` sha256 `{export['sha256']}` (step {export['step']}, "
        f"{export['core_kind']} dim {export['dim']})",
        f"- encoder: {export['encoder']} hash `{export['encoder_hash']}`",
        f"- dataset: {dataset['kind']} hash `{dataset['hash']}` ({dataset['train_videos']} train / "
        f"{dataset['test_videos']} test videos, {dataset['frames']} frames at {dataset['size']} px)",
        f"- readout steps: {summary['readout_steps']}; wall time {summary['wall_seconds']:.0f} s",
        "",
    ]
    return "\n".join(lines)


def _future_markdown(future: dict[str, Any] | None) -> list[str]:
    """The --videos result: held-out future-feature L1 of the export against copy-last, per offset."""
    if future is None:
        return []
    dataset = future["dataset"]
    lines = [
        f"## Future-feature prediction on real video ({len(dataset['videos'])} videos in `{dataset['dir']}`)",
        "",
        "| offset | L1 | copy-last L1 | gain vs copy-last |",
        "|---:|---:|---:|---:|",
    ]
    for r in future["results"]:
        lines.append(f"| {r['offset']} | {r['l1']:.4f} | {r['copy_last_l1']:.4f} | {100 * r['gain']:+.1f}% |")
    return [*lines, *skipped_lines(dataset.get("skipped", [])), ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.suite", description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated subset of the procedural tasks")
    parser.add_argument("--videos", type=Path, default=None, help="folder of real videos for the future-feature eval")
    parser.add_argument(
        "--seeds", type=int, default=3, help="readout seeds per task and variant (seed, seed+1, ...); mean ± sd"
    )
    args = parser.parse_args(argv)
    args.tasks = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in args.tasks if t not in TASKS]
    if unknown:
        parser.error(f"unknown tasks {unknown}; known: {', '.join(TASKS)}")
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    setup_logging(args.verbose)
    try:
        run_suite(args)
    except (EncoderMismatchError, FileNotFoundError, ValueError, VideoDecodeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
