"""Temporal cores: forward == streaming steps == chunked forward, gradients, registry,
on the CPU scan path (kernels/selective_scan/cpu.py, pinned to the reference) and
(through the Triton interpreter) on the kernel.

The gated transformer's forward is the loop of its step (its gates read the
state), so forward == steps says nothing about it: it is checked against a
reference written out here from its docstring's math instead.

Shape letters: the glossary in ``pretrain/__init__.py`` (B batch, T time, N
tokens per frame, d the core's width, A heads, E head width).
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from kernels.selective_scan import uses_triton
from kernels.selective_scan.selective_scan import CONFIG_ENV
from pretrain.model.cores import CORE_KINDS, MambaBlock, TemporalCore, build_core

B, T, N, d = 2, 5, 6, 16
DEPTH = 2

EXPECTED_STATE_SHAPES: dict[str, dict[str, tuple[int, ...]]] = {
    "identity": {},
    "gated_transformer": {"state": (B, N, d)},
    "mamba": {
        f"layer{i}.{key}": shape
        for i in range(DEPTH)
        for key, shape in (("conv", (B * N, 2 * d, 3)), ("ssm", (B * N, 2 * d, 16)))
    },
}
EXPECTED_STATE_SHAPES["gmmix"] = EXPECTED_STATE_SHAPES["mamba"]


def make_core(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return build_core(kind, d, depth=DEPTH, num_heads=4, mlp_ratio=2.0, d_state=16, d_conv=4, expand=2)


def make_clip(seed: int = 1) -> Tensor:
    return torch.randn(B, T, N, d, generator=torch.Generator().manual_seed(seed))


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
    x_BTNd = make_clip()
    with torch.no_grad():
        y_BTNd, state = core(x_BTNd)
        step_state = None
        ys = []
        for t in range(T):
            y_BNd, step_state = core.step(x_BTNd[:, t], step_state)
            ys.append(y_BNd)
    assert y_BTNd.shape == (B, T, N, d)
    torch.testing.assert_close(torch.stack(ys, dim=1), y_BTNd, atol=1e-5, rtol=1e-5)
    assert step_state is not None and set(step_state) == set(state)
    for key in state:
        torch.testing.assert_close(step_state[key], state[key], atol=1e-5, rtol=1e-5)


def test_identity_core_returns_its_input() -> None:
    """The image-only baseline: forward and step hand the tokens through, with no state."""
    core = make_core("identity")
    x_BTNd = make_clip()
    y_BTNd, state = core(x_BTNd)
    assert torch.equal(y_BTNd, x_BTNd) and state == {}
    y_BNd, state = core.step(x_BTNd[:, 2], {})
    assert torch.equal(y_BNd, x_BTNd[:, 2]) and state == {}


def _layer_norm(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).square().mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * weight + bias


def _gated_transformer_reference(p: dict[str, Tensor], x_BTNd: Tensor, heads: int) -> tuple[Tensor, Tensor]:
    """The gated transformer's docstring, frame by frame, from its parameters alone (float64).

    s0 = the learned token; per frame: u, r = sigmoid(W [LN(x), s]); memory = r * LN(s);
    h = x, then per layer h += Attn(q=LN(h), kv=memory), h += MLP(LN(h)); h = LN(h);
    s' = (1 - u) * s + u * h, and the output is s'.
    """
    B, T, N, d = x_BTNd.shape
    E = d // heads
    s_BNd = p["init_token_D"].expand(B, N, d)
    depth = 1 + max(int(k.split(".")[1]) for k in p if k.startswith("layers."))
    outputs = []
    for t in range(T):
        x_BNd = x_BTNd[:, t]
        joint_BN2d = torch.cat([_layer_norm(x_BNd, p["input_norm.weight"], p["input_norm.bias"]), s_BNd], dim=-1)
        gates_BN2d = torch.sigmoid(joint_BN2d @ p["gates.weight"].T + p["gates.bias"])
        u_BNd, r_BNd = gates_BN2d[..., :d], gates_BN2d[..., d:]
        memory_BNd = r_BNd * _layer_norm(s_BNd, p["state_norm.weight"], p["state_norm.bias"])
        h_BNd = x_BNd
        for i in range(depth):
            w = {k.removeprefix(f"layers.{i}."): v for k, v in p.items() if k.startswith(f"layers.{i}.")}
            q_BNd = _layer_norm(h_BNd, w["attn_norm.weight"], w["attn_norm.bias"])
            q_BNd = q_BNd @ w["attn.q_proj.weight"].T + w["attn.q_proj.bias"]
            kv_BN2d = memory_BNd @ w["attn.kv_proj.weight"].T + w["attn.kv_proj.bias"]
            k_BNd, v_BNd = kv_BN2d[..., :d], kv_BN2d[..., d:]
            heads_out = []
            for a in range(heads):
                cut = slice(a * E, (a + 1) * E)
                scores_BNN = q_BNd[..., cut] @ k_BNd[..., cut].transpose(1, 2) / E**0.5
                heads_out.append(scores_BNN.softmax(dim=-1) @ v_BNd[..., cut])
            attn_BNd = torch.cat(heads_out, dim=-1) @ w["attn.out_proj.weight"].T + w["attn.out_proj.bias"]
            h_BNd = h_BNd + attn_BNd
            m_BNd = _layer_norm(h_BNd, w["mlp_norm.weight"], w["mlp_norm.bias"])
            hidden = torch.nn.functional.gelu(m_BNd @ w["mlp.fc1.weight"].T + w["mlp.fc1.bias"])
            h_BNd = h_BNd + hidden @ w["mlp.fc2.weight"].T + w["mlp.fc2.bias"]
        h_BNd = _layer_norm(h_BNd, p["out_norm.weight"], p["out_norm.bias"])
        s_BNd = (1 - u_BNd) * s_BNd + u_BNd * h_BNd
        outputs.append(s_BNd)
    return torch.stack(outputs, dim=1), s_BNd


def test_gated_transformer_matches_its_written_out_math() -> None:
    core = make_core("gated_transformer")
    # Non-trivial gates and a non-constant initial token, so every term of the update shows.
    with torch.no_grad():
        for name, param in core.named_parameters():
            if name.endswith("bias") or name == "init_token_D":
                param.normal_(std=0.5, generator=torch.Generator().manual_seed(len(name)))
    x_BTNd = make_clip()
    params = {k: v.detach().double() for k, v in core.state_dict().items()}
    y_ref_BTNd, s_ref_BNd = _gated_transformer_reference(params, x_BTNd.double(), heads=4)
    with torch.no_grad():
        y_BTNd, state = core(x_BTNd)
    torch.testing.assert_close(y_BTNd.double(), y_ref_BTNd, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state["state"].double(), s_ref_BNd, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", CORE_KINDS)
def test_chunked_forward_equals_full_forward(kind: str) -> None:
    core = make_core(kind)
    x_BTNd = make_clip()
    with torch.no_grad():
        y_full, state_full = core(x_BTNd)
        y_head, head_state = core(x_BTNd[:, :2])
        carried = {k: v.clone() for k, v in head_state.items()}
        y_tail, state = core(x_BTNd[:, 2:], head_state)
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
    x_BTNd = make_clip().requires_grad_(True)
    y_BTNd, _ = core(x_BTNd)
    weights = torch.randn(y_BTNd.shape, generator=torch.Generator().manual_seed(2))
    (y_BTNd * weights).sum().backward()
    assert x_BTNd.grad is not None and torch.isfinite(x_BTNd.grad).all()
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
    block = MambaBlock(d, d_state=8, d_conv=3, expand=2)
    x_BTNd = make_clip()
    with torch.no_grad():
        y_full, _ = block(x_BTNd)
        state = block.init_state(B, N, "cpu", torch.float32)
        ys = []
        for t in range(T):
            y_BNd, state = block.step(x_BTNd[:, t], state)
            ys.append(y_BNd)
    torch.testing.assert_close(torch.stack(ys, dim=1), y_full, atol=1e-5, rtol=1e-5)
    assert state["conv"].shape == (B * N, 2 * d, 2)
    # The conv state holds the last d_conv - 1 pre-conv inputs, i.e. in_proj's x half.
    x_last_PId = block.in_proj(x_BTNd[:, -2:].transpose(1, 2).reshape(B * N, 2, d))[..., : 2 * d]
    torch.testing.assert_close(state["conv"], x_last_PId.transpose(1, 2), atol=1e-6, rtol=1e-6)


def test_mamba_block_dt_init_is_in_range() -> None:
    torch.manual_seed(0)
    block = MambaBlock(64, d_state=16)
    dt = torch.nn.functional.softplus(block.dt_proj.bias.detach())
    assert dt.min() >= 1e-3 * (1 - 1e-4) and dt.max() <= 1e-1 * (1 + 1e-4)
    torch.testing.assert_close(-torch.exp(block.A_log.detach()[0]), -torch.arange(1.0, 17.0))


@pytest.mark.parametrize("kind", ["gmmix", "mamba"])
def test_bf16_forward_keeps_fp32_ssm_state(kind: str) -> None:
    core = make_core(kind)
    x_BTNd = make_clip()
    with torch.no_grad():
        y_fp32, _ = core(x_BTNd)
        y_bf16, state = core.to(torch.bfloat16)(x_BTNd.to(torch.bfloat16))
    assert y_bf16.dtype == torch.bfloat16
    assert state["layer0.ssm"].dtype == torch.float32 and state["layer0.conv"].dtype == torch.bfloat16
    torch.testing.assert_close(y_bf16.float(), y_fp32, atol=0.1, rtol=0.1)


def test_build_core_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match=r"'lstm'.*identity, gated_transformer, gmmix, mamba"):
        build_core("lstm", d)


def test_cores_reject_malformed_frames() -> None:
    core = make_core("mamba")
    with pytest.raises(ValueError, match="x_BTNd"):
        core(torch.randn(B, N, d))
    with pytest.raises(ValueError, match="x_BNd"):
        core.step(torch.randn(B, N, d + 1), None)


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
    x_BTNd = torch.randn(1, T, 3, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        y_ref, state_ref = core(x_BTNd)
        _use_kernel(monkeypatch)
        assert uses_triton(x_BTNd.device)
        y_BTNd, state = core(x_BTNd)
        step_state = None
        ys = []
        for t in range(T):
            y_BNd, step_state = core.step(x_BTNd[:, t], step_state)
            ys.append(y_BNd)
        y_head, head_state = core(x_BTNd[:, :2])
        y_tail, tail_state = core(x_BTNd[:, 2:], head_state)
    torch.testing.assert_close(y_BTNd, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.stack(ys, dim=1), y_BTNd, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([y_head, y_tail], dim=1), y_BTNd, atol=1e-5, rtol=1e-5)
    assert step_state is not None
    for key in state_ref:
        torch.testing.assert_close(state[key], state_ref[key], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(step_state[key], state_ref[key], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(tail_state[key], state_ref[key], atol=1e-5, rtol=1e-5)


@interpreter_noise
@pytest.mark.parametrize("kind", ["gmmix", "mamba"])
def test_kernel_path_gradients_equal_reference_path(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every parameter's gradient, with the loss reaching the carried state too."""
    x_BTNd = torch.randn(1, T, 3, 8, generator=torch.Generator().manual_seed(5))
    grads: dict[str, dict[str, Tensor]] = {}
    for path in ("reference", "kernel"):
        if path == "kernel":
            _use_kernel(monkeypatch)
        core = _small_core(kind)
        y_BTNd, state = core(x_BTNd)
        weights = torch.randn(y_BTNd.shape, generator=torch.Generator().manual_seed(6))
        ((y_BTNd * weights).sum() + state["layer0.ssm"].square().sum()).backward()
        grads[path] = {name: p.grad for name, p in core.named_parameters() if p.grad is not None}
    assert set(grads["kernel"]) == set(grads["reference"])
    for name, grad_ref in grads["reference"].items():
        torch.testing.assert_close(grads["kernel"][name], grad_ref, atol=1e-4, rtol=1e-4, msg=lambda m, k=name: k + m)
