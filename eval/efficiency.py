"""Data efficiency: what pre-training buys with few labels, per task, with confidence intervals.

    python -m eval.efficiency --export DIR --out OUT [--quick] [--tasks a,b] [--budgets 8,32,128,512]
        [--variants pretrained,...] [--seeds 3] [--test-videos 100] [--steps 150]
        [--readings streaming,all-frames] [--labelled-draw uniform|balanced] [--encoder PATH] [--no-mlflow]
        [--check]

For every task and every budget N of labelled clips, the same readout is
trained on the same N clips for each variant and scored on one fixed test set:

- ``pretrained``: the export's adapter and core, frozen (probe);
- ``pretrained-ft``: the same, fine-tuned with the readout;
- ``scratch``: the same architecture from a fresh init, trained with the
  readout: what a user gets without pre-training (the data-efficiency control);
- ``random``: the same architecture, fresh and frozen ("any fixed mixing helps");
- ``identity`` / ``identity-ft``: the export's adapter and no temporal core
  (image only), frozen / fine-tuned.

Positive control per task: ``control-allframes``, the identity path with the
all-frames readout (every frame's tokens, no memory needed) on all labels; a
task it cannot learn is reported as unlearnable here, not as a loss of the
core. ``scratch`` at the largest budget is the end-to-end control. The floor
every row is read against is the ``no-features`` answer (the training pool's
majority class, the query carried unchanged, the pool's mean): a task is
learnable here when the control or some variant beats that, and it separates
variants when something also beats the worst variant. A ``scratch`` that beats
it at no budget is named in the report (``scratch_learned``): a win over a
control that never learns says little about pre-training.

Seeds vary the readout init, the batch order, the fresh inits of ``scratch``
and ``random`` and which labelled clips are drawn (the budgets of one seed
are nested: the first N of one permutation of the training pool, or with
``--labelled-draw balanced`` that permutation dealt out class by class); seed s
of every variant sees the same clips. Means are over seeds of the metric on the
whole test set; intervals and paired differences come from a hierarchical
bootstrap over seeds and test clips (``eval.stats``), plus an exact McNemar
test for classification. The verdict asks for intervals apart (``verdict``);
the paired one, printed beside it, for paired gains above 0
(``paired_verdict``). Readings: ``streaming`` (the headline: every answer
read from one frame's core output, so whatever a task needs from the past
must come through the core) and ``all-frames`` (a 4DS-style probe over every
frame's outputs).

Fairness, checked and recorded: every variant of a reading has the same
readout (architecture and width); frozen variants train the readout only, so
they train the same number of parameters; ``pretrained-ft`` and ``scratch``
train the same parameters; ``identity-ft`` trains the adapter only (it has no
core). Same optimizer, steps, batch, learning rates and seed schedule for all.

Writes OUT/efficiency.json (one row per task, metric, variant, budget and
reading), OUT/efficiency.md, one PNG per task, and logs them to MLflow.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_shards.io import OutputDirError, check_output_dir, output_dir
from data_shards.procedural import DEFAULT_ORDER_EVENTS, ORDER_EVENTS
from eval.data import ClipSet, ProceduralConfig, load_procedural
from eval.features import (
    EncoderMismatchError,
    Export,
    FeaturePath,
    build_feature_path,
    export_summary,
    load_checked_encoder,
    read_export,
)
from eval.probe import FeatureCache, ProbeResult, ReadoutConfig, train_and_evaluate
from eval.report import check_out_root, log_to_mlflow
from eval.stats import (
    BootstrapDraws,
    bootstrap_p_value,
    bootstrap_scores,
    intervals_overlap,
    mcnemar_exact,
    percentile_interval,
)
from eval.tasks import Batch, Task, build_task

log = logging.getLogger(__name__)

FORMAT = "video-pretrain-efficiency/1"
# variant -> (feature path of eval.features, probe mode)
VARIANTS: dict[str, tuple[str, str]] = {
    "pretrained": ("pretrained", "frozen"),
    "pretrained-ft": ("pretrained", "finetune"),
    "scratch": ("random", "finetune"),
    "random": ("random", "frozen"),
    "identity": ("identity", "frozen"),
    "identity-ft": ("identity", "finetune"),
}
CONTROL = "control-allframes"
READINGS: dict[str, bool] = {"streaming": True, "all-frames": False}
"""reading -> the ``streaming`` flag a task's readout is built with."""
TASKS: tuple[str, ...] = (
    "classification",
    "classify_speed",
    "classify_order",
    "point_tracking",
    "box_tracking",
    "camera_pose",
)
TEMPORAL_TASKS: tuple[str, ...] = TASKS[:5]
"""The tasks the verdict counts: each needs information from earlier frames."""
COST_ORDER: tuple[str, ...] = ("point_tracking", "box_tracking", "camera_pose", "depth")
"""Tasks whose readouts cost the most (dense or per-frame heads), started first so workers finish together."""
TARGET_TASKS = 3
"""The target: pre-training wins on at least this many temporal tasks at the two smallest budgets."""
DEFAULT_FINETUNE_LR = 5e-4
"""The feature path's learning rate in every fine-tuned variant (pretrained-ft, scratch, identity-ft): one
rate for all, so a comparison is not one of step sizes; ``--finetune-lr`` sweeps it."""


LABELLED_DRAWS = ("uniform", "balanced")


