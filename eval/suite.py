"""Every procedural task x {pretrained, identity, random}: one comparison table, reports, a bar chart.

    python -m eval.suite --export runs/tiny-cpu/export [--out runs/eval] [--seed 0] [--steps 150]
        [--tasks classification,depth] [--videos VIDEO_DIR] [--no-mlflow]

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
import logging
import sys
import time
from pathlib import Path
from typing import Any

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
    """Markdown: one row per (task, metric), one column per variant, and whether pretrained beats identity."""
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
            values = {v: variants[v]["metrics"][metric] for v in VARIANTS if v in variants}
            cells = [format_metric(values[v]) if v in values else "-" for v in VARIANTS]
            if metric in _UNRANKED:
                arrow, verdict = "", ""
            else:
                higher = metric not in _LOWER_IS_BETTER
                arrow, verdict = ("↑" if higher else "↓"), _verdict(values, higher)
            lines.append(f"| {task} | {metric} {arrow} | {' | '.join(cells)} | {verdict} |")
    return "\n".join(lines)


# Counts describe the test set, not a model; every other metric is ranked in its own direction.
_UNRANKED = frozenset({"scored_boxes"})
_LOWER_IS_BETTER = frozenset({"abs_rel", "rpe_trans", "rpe_rot_deg"})


def _verdict(values: dict[str, float], higher_is_better: bool) -> str:
    if "pretrained" not in values or "identity" not in values:
        return ""
    diff = values["pretrained"] - values["identity"]
    if diff == 0:
        return "tie"
    return f"{'better' if (diff > 0) == higher_is_better else 'worse'} ({diff:+.4f})"


def bar_chart(records: list[dict[str, Any]], path: Path) -> Path:
    """One panel per task: its primary metric for each variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in records))
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3.2), squeeze=False)
    colors = {"pretrained": "tab:blue", "identity": "tab:gray", "random": "tab:orange"}
    for ax, task in zip(axes[0], tasks, strict=True):
        rows = {r["variant"]: r for r in records if r["task"] == task}
        variants = [v for v in VARIANTS if v in rows]
        primary = rows[variants[0]]["primary"]
        values = [rows[v]["metrics"][primary] for v in variants]
        ax.bar(variants, values, color=[colors[v] for v in variants])
        arrow = "higher" if rows[variants[0]]["higher_is_better"] else "lower"
        ax.set_title(f"{task}\n{primary} ({arrow} is better)", fontsize=9)
        ax.tick_params(axis="x", labelsize=8, rotation=20)
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
    for task in args.tasks:
        for variant in VARIANTS:
            record = evaluate_task(task, variant, export, clips, settings, cache)
            records.append(record)
            print(f"{task:>15} {variant:>10}: {record['metrics']}", flush=True)
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
        metrics = {f"{r['task']}.{r['variant']}.{k}": v for r in records for k, v in r["metrics"].items()}
        params = {k: summary[k] for k in ("export", "dataset", "probe", "protocol", "seed", "readout_steps")}
        print(f"logged to {log_to_mlflow(args.out, 'suite', params, metrics, artifacts)}")
    return summary


def write_suite_report(summary: dict[str, Any], out_dir: Path) -> list[Path]:
    """Publish OUT/suite whole: per-task reports, report.md, report.json, bars.png; returns the last three."""
    with output_dir(out_dir, is_ours=is_suite_report, what="eval suite report") as tmp:
        for record in summary["records"]:
            write_report_files(record, task_markdown(record), tmp / record["task"] / record["variant"])
        write_text_atomic(tmp / "report.md", _summary_markdown(summary))
        write_json(summary, tmp / "report.json")
        bar_chart(summary["records"], tmp / "bars.png")
    return [out_dir / "report.md", out_dir / "report.json", out_dir / "bars.png"]


def _summary_markdown(summary: dict[str, Any]) -> str:
    export, dataset = summary["export"], summary["dataset"]
    return "\n".join(
        [
            f"# Eval suite: {summary['probe']} probe, {summary['protocol']} protocol, seed {summary['seed']}",
            "",
            summary["table"],
            "",
            f"- export: `{export['dir']}` sha256 `{export['sha256']}` (step {export['step']}, "
            f"{export['core_kind']} dim {export['dim']})",
            f"- encoder: {export['encoder']} hash `{export['encoder_hash']}`",
            f"- dataset: {dataset['kind']} hash `{dataset['hash']}` ({dataset['train_videos']} train / "
            f"{dataset['test_videos']} test videos, {dataset['frames']} frames at {dataset['size']} px)",
            f"- readout steps: {summary['readout_steps']}; wall time {summary['wall_seconds']:.0f} s",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.suite", description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated subset of the procedural tasks")
    parser.add_argument("--videos", type=Path, default=None, help="folder of real videos for the future-feature eval")
    args = parser.parse_args(argv)
    args.tasks = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in args.tasks if t not in TASKS]
    if unknown:
        parser.error(f"unknown tasks {unknown}; known: {', '.join(TASKS)}")
    setup_logging(args.verbose)
    try:
        run_suite(args)
    except (EncoderMismatchError, FileNotFoundError, ValueError, VideoDecodeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
