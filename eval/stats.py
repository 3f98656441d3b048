"""Confidence intervals and paired tests for readout scores over seeds and test clips.

Shape legend: S seeds, C test clips, B bootstrap draws.

A score is a metric of one readout (one seed) on a set of test clips, and a
metric need not be a mean of per-clip values (TAP-Vid's AJ, box mIoU over
every scored box), so the bootstrap recomputes the metric on each resample
instead of averaging per-clip numbers. It is hierarchical: each draw resamples
the seeds and, shared by all of them, the test clips, both with replacement,
and scores the mean over the drawn seeds of the metric on the drawn clips.
Variants scored with the same draws (``BootstrapDraws``) are paired: seed s
of one variant trained on the same labelled clips as seed s of another, and
both are read on the same resampled test clips, so a difference's interval
reflects the comparison, not two independent spreads.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

ScoreFn = Callable[[int, np.ndarray], float]
"""score(seed_index, clip_indices_C) -> the metric of that seed's readout on those clips."""


@dataclass(frozen=True, slots=True)
class BootstrapDraws:
    """The resamples every variant of one comparison is scored on."""

    seeds_BS: np.ndarray
    """int (B, S): seed indices drawn with replacement."""
    clips_BC: np.ndarray
    """int (B, C): test clip indices drawn with replacement, shared by every seed of a draw."""

    @classmethod
    def draw(cls, num_seeds: int, num_clips: int, draws: int, seed: int = 0) -> BootstrapDraws:
        rng = np.random.default_rng(seed)
        return cls(
            rng.integers(num_seeds, size=(draws, num_seeds)),
            rng.integers(num_clips, size=(draws, num_clips)),
        )


def bootstrap_scores(score: ScoreFn, draws: BootstrapDraws) -> np.ndarray:
    """(B,) the mean over each draw's seeds of the metric on its clips; every (seed, clips) pair computed once."""
    out_B = np.empty(len(draws.seeds_BS))
    for b, (seeds_S, clips_C) in enumerate(zip(draws.seeds_BS, draws.clips_BC, strict=True)):
        per_seed = {s: score(int(s), clips_C) for s in set(seeds_S.tolist())}
        out_B[b] = np.mean([per_seed[int(s)] for s in seeds_S])
    return out_B


def percentile_interval(samples_B: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The central ``level`` interval of bootstrap samples."""
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(samples_B, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_p_value(differences_B: np.ndarray) -> float:
    """Two-sided bootstrap p-value of 'the difference is 0': twice the smaller tail mass at 0, at most 1."""
    below = float(np.mean(differences_B <= 0))
    above = float(np.mean(differences_B >= 0))
    return min(1.0, 2 * min(below, above))


def mcnemar_exact(a_correct: np.ndarray, b_correct: np.ndarray) -> tuple[int, int, float]:
    """Exact McNemar test of paired right/wrong outcomes: (a right b wrong, a wrong b right, two-sided p)."""
    a_correct, b_correct = np.asarray(a_correct, bool), np.asarray(b_correct, bool)
    only_a = int(np.sum(a_correct & ~b_correct))
    only_b = int(np.sum(~a_correct & b_correct))
    n = only_a + only_b
    if n == 0:
        return only_a, only_b, 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return only_a, only_b, min(1.0, 2 * tail)


def intervals_overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]
