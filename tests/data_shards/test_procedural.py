"""Procedural videos: determinism, and ground truth that agrees with the decoded pixels.

Shape legend: T frames, H height, W width, C = 3 colour channels (RGB), O objects.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import av
import numpy as np
import pytest

from data_shards import GroundTruth, decode_video, generate_dataset, generate_video
from data_shards.build import h264_encoder
from data_shards.procedural import BACKGROUND_DEPTH, LABEL_NAMES, ORDER_NAMES, SPEED_NAMES, render_video


@pytest.fixture(scope="module")
def dense_video(tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, GroundTruth]:
    """(decoded frames_THWC, ground truth with dense maps) of one 32-frame 128x128 video."""
    path = tmp_path_factory.mktemp("proc") / "v.mp4"
    truth = generate_video(path, seed=11, dense=True)
    frames_THWC, _ = decode_video(path)
    return frames_THWC, truth


def test_deterministic_given_seed(tmp_path: Path) -> None:
    first = generate_video(tmp_path / "a.mp4", seed=7, dense=True)
    second = generate_video(tmp_path / "b.mp4", seed=7, dense=True)
    other = generate_video(tmp_path / "c.mp4", seed=8)
    assert (tmp_path / "a.mp4").read_bytes() == (tmp_path / "b.mp4").read_bytes()
    assert first.to_json() == second.to_json()
    assert (tmp_path / "a.mp4").read_bytes() != (tmp_path / "c.mp4").read_bytes()
    assert not np.array_equal(first.centers_OT2, other.centers_OT2)


@pytest.mark.parametrize(("size", "frames", "fps"), [((128, 128), 32, 8), ((64, 96), 12, 25), ((96, 64), 5, 30)])
def test_file_decodes_to_the_stated_shape(tmp_path: Path, size: tuple[int, int], frames: int, fps: int) -> None:
    truth = generate_video(tmp_path / "v.mp4", seed=0, frames=frames, size=size, fps=fps)
    frames_THWC, info = decode_video(tmp_path / "v.mp4")
    assert frames_THWC.shape == (frames, *size, 3)
    assert info.fps == pytest.approx(fps)
    assert truth.centers_OT2.shape == (3, frames, 2)
    assert truth.boxes_OT4.shape == (3, frames, 4)
    assert truth.visible_OT.shape == truth.occluded_OT.shape == (3, frames)
    assert truth.camera_T2.shape == (frames, 2)
    assert truth.depth_THW is None and truth.masks_THW is None


def test_generation_is_fast(tmp_path: Path) -> None:
    started = time.perf_counter()
    generate_video(tmp_path / "v.mp4", seed=1, frames=32, size=(128, 128))
    assert time.perf_counter() - started < 0.5


def test_object_pixels_have_the_object_colour(dense_video: tuple[np.ndarray, GroundTruth]) -> None:
    """Where the mask says object o is seen, the decoded pixels carry o's colour (and not another's)."""
    frames_THWC, truth = dense_video
    # Stripes alternate between the colour and 55% of it: the mean lies in between.
    expected_O3 = truth.colors_O3.astype(float) * (1.0 + 0.55) / 2
    checked = 0
    for t in range(truth.num_frames):
        for o in range(truth.num_objects):
            mask_HW = truth.masks_THW[t] == o + 1
            # Skip thin slivers: chroma subsampling blurs colour across edges.
            if mask_HW.sum() < 150:
                continue
            mean_3 = frames_THWC[t][mask_HW].astype(float).mean(axis=0)
            distances_O = np.linalg.norm(expected_O3 - mean_3, axis=1)
            assert distances_O.argmin() == o, (t, o, mean_3, expected_O3)
            assert distances_O[o] < 40, (t, o, distances_O[o])
            checked += 1
    assert checked > truth.num_frames


def test_boxes_and_centers_match_the_masks(dense_video: tuple[np.ndarray, GroundTruth]) -> None:
    _, truth = dense_video
    for t in range(truth.num_frames):
        for o in range(truth.num_objects):
            ys, xs = np.nonzero(truth.masks_THW[t] == o + 1)
            if not truth.visible_OT[o, t] or truth.occluded_OT[o, t]:
                continue
            x0, y0, x1, y1 = truth.boxes_OT4[o, t]
            assert x0 - 0.5 <= xs.min() and xs.max() + 1 <= x1 + 0.5
            assert y0 - 0.5 <= ys.min() and ys.max() + 1 <= y1 + 0.5
            if truth.visible_fraction_OT[o, t] == 1.0:
                # Pixel centres sit at +0.5: the mask centroid is the object centre.
                np.testing.assert_allclose([xs.mean() + 0.5, ys.mean() + 0.5], truth.centers_OT2[o, t], atol=0.6)


def test_visibility_fraction_counts_drawn_pixels(dense_video: tuple[np.ndarray, GroundTruth]) -> None:
    _, truth = dense_video
    drawn_OT = np.stack([(truth.masks_THW == o + 1).sum(axis=(1, 2)) for o in range(truth.num_objects)])
    ex_O, ey_O = truth.extents_O2.T
    area_O = np.where(np.array(truth.shapes) == "disc", np.pi * ex_O**2, 4 * ex_O * ey_O)
    # The fraction is of the pixels the whole shape covers in that frame; the continuous area is within a few %.
    np.testing.assert_allclose(truth.visible_fraction_OT * area_O[:, None], drawn_OT, atol=0.08 * area_O.max())
    assert (truth.visible_fraction_OT <= 1).all()
    np.testing.assert_array_equal(truth.visible_OT, truth.visible_fraction_OT >= 0.5)


def test_occlusion_at_the_meeting_frame(tmp_path: Path) -> None:
    """With occlusions, objects 0 and 1 meet at the middle frame and the farther one is covered."""
    for seed in range(5):
        truth = generate_video(tmp_path / f"o{seed}.mp4", seed=seed, dense=True)
        mid = (truth.num_frames - 1) // 2
        farther = 0 if truth.depths_O[0] > truth.depths_O[1] else 1
        assert truth.occluded_OT[farther, mid]
        assert not truth.occluded_OT[1 - farther, mid]
        np.testing.assert_allclose(truth.centers_OT2[0, mid], truth.centers_OT2[1, mid], atol=2.0)
        # The depth map shows the nearer object at the meeting point.
        x, y = truth.centers_OT2[1 - farther, mid].astype(int)
        if 0 <= x < 128 and 0 <= y < 128:
            assert truth.depth_THW[mid, y, x] == truth.depths_O[1 - farther]


def test_no_occlusions_when_disabled(tmp_path: Path) -> None:
    for seed in range(5):
        truth = generate_video(tmp_path / f"n{seed}.mp4", seed=seed, occlusions=False, num_objects=4, dense=True)
        assert not truth.occluded_OT.any()


def test_objects_leaving_the_frame_are_not_visible(tmp_path: Path) -> None:
    truth = generate_video(tmp_path / "v.mp4", seed=3, frames=64)
    outside_OT = (
        (truth.centers_OT2[..., 0] < -truth.extents_O2[:, None, 0])
        | (truth.centers_OT2[..., 0] > 128 + truth.extents_O2[:, None, 0])
        | (truth.centers_OT2[..., 1] < -truth.extents_O2[:, None, 1])
        | (truth.centers_OT2[..., 1] > 128 + truth.extents_O2[:, None, 1])
    )
    assert outside_OT.any()
    assert not truth.visible_OT[outside_OT].any()
    assert (truth.visible_fraction_OT[outside_OT] == 0).all()
    boxes_OT4 = truth.boxes_OT4[outside_OT]
    assert ((boxes_OT4[:, 0] == boxes_OT4[:, 2]) | (boxes_OT4[:, 1] == boxes_OT4[:, 3])).all()


def test_camera_pan_moves_the_background(dense_video: tuple[np.ndarray, GroundTruth], tmp_path: Path) -> None:
    frames_THWC, truth = dense_video
    step_2 = (truth.camera_T2[1] - truth.camera_T2[0]).astype(int)
    assert np.abs(truth.camera_T2[-1]).sum() > 10
    # The background seen at (y, x) in frame 1 was at (y + dy, x + dx) in frame 0.
    dx, dy = step_2
    height, width = truth.size
    ys, xs = np.mgrid[8 : height - 8, 8 : width - 8]
    background_N = (truth.masks_THW[1][ys, xs] == 0) & (truth.masks_THW[0][ys + dy, xs + dx] == 0)
    later = frames_THWC[1][ys, xs][background_N].astype(float)
    shifted = frames_THWC[0][ys + dy, xs + dx][background_N].astype(float)
    unshifted = frames_THWC[0][ys, xs][background_N].astype(float)
    assert np.abs(later - shifted).mean() < 0.5 * np.abs(later - unshifted).mean()

    still = generate_video(tmp_path / "still.mp4", seed=11, camera_pan=False, dense=True)
    assert not still.camera_T2.any()
    still_THWC, _ = decode_video(tmp_path / "still.mp4")
    static_HW = (still.masks_THW[0] == 0) & (still.masks_THW[-1] == 0)
    assert np.abs(still_THWC[0][static_HW].astype(float) - still_THWC[-1][static_HW]).mean() < 4


def test_depth_map(dense_video: tuple[np.ndarray, GroundTruth]) -> None:
    _, truth = dense_video
    assert truth.depth_THW.shape == (truth.num_frames, *truth.size)
    np.testing.assert_array_equal(truth.depth_THW[truth.masks_THW == 0], BACKGROUND_DEPTH)
    for o in range(truth.num_objects):
        np.testing.assert_array_equal(truth.depth_THW[truth.masks_THW == o + 1], truth.depths_O[o])
    assert (truth.depths_O < BACKGROUND_DEPTH).all()


def test_label_is_the_drift_direction(tmp_path: Path) -> None:
    labels = set()
    for seed in range(12):
        truth = generate_video(tmp_path / f"l{seed}.mp4", seed=seed, frames=4, size=(32, 32))
        name = truth.label_names[truth.label]
        labels.add(name)
        vx, vy = truth.velocities_O2.T
        expected = {"left": -vx, "right": vx, "up": -vy, "down": vy}[name]
        assert (expected > np.abs({"left": vy, "right": vy, "up": vx, "down": vx}[name])).all()
    assert truth.label_names == LABEL_NAMES
    assert len(labels) >= 3


def test_json_round_trip(dense_video: tuple[np.ndarray, GroundTruth]) -> None:
    _, truth = dense_video
    back = GroundTruth.from_json(truth.to_json())
    assert back.to_json() == truth.to_json()
    np.testing.assert_array_equal(back.masks_THW, truth.masks_THW)
    assert back.depth_THW.dtype == np.float32 and back.visible_OT.dtype == np.bool_
    assert back.size == truth.size and back.label_names == truth.label_names


def test_generate_dataset(tmp_path: Path) -> None:
    dataset = generate_dataset(tmp_path / "a", 3, seed=5, frames=8, size=(32, 48))
    again = generate_dataset(tmp_path / "b", 3, seed=5, frames=8, size=(32, 48))
    assert [p.name for p, _ in dataset] == ["proc-00000.mp4", "proc-00001.mp4", "proc-00002.mp4"]
    assert len({truth.seed for _, truth in dataset}) == 3
    for (path, truth), (path_b, _) in zip(dataset, again):
        assert path.read_bytes() == path_b.read_bytes()
        assert GroundTruth.from_json(path.with_suffix(".json").read_text()).to_json() == truth.to_json()
        assert decode_video(path)[0].shape == (8, 32, 48, 3)


def test_temporal_labels_speed_bins_and_flash_order(tmp_path: Path) -> None:
    speeds, orders = set(), set()
    for seed in range(10):
        path = tmp_path / f"e{seed}.mp4"
        truth = generate_video(path, seed=seed, frames=8, size=(64, 64), dense=True, temporal_labels=True)
        plain = generate_video(tmp_path / f"p{seed}.mp4", seed=seed, frames=8, size=(64, 64), dense=True)
        speeds.add(SPEED_NAMES[truth.speed_label])
        orders.add(ORDER_NAMES[truth.order_label])
        # Speed: every object's travel over the clip (jitter across the direction aside) lies in the bin.
        along_O = np.abs(truth.velocities_O2 @ np.abs(np.array([[-1, 1, 0, 0], [0, 0, -1, 1]])[:, truth.label]))
        travel_O = along_O * 8 / 64
        low, high = {"slow": (0.25, 0.45), "fast": (0.7, 1.0)}[SPEED_NAMES[truth.speed_label]]
        assert ((travel_O >= low - 1e-6) & (travel_O <= high + 1e-6)).all()
        # Order: objects 0 and 1 (a disc and a rect) flash at distinct inner frames, the named one first.
        assert sorted(truth.shapes[:2]) == ["disc", "rect"]
        flash_O = truth.flash_frames_O
        assert (flash_O[2:] == -1).all() and flash_O[0] != flash_O[1]
        assert (flash_O[:2] >= 1).all() and (flash_O[:2] <= 6).all()
        disc = truth.shapes.index("disc")
        disc_first = flash_O[disc] < flash_O[1 - disc]
        assert disc_first == (ORDER_NAMES[truth.order_label] == "disc_first")
        # The flash brightens the object's drawn pixels on its frame only.
        frames_THWC, _ = decode_video(path)
        for o in (0, 1):
            t = int(flash_O[o])
            seen_HW = truth.masks_THW[t] == o + 1
            if seen_HW.sum() >= 20:
                others = [s for s in range(8) if s != t and (truth.masks_THW[s] == o + 1).sum() >= 20]
                flash_mean = frames_THWC[t][seen_HW].mean()
                assert all(flash_mean > frames_THWC[s][truth.masks_THW[s] == o + 1].mean() + 20 for s in others)
        # The direction, colours, depths and camera come from the main stream, unchanged by the labels.
        assert truth.label == plain.label and plain.speed_label == plain.order_label == -1
        np.testing.assert_array_equal(truth.depths_O, plain.depths_O)
        np.testing.assert_array_equal(truth.camera_T2, plain.camera_T2)
        np.testing.assert_array_equal(truth.colors_O3, plain.colors_O3)
    assert speeds == set(SPEED_NAMES) and orders == set(ORDER_NAMES)


def test_temporal_labels_json_round_trip_and_old_records(tmp_path: Path) -> None:
    truth = generate_video(tmp_path / "v.mp4", seed=3, frames=6, size=(32, 32), temporal_labels=True)
    back = GroundTruth.from_json(truth.to_json())
    assert back.to_json() == truth.to_json() and back.flash_frames_O.dtype == np.int64
    generate_video(tmp_path / "w.mp4", seed=3, frames=6, size=(32, 32), temporal_labels=True)
    assert (tmp_path / "v.mp4").read_bytes() == (tmp_path / "w.mp4").read_bytes()
    # A record written before the temporal labels existed still loads, without them.
    record = json.loads(truth.to_json())
    for key in ("speed_label", "order_label", "flash_frames_O"):
        del record[key]
    old = GroundTruth.from_json(json.dumps(record))
    assert old.speed_label == old.order_label == -1 and old.flash_frames_O is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"frames": 0},
        {"size": (33, 64)},
        {"size": (8, 8)},
        {"num_objects": 0},
        {"fps": 0},
        {"frames": 3, "temporal_labels": True},
        {"num_objects": 1, "temporal_labels": True},
        {"anchor_frame": "first"},
        {"pan_speed": (3.0, 1.0)},
        {"pan_speed": (-1.0, 1.0)},
        {"frames": 3, "speed_change": True},
    ],
)
def test_invalid_arguments(tmp_path: Path, kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        generate_video(tmp_path / "v.mp4", seed=0, **kwargs)


# Pinned before anchor_frame, pan_speed and speed_change existed (PyAV 18.1.0, FFmpeg 8.1.2, libx264):
# sha256 of the rendered frames, of the ground-truth JSON, and of the mp4 file.
_PINNED = [
    (
        {"seed": 7, "frames": 8, "size": (32, 32)},
        "95df34012e7f18a1628898bc17c5d937cb02d80ca17351f4a7452bc17f488ba3",
        "b88b6d8cb928d92af61d9cd1bc05df74f5500a6e357e363b89bf73d55733adbc",
        "56df0485ac002b6a721899b564195a05b5b42dfa6702a98533a1188eff83bf4a",
    ),
    (
        {"seed": 3, "frames": 8, "size": (64, 48), "temporal_labels": True, "dense": True},
        "61cc13b4ba4131fa16d40ff6b3a49949304e22928fe4c7968d6eefd02e27d3b4",
        "ce4b410d889431f707517407fb89cdb220bdfc77502d22473eb9a056a9a5d63a",
        "6955c00d7124b3203cfe5e88fdfeeea445dca43906e8a23df32584247fd0f7d0",
    ),
    (
        {"seed": 5, "frames": 6, "size": (32, 32), "occlusions": False, "num_objects": 4, "camera_pan": False},
        "810be5fc6689bbe134f1b6f488a6217bb6069e29b522f6d6d67c22d653a6d64c",
        "175aa2630778bb733a717fd8c02c612fcaf9d85a2d93fc674a18b9b13c0dbb09",
        "06914cc9a22e06b2415cbfb37043048c43ff53c93b2dca85fed2a398c4725880",
    ),
]


@pytest.mark.parametrize(("kwargs", "frames_sha", "truth_sha", "mp4_sha"), _PINNED)
def test_new_options_at_their_defaults_keep_the_pinned_output(
    tmp_path: Path, kwargs: dict[str, object], frames_sha: str, truth_sha: str, mp4_sha: str
) -> None:
    """Cached eval sets and their token caches stay valid: defaults give the same frames, record and file."""
    defaults = {"anchor_frame": "middle", "pan_speed": (0.5, 1.5), "speed_change": False}
    frames_THWC, truth = render_video(**kwargs, **defaults)
    assert hashlib.sha256(frames_THWC.tobytes()).hexdigest() == frames_sha
    assert hashlib.sha256(truth.to_json().encode()).hexdigest() == truth_sha
    generate_video(tmp_path / "v.mp4", **kwargs)
    # The file's bytes also depend on the encoder build; the frames above do not.
    if av.__version__ == "18.1.0" and av.ffmpeg_version_info == "8.1.2" and h264_encoder() == "libx264":
        assert hashlib.sha256((tmp_path / "v.mp4").read_bytes()).hexdigest() == mp4_sha


def _ridge_accuracy(features_NF: np.ndarray, labels_N: np.ndarray, train: int) -> float:
    """Held-out accuracy of a one-vs-rest ridge classifier on standardized features and their squares."""
    x_NF = (features_NF - features_NF.mean(0)) / (features_NF.std(0) + 1e-6)
    x_NF = np.concatenate([x_NF, x_NF**2, np.ones((len(x_NF), 1))], axis=1)
    targets_NK = np.eye(labels_N.max() + 1)[labels_N]
    a_NF = x_NF[:train]
    weights_FK = np.linalg.solve(a_NF.T @ a_NF + np.eye(a_NF.shape[1]), a_NF.T @ targets_NK[:train])
    return float((np.argmax(x_NF[train:] @ weights_FK, axis=1) == labels_N[train:]).mean())


def _frame_features(truths: list[GroundTruth], t: int) -> np.ndarray:
    """(N, F): every object's centre and box at frame t."""
    return np.stack(
        [np.concatenate([truth.centers_OT2[:, t].ravel(), truth.boxes_OT4[:, t].ravel()]) for truth in truths]
    )


