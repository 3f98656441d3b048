"""One table of the pre-training ablations that `benchmarks/pretrain_ablations.sh` ran.

    python -m benchmarks.ablation_table [--runs runs] [--names base,vis0,...]

Per ablation NAME it reads what the script wrote: the export's held-out
future prediction (``runs/abl-NAME/export/config.json``), the frozen probes of
direction and speed (``runs/abl-eff-NAME/efficiency.json``) and the motion
probe (``runs/abl-vel-NAME.json``), and prints a markdown table: the gain over
copy-last per offset, then per task and budget the pretrained probe's top-1
with its 95% interval and the same-architecture random core beside it, then
R² of the object-velocity probe from the core's last state.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TASK_LABELS = {"classification": "direction", "classify_speed": "speed"}


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def heldout_gains(config: dict[str, Any]) -> str:
    """Held-out gain over copy-last per offset, e.g. '+12 / +20 / +24 %'."""
    future = [r for r in config.get("heldout", []) if r["offset"] > 0]
    gains = [100 * (1 - r["model_l1"] / r["copy_last_l1"]) for r in future]
    return " / ".join(f"{g:+.0f}" for g in gains) + " %" if gains else "-"


def probe_cell(rows: list[dict[str, Any]], task: str, budget: int) -> str:
    """'pretrained mean [low, high] (random mean)' of one task and budget, streaming reading."""
    at = {r["variant"]: r for r in rows if r["task"] == task and r["budget"] == budget}
    if "pretrained" not in at:
        return "-"
    ours = at["pretrained"]
    cell = f"{ours['mean']:.2f} [{ours['ci95_low']:.2f}, {ours['ci95_high']:.2f}]"
    return cell + (f" ({at['random']['mean']:.2f})" if "random" in at else "")


def ablation_row(runs: Path, name: str, budgets: Sequence[int]) -> list[str]:
    config = _load(runs / f"abl-{name}" / "export" / "config.json") or {}
    record = _load(runs / f"abl-eff-{name}" / "efficiency.json") or {"rows": []}
    velocity = _load(runs / f"abl-vel-{name}.json")
    cells = [name, heldout_gains(config)]
    cells += [probe_cell(record["rows"], task, b) for task in TASK_LABELS for b in budgets]
    if velocity and "pretrained" in velocity["results"]:
        objects = velocity["results"]["pretrained"]["objects"]
        cells.append(f"{objects['r2']:.2f} [{objects['ci95'][0]:.2f}, {objects['ci95'][1]:.2f}]")
    else:
        cells.append("-")
    return cells


def table(runs: Path, names: Sequence[str], budgets: Sequence[int] = (8, 32)) -> str:
    head = ["ablation", "held-out gain vs copy-last (offsets 1/2/4)"]
    head += [f"{TASK_LABELS[t]} N={b}: pretrained (random)" for t in TASK_LABELS for b in budgets]
    head.append("velocity R² (objects)")
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    lines += ["| " + " | ".join(ablation_row(runs, name, budgets)) + " |" for name in names]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ablation_table", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs"))
    parser.add_argument("--names", default=None, help="comma-separated (default: every runs/abl-NAME found)")
    args = parser.parse_args(argv)
    if args.names:
        names = args.names.split(",")
    else:
        names = sorted(p.name.removeprefix("abl-") for p in args.runs.glob("abl-*") if (p / "export").is_dir())
    if not names:
        print(f"error: no runs/abl-NAME/export under {args.runs}", file=sys.stderr)
        return 2
    print(table(args.runs, names), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
