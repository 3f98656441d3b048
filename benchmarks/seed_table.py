"""One table of `benchmarks/pretrain_seeds.sh`: frozen probes per export, and per setting over pre-training seeds.

    python -m benchmarks.seed_table [--runs runs] [--controls runs/eff-controls]

Per export ``runs/seed-NAME-sSEED`` it reads ``runs/seed-NAME-sSEED-eff/efficiency.json`` and prints a
markdown row: per task and budget the pretrained probe's mean with its 95% interval (over readout
seeds and test clips). Then one row per NAME: the mean over its pre-training seeds and their range,
the spread a reader must compare a difference between settings against. ``--controls`` adds the
rows of another report's variants (e.g. scratch and identity from a run with the same readout seeds
and dataset); a report of another dataset or labelled draw is refused, since its rows would not line up.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from eval.efficiency import labelled_draw_of

COLUMNS: tuple[tuple[str, str], ...] = (
    ("classification", "direction"),
    ("classify_speed", "speed"),
    ("classify_order", "order"),
    ("point_tracking", "point AJ"),
    ("box_tracking", "box mIoU"),
)
BUDGETS: tuple[int, ...] = (8, 32)
EXPORT_RE = re.compile(r"^seed-(?P<name>.+)-s(?P<seed>\d+)-eff$")


def cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "-"
    digits = 3 if abs(row["mean"]) < 0.1 else 2  # AJ lives near 0.02: two decimals would hide its interval
    return f"{row['mean']:.3f} [{row['ci95_low']:.{digits}f}, {row['ci95_high']:.{digits}f}]"


def rows_of(report: dict[str, Any], variant: str) -> dict[tuple[str, int], dict[str, Any]]:
    return {(r["task"], r["budget"]): r for r in report["rows"] if r["variant"] == variant}


def seed_summary(means: Sequence[float]) -> str:
    """'mean (min-max, n=K)' of one setting's pre-training seeds."""
    if not means:
        return "-"
    avg = sum(means) / len(means)
    return f"{avg:.3f} ({min(means):.3f}-{max(means):.3f}, n={len(means)})"


def header() -> list[str]:
    cols = [f"{label} N={b}" for _, label in COLUMNS for b in BUDGETS]
    return ["| export | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]


def row_line(label: str, at: dict[tuple[str, int], dict[str, Any]]) -> str:
    return f"| {label} | " + " | ".join(cell(at.get((t, b))) for t, _ in COLUMNS for b in BUDGETS) + " |"


def table(reports: dict[str, dict[str, Any]], controls: dict[str, Any] | None = None) -> str:
    """Markdown: one row per export, one per setting over its seeds, then the control variants."""
    lines = header()
    by_setting: dict[str, list[dict[tuple[str, int], dict[str, Any]]]] = defaultdict(list)
    for tag in sorted(reports):
        at = rows_of(reports[tag], "pretrained")
        by_setting[EXPORT_RE.match(tag)["name"]].append(at)
        lines.append(row_line(tag, at))
    for name, seeds in by_setting.items():
        cells = []
        for t, _ in COLUMNS:
            for b in BUDGETS:
                cells.append(seed_summary([s[(t, b)]["mean"] for s in seeds if (t, b) in s]))
        lines.append(f"| **{name}**, over seeds | " + " | ".join(cells) + " |")
    if controls is not None:
        for variant in ("scratch", "identity"):
            at = rows_of(controls, variant)
            if at:
                lines.append(row_line(f"{variant} (controls)", at))
    return "\n".join(lines)


def draw_key(report: dict[str, Any]) -> tuple[str, str]:
    """What decides which labelled clips each seed drew: rows of two reports line up only if it matches."""
    return report["dataset_hash"], labelled_draw_of(report)


def describe_draw(key: tuple[str, str]) -> str:
    return f"dataset hash {key[0]} ({key[1]} labelled draw)"


def load_reports(runs: Path) -> dict[str, dict[str, Any]]:
    reports = {}
    for path in sorted(runs.glob("seed-*-s*-eff/efficiency.json")):
        if EXPORT_RE.match(path.parent.name):
            reports[path.parent.name] = json.loads(path.read_text())
    return reports


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs"))
    parser.add_argument("--controls", type=Path, default=None, help="an efficiency report directory")
    args = parser.parse_args(argv)
    reports = load_reports(args.runs)
    if not reports:
        print(
            f"error: no {args.runs}/seed-*-sN-eff/efficiency.json; run bash benchmarks/pretrain_seeds.sh",
            file=sys.stderr,
        )
        return 2
    controls = None
    if args.controls is not None:
        path = args.controls / "efficiency.json"
        try:
            controls = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            print(f"error: cannot read {path}: {err}", file=sys.stderr)
            return 2
        draws = {draw_key(r) for r in reports.values()}
        if draws != {draw_key(controls)}:
            print(
                f"error: {path} has {describe_draw(draw_key(controls))}, the exports' reports "
                f"{', '.join(describe_draw(d) for d in sorted(draws))}: run the controls with the same --seeds, "
                "--budgets, --labelled-draw and test set",
                file=sys.stderr,
            )
            return 2
    print(table(reports, controls))
    return 0


if __name__ == "__main__":
    sys.exit(main())