@pytest.fixture(scope="module")
def anchored_truths() -> dict[str, list[GroundTruth]]:
    """300 ground truths (32x32, 8 frames, temporal labels) per anchor_frame; rendered, no file written."""
    return {
        anchor: [
            render_video(seed=seed, frames=8, size=(32, 32), temporal_labels=True, anchor_frame=anchor)[1]
            for seed in range(300)
        ]
        for anchor in ("middle", "last")
    }


def test_anchor_last_leaves_no_direction_or_speed_in_the_last_frame(
    anchored_truths: dict[str, list[GroundTruth]],
) -> None:
    """From the last frame's centres and boxes a classifier is at chance; from the first it is not."""
    truths = anchored_truths["last"]
    direction_N = np.array([truth.label for truth in truths])
    speed_N = np.array([truth.speed_label for truth in truths])
    last, first = _frame_features(truths, -1), _frame_features(truths, 0)
    assert _ridge_accuracy(last, direction_N, 200) < 0.40
    assert _ridge_accuracy(last, speed_N, 200) < 0.65
    # The same classifier reads both where the positions do carry them: the test can fail.
    assert _ridge_accuracy(first, direction_N, 200) > 0.6
    assert _ridge_accuracy(first, speed_N, 200) > 0.7
    # ... and so it does in the last frame of middle-anchored videos (the problem anchor_frame="last" fixes).
    middle = anchored_truths["middle"]
    assert _ridge_accuracy(_frame_features(middle, -1), np.array([truth.label for truth in middle]), 200) > 0.5


