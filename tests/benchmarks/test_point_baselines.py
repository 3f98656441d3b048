"""The feature-free point trackers bracket what AJ can read: standing still below knowing the patch."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from benchmarks.point_baselines import baselines, main


def test_patch_centres_are_within_half_a_patch_of_the_tracks() -> None:
    tracks_VQT2 = torch.rand(3, 4, 5, 2)
    targets = {"queries": tracks_VQT2[:, :, 0], "tracks": tracks_VQT2, "visible": torch.ones(3, 4, 5, dtype=torch.bool)}
    out = baselines(targets, grid=8)
    assert ((out["patch-centres"]["positions"] - tracks_VQT2).abs() <= 0.5 / 8 + 1e-6).all()
    assert torch.equal(out["stand-still"]["positions"][:, :, 3], tracks_VQT2[:, :, 0])


def test_cli_orders_the_baselines(tmp_path: Path, capsys) -> None:
    assert main(["--test-videos", "10", "--points", "4", "--out", str(tmp_path / "b.json")]) == 0
    results = json.loads((tmp_path / "b.json").read_text())
    assert results["exact"]["aj"] == 1.0
    assert results["stand-still"]["aj"] < results["patch-centres"]["aj"] < 1.0
    assert "stand-still" in capsys.readouterr().out


def test_cli_names_a_bad_size(capsys) -> None:
    assert main(["--test-videos", "3"]) == 2
    assert "test_videos must be >= 10" in capsys.readouterr().err
