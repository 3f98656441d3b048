"""Temporal cores: forward == streaming steps == chunked forward, gradients, registry,
on the reference scan and (through the Triton interpreter) on the kernel.

Shape legend: B batch, T time, N tokens per frame, D model width.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from kernels.selective_scan import uses_triton
from kernels.selective_scan.selective_scan import CONFIG_ENV
from pretrain.model.cores import CORE_KINDS, MambaBlock, TemporalCore, build_core

B, T, N, D = 2, 5, 6, 16
DEPTH = 2

EXPECTED_STATE_SHAPES: dict[str, dict[str, tuple[int, ...]]] = {
    "identity": {},
    "gated_transformer": {"state": (B, N, D)},
    "mamba": {
        f"layer{i}.{key}": shape
        for i in range(DEPTH)
        for key, shape in (("conv", (B * N, 2 * D, 3)), ("ssm", (B * N, 2 * D, 16)))
    },
}
EXPECTED_STATE_SHAPES["gmmix"] = EXPECTED_STATE_SHAPES["mamba"]


def make_core(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return build_core(kind, D, depth=DEPTH, num_heads=4, mlp_ratio=2.0, d_state=16, d_conv=4, expand=2)


def make_clip(seed: int = 1) -> Tensor:
    return torch.randn(B, T, N, D, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", CORE_KINDS)
def test_core_implements_the_interface(kind: str) -> None:
    core = make_core(kind)
    assert isinstance(core, TemporalCore)
    state = core.init_state(B, N, torch.device("cpu"), torch.float64)
    assert {k: tuple(v.shape) for k, v in state.items()} == EXPECTED_STATE_SHAPES[kind]
    for key, value in state.items():
        # The scan runs in fp32, so its state is kept in fp32 whatever the activations.
        assert value.dtype == (torch.float32 if key.endswith(".ssm") else torch.float64)


@pytest.mark.parametrize("kind", CORE_KINDS)
def test_forward_equals_loop_of_steps(kind: str) -> None:
    core = make_core(kind)
    x_BTND = make_clip()
    with torch.no_grad():
        y_BTND, state = core(x_BTND)
        step_state = None
        ys = []
        for t in range(T):
            y_BND, step_state = core.step(x_BTND[:, t], step_state)
            ys.append(y_BND)
    assert y_BTND.shape == (B, T, N, D)
    torch.testing.assert_close(torch.stack(ys, dim=1), y_BTND, atol=1e-5, rtol=1e-5)
    assert step_state is not None and set(step_state) == set(state)
    for key in state:
        torch.testing.assert_close(step_state[key], state[key], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", CORE_KINDS)
def test_chunked_forward_equals_full_forward(kind: str) -> None:
    core = make_core(kind)
    x_BTND = make_clip()
    with torch.no_grad():
        y_full, state_full = core(x_BTND)
        y_head, head_state = core(x_BTND[:, :2])
        carried = {k: v.clone() for k, v in head_state.items()}
        y_tail, state = core(x_BTND[:, 2:], head_state)
    torch.testing.assert_close(torch.cat([y_head, y_tail], dim=1), y_full, atol=1e-5, rtol=1e-5)
    assert set(state) == set(state_full)
    for key in state_full:
        torch.testing.assert_close(state[key], state_full[key], atol=1e-5, rtol=1e-5)
    # forward returns a new state and leaves the one it was given untouched.
    for key, value in carried.items():
        assert torch.equal(head_state[key], value)


@pytest.mark.parametrize("kind", CORE_KINDS)
def test_backward_reaches_every_parameter(kind: str) -> None:
    core = make_core(kind)
    x_BTND = make_clip().requires_grad_(True)
    y_BTND, _ = core(x_BTND)
    weights = torch.randn(y_BTND.shape, generator=torch.Generator().manual_seed(2))
    (y_BTND * weights).sum().backward()
    assert x_BTND.grad is not None and torch.isfinite(x_BTND.grad).all()
    params = dict(core.named_parameters())
    if kind == "identity":
        assert params == {}
        return
    assert params
    for name, param in params.items():
        assert param.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name} has a non-finite gradient"
        assert param.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


def test_mamba_block_streams_from_a_given_state() -> None:
    torch.manual_seed(0)
    block = MambaBlock(D, d_state=8, d_conv=3, expand=2)
    x_BTND = make_clip()
    with torch.no_grad():
        y_full, _ = block(x_BTND)
        state = block.init_state(B, N, "cpu", torch.float32)
        ys = []
        for t in range(T):
            y_BND, state = block.step(x_BTND[:, t], state)
            ys.append(y_BND)
    torch.testing.assert_close(torch.stack(ys, dim=1), y_full, atol=1e-5, rtol=1e-5)
    assert state["conv"].shape == (B * N, 2 * D, 2)
    # The conv state holds the last d_conv - 1 pre-conv inputs, i.e. in_proj's x half.
    x_last_PED = block.in_proj(x_BTND[:, -2:].transpose(1, 2).reshape(B * N, 2, D))[..., : 2 * D]
    torch.testing.assert_close(state["conv"], x_last_PED.transpose(1, 2), atol=1e-6, rtol=1e-6)


def test_mamba_block_dt_init_is_in_range() -> None:
    torch.manual_seed(0)
    block = MambaBlock(64, d_state=16)
    dt = torch.nn.functional.softplus(block.dt_proj.bias.detach())
    assert dt.min() >= 1e-3 * (1 - 1e-4) and dt.max() <= 1e-1 * (1 + 1e-4)
    torch.testing.assert_close(-torch.exp(block.A_log.detach()[0]), -torch.arange(1.0, 17.0))


@pytest.mark.parametrize("kind", ["gmmix", "mamba"])
def test_bf16_forward_keeps_fp32_ssm_state(kind: str) -> None:
    core = make_core(kind)
    x_BTND = make_clip()
    with torch.no_grad():
        y_fp32, _ = core(x_BTND)
        y_bf16, state = core.to(torch.bfloat16)(x_BTND.to(torch.bfloat16))
    assert y_bf16.dtype == torch.bfloat16
    assert state["layer0.ssm"].dtype == torch.float32 and state["layer0.conv"].dtype == torch.bfloat16
    torch.testing.assert_close(y_bf16.float(), y_fp32, atol=0.1, rtol=0.1)


def test_build_core_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match=r"'lstm'.*identity, gated_transformer, gmmix, mamba"):
        build_core("lstm", D)


def test_cores_reject_malformed_frames() -> None:
    core = make_core("mamba")
    with pytest.raises(ValueError, match="x_BTND"):
        core(torch.randn(B, N, D))
    with pytest.raises(ValueError, match="x_BND"):
        core.step(torch.randn(B, N, D + 1), None)


# The Triton kernel path of the Mamba-based cores, through the Triton
# interpreter on CPU (set per test, so the rest of the suite keeps the
# reference). chunk=4 makes the 5-frame clip two kernel chunks with a checkpoint.
KERNEL_CONFIG = "block_d=16,num_warps=1,chunk=4,batch_per_program=2,channel_splits=1"
# triton 3.6's interpreter warns once per runtime loop bound; noise here.
interpreter_noise = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


def _small_core(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return build_core(kind, 8, depth=1, num_heads=2, d_state=4, d_conv=3, expand=2)


def _use_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv(CONFIG_ENV, KERNEL_CONFIG)


@interpreter_noise
@pytest.mark.parametrize("kind", ["gmmix", "mamba"])
def test_kernel_path_forward_equals_steps_and_reference(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    core = _small_core(kind)
    x_BTND = torch.randn(1, T, 3, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        y_ref, state_ref = core(x_BTND)
        _use_kernel(monkeypatch)
        assert uses_triton(x_BTND.device)
        y_BTND, state = core(x_BTND)
        step_state = None
        ys = []
        for t in range(T):
            y_BND, step_state = core.step(x_BTND[:, t], step_state)
            ys.append(y_BND)
        y_head, head_state = core(x_BTND[:, :2])
        y_tail, tail_state = core(x_BTND[:, 2:], head_state)
    torch.testing.assert_close(y_BTND, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.stack(ys, dim=1), y_BTND, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([y_head, y_tail], dim=1), y_BTND, atol=1e-5, rtol=1e-5)
    assert step_state is not None
    for key in state_ref:
        torch.testing.assert_close(state[key], state_ref[key], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(step_state[key], state_ref[key], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(tail_state[key], state_ref[key], atol=1e-5, rtol=1e-5)


@interpreter_noise
@pytest.mark.parametrize("kind", ["gmmix", "mamba"])
def test_kernel_path_gradients_equal_reference_path(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every parameter's gradient, with the loss reaching the carried state too."""
    x_BTND = torch.randn(1, T, 3, 8, generator=torch.Generator().manual_seed(5))
    grads: dict[str, dict[str, Tensor]] = {}
    for path in ("reference", "kernel"):
        if path == "kernel":
            _use_kernel(monkeypatch)
        core = _small_core(kind)
        y_BTND, state = core(x_BTND)
        weights = torch.randn(y_BTND.shape, generator=torch.Generator().manual_seed(6))
        ((y_BTND * weights).sum() + state["layer0.ssm"].square().sum()).backward()
        grads[path] = {name: p.grad for name, p in core.named_parameters() if p.grad is not None}
    assert set(grads["kernel"]) == set(grads["reference"])
    for name, grad_ref in grads["reference"].items():
        torch.testing.assert_close(grads["kernel"][name], grad_ref, atol=1e-4, rtol=1e-4, msg=lambda m, k=name: k + m)