def test_anchor_last_places_objects_inside_the_last_frame(tmp_path: Path) -> None:
    met = 0
    for seed in range(8):
        truth = generate_video(
            tmp_path / f"a{seed}.mp4", seed=seed, frames=9, size=(64, 64), anchor_frame="last", dense=True
        )
        plain = generate_video(tmp_path / f"m{seed}.mp4", seed=seed, frames=9, size=(64, 64), dense=True)
        last_O2 = truth.centers_OT2[:, -1]
        inside_O = ((last_O2 >= truth.extents_O2 - 1e-4) & (last_O2 <= 64 - truth.extents_O2 + 1e-4)).all(axis=1)
        # Object 1 meets object 0 at the middle frame instead.
        assert inside_O[[0, *range(2, truth.num_objects)]].all()
        np.testing.assert_allclose(truth.centers_OT2[0, 4], truth.centers_OT2[1, 4], atol=1e-4)
        # The meeting is seen where it happens inside the frame (object 0 is only placed at the last frame).
        if truth.visible_fraction_OT[:2, 4].max() == 1.0:
            met += 1
            farther = 0 if truth.depths_O[0] > truth.depths_O[1] else 1
            assert truth.occluded_OT[farther, 4] and not truth.occluded_OT[1 - farther, 4]
        # Straight lines at the same velocities as the middle-anchored video: only the placement differs,
        # but for object 1, which moves at object 0's velocity plus a small drift across the motion.
        others = [0, *range(2, truth.num_objects)]
        np.testing.assert_allclose(
            np.diff(truth.centers_OT2[others], axis=1), np.diff(plain.centers_OT2[others], axis=1), atol=1e-4
        )
        drift_2 = truth.velocities_O2[1] - truth.velocities_O2[0]
        assert np.linalg.norm(drift_2) <= 0.8 + 1e-5
        assert abs(float(drift_2 @ _DIRECTIONS[truth.label])) < 1e-5
        assert truth.label == plain.label
        np.testing.assert_array_equal(truth.colors_O3, plain.colors_O3)
    assert met >= 4


