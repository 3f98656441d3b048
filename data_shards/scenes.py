"""Hard scene-cut detection, so that training clips do not straddle a cut.

Shape legend: T frames, H height, W width, C = 3 colour channels (RGB),
B histogram bins.

The per-frame signal is the distance between the colour histograms of
consecutive frames (half the L1 distance, in [0, 1]: the fraction of pixel
mass that changed bins). Histograms ignore where things are, so camera and
object motion barely move them, while a cut to another shot usually changes
the colour distribution at once. A frame pair is a cut when its distance is

- above an absolute floor (small changes are never cuts, even in a video
  that is otherwise perfectly still, where the MAD below is ~0),
- above median + k * MAD of the whole sequence (robust to how busy the
  video is overall), and
- about twice the median of its neighbours: a cut is an isolated spike,
  whereas a large object sweeping across the frame raises the distance for
  several frames in a row.

Gradual transitions (fades, dissolves, wipes) are not detected, and a cut
between two shots with nearly the same colours can be missed.
"""

from __future__ import annotations

import numpy as np

# Quantization levels per RGB channel; 8^3 = 512 joint bins.
_BINS_PER_CHANNEL = 8
# Frames are subsampled with a stride to about this short side before the
# histogram: the histogram of a strided image is a fine estimate and this
# keeps detection cheap at any resolution.
_HIST_SHORT_SIDE = 72
# Minimum histogram distance for a cut (15% of the pixel mass changes bins).
_ABS_FLOOR = 0.15
# Robust z-score a cut must exceed: distance > median + k * 1.4826 * MAD.
# Every k from 3 to 6 separated the sample clips; 4 sits in the middle.
_K_MAD = 4.0
# A cut must exceed this multiple of the median distance of its neighbours.
# On bikes.mp4 with frames chosen as data_shards.video does (the frame shown
# at each tick), cuts score >= 2.45 from 9 fps up and >= 2.36 at 8 fps, and
# motion that passes the two tests above <= 1.49 from 9 fps up but up to
# 2.13 at 8 fps (a sweep caught on consecutive frames); 2.25 sits between,
# with a thin margin at 8 fps, which is why 8 fps is the floor.
_SPIKE_RATIO = 2.25
# Neighbours on each side used for the local median. Wider windows reach
# into the previous shot's motion at low frame rates and blur the spike.
_LOCAL_RADIUS = 2
# 1.4826 * MAD estimates the standard deviation for normally distributed data.
_MAD_TO_STD = 1.4826


