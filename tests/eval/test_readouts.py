"""The readouts read what their protocol allows and nothing else, are as wide as promised, and can learn.

Shape legend (as eval/readouts.py): B clips, T frames, N = G*G patch tokens,
d feature width, Q query points or objects, 2 = (x, y), 4 = box.

Streaming: frame t's answer may depend on frame t's core outputs only (the
past reaches it through the core, which these tests replace by arbitrary
features), so perturbing any other frame must leave it bit-identical, and
perturbing frame t must move it. All frames: every answer may read every
frame, and does.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from eval.readouts import (
    READOUT_WIDTH,
    BoxTrackHead,
    FourierEncoding,
    PointTrackHead,
    free_running,
    patch_centers,
)
from eval.tasks import Batch, build_task

TASKS = ("classification", "depth", "point_tracking", "box_tracking", "camera_pose")
PER_FRAME_TASKS = TASKS[1:]
TRACKING = {
    "point_tracking": ("queries", "positions", PointTrackHead),
    "box_tracking": ("query_boxes", "boxes", BoxTrackHead),
}
"""Streaming tracking heads are recurrent: (query input, output, head class)."""
B, T, G, DIM = 2, 5, 3, 32

# Output -> its frame axis; a pose output s belongs to the pair (s, s+1), answered at frame s+1.
FRAME_AXIS = {"positions": 2, "visibility_logits": 2, "boxes": 2, "log_depth": 1, "translation": 1, "rotation": 1}
PAIR_OUTPUTS = ("translation", "rotation")


def synthetic_batch(name: str, batch: int = B, frames: int = T, queries: int = 3) -> Batch:
    """Query inputs of the task's batch layout (targets are not read by ``outputs``)."""
    gen = torch.Generator().manual_seed(1)
    if name == "point_tracking":
        return {"queries": torch.rand(batch, queries, 2, generator=gen)}
    if name == "box_tracking":
        corner_BQ2 = 0.6 * torch.rand(batch, queries, 2, generator=gen)
        return {"query_boxes": torch.cat([corner_BQ2, corner_BQ2 + 0.3], dim=-1)}
    return {}


def at_frame(outputs: Batch, t: int) -> dict[str, Tensor]:
    """The outputs answered at frame t (none of a pose output at t = 0)."""
    picked = {}
    for key, value in outputs.items():
        s = t - 1 if key in PAIR_OUTPUTS else t
        if s >= 0:
            picked[key] = value.select(FRAME_AXIS[key], s)
    return picked


def build(name: str, streaming: bool, dim: int = DIM, frames: int = T) -> tuple[object, nn.Module]:
    torch.manual_seed(0)
    task = build_task(name)
    readout = task.build_readout(dim, G, frames, streaming=streaming).eval()
    with torch.no_grad():
        # Some layers start at zero by design (the streaming point head starts standing still), which
        # would hide every input; random weights let these tests see what each answer reads.
        for parameter in readout.parameters():
            if not parameter.any():
                parameter.normal_(0.0, 0.1)
    return task, readout


def run(task, readout: nn.Module, features_BTNd: Tensor, batch: Batch) -> Batch:
    with torch.no_grad():
        return task.outputs(readout, features_BTNd, batch)