@dataclass(kw_only=True, slots=True)
class EfficiencyConfig:
    """The experiment's protocol; every variant gets exactly this."""

    budgets: tuple[int, ...] = (8, 32, 128, 512)
    """Labelled training clips per readout (the training pool holds the largest)."""
    seeds: int = 3
    """Seeds per (variant, budget)."""
    test_videos: int = 100
    """Fixed test set: with 100 clips one clip is one point of top-1."""
    tasks: tuple[str, ...] = TASKS
    """Tasks to run (the eval.tasks names)."""
    readings: tuple[str, ...] = ("streaming", "all-frames")
    """Readout readings; the first is the headline."""
    variants: tuple[str, ...] = (*VARIANTS, CONTROL)
    """Variants to train. A subset (e.g. only ``pretrained`` when ablating pre-training, whose controls
    do not change with the objective) costs less; the verdict needs pretrained(-ft), scratch and identity."""
    readout: ReadoutConfig = dataclasses.field(default_factory=lambda: ReadoutConfig(finetune_lr=DEFAULT_FINETUNE_LR))
    """Readout training: steps, batch, learning rates (the feature path's in finetune variants)."""
    frames: int = 16
    """Frames per procedural clip."""
    size: int = 112
    """Procedural frame side in pixels."""
    data_seed: int = 1000
    """Seed of the procedural eval set (disjoint from the pre-training corpus)."""
    order_events: str = DEFAULT_ORDER_EVENTS
    """What classify_order orders: whole-"frame" brightness events (3 frames each, bright then dark or the
    reverse) or one-frame "object" flashes (see data_shards.procedural.ORDER_EVENTS). The default is
    "frame" because no readout, not even the all-frames control with 512 labels, learned the order of
    one-frame flashes of a 1-2-patch object (benchmarks/results/2026-12-06-cpu-efficiency-no-features-
    order-cue.md); "object" makes the earlier set, whose dataset hash the older results name."""
    draws: int = 400
    """Bootstrap draws per comparison."""
    labelled_draw: str = "uniform"
    """How a seed draws its labelled clips: "uniform" (a permutation of the pool) or "balanced" (for
    classification tasks, the permutation dealt out class by class, so 8 labels of 4 classes are 2 of each;
    tracking tasks draw uniformly either way). From the frame-event set's 32-clip pool, a uniform draw of 8
    clips misses one of the 4 directions for 36% of seeds, and which clips a seed draws moved every variant
    by 0.1-0.2 (benchmarks/results/2026-12-07-cpu-matched-draws-order-history.md); "balanced" removes that
    part of the spread. "uniform" is the default because the stored results were drawn so."""

    def __post_init__(self) -> None:
        if not self.budgets or min(self.budgets) < 1 or list(self.budgets) != sorted(set(self.budgets)):
            raise ValueError(f"budgets must be increasing positive counts, got {self.budgets}")
        if self.seeds < 2:
            raise ValueError(f"seeds must be >= 2 for an interval, got {self.seeds}")
        if self.test_videos < 10:
            raise ValueError(f"test_videos must be >= 10, got {self.test_videos}")
        unknown = [t for t in self.tasks if t not in TASKS and t != "depth"]
        if unknown:
            raise ValueError(f"unknown tasks {unknown}; known: {', '.join(TASKS)}, depth")
        unknown = [v for v in self.variants if v not in (*VARIANTS, CONTROL)]
        if unknown or not self.variants:
            raise ValueError(f"variants must be among {[*VARIANTS, CONTROL]}, got {list(self.variants)}")
        if self.labelled_draw not in LABELLED_DRAWS:
            raise ValueError(f"labelled_draw must be one of {list(LABELLED_DRAWS)}, got {self.labelled_draw!r}")
        unknown = [r for r in self.readings if r not in READINGS]
        if unknown or not self.readings:
            raise ValueError(f"readings must be among {list(READINGS)}, got {list(self.readings)}")


QUICK = {"budgets": (8, 64), "readings": ("streaming",)}
"""What --quick changes: two budgets and the headline reading only..."""
QUICK_READOUT_STEPS = 100
"""...and 100 readout steps instead of 150 (fine-tuning the core is most of the time on a CPU)."""


def procedural_config(cfg: EfficiencyConfig) -> ProceduralConfig:
    """The labelled procedural set: the fixed test set first, then a training pool of the largest budget.

    Videos are drawn per index from one seed sequence, so the test set (the
    first ``test_videos``) and the start of the pool are the same videos for
    every budget ladder: ``--quick`` and the full run score on one test set.
    (ProceduralConfig calls the first videos its training split; here they are
    the test set, see ``split``.) Objects are placed uniformly at the last frame
    (no single late frame tells direction or speed) and the camera pans 2-6 px
    per frame.
    """
    return ProceduralConfig(
        train_videos=cfg.test_videos,
        test_videos=max(cfg.budgets),
        frames=cfg.frames,
        size=cfg.size,
        seed=cfg.data_seed,
        anchor_frame="last",
        pan_speed=(2.0, 6.0),
        order_events=cfg.order_events,
    )


