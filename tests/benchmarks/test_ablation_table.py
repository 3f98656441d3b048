"""The ablation table reads what benchmarks/pretrain_ablations.sh writes and shows missing parts as '-'."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import ablation_table


def _write(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


def _row(task: str, variant: str, budget: int, mean: float) -> dict:
    return {"task": task, "variant": variant, "budget": budget, "mean": mean, "ci95_low": mean - 0.1,
            "ci95_high": mean + 0.1}  # fmt: skip


def test_table_of_one_full_and_one_partial_ablation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    heldout = [{"offset": 1, "model_l1": 0.8, "copy_last_l1": 1.0}, {"offset": 2, "model_l1": 1.1, "copy_last_l1": 1.0}]
    _write(tmp_path / "abl-base" / "export" / "config.json", {"heldout": heldout})
    rows = [_row("classification", "pretrained", 8, 0.5), _row("classification", "random", 8, 0.25)]
    _write(tmp_path / "abl-eff-base" / "efficiency.json", {"rows": rows})
    _write(tmp_path / "abl-vel-base.json", {"results": {"pretrained": {"objects": {"r2": 0.57, "ci95": [0.5, 0.6]}}}})
    (tmp_path / "abl-bare" / "export").mkdir(parents=True)

    assert ablation_table.main(["--runs", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and lines[0].count("|") == lines[2].count("|") == lines[3].count("|")
    base = next(line for line in lines if line.startswith("| base"))
    assert "+20 / -10 %" in base  # 1 - 0.8/1.0 and 1 - 1.1/1.0
    assert "0.50 [0.40, 0.60] (0.25)" in base and "0.57 [0.50, 0.60]" in base
    bare = next(line for line in lines if line.startswith("| bare"))
    assert set(bare.strip("| ").split(" | ")[1:]) == {"-"}


def test_no_ablations_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert ablation_table.main(["--runs", str(tmp_path)]) == 2
    assert "no runs/abl-NAME/export" in capsys.readouterr().err
