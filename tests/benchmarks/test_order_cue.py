"""benchmarks.order_cue: the flash's patches, and a tiny end-to-end run of the record."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from benchmarks.order_cue import main, object_patches
from tests.eval.conftest import eval_cache, tiny_export  # noqa: F401


def test_object_patches_keep_the_patches_the_mask_covers_enough() -> None:
    mask_HW = np.zeros((8, 8), bool)
    mask_HW[0:4, 0:4] = True  # all of patch 0 (4 x 4 patches on a 2 x 2 grid)
    mask_HW[4:5, 4:8] = True  # a quarter of patch 3: below COVERED
    assert object_patches(mask_HW, 2).tolist() == [True, False, False, False]
    mask_HW[5:6, 4:8] = True  # half of patch 3
    assert object_patches(mask_HW, 2).tolist() == [True, False, False, True]


def test_order_cue_writes_contrast_shape_and_control_per_token_kind(
    tiny_export: Path,  # noqa: F811
    eval_cache: Path,  # noqa: F811
    tmp_path: Path,
    capsys,
) -> None:
    out = tmp_path / "cue.json"
    args = ["--export", str(tiny_export), "--cache-dir", str(eval_cache), "--out", str(out), "--steps", "2,3"]
    args += ["--seeds", "2", "--budgets", "2,20", "--test-videos", "10", "--frames", "6", "--size", "32"]
    assert main(args) == 0
    record = json.loads(out.read_text())
    assert set(record["features"]) == {"encoder", "adapter"}
    for kind in record["features"].values():
        assert kind["flashes"] > 0 and kind["contrast_median"] > 0
        for where in ("shape_before", "shape_at"):
            r = kind[where]
            assert 0 <= r["ci95"][0] <= r["accuracy"] <= r["ci95"][1] <= 1 and 0.5 <= r["majority"] <= 1
    assert [c["steps"] for c in record["control"]] == [2, 3]
    assert all(len(c["top1"]) == 2 and c["labels"] == 20 for c in record["control"])
    assert "| all-frames control, all labels |" in capsys.readouterr().out
