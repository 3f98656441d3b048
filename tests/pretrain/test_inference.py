"""StreamingModel: forward == a loop of step (every core), a constant-size state, predict as the objective predicts.

The models are the tiny export's architecture and encoder with freshly drawn
weights (the predictor's zero-initialized head included), so the predictor's
output depends on every input it reads.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from data_shards import decode_video, sample_video_path
from data_shards.features import EncoderMismatchError
from pretrain.inference import StreamingModel, StreamState
from pretrain.model.predictor import FuturePredictor
from pretrain.model.spec import CORE_KINDS

ATOL = 1e-5
"""fp32 on CPU: the parallel and the stepped paths differ only in summation order."""


@pytest.fixture(scope="module")
def base(tiny_export: Path) -> StreamingModel:
    return StreamingModel.from_export(tiny_export, device="cpu")


@pytest.fixture(scope="module")
def clip_BTHWC(base: StreamingModel) -> torch.Tensor:
    """Two streams of 7 carphone frames, decoded as the trainer decoded them (odd sizes: 56 x 68)."""
    frames_THWC, _ = decode_video(sample_video_path("carphone"), short_side=base.short_side, max_frames=14)
    return torch.from_numpy(frames_THWC).view(2, 7, *frames_THWC.shape[1:])


def fresh(base: StreamingModel, seed: int = 0, **spec_changes) -> StreamingModel:
    """The base model's encoder and config with a freshly drawn model of a changed spec."""
    spec = base.spec
    core = dataclasses.replace(spec.core, **spec_changes.pop("core", {}))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FuturePredictor(dataclasses.replace(spec, core=core, **spec_changes))
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.1)
    return StreamingModel(model, base.encoder, base.config)


def step_loop(m: StreamingModel, clip_BTHWC: torch.Tensor, state: StreamState | None = None):
    state = m.init_state(clip_BTHWC.shape[0]) if state is None else state
    outputs = []
    for t in range(clip_BTHWC.shape[1]):
        y_BNd, state = m.step(clip_BTHWC[:, t], state)
        outputs.append(y_BNd)
    return torch.stack(outputs, dim=1), state


def assert_states_equal(a: StreamState, b: StreamState) -> None:
    assert a.frames == b.frames
    ta, tb = a.tensors(), b.tensors()
    assert ta.keys() == tb.keys()
    for name in ta:
        torch.testing.assert_close(ta[name], tb[name], atol=ATOL, rtol=0, msg=name)


CASES = [(kind, "all", []) for kind in CORE_KINDS] + [("gmmix", "last", []), ("gated_transformer", "all", [0])]


@pytest.mark.parametrize(
    ("kind", "memory", "layers"), CASES, ids=[f"{k}-memory_{m}" + ("-layers" if ls else "") for k, m, ls in CASES]
)
def test_forward_equals_step_loop(base, clip_BTHWC, kind, memory, layers) -> None:
    m = fresh(base, core={"kind": kind}, memory=memory, feature_layers=layers)
    y_step_BTNd, state_step = step_loop(m, clip_BTHWC)
    y_fwd_BTNd, state_fwd = m.forward(clip_BTHWC)
    B, T = clip_BTHWC.shape[:2]
    assert y_fwd_BTNd.shape == (B, T, m.spec.num_tokens, m.spec.dim)
    assert y_fwd_BTNd.dtype == torch.float32
    torch.testing.assert_close(y_fwd_BTNd, y_step_BTNd, atol=ATOL, rtol=0)
    assert_states_equal(state_fwd, state_step)
    # A clip cut in two, the second part continuing from the first's state: the same again.
    y_a, state_a = m.forward(clip_BTHWC[:, :3])
    y_b, state_b = m.forward(clip_BTHWC[:, 3:], state_a)
    torch.testing.assert_close(torch.cat([y_a, y_b], dim=1), y_step_BTNd, atol=ATOL, rtol=0)
    assert_states_equal(state_b, state_step)
    for k in range(1, m.spec.max_offset + 1):
        torch.testing.assert_close(m.predict(state_fwd, k), m.predict(state_step, k), atol=ATOL, rtol=0)


@pytest.mark.parametrize("memory", ["all", "last"])
def test_state_size_is_constant(base, clip_BTHWC, memory) -> None:
    m = fresh(base, memory=memory)
    S = m.spec.max_source_frames if memory == "all" else 1
    assert m.memory_frames == S
    state = m.init_state(2)
    layout = {name: (t.shape, t.dtype) for name, t in state.tensors().items()}
    nbytes = state.nbytes()
    # Three times the window: the state must not grow once the window is full.
    frames = torch.cat([clip_BTHWC] * 2, dim=1)[:, : 3 * S + 2]
    for t in range(frames.shape[1]):
        y_BNd, state = m.step(frames[:, t], state)
        assert {name: (x.shape, x.dtype) for name, x in state.tensors().items()} == layout
        assert state.nbytes() == nbytes
        assert state.frames == t + 1
        # The window's newest entry is this frame's output; the oldest kept is S - 1 frames back.
        torch.testing.assert_close(state.memory_BSNd[:, -1], y_BNd, atol=0, rtol=0)