_DIRECTIONS = np.array([[-1.0, 0.0], [1.0, 0.0], [0.0, -1.0], [0.0, 1.0]])


def test_anchor_last_pair_distance_does_not_tell_the_speed(tmp_path: Path) -> None:
    """The best threshold on the last-frame distance of objects 0 and 1 is near chance for the speed bin."""
    distances, speeds = [], []
    for seed in range(200):
        _, truth = render_video(seed=seed, frames=16, size=(112, 112), anchor_frame="last", temporal_labels=True)
        distances.append(float(np.linalg.norm(truth.centers_OT2[0, -1] - truth.centers_OT2[1, -1])))
        speeds.append(truth.speed_label)
    distances_N, speeds_N = np.array(distances), np.array(speeds)
    best = max(
        max(np.mean((distances_N > t) == speeds_N), np.mean((distances_N <= t) == speeds_N)) for t in distances_N
    )
    assert best < 0.62, best


@pytest.mark.parametrize("pan_speed", [(0.5, 1.5), (2.0, 6.0), (4.0, 4.0)])
def test_pan_speed_range(pan_speed: tuple[float, float]) -> None:
    """The measured pan (over the clip, whole-pixel offsets) lies in the range, and the background follows it."""
    low, high = pan_speed
    speeds = []
    for seed in range(12):
        frames_THWC, truth = render_video(seed=seed, frames=24, size=(48, 48), pan_speed=pan_speed, dense=True)
        step_T = np.linalg.norm(np.diff(truth.camera_T2, axis=0), axis=1)
        # Offsets are rounded to whole pixels: a step is off by less than a pixel per axis, the whole pan by half.
        assert (step_T >= low - 1.42).all() and (step_T <= high + 1.42).all()
        speed = np.linalg.norm(truth.camera_T2[-1] - truth.camera_T2[0]) / 23
        assert low - 0.75 / 23 <= speed <= high + 0.75 / 23
        speeds.append(speed)
        # The background of frame t + 1 is frame t's, shifted by exactly the offset step (no codec in the way).
        for t in (0, 22):
            dx, dy = (truth.camera_T2[t + 1] - truth.camera_T2[t]).astype(int)
            ys, xs = np.mgrid[0:48, 0:48]
            ok = (ys + dy >= 0) & (ys + dy < 48) & (xs + dx >= 0) & (xs + dx < 48)
            ys, xs = ys[ok], xs[ok]
            background = (truth.masks_THW[t + 1][ys, xs] == 0) & (truth.masks_THW[t][ys + dy, xs + dx] == 0)
            later = frames_THWC[t + 1][ys[background], xs[background]]
            np.testing.assert_array_equal(later, frames_THWC[t][ys[background] + dy, xs[background] + dx])
    if high - low > 1:
        assert max(speeds) - min(speeds) > (high - low) / 3


