"""Each standard-format reader on tiny fixture files written in that format."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eval.formats import (
    read_kinetics_csv,
    read_mot_boxes,
    read_nuscenes_poses,
    read_scannet_scene,
    read_ssv2,
    read_tapvid,
)


def test_ssv2(tmp_path: Path) -> None:
    (tmp_path / "labels.json").write_text(json.dumps({"Moving something up": "0", "Pushing something left": "1"}))
    annotations = [
        {"id": "17", "template": "Pushing [something] left", "placeholders": ["cup"]},
        {"id": "4", "template": "Moving [something] up", "placeholders": ["pen"]},
    ]
    (tmp_path / "train.json").write_text(json.dumps(annotations))
    samples = read_ssv2(tmp_path / "train.json", tmp_path / "labels.json", tmp_path / "videos")
    assert [(s.path.name, s.label) for s in samples] == [("17.webm", 1), ("4.webm", 0)]
    (tmp_path / "bad.json").write_text(json.dumps([{"id": "9", "template": "Juggling [something]"}]))
    with pytest.raises(ValueError, match="Juggling"):
        read_ssv2(tmp_path / "bad.json", tmp_path / "labels.json", tmp_path)


def test_kinetics_csv(tmp_path: Path) -> None:
    csv_path = tmp_path / "val.csv"
    csv_path.write_text(
        "label,youtube_id,time_start,time_end,split\n"
        "riding a bike,abc,10,20,val\n"
        "abseiling,xyz,0,10,val\n"
        "riding a bike,def,5,15,train\n"
    )
    samples = read_kinetics_csv(csv_path, tmp_path, split="val")
    assert [(s.path.name, s.label, s.label_name) for s in samples] == [
        ("abc_000010_000020.mp4", 1, "riding a bike"),
        ("xyz_000000_000010.mp4", 0, "abseiling"),
    ]


def test_tapvid_pickle_and_npz(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    record = {
        "video": rng.integers(0, 255, (3, 8, 8, 3), dtype=np.uint8),
        "points": rng.random((2, 3, 2)).astype(np.float32),
        "occluded": np.array([[False, True, False], [False, False, False]]),
    }
    with open(tmp_path / "davis.pkl", "wb") as f:
        pickle.dump({"bear": record}, f)
    np.savez(tmp_path / "one.npz", **record)
    for path in (tmp_path / "davis.pkl", tmp_path / "one.npz"):
        (video,) = read_tapvid(path)
        np.testing.assert_array_equal(video.visible_QT, ~record["occluded"])
        np.testing.assert_allclose(video.tracks_QT2, record["points"])
    with open(tmp_path / "bad.pkl", "wb") as f:
        pickle.dump({"bear": {"video": record["video"]}}, f)
    with pytest.raises(ValueError, match="points"):
        read_tapvid(tmp_path / "bad.pkl")


def test_scannet_scene(tmp_path: Path) -> None:
    scene = tmp_path / "scene0000_00"
    (scene / "color").mkdir(parents=True)
    (scene / "depth").mkdir()
    for i in (0, 1, 10):
        Image.fromarray(np.full((4, 6, 3), 10 * i, np.uint8)).save(scene / "color" / f"{i}.jpg")
        Image.fromarray(np.full((4, 6), 1000 + i, np.uint16)).save(scene / "depth" / f"{i}.png")
    frames = read_scannet_scene(scene)
    assert [p.stem for p in frames.color_paths] == ["0", "1", "10"]
    assert frames.depth_m(2)[0, 0] == pytest.approx(1.010)
    assert frames.color(1).shape == (4, 6, 3)
    (scene / "color" / "11.jpg").write_bytes((scene / "color" / "10.jpg").read_bytes())
    with pytest.raises(ValueError, match="11"):
        read_scannet_scene(scene)


def test_mot_boxes(tmp_path: Path) -> None:
    gt = tmp_path / "gt.txt"
    gt.write_text("1,7,10,20,5,5,1,1,1.0\n2,7,12,20,5,5,1,1,1.0\n2,8,0,0,3,4,1,1,0.5\n")
    tracks = read_mot_boxes(gt, num_frames=3)
    np.testing.assert_allclose(tracks[7][:2], [[10, 20, 15, 25], [12, 20, 17, 25]])
    assert np.isnan(tracks[7][2]).all() and np.isnan(tracks[8][0]).all()
    np.testing.assert_allclose(tracks[8][1], [0, 0, 3, 4])


def test_nuscenes_relative_poses(tmp_path: Path) -> None:
    # Drive 1 m forward (x), turn 90 degrees left about z, drive 1 m along the new heading (world y).
    half = np.sqrt(0.5)
    poses = [
        {"timestamp": 2, "translation": [1, 0, 0], "rotation": [half, 0, 0, half]},
        {"timestamp": 1, "translation": [0, 0, 0], "rotation": [1, 0, 0, 0]},
        {"timestamp": 3, "translation": [1, 1, 0], "rotation": [half, 0, 0, half]},
    ]
    (tmp_path / "ego_pose.json").write_text(json.dumps(poses))
    relative = read_nuscenes_poses(tmp_path / "ego_pose.json")
    np.testing.assert_allclose(relative.translation_S3, [[1, 0, 0], [1, 0, 0]], atol=1e-6)
    np.testing.assert_allclose(relative.rotation_deg_S, [90, 0], atol=1e-4)
