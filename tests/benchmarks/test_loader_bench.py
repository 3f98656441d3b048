"""The loader benchmark runs and reports a ratio against its own raw-decode baseline (no timing asserted)."""

from __future__ import annotations

import re

import pytest

from benchmarks.loader import main


def test_loader_benchmark_prints_ratio_rows(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--quick", "--workers", "0", "--sizes", "32", "--no-build"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if re.match(r"\| 0 \| 32 \|", line)]
    assert len(rows) == 1
    ratio = float(rows[0].rstrip(" |").split("|")[-1].strip().rstrip("x"))
    assert ratio > 0
