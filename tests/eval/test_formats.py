"""Each standard-format reader on tiny fixture files written in that format, and each as eval.run --data.

The writers below produce the fixtures; the end-to-end tests give them frames
(webm/mp4 videos, jpg images) and run them through a tiny export.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_shards import generate_video
from eval.datasets import FORMAT_TASKS, load_format
from eval.features import load_checked_encoder, read_export
from eval.formats import (
    read_kinetics_csv,
    read_mot_boxes,
    read_nuscenes_poses,
    read_scannet_scene,
    read_ssv2,
    read_tapvid,
)


def _frames(seed: int, frames: int = 4, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (frames, size, size, 3), dtype=np.uint8)


def _write_webm(path: Path, frames_THWC: np.ndarray) -> None:
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libvpx", rate=8)
        stream.width, stream.height = frames_THWC.shape[2], frames_THWC.shape[1]
        stream.pix_fmt = "yuv420p"
        for frame in frames_THWC:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def write_ssv2(root: Path, videos: bool = False) -> None:
    """labels.json, train.json (2 videos), validation.json (1 video) and, with videos, videos/<id>.webm."""
    (root / "labels.json").write_text(json.dumps({"Moving something up": "0", "Pushing something left": "1"}))
    annotations = [
        {"id": "17", "template": "Pushing [something] left", "placeholders": ["cup"]},
        {"id": "4", "template": "Moving [something] up", "placeholders": ["pen"]},
    ]
    (root / "train.json").write_text(json.dumps(annotations))
    (root / "validation.json").write_text(json.dumps([{"id": "5", "template": "Moving [something] up"}]))
    if videos:
        for seed, video_id in enumerate(("17", "4", "5")):
            _write_webm(root / "videos" / f"{video_id}.webm", _frames(seed))


def test_ssv2(tmp_path: Path) -> None:
    write_ssv2(tmp_path)
    samples = read_ssv2(tmp_path / "train.json", tmp_path / "labels.json", tmp_path / "videos")
    assert [(s.path.name, s.label) for s in samples] == [("17.webm", 1), ("4.webm", 0)]
    (tmp_path / "bad.json").write_text(json.dumps([{"id": "9", "template": "Juggling [something]"}]))
    with pytest.raises(ValueError, match="Juggling"):
        read_ssv2(tmp_path / "bad.json", tmp_path / "labels.json", tmp_path)


def write_kinetics(root: Path, videos: bool = False) -> Path:
    """A CSV of 2 val and 1 train clip and, with videos, the procedural mp4 of each beside it."""
    csv_path = root / "val.csv"
    csv_path.write_text(
        "label,youtube_id,time_start,time_end,split\n"
        "riding a bike,abc,10,20,val\n"
        "abseiling,xyz,0,10,val\n"
        "riding a bike,def,5,15,train\n"
    )
    if videos:
        for seed, name in enumerate(("abc_000010_000020", "xyz_000000_000010", "def_000005_000015")):
            generate_video(root / f"{name}.mp4", seed=seed, frames=4, size=(32, 32))
    return csv_path


def test_kinetics_csv(tmp_path: Path) -> None:
    csv_path = write_kinetics(tmp_path)
    samples = read_kinetics_csv(csv_path, tmp_path, split="val")
    assert [(s.path.name, s.label, s.label_name) for s in samples] == [
        ("abc_000010_000020.mp4", 1, "riding a bike"),
        ("xyz_000000_000010.mp4", 0, "abseiling"),
    ]


def tapvid_record(frames: int = 3, size: int = 8, points: int = 2) -> dict[str, np.ndarray]:
    """One TAP-Vid video; point 0 is occluded on frame 1, the others always visible."""
    rng = np.random.default_rng(0)
    occluded = np.zeros((points, frames), bool)
    occluded[0, 1] = True
    return {
        "video": rng.integers(0, 255, (frames, size, size, 3), dtype=np.uint8),
        "points": rng.random((points, frames, 2)).astype(np.float32),
        "occluded": occluded,
    }


def test_tapvid_pickle_and_npz(tmp_path: Path) -> None:
    record = tapvid_record()
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


def write_scannet_scene(scene: Path, indices: tuple[int, ...] = (0, 1, 10), size: tuple[int, int] = (4, 6)) -> None:
    """color/<i>.jpg (grey level 10 i) and depth/<i>.png (1000 + i mm) per frame index."""
    (scene / "color").mkdir(parents=True)
    (scene / "depth").mkdir()
    for i in indices:
        Image.fromarray(np.full((*size, 3), 10 * i, np.uint8)).save(scene / "color" / f"{i}.jpg")
        Image.fromarray(np.full(size, 1000 + i, np.uint16)).save(scene / "depth" / f"{i}.png")


def test_scannet_scene(tmp_path: Path) -> None:
    scene = tmp_path / "scene0000_00"
    write_scannet_scene(scene)
    frames = read_scannet_scene(scene)
    assert [p.stem for p in frames.color_paths] == ["0", "1", "10"]
    assert frames.depth_m(2)[0, 0] == pytest.approx(1.010)
    assert frames.color(1).shape == (4, 6, 3)
    (scene / "color" / "11.jpg").write_bytes((scene / "color" / "10.jpg").read_bytes())
    with pytest.raises(ValueError, match="11"):
        read_scannet_scene(scene)


MOT_ROWS = "1,7,10,20,5,5,1,1,1.0\n2,7,12,20,5,5,1,1,1.0\n2,8,0,0,3,4,1,1,0.5\n"


def write_mot_sequence(sequence: Path, frames: int = 4) -> None:
    """MOT layout: img1/000001.jpg ... (32 x 32) and gt/gt.txt (MOT_ROWS, then track 7 on every later frame)."""
    (sequence / "img1").mkdir(parents=True)
    (sequence / "gt").mkdir()
    rows = MOT_ROWS + "".join(f"{t},7,{10 + 2 * t},20,5,5,1,1,1.0\n" for t in range(3, frames + 1))
    rows += "".join(f"{t},8,{t},{t},6,8,1,1,1.0\n" for t in range(3, frames + 1))
    (sequence / "gt" / "gt.txt").write_text(rows)
    for t, frame in enumerate(_frames(3, frames), start=1):
        Image.fromarray(frame).save(sequence / "img1" / f"{t:06d}.jpg")


def test_mot_boxes(tmp_path: Path) -> None:
    gt = tmp_path / "gt.txt"
    gt.write_text(MOT_ROWS)
    tracks = read_mot_boxes(gt, num_frames=3)
    np.testing.assert_allclose(tracks[7][:2], [[10, 20, 15, 25], [12, 20, 17, 25]])
    assert np.isnan(tracks[7][2]).all() and np.isnan(tracks[8][0]).all()
    np.testing.assert_allclose(tracks[8][1], [0, 0, 3, 4])


def write_nuscenes_scene(scene: Path, images: bool = False) -> None:
    """ego_pose.json: drive 1 m forward (x), turn 90 degrees left about z, drive 1 m along the new heading
    (world y), then 1 m more; with images, frames/<timestamp>.jpg for each pose."""
    half = np.sqrt(0.5)
    poses = [
        {"timestamp": 2, "translation": [1, 0, 0], "rotation": [half, 0, 0, half]},
        {"timestamp": 1, "translation": [0, 0, 0], "rotation": [1, 0, 0, 0]},
        {"timestamp": 3, "translation": [1, 1, 0], "rotation": [half, 0, 0, half]},
    ]
    if images:
        poses.append({"timestamp": 4, "translation": [1, 2, 0], "rotation": [half, 0, 0, half]})
        (scene / "frames").mkdir(parents=True)
        for pose, frame in zip(poses, _frames(4, len(poses)), strict=True):
            Image.fromarray(frame).save(scene / "frames" / f"{pose['timestamp']}.jpg")
    scene.mkdir(parents=True, exist_ok=True)
    (scene / "ego_pose.json").write_text(json.dumps(poses))


def test_nuscenes_relative_poses(tmp_path: Path) -> None:
    write_nuscenes_scene(tmp_path)
    relative = read_nuscenes_poses(tmp_path / "ego_pose.json")
    np.testing.assert_allclose(relative.translation_S3, [[1, 0, 0], [1, 0, 0]], atol=1e-6)
    np.testing.assert_allclose(relative.rotation_deg_S, [90, 0], atol=1e-4)


def _write_format(kind: str, root: Path) -> str:
    """Fixture files of one format with frames; returns the --data argument."""
    if kind == "ssv2":
        write_ssv2(root, videos=True)
        return f"ssv2:{root}"
    if kind == "kinetics":
        return f"kinetics:{write_kinetics(root, videos=True)}"
    if kind == "tapvid":
        with open(root / "davis.pkl", "wb") as f:
            pickle.dump({"bear": tapvid_record(frames=8, size=32, points=3)}, f)
        return f"tapvid:{root / 'davis.pkl'}"
    if kind == "scannet":
        write_scannet_scene(root / "scene0000_00", indices=(0, 1, 2, 10), size=(24, 32))
        return f"scannet:{root}"
    if kind == "mot":
        write_mot_sequence(root / "MOT17-02")
        return f"mot:{root}"
    write_nuscenes_scene(root / "scene-0001", images=True)
    return f"nuscenes:{root}"


@pytest.mark.parametrize("kind", list(FORMAT_TASKS))
def test_format_runs_end_to_end(tiny_export: Path, tmp_path: Path, kind: str) -> None:
    from eval.run import main as run_main

    data = _write_format(kind, tmp_path)
    task = FORMAT_TASKS[kind]
    argv = ["--export", str(tiny_export), "--task", task, "--data", data, "--steps=2", "--frames=2"]
    assert run_main([*argv, "--out", str(tmp_path / "out"), "--no-mlflow"]) == 0
    record = json.loads((tmp_path / "out" / task / "pretrained" / "report.json").read_text())
    assert record["dataset"]["kind"] == kind and len(record["dataset"]["hash"]) == 64
    assert record["dataset"]["frames"] == 2 and record["dataset"]["test_videos"] >= 1
    assert np.isfinite(record["metrics"][record["primary"]])


def test_format_targets(tiny_export: Path, tmp_path: Path) -> None:
    """What the readers hand the tasks: the fixtures' labels, tracks, depths, boxes and poses, in task layout."""
    export = read_export(tiny_export)
    encoder = load_checked_encoder(export)
    grid = export.spec.grid_h

    def load(kind: str, frames: int = 2):
        kind_, path = _write_format(kind, tmp_path / kind).split(":", 1)
        return load_format(kind_, Path(path), FORMAT_TASKS[kind], encoder, grid, frames)

    (tmp_path / "ssv2").mkdir()
    ssv2 = load("ssv2")
    # Train (17: "Pushing left" = 1, 4: "Moving up" = 0) first, then validation (5: "Moving up").
    assert ssv2.targets["label"].tolist() == [1, 0, 0] and ssv2.num_train == 2
    assert ssv2.tokens_VTND.shape[:2] == (3, 2) and ssv2.task_overrides == {"classes": 2}
    (tmp_path / "kinetics").mkdir()
    kinetics = load("kinetics")
    assert kinetics.targets["label"].tolist() == [1, 1, 0] and kinetics.num_train == 1
    (tmp_path / "tapvid").mkdir()
    tapvid = load("tapvid", frames=4)
    record = tapvid_record(frames=8, size=32, points=3)
    np.testing.assert_allclose(tapvid.targets["tracks"][1].numpy(), record["points"][:, 4:])
    np.testing.assert_allclose(tapvid.targets["queries"].numpy(), tapvid.targets["tracks"][:, :, 0].numpy())
    assert not tapvid.targets["visible"][0, 0, 1] and tapvid.num_train == 1
    scannet = load("scannet")
    assert scannet.targets["depth"].shape == (2, 2, 4 * grid, 4 * grid)
    assert scannet.targets["depth"][1, 1, 0, 0].item() == pytest.approx(1.010)
    mot = load("mot")
    boxes = mot.targets["boxes"].numpy()
    # Clip 0 (frames 1-2) queries track 7 only (8 starts on frame 2); clip 1 (frames 3-4) both.
    np.testing.assert_allclose(boxes[0, 0, :, 0] * 32, [10, 12])
    assert mot.targets["valid"][0].tolist() == [[True, True], [False, False]]
    assert mot.targets["valid"][1].all()
    nuscenes = load("nuscenes")
    np.testing.assert_allclose(nuscenes.targets["translation"].numpy()[:, 0], [[1, 0], [1, 0]], atol=1e-6)
    np.testing.assert_allclose(nuscenes.targets["rotation"].numpy()[:, 0], [90, 0], atol=1e-4)


def test_mismatched_task_and_format_is_a_clear_error(tiny_export: Path, tmp_path: Path, capsys) -> None:
    from eval.run import main as run_main

    base = ["--export", str(tiny_export), "--out", str(tmp_path), "--no-mlflow"]
    assert run_main([*base, "--task", "depth", "--data", f"ssv2:{tmp_path}"]) == 2
    assert "ssv2" in capsys.readouterr().err
    assert run_main([*base, "--task", "depth", "--data", f"imagenet:{tmp_path}"]) == 2
    assert "KIND:PATH" in capsys.readouterr().err
