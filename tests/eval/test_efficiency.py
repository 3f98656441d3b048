"""Data-efficiency experiment: statistics on hand examples, fairness, fresh inits, determinism, the CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from eval import efficiency
from eval.efficiency import LABELLED_DRAWS, VARIANTS, EfficiencyConfig, Experiment, labelled_subset
from eval.features import read_export
from eval.probe import ReadoutConfig
from eval.stats import BootstrapDraws, bootstrap_p_value, bootstrap_scores, mcnemar_exact, percentile_interval

TINY = {
    "budgets": (2, 4),
    "seeds": 2,
    "test_videos": 10,
    "tasks": ("classification", "point_tracking"),
    "readings": ("streaming",),
    "frames": 6,
    "size": 32,
    "draws": 50,
}


def tiny_cfg(**overrides) -> EfficiencyConfig:
    return EfficiencyConfig(readout=ReadoutConfig(steps=3, batch_size=2, finetune_lr=5e-4), **{**TINY, **overrides})


# ---- statistics on hand examples ----
def test_percentile_interval_of_known_samples() -> None:
    samples = np.arange(1, 1001, dtype=float)  # 1..1000
    low, high = percentile_interval(samples)
    assert low == pytest.approx(25.975) and high == pytest.approx(975.025)


def test_bootstrap_of_a_constant_metric_is_a_point_and_of_two_seeds_spans_them() -> None:
    draws = BootstrapDraws.draw(num_seeds=2, num_clips=5, draws=200, seed=1)
    constant = bootstrap_scores(lambda s, clips: 0.7, draws)
    assert np.all(constant == 0.7)
    # Seed 0 scores 0, seed 1 scores 1 on any clips: a draw's mean is 0, 0.5 or 1, each seen.
    by_seed = bootstrap_scores(lambda s, clips: float(s), draws)
    assert set(np.unique(by_seed)) == {0.0, 0.5, 1.0}
    # Per-clip accuracy: the metric of the resampled clips, not of the full set.
    correct = np.array([1, 1, 1, 0, 0], float)
    accuracy = bootstrap_scores(lambda s, clips: float(correct[clips].mean()), draws)
    assert 0.3 < accuracy.mean() < 0.9 and accuracy.min() < 0.6 < accuracy.max()


def test_paired_draws_cancel_the_shared_spread() -> None:
    """Two variants scored on the same draws: a constant gap has a zero-width interval."""
    rng = np.random.default_rng(0)
    per_clip = rng.random(50)
    draws = BootstrapDraws.draw(num_seeds=3, num_clips=50, draws=300, seed=2)
    a = bootstrap_scores(lambda s, clips: float(per_clip[clips].mean()) + 0.1, draws)
    b = bootstrap_scores(lambda s, clips: float(per_clip[clips].mean()), draws)
    low, high = percentile_interval(a - b)
    assert low == pytest.approx(0.1) and high == pytest.approx(0.1)
    assert bootstrap_p_value(a - b) == 0.0
    assert bootstrap_p_value(b - b) == 1.0


def test_mcnemar_exact_on_hand_counts() -> None:
    a = np.array([1] * 10 + [0] * 0 + [1] * 5, bool)
    b = np.array([0] * 10 + [1] * 0 + [1] * 5, bool)
    only_a, only_b, p = mcnemar_exact(a, b)
    assert (only_a, only_b) == (10, 0)
    assert p == pytest.approx(2 * 0.5**10)
    assert mcnemar_exact(a, a)[2] == 1.0
    # 3 vs 5 discordant: two-sided exact p = 2 * P(X <= 3), X ~ Bin(8, 1/2) = 2 * 93/256.
    a = np.array([1, 1, 1, 0, 0, 0, 0, 0], bool)
    assert mcnemar_exact(a, ~a)[2] == pytest.approx(2 * 93 / 256)


# ---- the protocol ----
def test_labelled_subsets_are_nested_and_shared_by_variants() -> None:
    small, large = labelled_subset(0, 8, 100), labelled_subset(0, 32, 100)
    assert torch.equal(large[:8], small)
    assert len(set(large.tolist())) == 32
    assert not torch.equal(labelled_subset(1, 8, 100), small)
    # Another ladder (a pool of the largest budget) draws other clips for the same seed and budget:
    # why a report names its pool and dataset hash.
    assert set(labelled_subset(0, 8, 32).tolist()) != set(labelled_subset(0, 8, 512).tolist())


def test_a_balanced_draw_holds_the_classes_evenly_in_every_prefix_and_keeps_the_seed_s_clips() -> None:
    labels_P = np.array([0] * 20 + [1] * 6 + [2] * 3 + [3] * 3)  # a skewed pool of 32
    for seed in range(5):
        for budget in (4, 8, 12, 16, 20):
            counts = np.bincount(labels_P[labelled_subset(seed, budget, 32, labels_P).numpy()], minlength=4)
            # Every class the pool has more of is at most one clip behind the largest.
            more_left = counts < np.bincount(labels_P)
            assert (counts[more_left] >= counts.max() - 1).all(), (budget, counts)
        small, large = labelled_subset(seed, 8, 32, labels_P), labelled_subset(seed, 16, 32, labels_P)
        assert torch.equal(large[:8], small)  # nested over budgets
        # Class 3 has 3 clips: after them it drops out, the others go on in turn.
        assert np.bincount(labels_P[labelled_subset(seed, 16, 32, labels_P).numpy()], minlength=4).tolist() == [
            5,
            5,
            3,
            3,
        ]
        # The whole pool is still the whole pool, and within a class the seed's permutation decides.
        assert sorted(labelled_subset(seed, 32, 32, labels_P).tolist()) == list(range(32))
        uniform = labelled_subset(seed, 32, 32).numpy()
        balanced = labelled_subset(seed, 32, 32, labels_P).numpy()
        for c in range(4):
            assert balanced[labels_P[balanced] == c].tolist() == uniform[labels_P[uniform] == c].tolist()
    assert not torch.equal(labelled_subset(0, 8, 32, labels_P), labelled_subset(1, 8, 32, labels_P))
    # A uniform draw of 8 from this pool misses a class for most seeds; the balanced one never does.
    missing = sum(len(set(labels_P[labelled_subset(s, 8, 32).numpy()])) < 4 for s in range(20))
    assert missing > 10
    assert all(len(set(labels_P[labelled_subset(s, 8, 32, labels_P).numpy()])) == 4 for s in range(20))


def test_the_labelled_draw_is_checked_and_named_in_the_report() -> None:
    with pytest.raises(ValueError, match="labelled_draw"):
        EfficiencyConfig(labelled_draw="stratified")
    assert efficiency.config_from_args(efficiency.parse_args(["--export", "x"])).labelled_draw == "uniform"
    cfg = efficiency.config_from_args(efficiency.parse_args(["--export", "x", "--labelled-draw", "balanced"]))
    assert cfg.labelled_draw == "balanced"
    assert efficiency.labelled_draw_of({"config": {}}) == "uniform"  # reports from before the choice


def test_the_experiment_balances_only_labelled_tasks_and_only_when_asked(tiny_export: Path) -> None:
    export = read_export(tiny_export)
    labels = torch.tensor([0] * 10 + [0] * 18 + [1] * 2)  # 10 test clips, then a pool of 20 with 2 of class 1
    drawn = {}
    for draw in LABELLED_DRAWS:
        experiment = Experiment(export, clips=None, cfg=tiny_cfg(labelled_draw=draw))  # type: ignore[arg-type]
        experiment.pool_idx = torch.arange(10, 30)
        drawn[draw] = experiment.labelled({"label": labels}, 4, seed=0)
        assert torch.equal(experiment.labelled({"query": labels}, 4, 0), experiment.pool_idx[labelled_subset(0, 4, 20)])
    assert (labels[drawn["balanced"]] == 1).sum() == 2
    assert torch.equal(drawn["uniform"], experiment.pool_idx[labelled_subset(0, 4, 20)])


def test_scratch_starts_fresh_and_seeds_differ(tiny_export: Path) -> None:
    export = read_export(tiny_export)
    experiment = Experiment(export, clips=None, cfg=tiny_cfg())  # type: ignore[arg-type]
    scratch0, scratch1 = experiment.path("scratch", 0), experiment.path("scratch", 1)
    pretrained = experiment.path("pretrained-ft", 0)
    assert scratch0.trainable and pretrained.trainable
    exported = export.model.core.state_dict()
    for name, value in scratch0.core.state_dict().items():
        if value.is_floating_point() and value.numel() > 1 and not torch.all(value == value.flatten()[0]):
            assert not torch.equal(value, exported[name]), name
    assert any(not torch.equal(v, scratch1.core.state_dict()[k]) for k, v in scratch0.core.state_dict().items())
    for name, value in pretrained.core.state_dict().items():
        torch.testing.assert_close(value, exported[name])
    assert not experiment.path("random", 0).trainable and not experiment.path("identity", 0).trainable


@pytest.fixture(scope="module")
def tiny_record(tiny_export: Path, eval_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("eff") / "report"
    args = ["--export", str(tiny_export), "--out", str(out), "--cache-dir", str(eval_cache), "--no-mlflow"]
    args += ["--budgets=2,4", "--seeds=2", "--test-videos=10", "--tasks=classification,point_tracking"]
    args += ["--readings=streaming", "--steps=3", "--draws=50", "--frames=6", "--size=32"]
    assert efficiency.main(args) == 0
    again = out.parent / "again"
    assert efficiency.main([*args[:2], "--out", str(again), *args[4:]]) == 0
    return {"first": json.loads((out / "efficiency.json").read_text()), "out": out, "again": again}


def test_efficiency_cli_writes_json_markdown_and_plots(tiny_record: dict) -> None:
    record, out = tiny_record["first"], tiny_record["out"]
    assert {p.name for p in out.iterdir()} == {
        "efficiency.json",
        "efficiency.md",
        "classification.png",
        "point_tracking.png",
    }
    rows = record["rows"]
    keys = {"task", "metric", "higher_is_better", "variant", "budget", "seeds", "mean", "ci95_low", "ci95_high"}
    assert all(keys <= set(r) for r in rows)
    for task in ("classification", "point_tracking"):
        for variant in VARIANTS:
            for budget in (2, 4):
                (row,) = [r for r in rows if (r["task"], r["variant"], r["budget"]) == (task, variant, budget)]
                assert row["seeds"] == [0, 1] and len(row["values"]) == 2
                assert row["ci95_low"] <= row["mean"] + 1e-9 and row["mean"] - 1e-9 <= row["ci95_high"]
        assert any(r["variant"] == "control-allframes" and r["task"] == task for r in rows)
    assert record["export_sha256"] and record["dataset_hash"]
    assert record["verdict"]["statement"] and record["gate"]["statement"]
    assert any(c.get("mcnemar") for c in record["comparisons"] if c["task"] == "classification")
    report = (out / "efficiency.md").read_text()
    assert "| pretrained |" in report
    assert record["verdict_paired"]["statement"] in report and "Paired gains" in report
    assert "| pretrained-ft − scratch |" in report
    assert f"(uniform) from a pool of 4 (dataset hash {record['dataset_hash'][:12]})" in report


def test_fairness_invariants_hold_per_variant(tiny_record: dict) -> None:
    for key, fair in tiny_record["first"]["fairness"].items():
        counts = fair["trainable_parameters"]
        readouts = {v: c["readout"] for v, c in counts.items() if v != "control-allframes"}
        assert len(set(readouts.values())) == 1, key
        for variant in ("pretrained", "random", "identity"):
            assert counts[variant]["feature_path"] == 0, (key, variant)
        assert counts["pretrained-ft"]["feature_path"] == counts["scratch"]["feature_path"] > 0
        assert 0 < counts["identity-ft"]["feature_path"] < counts["scratch"]["feature_path"]


def test_same_seed_gives_the_same_efficiency_json(tiny_record: dict) -> None:
    first = tiny_record["first"]
    again = json.loads((tiny_record["again"] / "efficiency.json").read_text())
    for record in (first, again):
        record.pop("seconds"), record.pop("wall_seconds")
        record["export"].pop("dir")
    assert first == again


def test_quick_and_full_ladders_score_on_the_same_test_videos() -> None:
    from data_shards.procedural import dataset_seeds
    from eval.efficiency import QUICK, procedural_config

    quick, full = procedural_config(EfficiencyConfig(**QUICK)), procedural_config(EfficiencyConfig())
    assert quick.train_videos == full.train_videos == 100  # the first videos: the test set
    n_quick, n_full = quick.train_videos + quick.test_videos, full.train_videos + full.test_videos
    assert dataset_seeds(n_quick, quick.seed) == dataset_seeds(n_full, full.seed)[:n_quick]
    assert quick.anchor_frame == "last" and min(quick.pan_speed) >= 2.0


def test_efficiency_refuses_a_directory_of_unrelated_files(
    tiny_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "mine"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("x")
    assert efficiency.main(["--export", str(tiny_export), "--out", str(out), "--no-mlflow", "--quick"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(out) in errors[0]
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "sub"]


def test_tasks_keep_their_order_when_workers_start_the_costly_ones_first(tiny_record: dict) -> None:
    # The pool runs point_tracking first (efficiency.COST_ORDER); the record keeps the asked order.
    record = tiny_record["first"]
    assert list(dict.fromkeys(r["task"] for r in record["rows"])) == ["classification", "point_tracking"]
    assert [k.split("/")[0] for k in record["fairness"]] == ["classification", "point_tracking"]


def test_a_variant_subset_trains_only_those(tiny_export: Path, eval_cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "subset"
    args = ["--export", str(tiny_export), "--out", str(out), "--cache-dir", str(eval_cache), "--no-mlflow"]
    args += ["--budgets=2,4", "--seeds=2", "--test-videos=10", "--tasks=classification", "--workers=1"]
    args += ["--readings=streaming", "--steps=3", "--draws=50", "--frames=6", "--size=32"]
    assert efficiency.main([*args, "--variants=pretrained,identity"]) == 0
    record = json.loads((out / "efficiency.json").read_text())
    assert {r["variant"] for r in record["rows"]} == {"pretrained", "identity"}
    # Without scratch there is nothing to win against: the verdict says no, it does not crash.
    assert record["verdict"]["wins"] == {"classification": False}


def test_an_unknown_variant_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"variants must be among .*got \['pretrianed'\]"):
        tiny_cfg(variants=("pretrianed",))


def test_quick_trains_fewer_readout_steps_unless_told() -> None:
    from eval.efficiency import QUICK_READOUT_STEPS, config_from_args, parse_args

    quick = config_from_args(parse_args(["--export", "x", "--quick"]))
    assert quick.readout.steps == QUICK_READOUT_STEPS < EfficiencyConfig().readout.steps
    assert quick.budgets == (8, 64) and quick.readings == ("streaming",)
    assert config_from_args(parse_args(["--export", "x", "--quick", "--steps", "7"])).readout.steps == 7


def test_finetune_lr_is_one_rate_for_every_finetuned_variant_and_can_be_swept() -> None:
    from eval.efficiency import DEFAULT_FINETUNE_LR, config_from_args, parse_args

    assert config_from_args(parse_args(["--export", "x"])).readout.finetune_lr == DEFAULT_FINETUNE_LR
    assert EfficiencyConfig().readout.finetune_lr == DEFAULT_FINETUNE_LR
    swept = config_from_args(parse_args(["--export", "x", "--quick", "--finetune-lr", "2e-3"]))
    assert swept.readout.finetune_lr == 2e-3 and swept.readout.lr == EfficiencyConfig().readout.lr
    with pytest.raises(ValueError, match="finetune_lr must be > 0"):
        config_from_args(parse_args(["--export", "x", "--finetune-lr", "0"]))


def _row(variant: str, mean: float, low: float, high: float, budget: int = 64) -> dict:
    return {
        "task": "classification",
        "variant": variant,
        "budget": budget,
        "reading": "streaming",
        "mean": mean,
        "ci95_low": low,
        "ci95_high": high,
        "higher_is_better": True,
    }


def _gain(variant: str, against: str, budget: int, low: float, high: float) -> dict:
    return {
        "task": "classify_speed",
        "reading": "streaming",
        "variant": variant,
        "against": against,
        "budget": budget,
        "gain": (low + high) / 2,
        "gain_ci95": [low, high],
        "mcnemar": {"only_ours_right": 20, "only_theirs_right": 5, "p": 0.004},
    }


def test_the_paired_verdict_needs_one_variant_above_both_controls_at_both_small_budgets() -> None:
    from eval.efficiency import headline_metrics, markdown, paired_verdict, verdict

    cfg = EfficiencyConfig(budgets=(8, 32, 128), tasks=("classify_speed",), readings=("streaming",))
    clear = [_gain("pretrained", against, b, 0.03, 0.19) for against in ("scratch", "identity") for b in (8, 32)]
    assert paired_verdict(clear, cfg, "streaming")["wins"] == {"classify_speed": True}
    # Overlapping unpaired intervals (speed's shape): the strict verdict says no where the paired one says yes.
    rows = [
        {**_row(v, m, lo, hi, budget=b), "task": "classify_speed", "metric": "top1"}
        for b in (8, 32)
        for v, m, lo, hi in (
            ("pretrained", 0.8, 0.66, 0.91),
            ("scratch", 0.69, 0.57, 0.8),
            ("identity", 0.53, 0.47, 0.59),
        )
    ]
    assert verdict(rows, cfg, "streaming")["wins"] == {"classify_speed": False}
    # An interval that reaches 0 at one small budget loses the task; the third budget is not asked.
    reaches_zero = [
        g if (g["against"], g["budget"]) != ("identity", 32) else {**g, "gain_ci95": [-0.01, 0.2]} for g in clear
    ]
    assert paired_verdict(reaches_zero, cfg, "streaming")["wins"] == {"classify_speed": False}
    assert paired_verdict([*clear, _gain("pretrained", "scratch", 128, -0.2, -0.1)], cfg, "streaming")["wins"] == {
        "classify_speed": True
    }
    # One variant must clear both controls: frozen over scratch and fine-tuned over identity is not a win.
    split = [g for g in clear if g["against"] == "scratch"] + [
        {**g, "variant": "pretrained-ft"} for g in clear if g["against"] == "identity"
    ]
    assert paired_verdict(split, cfg, "streaming")["wins"] == {"classify_speed": False}
    # Another reading's gains do not count.
    elsewhere = [{**g, "reading": "all-frames"} for g in clear]
    assert paired_verdict(elsewhere, cfg, "streaming")["wins"] == {"classify_speed": False}

    record = {
        "config": {"test_videos": 100, "seeds": 6, "readout": {"steps": 150}, "budgets": [8, 32, 128]},
        "export": {"dir": "runs/x/export"},
        "dataset_hash": "6ef73575f3c2f430",
        "gate": {"statement": "gate"},
        "rows": rows,
        "comparisons": clear,
        "learnability": {},
        "verdict": verdict(rows, cfg, "streaming"),
        "verdict_paired": paired_verdict(clear, cfg, "streaming"),
    }
    report = markdown(record)
    assert "gain over scratch and identity is above 0 on 1 of 1 temporal tasks" in report
    assert "| pretrained − scratch | +0.110 [+0.030, +0.190], McNemar p = 0.004 |" in report
    assert headline_metrics(record)["verdict.tasks_won"] == 0.0
    assert headline_metrics(record)["verdict_paired.tasks_won"] == 1.0


def test_without_a_floor_a_task_is_learnable_when_the_control_or_any_variant_clears_the_worst() -> None:
    from eval.efficiency import CONTROL, LEARNABLE, NOT_LEARNABLE_NO_FLOOR, learnability

    flat = [_row("identity", 0.25, 0.18, 0.32), _row("scratch", 0.27, 0.2, 0.35)]
    control = _row(CONTROL, 0.3, 0.2, 0.4)
    assert learnability([*flat, control], "streaming") == {"classification": NOT_LEARNABLE_NO_FLOOR}
    assert learnability([*flat, _row(CONTROL, 0.6, 0.5, 0.7)], "streaming") == {"classification": LEARNABLE}
    # The all-frames control overlaps the worst variant, but the pre-trained core reads the task: learnable.
    core_reads_it = [*flat, _row("pretrained", 0.99, 0.95, 1.0), _row(CONTROL, 0.49, 0.28, 0.66)]
    assert learnability(core_reads_it, "streaming") == {"classification": LEARNABLE}
    # Only the largest budget counts.
    small = _row("pretrained", 0.99, 0.95, 1.0, budget=8)
    assert learnability([*flat, small, control], "streaming") == {"classification": NOT_LEARNABLE_NO_FLOOR}


def test_the_no_feature_answer_separates_a_flat_but_learnable_task_from_an_unlearnable_one() -> None:
    from eval.efficiency import CONTROL, LEARNABLE, LEARNABLE_FLAT, NOT_LEARNABLE, learnability

    flat = [_row("identity", 0.32, 0.28, 0.36), _row("scratch", 0.35, 0.31, 0.39), _row(CONTROL, 0.37, 0.3, 0.44)]
    # Box tracking's shape: every variant well above standing still, none above another.
    standstill = {"classification": _row("no-features", 0.19, 0.16, 0.22)}
    assert learnability(flat, "streaming", standstill) == {"classification": LEARNABLE_FLAT}
    # Order's shape: everything where the majority class is.
    majority = {"classification": _row("no-features", 0.34, 0.3, 0.38)}
    assert learnability(flat, "streaming", majority) == {"classification": NOT_LEARNABLE}
    clears = [*flat, _row("pretrained", 0.6, 0.55, 0.65)]
    assert learnability(clears, "streaming", standstill) == {"classification": LEARNABLE}


def test_the_no_feature_answers_are_the_majority_class_and_the_query_standing_still() -> None:
    from eval.efficiency import no_feature_outputs
    from eval.tasks import build_task

    pool, test = torch.arange(0, 6), torch.arange(6, 9)
    labels = {"label": torch.tensor([2, 2, 1, 2, 0, 3, 1, 2, 0])}
    task = build_task("classification")
    logits = no_feature_outputs(task, labels, pool, test)["logits"]
    assert logits.argmax(-1).tolist() == [2, 2, 2]
    assert task.metrics({"logits": logits}, {"label": labels["label"][test]})["top1"] == pytest.approx(1 / 3)

    boxes_VQT4 = torch.rand(9, 2, 5, 4)
    box_targets = {"query_boxes": boxes_VQT4[:, :, 0], "boxes": boxes_VQT4, "valid": torch.ones(9, 2, 5, dtype=bool)}
    still = no_feature_outputs(build_task("box_tracking"), box_targets, pool, test)["boxes"]
    assert still.shape == (3, 2, 5, 4) and torch.equal(still[:, :, 3], boxes_VQT4[6:, :, 0])

    tracks_VQT2 = torch.rand(9, 4, 5, 2)
    points = {"queries": tracks_VQT2[:, :, 0], "tracks": tracks_VQT2, "visible": torch.ones(9, 4, 5, dtype=bool)}
    out = no_feature_outputs(build_task("point_tracking"), points, pool, test)
    assert torch.equal(out["positions"][:, :, 4], tracks_VQT2[6:, :, 0]) and (out["visibility_logits"] > 0).all()


def test_an_efficiency_report_carries_the_no_feature_answer_per_task(tiny_record: dict) -> None:
    record = tiny_record["first"]
    assert set(record["no_features"]) == {"classification", "point_tracking"}
    for task, floor in record["no_features"].items():
        assert floor["task"] == task and floor["ci95_low"] <= floor["mean"] <= floor["ci95_high"]
    assert "| no-features (any N) |" in (tiny_record["out"] / "efficiency.md").read_text()


def test_order_events_default_to_whole_frames_and_object_flashes_keep_their_cache_key() -> None:
    from eval.data import ProceduralConfig, _config_key
    from eval.efficiency import config_from_args, parse_args, procedural_config

    default = procedural_config(config_from_args(parse_args(["--export", "x"])))
    assert default.order_events == "frame" and EfficiencyConfig().order_events == "frame"
    flashes = procedural_config(config_from_args(parse_args(["--export", "x", "--order-events", "object"])))
    assert flashes.order_events == "object"
    # The object-flash set is the one made before order_events existed (ProceduralConfig's own default):
    # the same cache key, so the same cached videos and tokens.
    fields = {f.name: getattr(flashes, f.name) for f in dataclasses.fields(flashes) if f.name != "order_events"}
    assert _config_key(flashes) == _config_key(ProceduralConfig(**fields))
    assert _config_key(default) != _config_key(flashes)
    with pytest.raises(ValueError, match="order_events must be one of"):
        ProceduralConfig(order_events="global")
    with pytest.raises(SystemExit):
        parse_args(["--export", "x", "--order-events", "global"])


def test_check_validates_the_arguments_and_out_without_reading_the_export(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing_export, out = tmp_path / "not-trained-yet", tmp_path / "out"
    args = ["--export", str(missing_export), "--out", str(out), "--check", "--budgets=8,32", "--seeds=2"]
    assert efficiency.main(args) == 0
    assert "ok: tasks" in capsys.readouterr().out
    assert not out.exists() and not missing_export.exists()
    # A bad setting fails the same way it would after pre-training, naming the setting.
    assert efficiency.main([*args, "--test-videos=8"]) == 2
    assert "test_videos must be >= 10" in capsys.readouterr().err
    # So does an OUT that is someone else's directory.
    out.mkdir()
    (out / "notes.txt").write_text("x")
    assert efficiency.main(args) == 2
    assert str(out) in capsys.readouterr().err


def test_a_scratch_control_that_never_learns_is_named_in_the_report() -> None:
    from eval.efficiency import markdown, scratch_caution, scratch_learned

    floor = {"classification": _row("no-features", 0.28, 0.2, 0.38)}
    # The GMMix's shape: scratch at the floor at every budget, pre-training far above it.
    stuck = [_row("scratch", 0.24, 0.18, 0.3, budget=b) for b in (8, 32, 512)]
    stuck.append(_row("pretrained", 0.97, 0.93, 0.99, budget=512))
    assert scratch_learned(stuck, "streaming", floor) == {"classification": False}
    # Above the floor at one budget is enough; another reading's rows do not count.
    learns = [*stuck[:2], _row("scratch", 0.91, 0.85, 0.96, budget=512)]
    assert scratch_learned(learns, "streaming", floor) == {"classification": True}
    elsewhere = [{**r, "reading": "all-frames"} for r in learns]
    assert scratch_learned([*stuck, *elsewhere], "streaming", floor) == {"classification": False}
    # No floor or no scratch rows: nothing to say.
    assert scratch_learned(stuck, "streaming", {}) == {}
    assert scratch_learned(stuck[3:], "streaming", floor) == {}

    record = {
        "config": {"test_videos": 100, "seeds": 3, "readout": {"steps": 150}, "budgets": [8, 32, 512]},
        "export": {"dir": "runs/x/export"},
        "dataset_hash": "9d2b6033a6e7",
        "gate": {"statement": "gate"},
        "rows": [{**r, "metric": "top1"} for r in stuck],
        "learnability": {},
        "verdict": {"reading": "streaming", "statement": "verdict"},
        "scratch_learned": {"classification": False, "classify_speed": True},
    }
    line = scratch_caution(record)
    assert line is not None and "up to N=512 on classification;" in line and "classify_speed" not in line
    assert f"- {line}" in markdown(record)
    # A report from before the check, or one where scratch learned everything, carries no caution.
    assert scratch_caution({**record, "scratch_learned": {"classification": True}}) is None
    del record["scratch_learned"]
    assert "caution" not in markdown(record)
