"""The inference benchmark runs on an export (given, or trained for one step) and prints its three ratios."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from benchmarks.infer import main
from tests.conftest import tiny_overrides
from tests.eval.conftest import tiny_export  # noqa: F401  (a fixture, registered by being imported here)


def _ratios(out: str) -> dict[str, float]:
    return {m[1]: float(m[2]) for m in re.finditer(r"^(\S+ / \S+)\s+= ([0-9.]+)", out, re.M)}


def test_infer_benchmark_on_an_export(tiny_export: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    assert main(["--export", str(tiny_export), "--frames", "4", "--reps", "1", "--device", "cpu"]) == 0
    ratios = _ratios(capsys.readouterr().out)
    assert set(ratios) == {"stream / encoder", "step / encoder-1", "cli / encoder"}
    assert all(r > 0 for r in ratios.values())


def test_infer_benchmark_makes_its_own_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    overrides = [o for o in tiny_overrides(tmp_path) if not o.startswith(("--run.out_dir", "--train.steps"))]
    assert main(["--make-export", "tiny-cpu", "--frames", "3", "--reps", "1", "--device", "cpu", "--", *overrides]) == 0
    out = capsys.readouterr().out
    assert "core d=32" in out and len(_ratios(out)) == 3


def test_infer_benchmark_without_an_export_is_one_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--export", str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err.startswith("error: no export")