@pytest.mark.parametrize("memory", ["all", "last"])
def test_predict_is_the_objectives_prediction(base, clip_BTHWC, memory) -> None:
    """Over S frames from a fresh state, predict == FuturePredictor.forward with those frames as sources, all masked."""
    m = fresh(base, memory=memory)
    S = m.spec.max_source_frames
    _, state = step_loop(m, clip_BTHWC[:, :S])
    tokens_BSND, _ = m.encode(m.prepare(clip_BTHWC[:, :S].flatten(0, 1)).unflatten(0, (2, S)))
    B, D = tokens_BSND.shape[0], tokens_BSND.shape[-1]
    for k in range(1, m.spec.max_offset + 1):
        offsets_BK = torch.full((B, 1), k)
        expected_B1ND = m.model(
            tokens_BSND, offsets_BK, torch.zeros(B, 1, 0, dtype=torch.long), torch.zeros(B, 1, 0, D)
        )
        torch.testing.assert_close(m.predict(state, offset=k), expected_B1ND[:, 0], atol=ATOL, rtol=0)


def test_predict_shape_and_offsets(base, clip_BTHWC) -> None:
    m = fresh(base)
    with pytest.raises(ValueError, match="at least one frame"):
        m.predict(m.init_state(2), offset=1)
    _, state = step_loop(m, clip_BTHWC[:, :3])
    pred_1 = m.predict(state, offset=1)
    pred_max = m.predict(state, offset=m.spec.max_offset)
    assert pred_1.shape == (2, m.spec.num_tokens, m.spec.encoder_dim)
    assert pred_1.dtype == torch.float32
    assert (pred_1 - pred_max).abs().max() > 1e-3
    for bad in (0, m.spec.max_offset + 1):
        with pytest.raises(ValueError, match="offset must be in"):
            m.predict(state, offset=bad)


def test_step_takes_one_frame_or_a_batch(base, clip_BTHWC) -> None:
    frame_HWC = clip_BTHWC[0, 0].numpy()
    y_BNd, state = base.step(frame_HWC, base.init_state(1))
    assert y_BNd.shape == (1, base.spec.num_tokens, base.spec.dim)
    batched_BNd, _ = base.step(clip_BTHWC[:1, 0], base.init_state(1))
    torch.testing.assert_close(y_BNd, batched_BNd, atol=0, rtol=0)
    with pytest.raises(ValueError, match="state is for 1 streams"):
        base.step(clip_BTHWC[:, 0], state)
    with pytest.raises(ValueError, match="uint8"):
        base.step(clip_BTHWC[0, 0].float(), state)


def test_prepare_cuts_the_trainers_square(base) -> None:
    """A wide frame: the centred square, resized to the encoder's image size."""
    frame_HWC = torch.zeros(60, 100, 3, dtype=torch.uint8)
    frame_HWC[:, :20] = 255
    frame_HWC[:, 80:] = 255
    crop_BCHW = base.prepare(frame_HWC)
    size = base.encoder.image_size
    assert crop_BCHW.shape == (1, 3, size, size) and crop_BCHW.dtype == torch.uint8
    assert crop_BCHW.max() == 0


def test_from_export_refuses_another_encoder(tiny_export: Path, tmp_path: Path) -> None:
    export = tmp_path / "export"
    shutil.copytree(tiny_export, export)
    record = json.loads((export / "config.json").read_text())
    record["encoder"]["weights_hash"] = "0123456789abcdef"
    (export / "config.json").write_text(json.dumps(record))
    with pytest.raises(EncoderMismatchError, match="0123456789abcdef"):
        StreamingModel.from_export(export)


@pytest.mark.gpu
def test_cuda_bf16_forward_equals_step_loop(tiny_export: Path, clip_BTHWC) -> None:
    m = StreamingModel.from_export(tiny_export, device="cuda")
    y_step, state_step = step_loop(m, clip_BTHWC)
    y_fwd, state_fwd = m.forward(clip_BTHWC)
    assert y_fwd.dtype == torch.float32 and y_fwd.device.type == "cuda"
    torch.testing.assert_close(y_fwd, y_step, atol=5e-2, rtol=5e-2)
    assert {k: v.shape for k, v in state_fwd.tensors().items()} == {k: v.shape for k, v in state_step.tensors().items()}
    assert m.predict(state_step, offset=1).dtype == torch.float32