def test_speed_change_is_one_break_in_a_straight_line(tmp_path: Path) -> None:
    frames = 16
    for seed in range(10):
        truth = generate_video(
            tmp_path / f"s{seed}.mp4", seed=seed, frames=frames, size=(64, 64), speed_change=True, temporal_labels=True
        )
        plain = generate_video(tmp_path / f"p{seed}.mp4", seed=seed, frames=frames, size=(64, 64), temporal_labels=True)
        steps_OT2 = np.diff(truth.centers_OT2.astype(np.float64), axis=1)
        for o in range(truth.num_objects):
            k, factor = int(truth.speed_change_frames_O[o]), float(truth.speed_factors_O[o])
            assert 4 <= k <= 11 and 0.5 <= factor <= 2.0
            # The step from frame t to t + 1 is the velocity before k and factor times it from k on.
            np.testing.assert_allclose(steps_OT2[o, :k], np.broadcast_to(truth.velocities_O2[o], (k, 2)), atol=1e-3)
            np.testing.assert_allclose(
                steps_OT2[o, k:], np.broadcast_to(factor * truth.velocities_O2[o], (15 - k, 2)), atol=1e-3
            )
            # speed_label is the bin of the mean speed: the travel over the clip, as without the change.
            direction_2 = np.array([[-1, 0], [1, 0], [0, -1], [0, 1]])[truth.label]
            travel = (truth.centers_OT2[o, -1] - truth.centers_OT2[o, 0]) @ direction_2 / 15 * frames / 64
            low, high = {"slow": (0.25, 0.45), "fast": (0.7, 1.0)}[SPEED_NAMES[truth.speed_label]]
            assert low - 1e-4 <= travel <= high + 1e-4
        # Everything else is drawn as without speed changes.
        assert (truth.label, truth.speed_label, truth.order_label) == (
            plain.label,
            plain.speed_label,
            plain.order_label,
        )
        np.testing.assert_array_equal(truth.camera_T2, plain.camera_T2)
        np.testing.assert_array_equal(truth.depths_O, plain.depths_O)
        # Objects 0 and 1 still meet at the middle frame (7.5: frames 7 and 8 lie on one straight step).
        np.testing.assert_allclose(truth.centers_OT2[0, 7:9].mean(0), truth.centers_OT2[1, 7:9].mean(0), atol=1e-3)
        back = GroundTruth.from_json(truth.to_json())
        assert back.to_json() == truth.to_json() and back.speed_change_frames_O.dtype == np.int64
    # Without speed changes the record has no such fields (it is the record written before they existed).
    assert "speed_change_frames_O" not in json.loads(plain.to_json())
    assert GroundTruth.from_json(plain.to_json()).speed_factors_O is None


