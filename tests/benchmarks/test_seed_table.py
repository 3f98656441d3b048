"""The seed table reads what benchmarks/pretrain_seeds.sh writes, summarizes settings over seeds, and refuses
controls measured on another dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import seed_table


def _row(task: str, variant: str, budget: int, mean: float) -> dict:
    return {"task": task, "variant": variant, "budget": budget, "mean": mean, "ci95_low": mean - 0.1,
            "ci95_high": mean + 0.1}  # fmt: skip


def _report(path: Path, rows: list[dict], dataset_hash: str = "abc", draw: str | None = None) -> None:
    path.mkdir(parents=True)
    report = {"rows": rows, "dataset_hash": dataset_hash}
    if draw is not None:
        report["config"] = {"labelled_draw": draw}
    (path / "efficiency.json").write_text(json.dumps(report))


def test_rows_per_export_and_a_summary_per_setting(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for seed, speed in ((0, 0.7), (1, 0.9)):
        _report(tmp_path / f"seed-plain-s{seed}-eff", [_row("classify_speed", "pretrained", 8, speed)])
    _report(tmp_path / "seed-change1-s0-eff", [_row("classify_speed", "pretrained", 8, 0.85)])
    _report(tmp_path / "seed-odd-eff", [_row("classify_speed", "pretrained", 8, 0.1)])  # not an export's report
    _report(
        tmp_path / "controls", [_row("classify_speed", "scratch", 8, 0.6), _row("classify_speed", "random", 8, 0.5)]
    )

    assert seed_table.main(["--runs", str(tmp_path), "--controls", str(tmp_path / "controls")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len({line.count("|") for line in lines}) == 1  # every row has every column
    speed8 = 1 + 2 * 1 + 1  # export column, then direction N=8 / 32, then speed N=8
    cells = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in lines[2:]}
    assert set(cells) == {"seed-change1-s0-eff", "seed-plain-s0-eff", "seed-plain-s1-eff", "**change1**, over seeds",
                          "**plain**, over seeds", "scratch (controls)"}  # fmt: skip
    assert cells["seed-plain-s1-eff"][speed8 - 1] == "0.900 [0.80, 1.00]"
    assert cells["**plain**, over seeds"][speed8 - 1] == "0.800 (0.700-0.900, n=2)"
    assert cells["**change1**, over seeds"][1] == "-"  # direction was not run
    assert cells["scratch (controls)"][speed8 - 1] == "0.600 [0.50, 0.70]"


def test_controls_of_another_dataset_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _report(tmp_path / "seed-plain-s0-eff", [_row("classify_speed", "pretrained", 8, 0.7)], dataset_hash="abc")
    _report(tmp_path / "controls", [_row("classify_speed", "scratch", 8, 0.6)], dataset_hash="other")
    assert seed_table.main(["--runs", str(tmp_path), "--controls", str(tmp_path / "controls")]) == 2
    assert "dataset hash other" in capsys.readouterr().err


def test_controls_of_another_labelled_draw_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _report(tmp_path / "seed-plain-s0-eff", [_row("classify_speed", "pretrained", 8, 0.7)])  # older: uniform
    _report(tmp_path / "uniform", [_row("classify_speed", "scratch", 8, 0.6)], draw="uniform")
    _report(tmp_path / "balanced", [_row("classify_speed", "scratch", 8, 0.6)], draw="balanced")
    assert seed_table.main(["--runs", str(tmp_path), "--controls", str(tmp_path / "uniform")]) == 0
    capsys.readouterr()
    assert seed_table.main(["--runs", str(tmp_path), "--controls", str(tmp_path / "balanced")]) == 2
    assert "balanced" in capsys.readouterr().err


def test_no_reports_is_an_error_naming_the_script(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert seed_table.main(["--runs", str(tmp_path)]) == 2
    assert "benchmarks/pretrain_seeds.sh" in capsys.readouterr().err