def split(clips: ClipSet, cfg: EfficiencyConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(test indices, training pool indices) of a set made by ``procedural_config``."""
    total = len(clips.tokens_VTND)
    if total < cfg.test_videos + max(cfg.budgets):
        raise ValueError(f"{total} videos cannot hold {cfg.test_videos} test clips and a pool of {max(cfg.budgets)}")
    return torch.arange(cfg.test_videos), torch.arange(cfg.test_videos, total)


def labelled_subset(seed: int, budget: int, pool: int, labels_P: np.ndarray | None = None) -> torch.Tensor:
    """The first ``budget`` clips of seed's order of the pool: nested over budgets, shared by variants.

    The order is a permutation of the pool; given the pool's class labels, that permutation dealt out
    class by class (``balanced_order``), so that any prefix holds the classes as evenly as the pool allows.
    """
    order = np.random.default_rng([seed, 0x5EED]).permutation(pool)
    if labels_P is not None:
        order = balanced_order(order, labels_P[order])
    return torch.from_numpy(order[:budget].copy())


def balanced_order(order: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``order`` dealt out by class: round k holds the k-th clip of each class in ``order``.

    Within a round, classes come in the order their k-th clip appears, so the seed's permutation also
    picks which class gets the odd clip when a budget is not a multiple of the class count. A class the
    pool runs out of drops out of later rounds.
    """
    rank = np.zeros(len(order), dtype=np.int64)
    seen: dict[int, int] = {}
    for i, label in enumerate(labels.tolist()):
        rank[i] = seen.get(label, 0)
        seen[label] = rank[i] + 1
    return order[np.argsort(rank, kind="stable")]


@dataclass(slots=True)
class Trained:
    """One readout's result: its test outputs and what trained."""

    result: ProbeResult
    budget: int
    seed: int


class Experiment:
    """Runs every (variant, budget, seed) of one task and reading; frozen features shared across tasks."""

    def __init__(self, export: Export, clips: ClipSet, cfg: EfficiencyConfig) -> None:
        self.export, self.clips, self.cfg = export, clips, cfg
        self.cache = FeatureCache()
        self.grid = export.spec.grid_h
        self.test_idx, self.pool_idx = split(clips, cfg) if clips is not None else (None, None)

    def path(self, variant: str, seed: int) -> FeaturePath:
        base, probe = VARIANTS[variant] if variant != CONTROL else ("identity", "frozen")
        # The clip protocol runs the core's parallel forward; for these causal cores it equals the
        # loop of step (tests/eval/test_features.py), and every readout reads frame t's output only.
        return build_feature_path(self.export, base, "clip", probe, seed)

    def labelled(self, targets: Batch, budget: int, seed: int) -> torch.Tensor:
        """Seed's ``budget`` labelled clips (indices into the clip set); balanced over classes if asked and labelled."""
        labels_P = None
        if self.cfg.labelled_draw == "balanced" and "label" in targets:
            labels_P = targets["label"][self.pool_idx].numpy()
        return self.pool_idx[labelled_subset(seed, budget, len(self.pool_idx), labels_P)]

    def train(self, task: Task, targets: Batch, variant: str, budget: int, seed: int, streaming: bool) -> Trained:
        path = self.path(variant, seed)
        features = None
        if not path.trainable:
            base = VARIANTS.get(variant, ("identity",))[0]
            key = (base, str(seed) if base == "random" else "")
            features = self.cache.get(key, path, self.clips.tokens_VTND, self.cfg.readout.eval_batch_size)
        train_idx = self.labelled(targets, budget, seed)
        result = train_and_evaluate(
            task,
            path,
            self.clips.tokens_VTND,
            targets,
            train_idx,
            self.test_idx,
            self.grid,
            self.cfg.readout,
            seed,
            features,
            streaming=streaming,
        )
        return Trained(result, budget, seed)


def _index(batch: Batch, idx: np.ndarray) -> Batch:
    index = torch.from_numpy(idx)
    return {k: v[index] for k, v in batch.items()}


def _scorer(task: Task, runs: list[Trained]):
    """score(seed_index, clips) of one (variant, budget): the primary metric on those test clips."""

    def score(s: int, clips_C: np.ndarray) -> float:
        result = runs[s].result
        return task.metrics(_index(result.test_outputs, clips_C), _index(result.test_targets, clips_C))[task.primary]

    return score


def _correct(task: Task, trained: Trained) -> np.ndarray | None:
    """Per test clip right/wrong of a classification readout, else None."""
    outputs, targets = trained.result.test_outputs, trained.result.test_targets
    if "logits" not in outputs or "label" not in targets:
        return None
    return (outputs["logits"].argmax(-1) == targets["label"]).numpy()


def summarize_task(
    task: Task, reading: str, runs: dict[tuple[str, int], list[Trained]], cfg: EfficiencyConfig, num_test: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows (task, metric, variant, budget) with mean and CI, and paired comparisons of pre-training."""
    draws = BootstrapDraws.draw(cfg.seeds, num_test, cfg.draws, seed=0)
    samples: dict[tuple[str, int], np.ndarray] = {}
    rows = []
    for (variant, budget), trained in runs.items():
        samples[(variant, budget)] = bootstrap_scores(_scorer(task, trained), draws)
        values = [t.result.metrics[task.primary] for t in trained]
        low, high = percentile_interval(samples[(variant, budget)])
        rows.append(
            {
                "task": task.name,
                "metric": task.primary,
                "higher_is_better": task.higher_is_better,
                "reading": reading,
                "variant": variant,
                "budget": budget,
                "seeds": [t.seed for t in trained],
                "mean": float(np.mean(values)),
                "ci95_low": low,
                "ci95_high": high,
                "values": values,
            }
        )
    comparisons = []
    sign = 1.0 if task.higher_is_better else -1.0
    for budget in cfg.budgets:
        for ours in ("pretrained", "pretrained-ft"):
            for theirs in ("scratch", "identity", "identity-ft"):
                if (ours, budget) not in samples or (theirs, budget) not in samples:
                    continue
                diff_B = sign * (samples[(ours, budget)] - samples[(theirs, budget)])
                record = {
                    "task": task.name,
                    "reading": reading,
                    "budget": budget,
                    "variant": ours,
                    "against": theirs,
                    "gain": float(np.mean(diff_B)),
                    "gain_ci95": list(percentile_interval(diff_B)),
                    "p_bootstrap": bootstrap_p_value(diff_B),
                }
                a = [_correct(task, t) for t in runs[(ours, budget)]]
                b = [_correct(task, t) for t in runs[(theirs, budget)]]
                if all(x is not None for x in (*a, *b)):
                    only_ours, only_theirs, p = mcnemar_exact(np.concatenate(a), np.concatenate(b))
                    record["mcnemar"] = {"only_ours_right": only_ours, "only_theirs_right": only_theirs, "p": p}
                comparisons.append(record)
    return rows, comparisons


def fairness(task: Task, runs: dict[tuple[str, int], list[Trained]]) -> dict[str, Any]:
    """Trainable parameters per variant and the invariants they must satisfy (raises if one does not hold)."""
    counts = {}
    for (variant, _), trained in runs.items():
        counts.setdefault(variant, trained[0].result.trainable_parameters)
    readouts = {v: c["readout"] for v, c in counts.items() if v != CONTROL}
    frozen = {
        v: c["readout"] + c["feature_path"] for v, c in counts.items() if VARIANTS.get(v, ("", ""))[1] == "frozen"
    }
    checks = {
        "same readout for every variant": len(set(readouts.values())) == 1,
        "frozen variants train the same number of parameters": len(set(frozen.values())) <= 1,
        "pretrained-ft and scratch train the same number of parameters": (
            "pretrained-ft" not in counts
            or "scratch" not in counts
            or counts["pretrained-ft"]["feature_path"] == counts["scratch"]["feature_path"]
        ),
    }
    failed = [name for name, ok in checks.items() if not ok]
    if failed:
        raise AssertionError(f"{task.name}: fairness invariant broken: {failed}; counts {counts}")
    return {"trainable_parameters": counts, "invariants": list(checks)}


def row_above(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Row a (of efficiency.json) beats row b with their 95% intervals apart, in the metric's direction."""
    separated = not intervals_overlap((a["ci95_low"], a["ci95_high"]), (b["ci95_low"], b["ci95_high"]))
    return separated and (a["mean"] > b["mean"]) == a["higher_is_better"]


PRETRAINED_VARIANTS = ("pretrained", "pretrained-ft")
CONTROL_VARIANTS = ("scratch", "identity")


def _tasks_won(cfg: EfficiencyConfig, beats: Callable[[str, str, str, int], bool]) -> dict[str, bool]:
    """Per temporal task: does one pre-trained variant beat every control at each of the two smallest budgets?

    ``beats(task, ours, control, budget)`` is the test of one pair (intervals
    apart for ``verdict``, paired gain above 0 for ``paired_verdict``).
    """
    return {
        task: all(
            any(all(beats(task, ours, control, budget) for control in CONTROL_VARIANTS) for ours in PRETRAINED_VARIANTS)
            for budget in cfg.budgets[:2]
        )
        for task in TEMPORAL_TASKS
        if task in cfg.tasks
    }


def verdict(rows: list[dict[str, Any]], cfg: EfficiencyConfig, reading: str) -> dict[str, Any]:
    """The target: pretrained(-ft) above scratch and identity, CIs apart, at the two smallest budgets."""
    table = {(r["task"], r["variant"], r["budget"]): r for r in rows if r["reading"] == reading}

    def beats(task: str, ours: str, control: str, budget: int) -> bool:
        a, b = table.get((task, ours, budget)), table.get((task, control, budget))
        return a is not None and b is not None and row_above(a, b)

    small = list(cfg.budgets[:2])
    wins = _tasks_won(cfg, beats)
    met = sum(wins.values()) >= TARGET_TASKS
    return {
        "reading": reading,
        "budgets": small,
        "wins": wins,
        "met": met,
        "statement": (
            f"pre-training wins on {sum(wins.values())} of {len(wins)} temporal tasks at budgets {small} "
            f"(target: {TARGET_TASKS}); {'MET' if met else 'NOT MET'}"
        ),
    }


def paired_verdict(comparisons: list[dict[str, Any]], cfg: EfficiencyConfig, reading: str) -> dict[str, Any]:
    """The target read paired: the gain over scratch and over identity has its 95% interval above 0.

    Pairing removes the spread that every variant shares (which labelled
    clips a seed drew, which test clips are hard), so it can show a gain
    whose two unpaired intervals overlap. It is the weaker claim, reported
    beside ``verdict``, never instead of it.
    """
    gain_low = {
        (c["task"], c["variant"], c["against"], c["budget"]): c["gain_ci95"][0]
        for c in comparisons
        if c["reading"] == reading
    }

    def beats(task: str, ours: str, control: str, budget: int) -> bool:
        return gain_low.get((task, ours, control, budget), -np.inf) > 0

    small = list(cfg.budgets[:2])
    wins = _tasks_won(cfg, beats)
    return {
        "reading": reading,
        "budgets": small,
        "wins": wins,
        "statement": (
            f"paired on the same clips, pre-training's gain over scratch and identity is above 0 on "
            f"{sum(wins.values())} of {len(wins)} temporal tasks at budgets {small}"
        ),
    }


NO_FEATURES = "no-features"
"""The answer of a readout that reads no feature; every row is read against it (``no_feature_outputs``)."""
LEARNABLE = "learnable"
LEARNABLE_FLAT = "learnable (above the no-feature answer), but nothing above the worst variant"
NOT_LEARNABLE = "not shown learnable (neither the control nor any variant above the no-feature answer)"
NOT_LEARNABLE_NO_FLOOR = "not shown learnable (neither the control nor any variant above the worst variant's CI)"


def no_feature_outputs(task: Task, targets: Batch, pool_idx: torch.Tensor, test_idx: torch.Tensor) -> Batch | None:
    """What a readout that reads no feature answers on the test clips, from the training pool's labels only.

    Classification: the pool's majority class. Tracking: the query carried
    unchanged to every frame (a point stays visible). Pose: the pool's mean
    motion per frame pair. Depth: the pool's mean depth per pixel. None for
    targets of another kind. A task is learnable here only if something
    reads the features better than this.
    """
    test = {k: v[test_idx] for k, v in targets.items()}
    if "label" in targets:
        classes = int(getattr(task, "classes", None) or int(targets["label"].max()) + 1)
        majority = int(torch.bincount(targets["label"][pool_idx], minlength=classes).argmax())
        logits_VC = torch.zeros(len(test_idx), classes)
        # Descending logits: the majority class first, the rest in class order (for top-k).
        logits_VC[:] = -torch.arange(classes, dtype=torch.float32)
        logits_VC[:, majority] = 1.0
        return {"logits": logits_VC}
    if "query_boxes" in targets:
        frames = targets["boxes"].shape[2]
        return {"boxes": test["query_boxes"][:, :, None].expand(-1, -1, frames, -1).clone()}
    if "queries" in targets and "tracks" in targets:
        frames = targets["tracks"].shape[2]
        return {
            "positions": test["queries"][:, :, None].expand(-1, -1, frames, -1).clone(),
            "visibility_logits": torch.ones(test["visible"].shape),
        }
    if "translation" in targets:
        pose = ("translation", "rotation")
        return {k: targets[k][pool_idx].mean(0, keepdim=True).expand_as(test[k]).clone() for k in pose}
    if "depth" in targets:
        depth = targets["depth"][pool_idx].flatten(0, 1)
        # Zero marks a pixel without a reading: the mean is over the readings there are.
        valid = (depth > 0).float()
        mean_HW = (depth * valid).sum(0) / valid.sum(0).clamp(min=1)
        mean_HW = torch.where(valid.sum(0) > 0, mean_HW, depth[depth > 0].mean())
        return {"log_depth": mean_HW.log().expand_as(test["depth"]).clone()}
    return None


def no_features_row(
    task: Task, targets: Batch, pool_idx: torch.Tensor, test_idx: torch.Tensor, cfg: EfficiencyConfig
) -> dict[str, Any] | None:
    """The no-feature answer's primary metric on the test set, with a 95% bootstrap interval over test clips."""
    outputs = no_feature_outputs(task, targets, pool_idx, test_idx)
    if outputs is None:
        return None
    test = {k: v[test_idx] for k, v in targets.items()}

    def score(_: int, clips_C: np.ndarray) -> float:
        return task.metrics(_index(outputs, clips_C), _index(test, clips_C))[task.primary]

    samples = bootstrap_scores(score, BootstrapDraws.draw(1, len(test_idx), cfg.draws, seed=0))
    low, high = percentile_interval(samples)
    return {
        "task": task.name,
        "metric": task.primary,
        "higher_is_better": task.higher_is_better,
        "variant": NO_FEATURES,
        "mean": float(score(0, np.arange(len(test_idx)))),
        "ci95_low": low,
        "ci95_high": high,
    }


def learnability(
    rows: list[dict[str, Any]], reading: str, no_features: dict[str, dict[str, Any]] | None = None
) -> dict[str, str]:
    """Per task: was it shown learnable here, and does it separate variants?

    Learnable: the positive control, or any variant at the largest budget, is
    above the no-feature answer with CIs apart (a core that reads the task
    where the all-frames probe cannot has shown it learnable too). It
    separates variants when one of them is also above the worst variant.
    Without a no-feature answer, only the second test is made.
    """
    out = {}
    for task in dict.fromkeys(r["task"] for r in rows):
        control = next((r for r in rows if r["task"] == task and r["variant"] == CONTROL), None)
        if control is None:
            continue
        largest = max(r["budget"] for r in rows if r["task"] == task and r["variant"] != CONTROL)
        others = [r for r in rows if r["task"] == task and r["budget"] == largest and r["reading"] == reading]
        worst = min(others, key=lambda r: r["mean"] * (1 if r["higher_is_better"] else -1))
        separates = any(row_above(r, worst) for r in (control, *others))
        floor = (no_features or {}).get(task)
        if floor is None:
            out[task] = LEARNABLE if separates else NOT_LEARNABLE_NO_FLOOR
        elif not any(row_above(r, floor) for r in (control, *others)):
            out[task] = NOT_LEARNABLE
        else:
            out[task] = LEARNABLE if separates else LEARNABLE_FLAT
    return out


def scratch_learned(
    rows: list[dict[str, Any]], reading: str, no_features: dict[str, dict[str, Any]] | None
) -> dict[str, bool]:
    """Per task: did scratch, at some budget, rise above the no-feature answer (intervals apart)?

    A control that learns nothing at any budget makes a weak comparison: a win over it may come from
    scratch's training recipe (its rate, the readout's steps) rather than from what pre-training put in
    the state. A GMMix core trained from scratch at the shared rate stayed at the floor up to 512 labels
    while, given 4x the steps and the rate, it learned speed (benchmarks/results/
    2026-12-07-cpu-gmmix-full-ladder.md). Tasks without scratch rows or a no-feature answer are left out.
    """
    out = {}
    for task, floor in (no_features or {}).items():
        scratch = [r for r in rows if r["task"] == task and r["variant"] == "scratch" and r["reading"] == reading]
        if scratch:
            out[task] = any(row_above(r, floor) for r in scratch)
    return out


def scratch_caution(record: dict[str, Any]) -> str | None:
    """The report's line naming the tasks whose scratch control never learned, or None."""
    never = [task for task, learned in record.get("scratch_learned", {}).items() if not learned]
    if not never:
        return None
    largest = max(record["config"]["budgets"])
    return (
        f"caution: scratch is not above the no-feature answer at any budget up to N={largest} on "
        f"{', '.join(never)}; a win over it may come from scratch's training recipe rather than from "
        "pre-training, or from too few labels; the full budget ladder, or --variants scratch --finetune-lr 2e-3 "
        "--steps 600 beside this report, tells which"
    )


@dataclass(slots=True)
class TaskOutcome:
    """Everything one task contributes to the record."""

    rows: list[dict[str, Any]]
    comparisons: list[dict[str, Any]]
    fairness: dict[str, Any]
    readouts: dict[str, Any]
    seconds: float
    no_features: dict[str, Any] | None = None


def run_task(experiment: Experiment, task_name: str) -> TaskOutcome:
    """Every reading x variant x budget x seed of one task, then its statistics."""
    cfg, clips = experiment.cfg, experiment.clips
    task = build_task(task_name)
    targets = task.targets(clips.truths, experiment.grid)
    start = time.perf_counter()
    outcome = TaskOutcome([], [], {}, {}, 0.0)
    outcome.no_features = no_features_row(task, targets, experiment.pool_idx, experiment.test_idx, cfg)
    for reading in cfg.readings:
        runs: dict[tuple[str, int], list[Trained]] = {}
        for variant in (v for v in VARIANTS if v in cfg.variants):
            for budget in cfg.budgets:
                runs[(variant, budget)] = [
                    experiment.train(task, targets, variant, budget, seed, READINGS[reading])
                    for seed in range(cfg.seeds)
                ]
                scores = [round(t.result.metrics[task.primary], 4) for t in runs[(variant, budget)]]
                log.info("%s %s %s N=%d: %s", task_name, reading, variant, budget, scores)
        if reading == cfg.readings[0] and CONTROL in cfg.variants:
            runs[(CONTROL, max(cfg.budgets))] = [
                experiment.train(task, targets, CONTROL, max(cfg.budgets), seed, streaming=False)
                for seed in range(cfg.seeds)
            ]
        task_rows, task_comparisons = summarize_task(task, reading, runs, cfg, len(experiment.test_idx))
        outcome.rows += task_rows
        outcome.comparisons += task_comparisons
        outcome.fairness[f"{task_name}/{reading}"] = fairness(task, runs)
        outcome.readouts[f"{task_name}/{reading}"] = task.config()
    outcome.seconds = time.perf_counter() - start
    log.info("%s done in %.0f s", task_name, outcome.seconds)
    return outcome


# The experiment a forked worker process runs its tasks on (inherited, not pickled).
_WORKER_EXPERIMENT: Experiment | None = None


def _run_task_in_worker(task_name: str) -> TaskOutcome:
    # One thread per worker: the readouts are small, so two single-threaded processes keep
    # two cores busier than one process with two threads.
    torch.set_num_threads(1)
    assert _WORKER_EXPERIMENT is not None
    return run_task(_WORKER_EXPERIMENT, task_name)


def run_tasks(experiment: Experiment, tasks: Sequence[str], workers: int) -> list[TaskOutcome]:
    """Tasks one after another, or spread over ``workers`` forked processes (same numbers up to float rounding)."""
    if workers <= 1 or len(tasks) <= 1:
        return [run_task(experiment, name) for name in tasks]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # Longest first: the pool hands out tasks in submission order, so the costly ones must not come last.
    order = sorted(tasks, key=lambda name: COST_ORDER.index(name) if name in COST_ORDER else len(COST_ORDER))
    global _WORKER_EXPERIMENT
    _WORKER_EXPERIMENT = experiment
    try:
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            outcomes = dict(zip(order, pool.map(_run_task_in_worker, order), strict=True))
    finally:
        _WORKER_EXPERIMENT = None
    return [outcomes[name] for name in tasks]


def run_efficiency(export: Export, clips: ClipSet, cfg: EfficiencyConfig, workers: int = 1) -> dict[str, Any]:
    """Every task x reading x variant x budget x seed, then the statistics; the efficiency.json record."""
    experiment = Experiment(export, clips, cfg)
    outcomes = run_tasks(experiment, cfg.tasks, workers)
    rows = [row for outcome in outcomes for row in outcome.rows]
    comparisons = [c for outcome in outcomes for c in outcome.comparisons]
    fair = {k: v for outcome in outcomes for k, v in outcome.fairness.items()}
    readouts = {k: v for outcome in outcomes for k, v in outcome.readouts.items()}
    no_features = {
        name: outcome.no_features
        for name, outcome in zip(cfg.tasks, outcomes, strict=True)
        if outcome.no_features is not None
    }
    seconds = {name: outcome.seconds for name, outcome in zip(cfg.tasks, outcomes, strict=True)}
    headline = cfg.readings[0]
    return {
        "format": FORMAT,
        "config": dataclasses.asdict(cfg),
        "export": export_summary(export),
        "export_sha256": export.sha256,
        "dataset_hash": clips.dataset_hash,
        "dataset": {k: v for k, v in clips.description.items() if k != "dir"},
        "gate": future_gate(export),
        "rows": rows,
        "comparisons": comparisons,
        "fairness": fair,
        "readouts": readouts,
        "no_features": no_features,
        "verdict": verdict(rows, cfg, headline),
        "verdict_paired": paired_verdict(comparisons, cfg, headline),
        "learnability": learnability(rows, headline, no_features),
        "scratch_learned": scratch_learned(rows, headline, no_features),
        "seconds": seconds,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def future_gate(export: Export) -> dict[str, Any]:
    """Did the export beat copy-last, and its identity-core control, on held-out future prediction?

    Read from the export's own config.json (the trainer records both); an
    export that beats neither has not learned anything temporal, and the
    report says so before any number.
    """
    # Future offsets only (a recall row, offset -k, is not future prediction).
    heldout = [r for r in export.config.heldout or [] if r.offset > 0]
    if not heldout:
        return {"checked": False, "statement": "the export records no held-out future-prediction result"}
    vs_copy = [r.offset for r in heldout if r.model_l1 < r.copy_last_l1]
    recorded = export.config.identity_control
    control = {r.offset: r for r in recorded.heldout} if recorded is not None else {}
    vs_identity = [r.offset for r in heldout if r.offset in control and r.model_l1 < control[r.offset].model_l1]
    passed = len(vs_copy) == len(heldout) and bool(control) and len(vs_identity) == len(heldout)
    statement = f"held-out future prediction beats copy-last at {len(vs_copy)} of {len(heldout)} offsets"
    statement += (
        f" and the identity-core control at {len(vs_identity)} of {len(heldout)}"
        if control
        else " (the export records no identity-core control)"
    )
    if not passed:
        statement += ": the core has not been shown to learn anything temporal; read what follows as such"
    return {
        "checked": True,
        "heldout": [dataclasses.asdict(r) for r in heldout],
        "identity_control": [dataclasses.asdict(r) for r in control.values()],
        "beats_copy_last_at": vs_copy,
        "beats_identity_at": vs_identity,
        "passed": passed,
        "statement": statement,
    }


# ---- reports ----
def _cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "-"
    return f"{row['mean']:.3f} [{row['ci95_low']:.3f}, {row['ci95_high']:.3f}]"


def labelled_draw_of(record: dict[str, Any]) -> str:
    """The report's labelled draw; reports written before the choice existed drew uniformly."""
    return record.get("config", {}).get("labelled_draw", "uniform")


def markdown(record: dict[str, Any]) -> str:
    cfg = record["config"]
    lines = [
        f"# Data efficiency: {record['export']['dir']}",
        "",
        f"- gate: {record['gate']['statement']}",
        f"- verdict ({record['verdict']['reading']}): {record['verdict']['statement']}",
        *(
            [f"- {record['verdict_paired']['statement']} (weaker; see each task's paired gains)"]
            if "verdict_paired" in record
            else []
        ),
        *([f"- {caution}"] if (caution := scratch_caution(record)) else []),
        f"- test set: {cfg['test_videos']} procedural clips; seeds: {cfg['seeds']}; readout steps: "
        f"{cfg['readout']['steps']}; 95% intervals from a bootstrap over seeds and test clips",
        # labelled_subset permutes the whole pool, so another budget ladder draws other clips per seed.
        f"- labelled clips: each seed draws its own ({labelled_draw_of(record)}) from a pool of "
        f"{max(cfg['budgets'])} (dataset hash {record['dataset_hash'][:12]}); another report's rows line up draw "
        "for draw only under the same hash and draw",
        "",
    ]
    rows = record["rows"]
    for task in dict.fromkeys(r["task"] for r in rows):
        for reading in dict.fromkeys(r["reading"] for r in rows if r["task"] == task):
            subset = {(r["variant"], r["budget"]): r for r in rows if r["task"] == task and r["reading"] == reading}
            budgets = sorted({b for _, b in subset})
            first = next(iter(subset.values()))
            arrow = "↑" if first["higher_is_better"] else "↓"
            lines += [
                f"## {task} ({first['metric']} {arrow}, {reading}) — {record['learnability'].get(task, '')}",
                "",
                "| variant | " + " | ".join(f"N={b}" for b in budgets) + " |",
                "|---|" + "---|" * len(budgets),
            ]
            for variant in [*VARIANTS, CONTROL]:
                if any(v == variant for v, _ in subset):
                    lines.append(
                        f"| {variant} | " + " | ".join(_cell(subset.get((variant, b))) for b in budgets) + " |"
                    )
            floor = record.get("no_features", {}).get(task)
            if floor is not None:
                lines.append(f"| {NO_FEATURES} (any N) | " + " | ".join(_cell(floor) for _ in budgets) + " |")
            lines += ["", *_paired_gains_table(record.get("comparisons", []), task, reading, budgets)]
    return "\n".join(lines) + "\n"


def _paired_gains_table(comparisons: list[dict[str, Any]], task: str, reading: str, budgets: list[int]) -> list[str]:
    """Pre-training minus each control on the same clips and seeds, in the metric's better direction."""
    table = {
        (c["variant"], c["against"], c["budget"]): c
        for c in comparisons
        if c["task"] == task and c["reading"] == reading
    }
    pairs = list(dict.fromkeys((ours, against) for ours, against, _ in table))
    if not pairs:
        return []

    def cell(c: dict[str, Any] | None) -> str:
        if c is None:
            return "-"
        low, high = c["gain_ci95"]
        text = f"{c['gain']:+.3f} [{low:+.3f}, {high:+.3f}]"
        if "mcnemar" in c:
            text += f", McNemar p = {c['mcnemar']['p']:.1g}"
        return text

    lines = [
        "Paired gains (same test clips and seeds; 95% interval from the paired bootstrap):",
        "",
        "| gain | " + " | ".join(f"N={b}" for b in budgets) + " |",
        "|---|" + "---|" * len(budgets),
    ]
    for ours, against in pairs:
        lines.append(
            f"| {ours} − {against} | " + " | ".join(cell(table.get((ours, against, b))) for b in budgets) + " |"
        )
    return [*lines, ""]


def plot_task(record: dict[str, Any], task: str, path: Path) -> Path:
    """Metric vs budget (log x), one line per variant, the 95% interval as a band; one panel per reading."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in record["rows"] if r["task"] == task]
    readings = list(dict.fromkeys(r["reading"] for r in rows))
    fig, axes = plt.subplots(1, len(readings), figsize=(5.0 * len(readings), 3.6), squeeze=False)
    for ax, reading in zip(axes[0], readings, strict=True):
        for variant in VARIANTS:
            line = sorted(
                (r for r in rows if r["reading"] == reading and r["variant"] == variant), key=lambda r: r["budget"]
            )
            if not line:
                continue
            budgets = [r["budget"] for r in line]
            ax.plot(budgets, [r["mean"] for r in line], marker="o", label=variant)
            ax.fill_between(budgets, [r["ci95_low"] for r in line], [r["ci95_high"] for r in line], alpha=0.15)
        control = [r for r in rows if r["variant"] == CONTROL]
        for r in control if reading == readings[0] else []:
            ax.errorbar(
                [r["budget"]],
                [r["mean"]],
                yerr=[[r["mean"] - r["ci95_low"]], [r["ci95_high"] - r["mean"]]],
                fmt="k*",
                label=CONTROL,
            )
        floor = record.get("no_features", {}).get(task)
        if floor is not None:
            ax.axhline(floor["mean"], color="grey", linestyle="--", linewidth=1, label=NO_FEATURES)
        ax.set_xscale("log")
        ticks = sorted({r["budget"] for r in rows})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("labelled clips")
        ax.set_ylabel(f"{rows[0]['metric']} ({'higher' if rows[0]['higher_is_better'] else 'lower'} is better)")
        ax.set_title(f"{task} ({reading})")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def is_efficiency_report(directory: Path) -> bool:
    try:
        return json.loads((directory / "efficiency.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def write_reports(record: dict[str, Any], out: Path) -> list[Path]:
    """OUT/efficiency.json, efficiency.md and one PNG per task, published as one directory."""
    with output_dir(out, is_ours=is_efficiency_report, what="an efficiency report") as tmp:
        (tmp / "efficiency.json").write_text(json.dumps(record, indent=1) + "\n")
        (tmp / "efficiency.md").write_text(markdown(record))
        for task in dict.fromkeys(r["task"] for r in record["rows"]):
            plot_task(record, task, tmp / f"{task}.png")
    return sorted(out.iterdir())


def headline_metrics(record: dict[str, Any]) -> dict[str, float]:
    """Every row's mean, and how many temporal tasks pre-training wins, strictly and paired (MLflow metrics)."""
    metrics = {f"{r['task']}.{r['reading']}.{r['variant']}.N{r['budget']}": r["mean"] for r in record["rows"]}
    for key in ("verdict", "verdict_paired"):
        if key in record:
            metrics[f"{key}.tasks_won"] = float(sum(record[key]["wins"].values()))
    return metrics


# ---- command line ----
def config_from_args(args: argparse.Namespace) -> EfficiencyConfig:
    fields: dict[str, Any] = dict(QUICK) if args.quick else {}
    if args.budgets:
        fields["budgets"] = tuple(int(b) for b in args.budgets.split(","))
    if args.tasks:
        fields["tasks"] = tuple(args.tasks.split(","))
    if args.readings:
        fields["readings"] = tuple(args.readings.split(","))
    if args.variants:
        fields["variants"] = tuple(args.variants.split(","))
    for name in ("seeds", "test_videos", "draws", "frames", "size", "order_events", "labelled_draw"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    readout: dict[str, Any] = {"finetune_lr": DEFAULT_FINETUNE_LR}
    if args.quick:
        readout["steps"] = QUICK_READOUT_STEPS
    if args.steps is not None:
        readout["steps"] = args.steps
    if args.finetune_lr is not None:
        readout["finetune_lr"] = args.finetune_lr
    return EfficiencyConfig(readout=ReadoutConfig(**readout), **fields)


def describe_check(cfg: EfficiencyConfig) -> str:
    """One line of what a run with these settings would do (``--check``)."""
    return (
        f"tasks {','.join(cfg.tasks)}; budgets {','.join(map(str, cfg.budgets))}; {cfg.seeds} seeds; "
        f"{cfg.test_videos} test clips of {cfg.frames} frames at {cfg.size} px"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m eval.efficiency", description=__doc__.splitlines()[0])
    parser.add_argument("--export", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("runs/efficiency"))
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"budgets 8 and 64, the streaming reading only, {QUICK_READOUT_STEPS} readout steps",
    )
    parser.add_argument("--tasks", default=None, help=f"comma-separated, default {','.join(TASKS)}")
    parser.add_argument("--budgets", default=None, help="comma-separated labelled-clip counts")
    parser.add_argument("--readings", default=None, help="streaming and/or all-frames")
    parser.add_argument(
        "--variants", default=None, help=f"comma-separated subset of {','.join([*VARIANTS, CONTROL])} (default all)"
    )
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--test-videos", dest="test_videos", type=int, default=None)
    parser.add_argument("--draws", type=int, default=None, help="bootstrap draws")
    parser.add_argument("--frames", type=int, default=None, help="frames per procedural clip (default 16)")
    parser.add_argument("--size", type=int, default=None, help="procedural frame side in pixels (default 112)")
    parser.add_argument("--steps", type=int, default=None, help="readout optimizer steps")
    parser.add_argument(
        "--finetune-lr",
        dest="finetune_lr",
        type=float,
        default=None,
        help=f"learning rate of the feature path in every fine-tuned variant (default {DEFAULT_FINETUNE_LR:g})",
    )
    parser.add_argument(
        "--order-events",
        dest="order_events",
        default=None,
        choices=ORDER_EVENTS,
        help='what classify_order orders: whole-"frame" brightness events (default) or one-frame "object" flashes',
    )
    parser.add_argument(
        "--labelled-draw",
        dest="labelled_draw",
        default=None,
        choices=LABELLED_DRAWS,
        help="how a seed draws its labelled clips: uniform (default) or, for classification, balanced over classes",
    )
    parser.add_argument("--encoder", default=None, help="encoder weights source, when the recorded one is not here")
    parser.add_argument("--cache-dir", type=Path, default=None, help="procedural videos and token cache")
    parser.add_argument("--workers", type=int, default=2, help="task processes (one thread each; 1 = in process)")
    parser.add_argument("--no-mlflow", action="store_true")
    parser.add_argument(
        "--check",
        action="store_true",
        help="check the arguments and OUT, then exit without reading the export (a script's first step, "
        "so that a typo fails before hours of pre-training, not after)",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    start = time.perf_counter()
    try:
        cfg = config_from_args(args)
        # Refuse the output before anything heavy runs (a refused OUT must cost the user nothing).
        check_out_root(args.out)
        check_output_dir(args.out, is_ours=is_efficiency_report, what="an efficiency report")
        if args.check:
            print(f"ok: {describe_check(cfg)}; report to {args.out}")
            return 0
        export = read_export(args.export)
        encoder = load_checked_encoder(export, args.encoder)
        clips = load_procedural(procedural_config(cfg), encoder, args.cache_dir)
        record = run_efficiency(export, clips, cfg, workers=args.workers)
        record["wall_seconds"] = time.perf_counter() - start
        paths = write_reports(record, args.out)
    except (OutputDirError, EncoderMismatchError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(markdown(record))
    if not args.no_mlflow:
        where = log_to_mlflow(
            args.out.parent,
            "efficiency",
            {"config": record["config"]},
            headline_metrics(record),
            paths,
            training=export.config.tracking,
        )
        print(f"tracking: {where}")
    print(f"efficiency wall time {record['wall_seconds']:.0f} s; report in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