def color_histograms(frames_THWC: np.ndarray) -> np.ndarray:
    """Normalized joint RGB histograms, hist_TB (float64, rows sum to 1).

    frames_THWC: uint8 (T, H, W, 3). B = _BINS_PER_CHANNEL ** 3.
    """
    _check_frames(frames_THWC)
    num_frames, height, width, _ = frames_THWC.shape
    stride = max(1, min(height, width) // _HIST_SHORT_SIDE)
    small_THWC = frames_THWC[:, ::stride, ::stride].astype(np.int64)
    # Integer shift quantizes 0..255 into _BINS_PER_CHANNEL equal bins.
    shift = 8 - int(np.log2(_BINS_PER_CHANNEL))
    q_THWC = small_THWC >> shift
    bin_THW = (q_THWC[..., 0] * _BINS_PER_CHANNEL + q_THWC[..., 1]) * _BINS_PER_CHANNEL + q_THWC[..., 2]
    num_bins = _BINS_PER_CHANNEL**3
    # One bincount for all frames: offset each frame's bins into its own range.
    offsets_T = np.arange(num_frames, dtype=np.int64)[:, None, None] * num_bins
    counts = np.bincount((bin_THW + offsets_T).ravel(), minlength=num_frames * num_bins)
    hist_TB = counts.reshape(num_frames, num_bins).astype(np.float64)
    return hist_TB / hist_TB.sum(axis=1, keepdims=True)


def frame_distances(frames_THWC: np.ndarray) -> np.ndarray:
    """dist_T1: histogram distance in [0, 1] between frame t and t+1, shape (T-1,)."""
    hist_TB = color_histograms(frames_THWC)
    return 0.5 * np.abs(np.diff(hist_TB, axis=0)).sum(axis=1)


def adaptive_threshold(dist_T1: np.ndarray) -> float:
    """max(floor, median + k * 1.4826 * MAD) over the distances of one sequence."""
    if dist_T1.size == 0:
        return _ABS_FLOOR
    median = float(np.median(dist_T1))
    mad = float(np.median(np.abs(dist_T1 - median)))
    return max(_ABS_FLOOR, median + _K_MAD * _MAD_TO_STD * mad)


def detect_scene_cuts(frames_THWC: np.ndarray, threshold: float | None = None) -> list[int]:
    """Indices t where a hard cut happens between frame t-1 and frame t.

    frames_THWC: uint8 (T, H, W, 3) RGB. The thresholds were checked on the
        sample clips from their native rate (25-30 fps) down to 8 fps; below
        that, shots change so much between frames that cuts and motion are
        no longer separated reliably, so detect at >= 8 fps and map the cut
        times onto a sparser sampling.
    threshold: fixed histogram-distance threshold in [0, 1]; None uses the
        adaptive one (see ``adaptive_threshold``). The neighbour-spike test
        applies either way.

    The adaptive threshold needs a dozen or more frames to be meaningful;
    on shorter sequences mostly the floor and the spike test decide.
    """
    if threshold is not None and not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1] or None, got {threshold}")
    if frames_THWC.shape[0] < 2:
        _check_frames(frames_THWC)
        return []
    dist_T1 = frame_distances(frames_THWC)
    level = adaptive_threshold(dist_T1) if threshold is None else threshold
    local_T1 = _local_medians(dist_T1, _LOCAL_RADIUS)
    is_cut_T1 = (dist_T1 > level) & (dist_T1 > _SPIKE_RATIO * local_T1)
    # dist_T1[i] compares frames i and i+1, so the cut starts at frame i+1.
    return [int(i) + 1 for i in np.flatnonzero(is_cut_T1)]


def cut_free_windows(num_frames: int, cuts: list[int], window: int) -> list[int]:
    """Start indices s such that frames s .. s+window-1 contain no cut.

    A cut c (between frames c-1 and c) breaks every window with
    s < c <= s + window - 1; a window may start exactly at a cut.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if num_frames < 0:
        raise ValueError(f"num_frames must be >= 0, got {num_frames}")
    num_starts = num_frames - window + 1
    if num_starts <= 0:
        return []
    # breaks_T[c] = 1 when a cut lies between frames c-1 and c.
    breaks_T = np.zeros(num_frames + 1, dtype=np.int64)
    for c in cuts:
        if 0 < c < num_frames:
            breaks_T[c] = 1
    # prefix_T[i] = number of cuts with index < i.
    prefix_T = np.concatenate([[0], np.cumsum(breaks_T)])
    starts = np.arange(num_starts)
    # Cuts in (s, s + window - 1] = prefix[s + window] - prefix[s + 1].
    inside = prefix_T[starts + window] - prefix_T[starts + 1]
    return [int(s) for s in starts[inside == 0]]


def _local_medians(dist_T1: np.ndarray, radius: int) -> np.ndarray:
    """Median of up to ``radius`` values on each side of every entry, the entry itself excluded."""
    n = dist_T1.shape[0]
    out_T1 = np.zeros(n, dtype=np.float64)
    for i in range(n):
        neighbours = np.concatenate([dist_T1[max(0, i - radius) : i], dist_T1[i + 1 : i + 1 + radius]])
        # A lone value has no neighbours: the spike test then passes trivially (0).
        out_T1[i] = float(np.median(neighbours)) if neighbours.size else 0.0
    return out_T1


def _check_frames(frames_THWC: np.ndarray) -> None:
    if frames_THWC.ndim != 4 or frames_THWC.shape[-1] != 3:
        raise ValueError(f"frames_THWC must have shape (T, H, W, 3), got {frames_THWC.shape}")
    if frames_THWC.dtype != np.uint8:
        raise ValueError(f"frames_THWC must be uint8, got {frames_THWC.dtype}")
