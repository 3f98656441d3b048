"""Temporal cores: recurrent modules that read frame tokens as a causal stream.

Shape letters follow the glossary in ``pretrain/__init__.py``: B batch, T
time (frames), N tokens per frame, d the core's width, P = B*N per-patch
sequences, F = B*T frames, E Mamba inner width (expand * d), Z SSM state size
per channel (d_state), J causal conv width (d_conv), R rank of the step-size
projection (dt_rank), X = R + 2Z outputs of x_proj.

Every core keeps the width d, uses pre-norm residual sublayers and shares one
interface (`TemporalCore`): `forward` over a clip, `step` over one frame, and
a state dict whose keys are namespaced per layer ("layer0.conv"). `forward`
with a state continues from it, so a clip cut into chunks, or into single
frames, gives the same outputs as one call; the tests hold them together.
The residual stream is returned without a final norm, like the identity
core's output: consumers normalize what they read.
"""

from __future__ import annotations

import logging
import math
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels.selective_scan import selective_scan
from pretrain.model.blocks import Attention, Mlp
from pretrain.model.spec import CORE_KINDS, CoreKind

logger = logging.getLogger(__name__)

State = dict[str, Tensor]
"""A core's recurrent state: tensors keyed by "layer{i}.{name}" (or "state")."""


@runtime_checkable
class TemporalCore(Protocol):
    """The interface every temporal core implements (all are nn.Modules)."""

    def init_state(self, batch: int, num_tokens: int, device: torch.device | str, dtype: torch.dtype) -> State:
        """State before the first frame, for `batch` clips of `num_tokens` tokens."""
        ...

    def forward(self, x_BTNd: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """Outputs (B, T, N, d) for a clip, and the state after its last frame."""
        ...

    def step(self, x_BNd: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """Output (B, N, d) for one frame, and the state after it."""
        ...


def _prefixed(state: State, prefix: str) -> State:
    return {prefix + key: value for key, value in state.items()}


def _unprefixed(state: State, prefix: str) -> State:
    return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}


def _require_keys(state: State, keys: tuple[str, ...], owner: str) -> None:
    missing = [key for key in keys if key not in state]
    if missing:
        raise ValueError(f"state for {owner} lacks keys {missing}; it has {sorted(state)}")


def _check_frames(x: Tensor, ndim: int, name: str, dim: int) -> None:
    layout = "(B, T, N, d)" if ndim == 4 else "(B, N, d)"
    if x.dim() != ndim or x.shape[-1] != dim:
        raise ValueError(f"{name} must be {layout} with d={dim}, got shape {tuple(x.shape)}")


class IdentityCore(nn.Module):
    """No temporal model: y = x. The image-only baseline; no parameters, no state."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def init_state(self, batch: int, num_tokens: int, device: torch.device | str, dtype: torch.dtype) -> State:
        return {}

    def forward(self, x_BTNd: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        _check_frames(x_BTNd, 4, "x_BTNd", self.dim)
        return x_BTNd, {}

    def step(self, x_BNd: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        _check_frames(x_BNd, 3, "x_BNd", self.dim)
        return x_BNd, {}


class CrossAttentionLayer(nn.Module):
    """Pre-norm cross-attention (queries: frame tokens, keys/values: memory) + MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, max(1, round(dim * mlp_ratio)))

    def forward(self, x_BNd: Tensor, memory_BNd: Tensor) -> Tensor:
        x_BNd = x_BNd + self.attn(self.attn_norm(x_BNd), memory_BNd)
        return x_BNd + self.mlp(self.mlp_norm(x_BNd))


