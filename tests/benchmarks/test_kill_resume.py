"""kill -9 harness: 5 SIGKILLs at random points of a tiny training run, then the run ends as if never killed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.kill_resume import main


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_export(tmp_path: Path) -> None:
    out = tmp_path / "kill_resume"
    rc = main(["--kills", "5", "--out", str(out), "--seed", "0", "--steps", "6"])
    summary = json.loads((out / "kill_resume.json").read_text())
    failed = [s for s in summary["start_log"] if not s["killed"] and s["returncode"] != 0]
    assert summary["failed_resumes"] == 0, [(s["index"], s["returncode"], s["tail"]) for s in failed]
    assert summary["kills"] >= 3
    assert summary["resumes"] >= summary["kills"]
    assert summary["final_start_returncode"] == 0
    export = summary["export"]
    assert export["identical"], export
    assert export["tensors"] > 0 and export["step"] == export["reference_step"] == 6
    assert summary["checkpoints"] and not [c for c in summary["checkpoints"] if c["error"]]
    assert summary["checkpoint_dir_leftovers"] == []
    assert summary["export_side_leftovers"] == []
    assert summary["other_temporaries"] == []
    assert rc == 0