def same(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def perturbed(features_BTNd: Tensor, frames: slice | int) -> Tensor:
    out = features_BTNd.clone()
    out[:, frames] += torch.randn_like(out[:, frames])
    return out


@pytest.mark.parametrize("name", PER_FRAME_TASKS)
def test_streaming_answer_at_t_reads_frame_t_only(name: str) -> None:
    task, readout = build(name, streaming=True)
    batch = synthetic_batch(name)
    torch.manual_seed(2)
    features_BTNd = torch.randn(B, T, G * G, DIM)
    base = run(task, readout, features_BTNd, batch)
    for t in range(T):
        # The future never reaches frames <= t ...
        future = run(task, readout, perturbed(features_BTNd, slice(t + 1, None)), batch)
        for s in range(t + 1):
            assert same(at_frame(future, s), at_frame(base, s)), f"frame {s} moved with frames > {t}"
        # ... and frame t's own tokens do (a head that reads nothing would pass the line above).
        own = run(task, readout, perturbed(features_BTNd, t), batch)
        if at_frame(base, t):
            assert not same(at_frame(own, t), at_frame(base, t)), f"frame {t}'s answer ignores frame {t}"
    if name not in TRACKING:
        # No recurrence in the head: the past does not reach frame t either (the tracking heads carry their
        # own prediction, by design; see test_tracking_query_is_the_previous_prediction).
        for t in range(1, T):
            past = run(task, readout, perturbed(features_BTNd, slice(0, t)), batch)
            assert same(at_frame(past, t), at_frame(base, t)), f"frame {t} moved with frames < {t}"


def test_streaming_classification_reads_the_last_frame_only() -> None:
    task, readout = build("classification", streaming=True)
    features_BTNd = torch.randn(B, T, G * G, DIM)
    logits_BC = run(task, readout, features_BTNd, {})["logits"]
    assert torch.equal(run(task, readout, perturbed(features_BTNd, slice(0, T - 1)), {})["logits"], logits_BC)
    assert not torch.equal(run(task, readout, perturbed(features_BTNd, T - 1), {})["logits"], logits_BC)


def test_point_query_is_a_coordinate_not_a_frame0_feature() -> None:
    """All frames: the query is the frame-0 coordinate; frame 0's tokens reach every frame through the
    attention over all frames, never by sampling a feature at the query (then frame 0 alone would move)."""
    centers_N2 = patch_centers(G)
    batch = {"queries": centers_N2[[4, 0]].expand(B, 2, 2).clone()}
    features_BTNd = torch.randn(B, T, G * G, DIM)
    changed = features_BTNd.clone()
    changed[:, 0, 4] += 3 * torch.randn(B, DIM)
    task, readout = build("point_tracking", streaming=False)
    encoded: list[Tensor] = []
    handle = readout.query.register_forward_hook(lambda module, args, out: encoded.append(args[0].clone()))
    try:
        base, moved = run(task, readout, features_BTNd, batch), run(task, readout, changed, batch)
    finally:
        handle.remove()
    assert all(torch.equal(e, batch["queries"]) for e in encoded)
    assert not any(same(at_frame(moved, t), at_frame(base, t)) for t in range(T))


@pytest.mark.parametrize("name", TRACKING)
def test_tracking_query_is_the_previous_prediction(name: str) -> None:
    """Streaming tracking is free-running: the query at t encodes what the head predicted at t-1
    (the given query at t = 0), a coordinate, never a feature sampled from an earlier frame."""
    query_key, output_key, head = TRACKING[name]
    task, readout = build(name, streaming=True)
    assert isinstance(readout, head)
    batch = synthetic_batch(name)
    encoded: list[Tensor] = []
    handle = readout.query.register_forward_hook(lambda module, args, out: encoded.append(args[0].clone()))
    try:
        predicted_BQTk = run(task, readout, torch.randn(B, T, G * G, DIM), batch)[output_key]
    finally:
        handle.remove()
    assert len(encoded) == T
    assert torch.equal(encoded[0], batch[query_key])
    for t in range(1, T):
        assert torch.equal(encoded[t], predicted_BQTk[:, :, t - 1]), f"query at {t} is not the prediction at {t - 1}"
    # So frame 0's tokens reach later frames, but only through the predicted coordinates.
    features_BTNd = torch.randn(B, T, G * G, DIM)
    base = run(task, readout, features_BTNd, batch)
    moved = run(task, readout, perturbed(features_BTNd, 0), batch)
    assert not same(at_frame(moved, T - 1), at_frame(base, T - 1))


@pytest.mark.parametrize("name", TRACKING)
def test_batched_training_pass_equals_the_free_running_loop(name: str) -> None:
    """With gradients on, the tracking heads run the chain without a graph and then every frame from its
    prior at once: the outputs and every gradient must be the loop's (which is what runs without them)."""
    query_key, output_key, _ = TRACKING[name]
    task, readout = build(name, streaming=True)
    batch = synthetic_batch(name)
    features_BTNd = torch.randn(B, T, G * G, DIM)

    def outputs_and_grads(loop: bool) -> tuple[Tensor, list[Tensor]]:
        readout.zero_grad()
        features = features_BTNd.clone().requires_grad_(True)
        if loop:
            keys, values = readout.kv(features)
            step = readout._step
            out = free_running(step, keys, values, batch[query_key], detach=True, batch_training=False)[0]
        else:
            out = task.outputs(readout, features, batch)[output_key]
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return out.detach(), [features.grad, *(p.grad for p in readout.parameters() if p.grad is not None)]

    batched, batched_grads = outputs_and_grads(loop=False)
    looped, looped_grads = outputs_and_grads(loop=True)
    torch.testing.assert_close(batched, looped, rtol=1e-5, atol=1e-6)
    assert len(batched_grads) == len(looped_grads)
    for a, b in zip(batched_grads, looped_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_streaming_point_head_steps_at_most_a_patch_per_frame() -> None:
    task, readout = build("point_tracking", streaming=True)
    with torch.no_grad():
        readout.out.mlp[-1].bias.fill_(100.0)
    positions_BQT2 = run(task, readout, torch.randn(B, T, G * G, DIM), synthetic_batch("point_tracking"))["positions"]
    steps = torch.diff(positions_BQT2, dim=2).abs()
    torch.testing.assert_close(steps, torch.full_like(steps, 1 / G))


@pytest.mark.parametrize("name", TASKS)
def test_all_frames_readout_reads_every_frame(name: str) -> None:
    """The 4DS-style control: the first answer moves with the last frame (depth stays per frame)."""
    task, readout = build(name, streaming=False)
    batch = synthetic_batch(name)
    features_BTNd = torch.randn(B, T, G * G, DIM)
    base, moved = run(task, readout, features_BTNd, batch), run(task, readout, perturbed(features_BTNd, T - 1), batch)
    if name == "classification":
        moved = run(task, readout, perturbed(features_BTNd, 0), batch)
        assert not torch.equal(moved["logits"], base["logits"])
    elif name == "depth":
        assert same(at_frame(moved, 0), at_frame(base, 0))
    else:
        first = 1 if name == "camera_pose" else 0
        assert not same(at_frame(moved, first), at_frame(base, first))


@pytest.mark.parametrize("streaming", [True, False], ids=["streaming", "all_frames"])
@pytest.mark.parametrize("dim", [32, 384])
@pytest.mark.parametrize("name", TASKS)
def test_readout_width_is_independent_of_the_core(name: str, dim: int, streaming: bool) -> None:
    """Every readout projects the features to >= 128 and keeps every hidden layer that wide."""
    task, readout = build(name, streaming, dim=dim)
    assert readout.width >= READOUT_WIDTH >= 128
    assert task.config()["readout_width"] == readout.width
    coordinate_inputs = {id(m.mlp[0]) for m in readout.modules() if isinstance(m, FourierEncoding)}
    linears = [m for m in readout.modules() if isinstance(m, nn.Linear)]
    from_features = [m for m in linears if m.in_features == dim]
    assert from_features and all(m.out_features >= 128 for m in from_features)
    for m in linears:
        if m not in from_features and id(m) not in coordinate_inputs:
            assert m.in_features >= 128, f"a hidden layer of width {m.in_features} in {name}"
    # The readout is the same whatever the core's width, except for the projection's input.
    _, other = build(name, streaming, dim=64)
    delta = sum(p.numel() for p in readout.parameters()) - sum(p.numel() for p in other.parameters())
    assert delta == sum(m.out_features for m in from_features) * (dim - 64)


def test_config_says_which_readout_ran() -> None:
    for name in TASKS:
        task = build_task(name)
        config = task.config()
        assert config["readouts_built"] == [] and config["readout_width"] >= 128
        assert config["readout_streaming"] and config["readout_all_frames"]
        task.build_readout(DIM, G, T, streaming=True)
        assert task.config()["readouts_built"] == ["streaming"]
        task.build_readout(DIM, G, T, streaming=False)
        task.build_readout(DIM, G, T, streaming=True)
        assert task.config()["readouts_built"] == ["streaming", "all_frames"]


def test_untrained_box_head_keeps_the_query_size() -> None:
    """The size is the prior box's times a learned factor: with that factor at 1 the box keeps its size."""
    task, readout = build("box_tracking", streaming=True)
    with torch.no_grad():
        readout.out.mlp[-1].weight.zero_()
        readout.out.mlp[-1].bias.zero_()
    query_BQ4 = torch.tensor([[[0.4, 0.4, 0.6, 0.5]]]).expand(B, 1, 4)
    boxes_BQT4 = run(task, readout, torch.randn(B, T, G * G, DIM), {"query_boxes": query_BQ4})["boxes"]
    size_BQT2 = boxes_BQT4[..., 2:] - boxes_BQT4[..., :2]
    torch.testing.assert_close(size_BQT2, torch.tensor([0.2, 0.1]).expand_as(size_BQT2))


# Learnability: features where frame t's tokens carry frame t's answer (what a perfect core would
# deliver). A streaming head must learn it within a readout's budget; chance is far from the bar.
LEARN_CLIPS, LEARN_TRAIN, LEARN_T, LEARN_G, LEARN_D = 48, 32, 5, 6, 32


def _cells_to_centers(cells: Tensor) -> Tensor:
    return (torch.stack([cells % LEARN_G, cells // LEARN_G], dim=-1).float() + 0.5) / LEARN_G


def _train(name: str, features_VTNd: Tensor, targets: Batch, steps: int, lr: float = 2e-3) -> tuple[Batch, Batch]:
    """Train the streaming readout on the first clips as eval.probe does; outputs and targets of the rest."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    task = build_task(name)
    readout = task.build_readout(LEARN_D, LEARN_G, LEARN_T, streaming=True)
    optimizer = torch.optim.AdamW(readout.parameters(), lr=lr, weight_decay=0.01)
    for _ in range(steps):
        idx = torch.randint(LEARN_TRAIN, (8,), generator=gen)
        batch = {k: v[idx] for k, v in targets.items()}
        loss = task.loss(task.outputs(readout, features_VTNd[idx], batch), batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    test = {k: v[LEARN_TRAIN:] for k, v in targets.items()}
    return run(task, readout.eval(), features_VTNd[LEARN_TRAIN:], test), test


def _noise(gen: torch.Generator) -> Tensor:
    return 0.1 * torch.randn(LEARN_CLIPS, LEARN_T, LEARN_G**2, LEARN_D, generator=gen)


def test_streaming_point_head_learns_when_frame_t_holds_the_answer() -> None:
    """A point drifts at a constant sub-patch velocity; frame t's tokens carry that velocity (what a core
    that has seen the motion would give) wherever the point has been. Free-running from frame 0, the
    head must follow it far closer than standing still does."""
    gen = torch.Generator().manual_seed(0)
    V = LEARN_CLIPS
    start_V2 = 0.3 + 0.4 * torch.rand(V, 2, generator=gen)
    velocity_V2 = (torch.rand(V, 2, generator=gen) - 0.5) * (0.8 / LEARN_G)
    tracks_V1T2 = (start_V2[:, None] + torch.arange(LEARN_T)[None, :, None] * velocity_V2[:, None])[:, None]
    features_VTNd = _noise(gen)
    features_VTNd[..., :2] += velocity_V2[:, None, None] * LEARN_G
    targets = {
        "queries": start_V2[:, None],
        "tracks": tracks_V1T2,
        "visible": torch.ones(V, 1, LEARN_T, dtype=torch.bool),
    }
    outputs, test = _train("point_tracking", features_VTNd, targets, steps=200)
    error = (outputs["positions"] - test["tracks"]).norm(dim=-1).mean()
    still = (test["queries"][:, :, None] - test["tracks"]).norm(dim=-1).mean()
    assert error < 0.5 * still, f"mean error {error * LEARN_G:.3f} patches vs {still * LEARN_G:.3f} standing still"


def test_streaming_box_head_learns_when_frame_t_holds_the_answer() -> None:
    """A 2 x 2-patch object random-walks a patch per frame; frame t's tokens mark its patches. Free-running."""
    gen = torch.Generator().manual_seed(0)
    V, size = LEARN_CLIPS, 2
    start_V2 = torch.randint(0, LEARN_G - size + 1, (V, 2), generator=gen)
    steps_VT2 = torch.randint(-1, 2, (V, LEARN_T, 2), generator=gen)
    steps_VT2[:, 0] = 0
    corner_VT2 = (start_V2[:, None] + steps_VT2.cumsum(1)).clamp(0, LEARN_G - size)
    features_VTNd = _noise(gen)
    v_, t_ = torch.meshgrid(torch.arange(V), torch.arange(LEARN_T), indexing="ij")
    for i in range(size):
        for j in range(size):
            cells_VT = (corner_VT2[..., 1] + i) * LEARN_G + corner_VT2[..., 0] + j
            features_VTNd[v_, t_, cells_VT, 0] += 1.0
    boxes_V1T4 = torch.cat([corner_VT2, corner_VT2 + size], dim=-1).float()[:, None] / LEARN_G
    targets = {"query_boxes": boxes_V1T4[:, :, 0], "boxes": boxes_V1T4, "valid": torch.ones(V, 1, LEARN_T, dtype=bool)}
    outputs, test = _train("box_tracking", features_VTNd, targets, steps=150)
    miou = build_task("box_tracking").metrics(outputs, test)["miou"]
    assert miou > 0.7, f"mIoU {miou:.2f}"


def test_streaming_pose_head_learns_when_frame_t_holds_the_answer() -> None:
    """Frame t's tokens carry the motion from t-1 to t; predicting zero would err by ~3.8."""
    gen = torch.Generator().manual_seed(0)
    motion_VS2 = 3 * torch.randn(LEARN_CLIPS, LEARN_T - 1, 2, generator=gen)
    features_VTNd = _noise(gen)
    features_VTNd[:, 1:, :, :2] += motion_VS2[:, :, None] / 3
    targets = {"translation": motion_VS2, "rotation": torch.zeros(LEARN_CLIPS, LEARN_T - 1)}
    outputs, test = _train("camera_pose", features_VTNd, targets, steps=200)
    zero_error = test["translation"].norm(dim=-1).mean()
    error = build_task("camera_pose").metrics(outputs, test)["rpe_trans"]
    assert error < 0.3 * zero_error, f"RPE {error:.2f} vs {zero_error:.2f} for predicting no motion"


def test_streaming_classification_learns_when_the_last_frame_holds_the_answer() -> None:
    gen = torch.Generator().manual_seed(0)
    labels_V = torch.randint(4, (LEARN_CLIPS,), generator=gen)
    features_VTNd = _noise(gen)
    features_VTNd[torch.arange(LEARN_CLIPS), -1, :, labels_V] += 1.0
    outputs, test = _train("classification", features_VTNd, {"label": labels_V}, steps=100)
    assert build_task("classification").metrics(outputs, test)["top1"] == 1.0