class GatedTransformerCore(nn.Module):
    """RVM's core: a GRU whose candidate state comes from a cross-attention transformer.

    Per frame, with state s (B, N, d):
        u, r = sigmoid(W [LN(x), s])          update and reset gates
        h    = LN(Transformer(q=x, kv=r * LN(s)))
        s'   = (1 - u) * s + u * h,  y = s'

    The reset gate scales the normalized state (RVM's order) rather than being
    normalized away inside LN(r * s): r -> 0 must be able to blank a memory
    channel. h is normalized so that s, a convex blend of normalized vectors
    and the initial state, stays bounded over arbitrarily long streams.
    The initial state is one learned token (d,), broadcast to every position
    and clip: a zero state would make LN(s) degenerate (its input has no
    variance), and a learned token lets training pick the "empty memory".
    The gates depend on the state, so the core is sequential: forward loops step.
    """

    def __init__(self, dim: int, *, depth: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.dim = dim
        # Width d; the name (with D) is the state-dict key checkpoints and exports were written with.
        self.init_token_D = nn.Parameter(torch.empty(dim))
        nn.init.trunc_normal_(self.init_token_D, std=0.02)
        self.input_norm = nn.LayerNorm(dim)
        self.gates = nn.Linear(2 * dim, 2 * dim)
        self.state_norm = nn.LayerNorm(dim)
        self.layers = nn.ModuleList([CrossAttentionLayer(dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.out_norm = nn.LayerNorm(dim)

    def init_state(self, batch: int, num_tokens: int, device: torch.device | str, dtype: torch.dtype) -> State:
        s_BNd = self.init_token_D.to(device=device, dtype=dtype).expand(batch, num_tokens, self.dim)
        return {"state": s_BNd}

    def forward(self, x_BTNd: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        _check_frames(x_BTNd, 4, "x_BTNd", self.dim)
        if state is None:
            state = self.init_state(x_BTNd.shape[0], x_BTNd.shape[2], x_BTNd.device, x_BTNd.dtype)
        ys = []
        for t in range(x_BTNd.shape[1]):
            y_BNd, state = self.step(x_BTNd[:, t], state)
            ys.append(y_BNd)
        return torch.stack(ys, dim=1), state

    def step(self, x_BNd: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        _check_frames(x_BNd, 3, "x_BNd", self.dim)
        if state is None:
            state = self.init_state(x_BNd.shape[0], x_BNd.shape[1], x_BNd.device, x_BNd.dtype)
        _require_keys(state, ("state",), type(self).__name__)
        s_BNd = state["state"]
        gates_BN2d = torch.sigmoid(self.gates(torch.cat([self.input_norm(x_BNd), s_BNd], dim=-1)))
        update_BNd, reset_BNd = gates_BN2d.chunk(2, dim=-1)
        memory_BNd = reset_BNd * self.state_norm(s_BNd)
        h_BNd = x_BNd
        for layer in self.layers:
            h_BNd = layer(h_BNd, memory_BNd)
        h_BNd = self.out_norm(h_BNd)
        s_BNd = torch.lerp(s_BNd, h_BNd, update_BNd)
        return s_BNd, {"state": s_BNd}


class MambaBlock(nn.Module):
    """Mamba mixer (no norm, no residual) run over time, independently per patch.

    Input (B, T, N, d) becomes B*N sequences (P, d, T): in_proj d -> 2E (x, z),
    causal depthwise conv over time, SiLU, x_proj E -> R + 2S (step size, B, C
    per time step), dt_proj R -> E, selective scan gated by silu(z), out_proj
    E -> d. Initialization follows mamba_ssm's `Mamba`. The scan is
    `kernels.selective_scan.selective_scan`: the Triton kernel on CUDA (one
    program per patch and channel block, time inside the tile), on CPU the
    fp32 CPU path (the reference's math with a hand-written backward, pinned
    to the reference by tests); `step` is the same call with T = 1.

    State: "conv" (P, E, J-1), the last J-1 pre-conv inputs, in the input's
    dtype; "ssm" (P, E, Z), always fp32 because the scan runs in fp32. The
    initial conv state is zeros, which is exactly the causal left padding of
    J-1 zeros, so forward and step run the same conv over [conv state, x].
    """

    def __init__(
        self,
        dim: int,
        *,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | None = None,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
    ) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("d_state", d_state), ("d_conv", d_conv), ("expand", expand)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.dim = dim
        self.d_state = d_state
        self.d_conv = d_conv
        self.d_inner = expand * dim
        self.dt_rank = dt_rank if dt_rank is not None else math.ceil(dim / 16)
        E, R, Z = self.d_inner, self.dt_rank, d_state

        self.in_proj = nn.Linear(dim, 2 * E, bias=False)
        # No padding: the carried conv state provides the J-1 past inputs.
        self.conv1d = nn.Conv1d(E, E, kernel_size=d_conv, groups=E, bias=True)
        self.x_proj = nn.Linear(E, R + 2 * Z, bias=False)
        self.dt_proj = nn.Linear(R, E, bias=True)
        self.out_proj = nn.Linear(E, dim, bias=False)
        self._init_dt(dt_min, dt_max, dt_init_floor)
        # S4D-real init: channel state n decays at rate n + 1.
        A_EZ = torch.arange(1, Z + 1, dtype=torch.float32).repeat(E, 1)
        self.A_log = nn.Parameter(torch.log(A_EZ))
        self.D = nn.Parameter(torch.ones(E))

    def _init_dt(self, dt_min: float, dt_max: float, dt_init_floor: float) -> None:
        """Mamba's init: softplus(dt_proj bias) is log-uniform in [dt_min, dt_max]."""
        std = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        log_dt_E = torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        dt_E = torch.exp(log_dt_E).clamp(min=dt_init_floor)
        # Inverse of softplus: x = dt + log(1 - exp(-dt)).
        inv_softplus_dt_E = dt_E + torch.log(-torch.expm1(-dt_E))
        with torch.no_grad():
            self.dt_proj.bias.copy_(inv_softplus_dt_E)

    def init_state(self, batch: int, num_tokens: int, device: torch.device | str, dtype: torch.dtype) -> State:
        P = batch * num_tokens
        return {
            "conv": torch.zeros(P, self.d_inner, self.d_conv - 1, device=device, dtype=dtype),
            "ssm": torch.zeros(P, self.d_inner, self.d_state, device=device, dtype=torch.float32),
        }

    def forward(self, x_BTNd: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        _check_frames(x_BTNd, 4, "x_BTNd", self.dim)
        B, T, N, d = x_BTNd.shape
        if state is None:
            state = self.init_state(B, N, x_BTNd.device, x_BTNd.dtype)
        _require_keys(state, ("conv", "ssm"), type(self).__name__)
        x_PTd = x_BTNd.transpose(1, 2).reshape(B * N, T, d)
        y_PTd, state = self._scan(x_PTd, state["conv"], state["ssm"])
        return y_PTd.view(B, N, T, d).transpose(1, 2), state

    def step(self, x_BNd: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        # The same scan with T = 1: conv over [conv state, x_t], then one
        # selective-scan step from the carried ssm state.
        _check_frames(x_BNd, 3, "x_BNd", self.dim)
        y_B1Nd, state = self.forward(x_BNd.unsqueeze(1), state)
        return y_B1Nd.squeeze(1), state

    def _scan(self, x_PTd: Tensor, conv_PEJ: Tensor, ssm_PEZ: Tensor) -> tuple[Tensor, State]:
        T = x_PTd.shape[1]
        E, R, Z = self.d_inner, self.dt_rank, self.d_state
        expected_conv = (x_PTd.shape[0], E, self.d_conv - 1)
        if tuple(conv_PEJ.shape) != expected_conv:
            raise ValueError(f"state['conv'] must have shape {expected_conv}, got {tuple(conv_PEJ.shape)}")

        x_PET, z_PET = self.in_proj(x_PTd).transpose(1, 2).chunk(2, dim=1)
        window_PEW = torch.cat([conv_PEJ.to(x_PET.dtype), x_PET], dim=-1)
        # The next chunk's causal context: the last J-1 pre-conv inputs.
        new_conv_PEJ = window_PEW[:, :, T:]
        x_PET = F.silu(self.conv1d(window_PEW))

        proj_PTX = self.x_proj(x_PET.transpose(1, 2))
        dt_PTR, b_PTZ, c_PTZ = proj_PTX.split([R, Z, Z], dim=-1)
        # The bias goes to the scan as delta_bias, where it is added in fp32
        # before the softplus (as in mamba's fused path).
        delta_PET = F.linear(dt_PTR, self.dt_proj.weight).transpose(1, 2)
        A_EZ = -torch.exp(self.A_log.float())
        y_PET, new_ssm_PEZ = selective_scan(
            x_PET,
            delta_PET,
            A_EZ,
            b_PTZ.transpose(1, 2),
            c_PTZ.transpose(1, 2),
            D=self.D.float(),
            z=z_PET,
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
            return_last_state=True,
            initial_state=ssm_PEZ,
        )
        y_PTd = self.out_proj(y_PET.transpose(1, 2))
        return y_PTd, {"conv": new_conv_PEJ, "ssm": new_ssm_PEZ}


class MambaLayer(nn.Module):
    """x + MambaBlock(LN(x)), per patch over time."""

    def __init__(self, dim: int, *, d_state: int, d_conv: int, expand: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mamba = MambaBlock(dim, d_state=d_state, d_conv=d_conv, expand=expand)

    def forward(self, x_BTNd: Tensor, state: State) -> tuple[Tensor, State]:
        y_BTNd, state = self.mamba(self.norm(x_BTNd), state)
        return x_BTNd + y_BTNd, state


class _MambaLayerStack(nn.Module):
    """A stack of layers that each carry one MambaBlock's state under "layer{i}.": forward, step, init_state."""

    dim: int
    layers: nn.ModuleList

    def init_state(self, batch: int, num_tokens: int, device: torch.device | str, dtype: torch.dtype) -> State:
        state: State = {}
        for i, layer in enumerate(self.layers):
            state.update(_prefixed(layer.mamba.init_state(batch, num_tokens, device, dtype), f"layer{i}."))
        return state

    def forward(self, x_BTNd: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        _check_frames(x_BTNd, 4, "x_BTNd", self.dim)
        if state is None:
            state = self.init_state(x_BTNd.shape[0], x_BTNd.shape[2], x_BTNd.device, x_BTNd.dtype)
        new_state: State = {}
        for i, layer in enumerate(self.layers):
            x_BTNd, layer_state = layer(x_BTNd, _unprefixed(state, f"layer{i}."))
            new_state.update(_prefixed(layer_state, f"layer{i}."))
        return x_BTNd, new_state

    def step(self, x_BNd: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        _check_frames(x_BNd, 3, "x_BNd", self.dim)
        y_B1Nd, state = self.forward(x_BNd.unsqueeze(1), state)
        return y_B1Nd.squeeze(1), state


class MambaCore(_MambaLayerStack):
    """Temporal Mamba only ("M" in the paper): depth x (x + MambaBlock(LN(x)))."""

    def __init__(self, dim: int, *, depth: int, d_state: int, d_conv: int, expand: int) -> None:
        super().__init__()
        self.dim = dim
        self.layers = nn.ModuleList(
            [MambaLayer(dim, d_state=d_state, d_conv=d_conv, expand=expand) for _ in range(depth)]
        )


class GMMixLayer(nn.Module):
    """Per-frame spatial attention, per-patch temporal Mamba, learned blend.

    a = x + Attn(LN(x))               over the N tokens of each frame
    m = a + MambaBlock(LN(a))         over time, per patch
    g = sigmoid(W [a, m])             per token and channel
    y = g * m + (1 - g) * a
    """

    def __init__(self, dim: int, *, num_heads: int, d_state: int, d_conv: int, expand: int) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.mamba_norm = nn.LayerNorm(dim)
        self.mamba = MambaBlock(dim, d_state=d_state, d_conv=d_conv, expand=expand)
        self.gate = nn.Linear(2 * dim, dim)

    def forward(self, x_BTNd: Tensor, state: State) -> tuple[Tensor, State]:
        B, T, N, d = x_BTNd.shape
        x_FNd = x_BTNd.reshape(B * T, N, d)
        a_BTNd = (x_FNd + self.attn(self.attn_norm(x_FNd))).view(B, T, N, d)
        y_BTNd, state = self.mamba(self.mamba_norm(a_BTNd), state)
        m_BTNd = a_BTNd + y_BTNd
        g_BTNd = torch.sigmoid(self.gate(torch.cat([a_BTNd, m_BTNd], dim=-1)))
        return torch.lerp(a_BTNd, m_BTNd, g_BTNd), state


class GMMixCore(_MambaLayerStack):
    """The paper's best core ("GMMix"): depth x GMMixLayer.

    Spatial attention needs no state; each layer's Mamba carries
    "layer{i}.conv" and "layer{i}.ssm".
    """

    def __init__(self, dim: int, *, depth: int, num_heads: int, d_state: int, d_conv: int, expand: int) -> None:
        super().__init__()
        self.dim = dim
        self.layers = nn.ModuleList(
            [GMMixLayer(dim, num_heads=num_heads, d_state=d_state, d_conv=d_conv, expand=expand) for _ in range(depth)]
        )


def build_core(
    kind: CoreKind,
    dim: int,
    *,
    depth: int = 1,
    num_heads: int = 4,
    mlp_ratio: float = 2.0,
    d_state: int = 16,
    d_conv: int = 4,
    expand: int = 2,
) -> nn.Module:
    """Build a temporal core of width `dim` (a `TemporalCore`).

    `num_heads` serves gated_transformer and gmmix, `mlp_ratio` gated_transformer,
    `d_state`, `d_conv`, `expand` the Mamba blocks of gmmix and mamba.
    """
    if kind not in CORE_KINDS:
        raise ValueError(f"kind={kind!r} is not a core kind; allowed: {', '.join(CORE_KINDS)}")
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    core: nn.Module
    if kind == "identity":
        core = IdentityCore(dim)
    elif kind == "gated_transformer":
        core = GatedTransformerCore(dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio)
    elif kind == "gmmix":
        core = GMMixCore(dim, depth=depth, num_heads=num_heads, d_state=d_state, d_conv=d_conv, expand=expand)
    else:
        core = MambaCore(dim, depth=depth, d_state=d_state, d_conv=d_conv, expand=expand)
    num_params = sum(p.numel() for p in core.parameters())
    logger.info("built %s core: dim=%d depth=%d, %d parameters", kind, dim, depth, num_params)
    return core