def test_whole_frame_order_events_brighten_then_darken_as_the_label_says() -> None:
    from data_shards.procedural import FRAME_EVENT_FRAMES, FRAME_ORDER_NAMES

    labels = set()
    for seed in range(8):
        kwargs = {"seed": seed, "frames": 12, "size": (32, 32), "dense": True, "temporal_labels": True}
        objects_THWC, truth = render_video(**kwargs)
        frames_THWC, framed = render_video(**kwargs, order_events="frame")
        labels.add(FRAME_ORDER_NAMES[framed.order_label])
        # Same draws: only the event frames differ from the object-flash video (whose flashes fall on
        # the events' first frames).
        assert framed.to_json() == truth.to_json()
        first, second = sorted(int(t) for t in framed.flash_frames_O if t >= 0)
        assert first >= 1 and second <= 12 - 2
        changed_T = (frames_THWC != objects_THWC).any(axis=(1, 2, 3))
        bright_first = FRAME_ORDER_NAMES[framed.order_label] == "bright_first"
        shift_T = frames_THWC.reshape(12, -1).mean(1) - objects_THWC.reshape(12, -1).mean(1)
        first_frames = range(first, min(first + FRAME_EVENT_FRAMES, second))
        second_frames = range(second, min(second + FRAME_EVENT_FRAMES, 12 - 1))
        assert all((shift_T[t] > 0) == bright_first and abs(shift_T[t]) > 20 for t in first_frames)
        assert all((shift_T[t] < 0) == bright_first and abs(shift_T[t]) > 20 for t in second_frames)
        # Nothing else changes, and never the last frame (it would give the order away).
        assert changed_T.nonzero()[0].tolist() == [*first_frames, *second_frames] and not changed_T[-1]
        assert objects_THWC.shape == frames_THWC.shape
    assert labels == set(FRAME_ORDER_NAMES)


def test_order_events_default_is_the_object_flash_and_a_bad_value_is_named() -> None:
    kwargs = {"seed": 2, "frames": 8, "size": (32, 32), "temporal_labels": True}
    np.testing.assert_array_equal(render_video(**kwargs)[0], render_video(**kwargs, order_events="object")[0])
    with pytest.raises(ValueError, match="order_events must be one of"):
        render_video(**kwargs, order_events="global")
