"""Selective scan in Triton: forward and backward kernels, host launchers, autograd.

Shape legend (lower case as in reference.py, because ``B`` and ``C`` name the
SSM's matrices): b batch, d channels (dim), n state size (d_state), l sequence
length, g groups of channels sharing one B/C, c time chunks, k position inside
a chunk, p programs along the batch axis of the backward grid.
Kernel blocks: BLOCK_D channels per program, CHUNK time steps per tile (also
the checkpoint interval), N_PAD = d_state rounded up to a power of two,
BLOCK_B batch elements per backward program.

Design (README.md has the math and the reasons): time is a tensor axis. A
program takes a [BLOCK_D, CHUNK] tile of channels x time steps and runs the
recurrence h_k = a_k h_{k-1} + x_k along time as a parallel
``tl.associative_scan``, looping over the state index n; the state
[BLOCK_D, N_PAD] stays in registers from one chunk to the next. The forward's
grid is (b, channel blocks). It writes the state at every chunk boundary, a
(b, d, c - 1, n) fp32 buffer that is empty when l <= CHUNK. The backward
restarts each chunk from its checkpoint, recomputes the chunk's states with the
same scan and runs the gradient recurrence as a reverse scan; it never stores a
per-step state. Its grid is (batch-row blocks, channel splits): a program walks
its channel blocks inside each chunk, so dB and dC sum over channels in
registers, and dA, dD, d(delta_bias) over batch rows in one private row.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

from kernels.selective_scan.reference import _check, _validate

logger = logging.getLogger(__name__)

CONFIG_ENV = "SELECTIVE_SCAN_CONFIG"
"""Pins one launch config, e.g. ``block_d=8,num_warps=2,chunk=16,batch_per_program=2``."""

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""Element types the kernels load; anything else is refused with a ValueError."""

FILL_OUTPUTS_WITH_NAN = False
"""Test hook: allocate every kernel-written output with NaN instead of
``torch.empty``, so an element the kernel forgets to write fails the comparison."""

# exp(x) = exp2(x * log2(e)): exp2 is the native MUFU instruction, so A is
# prescaled once per load and the inner loop issues one ex2 per element.
LOG2E = tl.constexpr(1.4426950408889634)
# torch.nn.functional.softplus's default threshold: above it softplus(x) = x.
SOFTPLUS_THRESHOLD = tl.constexpr(20.0)


@dataclass(frozen=True, slots=True)
class ScanConfig:
    """One launch configuration of the kernels."""

    block_d: int = 16
    """Channels per program (a power of two)."""
    num_warps: int = 4
    """Warps per program."""
    chunk: int = 64
    """Longest time tile (a power of two >= 2); also the checkpoint interval.
    The tile is min(chunk, next_power_of_2(l)) steps."""
    batch_per_program: int = 0
    """Batch rows per backward program (the dA/dD/delta_bias partial sums
    cover this many); 0 picks it from the batch size."""
    channel_splits: int = 0
    """Backward programs along the channels (each walks every split-th channel
    block; dB/dC get one partial sum per split); 0 picks it from the shapes."""

    def __post_init__(self) -> None:
        for name, value, low in (
            ("block_d", self.block_d, 1),
            ("num_warps", self.num_warps, 1),
            ("chunk", self.chunk, 2),
            ("batch_per_program", self.batch_per_program, 0),
            ("channel_splits", self.channel_splits, 0),
        ):
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        for name, value in (("block_d", self.block_d), ("num_warps", self.num_warps), ("chunk", self.chunk)):
            if value & (value - 1):
                raise ValueError(f"{name} must be a power of two, got {value}")

    @classmethod
    def parse(cls, text: str) -> ScanConfig:
        """``"block_d=8,chunk=16"`` -> ScanConfig; unknown keys are errors."""
        known = {f.name for f in fields(cls)}
        values: dict[str, int] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, sep, value = item.partition("=")
            key = key.strip()
            if not sep or key not in known:
                raise ValueError(f"{CONFIG_ENV}: {item!r} is not key=value with a key in {sorted(known)}")
            values[key] = int(value)
        return cls(**values)


INTERPRETER_CONFIG = ScanConfig(block_d=16, num_warps=1, chunk=64, batch_per_program=2, channel_splits=1)
"""Used under TRITON_INTERPRET=1 unless a config is pinned: the autotuner
cannot time candidates on the interpreter, so it always gets exactly one."""


def interpreter_enabled() -> bool:
    """Whether TRITON_INTERPRET asks for the interpreter, read at call time."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def pinned_config() -> ScanConfig | None:
    """The config pinned by $SELECTIVE_SCAN_CONFIG, read at call time."""
    text = os.environ.get(CONFIG_ENV, "").strip()
    return ScanConfig.parse(text) if text else None


# The kernels call only builtins and JITFunctions passed as combine functions,
# never a @triton.jit helper directly: such a helper is compiled or interpreted
# as decided when it was decorated (tl.sum, tl.zeros and tl.sigmoid are helpers
# of that kind, fixed when triton was imported), while the kernels here run in
# whichever mode a call asks for (see `_in_mode`). So sums are tl.reduce with
# tl.sum's own combine function, which the interpreter also recognizes and runs
# as one numpy sum, and zeros are tl.full.
_sum_combine = tl.standard._sum_combine


# Combine functions are JITFunctions in both modes on purpose: the compiler
# inlines them into the kernels, and the interpreter's scan calls only `.fn`.
@triton.JITFunction
def _linear_recurrence_combine(a_first, x_first, a_then, x_then):
    # Compose two affine maps h -> a h + x, applying `first` then `then`: the
    # forward recurrence h_k = a_k h_{k-1} + x_k over a segment of steps.
    return a_first * a_then, a_then * x_first + x_then


@triton.JITFunction
def _gradient_recurrence_combine(a_head_later, p_later, x_later, a_head_earlier, p_earlier, x_earlier):
    # The backward recurrence g_k = beta_k + a_{k+1} g_{k+1} multiplies by the
    # NEXT step's decay. A time segment is (its first step's a, the product of
    # its other a's, its g given a zero gradient after it); joining an earlier
    # segment to a later one needs the later one's first a. Scanned with
    # reverse=True, the accumulated (later) segment comes first.
    bridge = p_earlier * a_head_later
    return a_head_earlier, bridge * p_later, x_earlier + bridge * x_later


@triton.jit
def selective_scan_fwd_kernel(
    u_ptr,
    delta_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    z_ptr,
    delta_bias_ptr,
    h0_ptr,
    y_ptr,
    last_ptr,
    ckpt_ptr,
    dim,
    seqlen,
    d_state,
    n_groups,
    channels_per_group,
    n_chunks,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_DELTA_BIAS: tl.constexpr,
    DELTA_SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr,
    STORE_LAST: tl.constexpr,
    STORE_CKPT: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CHUNK: tl.constexpr,
    N_PAD: tl.constexpr,
):
    # Layouts (made contiguous by the host): u, delta, z, y (b, d, l); A (d, n);
    # B, C (b, g, n, l); D, delta_bias (d,); h0, last (b, d, n); ckpt (b, d, c - 1, n).
    # Grid: (b, cdiv(d, BLOCK_D)). Offsets inside one batch element are int32;
    # the batch offset goes into the base pointers in int64.
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
    offs_k = tl.arange(0, CHUNK)  # [CHUNK]
    offs_n = tl.arange(0, N_PAD)  # [N_PAD]
    mask_d = offs_d < dim
    mask_dn = mask_d[:, None] & (offs_n[None, :] < d_state)  # [BLOCK_D, N_PAD]
    bc_row_d = (offs_d // channels_per_group) * d_state * seqlen  # [BLOCK_D] each channel's group in B/C
    state_dn = offs_d[:, None] * d_state + offs_n[None, :]  # [BLOCK_D, N_PAD]
    seq_base = pid_b * dim * seqlen
    bc_base = pid_b * n_groups * d_state * seqlen

    if HAS_H0:
        h_dn = tl.load(h0_ptr + pid_b * dim * d_state + state_dn, mask=mask_dn, other=0.0).to(tl.float32)
    else:
        h_dn = tl.full([BLOCK_D, N_PAD], 0.0, tl.float32)
    if HAS_D:
        skip_d = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)  # [BLOCK_D]
    if HAS_DELTA_BIAS:
        bias_d = tl.load(delta_bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)  # [BLOCK_D]

    for c in range(n_chunks):
        if STORE_CKPT:
            # The state entering chunk c >= 1; chunk 0 restarts from h0.
            ckpt_dn = (offs_d[:, None] * (n_chunks - 1) + (c - 1)) * d_state + offs_n[None, :]
            tl.store(ckpt_ptr + pid_b * dim * (n_chunks - 1) * d_state + ckpt_dn, h_dn, mask=mask_dn & (c > 0))
        offs_t = c * CHUNK + offs_k  # [CHUNK]
        mask_dk = mask_d[:, None] & (offs_t < seqlen)[None, :]  # [BLOCK_D, CHUNK]
        seq_dk = offs_d[:, None] * seqlen + offs_t[None, :]  # [BLOCK_D, CHUNK]
        u_dk = tl.load(u_ptr + seq_base + seq_dk, mask=mask_dk, other=0.0).to(tl.float32)
        dt_dk = tl.load(delta_ptr + seq_base + seq_dk, mask=mask_dk, other=0.0).to(tl.float32)
        if HAS_DELTA_BIAS:
            dt_dk += bias_d[:, None]
        if DELTA_SOFTPLUS:
            soft_dk = tl.log(1.0 + tl.exp(tl.minimum(dt_dk, SOFTPLUS_THRESHOLD)))
            dt_dk = tl.where(dt_dk > SOFTPLUS_THRESHOLD, dt_dk, soft_dk)
        # A zero step outside the sequence makes those steps the identity
        # (a = 1, x = 0), so the chunk's last column is the state after step l-1.
        dt_dk = tl.where(mask_dk, dt_dk, 0.0)
        dtu_dk = dt_dk * u_dk
        y_dk = tl.full([BLOCK_D, CHUNK], 0.0, tl.float32)
        for n in range(d_state):
            is_n = offs_n[None, :] == n  # [1, N_PAD]
            h_start_d = tl.reduce(tl.where(is_n, h_dn, 0.0), 1, _sum_combine)  # [BLOCK_D]
            A2_d = tl.load(A_ptr + offs_d * d_state + n, mask=mask_d, other=0.0).to(tl.float32) * LOG2E
            bc_dk = bc_row_d[:, None] + n * seqlen + offs_t[None, :]  # [BLOCK_D, CHUNK]
            B_dk = tl.load(B_ptr + bc_base + bc_dk, mask=mask_dk, other=0.0).to(tl.float32)
            C_dk = tl.load(C_ptr + bc_base + bc_dk, mask=mask_dk, other=0.0).to(tl.float32)
            a_dk = tl.exp2(dt_dk * A2_d[:, None])  # [BLOCK_D, CHUNK]
            # Fold the carried state into the first step: h_0 = a_0 h_start + x_0.
            x_dk = dtu_dk * B_dk + tl.where(offs_k[None, :] == 0, a_dk * h_start_d[:, None], 0.0)
            _, h_dk = tl.associative_scan((a_dk, x_dk), axis=1, combine_fn=_linear_recurrence_combine)
            y_dk += h_dk * C_dk
            h_end_d = tl.reduce(tl.where(offs_k[None, :] == CHUNK - 1, h_dk, 0.0), 1, _sum_combine)  # [BLOCK_D]
            h_dn = tl.where(is_n, h_end_d[:, None], h_dn)
        if HAS_D:
            y_dk += skip_d[:, None] * u_dk
        if HAS_Z:
            z_dk = tl.load(z_ptr + seq_base + seq_dk, mask=mask_dk, other=0.0).to(tl.float32)
            y_dk *= z_dk / (1.0 + tl.exp(-z_dk))
        tl.store(y_ptr + seq_base + seq_dk, y_dk, mask=mask_dk)

    if STORE_LAST:
        tl.store(last_ptr + pid_b * dim * d_state + state_dn, h_dn, mask=mask_dn)


@triton.jit
def selective_scan_bwd_kernel(
    u_ptr,
    delta_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    z_ptr,
    delta_bias_ptr,
    h0_ptr,
    ckpt_ptr,
    dout_ptr,
    dlast_ptr,
    du_ptr,
    ddelta_ptr,
    dz_ptr,
    dA_part_ptr,
    dB_ptr,
    dC_ptr,
    dD_part_ptr,
    ddelta_bias_part_ptr,
    dh0_ptr,
    g_carry_ptr,
    batch,
    dim,
    seqlen,
    d_state,
    n_groups,
    channels_per_group,
    n_chunks,
    n_splits,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_DELTA_BIAS: tl.constexpr,
    DELTA_SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr,
    HAS_DLAST: tl.constexpr,
    MULTI_CHUNK: tl.constexpr,
    GROUPED: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CHUNK: tl.constexpr,
    N_PAD: tl.constexpr,
):
    # Grid: (p, s) = (cdiv(b, BLOCK_B), n_splits). Program (p, s) owns batch
    # rows p*BLOCK_B ... and the channel blocks s, s + n_splits, ... of them,
    # which it walks inside each time chunk. So dB and dC of one row and chunk
    # sum over those channels in registers, and one plain store per split
    # writes them: dB, dC are (s, b, n, l) partials (ungrouped B/C), or, when
    # grouped, (b, g, n, l) zeroed and accumulated with atomics.
    # dA_part (p, d, n), dD_part and ddelta_bias_part (p, d): zeroed, one row per
    # program along the batch, accumulated without atomics (no other program
    # touches the row). dout, du, ddelta, dz (b, d, l); dlast, dh0 (b, d, n);
    # g_carry (b, d, n): the gradient handed from a chunk to the one before it.
    pid_p = tl.program_id(0)
    split = tl.program_id(1)
    offs_k = tl.arange(0, CHUNK)  # [CHUNK]
    offs_n = tl.arange(0, N_PAD)  # [N_PAD]
    n_dblocks = (dim + BLOCK_D - 1) // BLOCK_D

    for bi in range(BLOCK_B):
        b = pid_p.to(tl.int64) * BLOCK_B + bi
        # A batch row past the end loads zeros everywhere and stores nothing.
        b_ok = b < batch
        seq_base = b * dim * seqlen
        bc_base = b * n_groups * d_state * seqlen
        state_base = b * dim * d_state
        for i in range(n_chunks):
            c = n_chunks - 1 - i
            offs_t = c * CHUNK + offs_k  # [CHUNK]
            mask_t = (offs_t < seqlen) & b_ok
            last_k = tl.minimum(seqlen - c * CHUNK, CHUNK) - 1
            if not GROUPED:
                dB_nk = tl.full([N_PAD, CHUNK], 0.0, tl.float32)
                dC_nk = tl.full([N_PAD, CHUNK], 0.0, tl.float32)
            for j in range(split, n_dblocks, n_splits):
                # The scratch rows read below (g_carry, the partial sums) were
                # written by other threads of this program in an earlier pass.
                tl.debug_barrier()
                offs_d = j * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
                mask_d = (offs_d < dim) & b_ok
                mask_dn = mask_d[:, None] & (offs_n[None, :] < d_state)  # [BLOCK_D, N_PAD]
                mask_dk = mask_d[:, None] & mask_t[None, :]  # [BLOCK_D, CHUNK]
                seq_dk = offs_d[:, None] * seqlen + offs_t[None, :]  # [BLOCK_D, CHUNK]
                state_dn = offs_d[:, None] * d_state + offs_n[None, :]  # [BLOCK_D, N_PAD]
                bc_row_d = (offs_d // channels_per_group) * d_state * seqlen  # [BLOCK_D]

                # The state entering chunk c (h0, or its checkpoint), and the
                # gradient w.r.t. the state after its last step (the last
                # state's gradient, or what chunk c + 1 handed back).
                h_start_dn = tl.full([BLOCK_D, N_PAD], 0.0, tl.float32)
                g_dn = tl.full([BLOCK_D, N_PAD], 0.0, tl.float32)
                if HAS_H0:
                    h0_dn = tl.load(h0_ptr + state_base + state_dn, mask=mask_dn & (c == 0), other=0.0)
                    h_start_dn += h0_dn.to(tl.float32)
                if HAS_DLAST:
                    dlast_dn = tl.load(dlast_ptr + state_base + state_dn, mask=mask_dn & (c == n_chunks - 1), other=0.0)
                    g_dn += dlast_dn.to(tl.float32)
                if MULTI_CHUNK:
                    ckpt_dn = (offs_d[:, None] * (n_chunks - 1) + (c - 1)) * d_state + offs_n[None, :]
                    ckpt_base = b * dim * (n_chunks - 1) * d_state
                    h_start_dn += tl.load(ckpt_ptr + ckpt_base + ckpt_dn, mask=mask_dn & (c > 0), other=0.0)
                    g_dn += tl.load(g_carry_ptr + state_base + state_dn, mask=mask_dn & (c < n_chunks - 1), other=0.0)

                # Only the tiles the state loop reads stay live across it;
                # the rest is reloaded after it, to keep registers for the scans.
                dt_dk = tl.load(delta_ptr + seq_base + seq_dk, mask=mask_dk, other=0.0).to(tl.float32)
                if HAS_DELTA_BIAS:
                    dt_dk += tl.load(delta_bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[:, None]
                if DELTA_SOFTPLUS:
                    soft_dk = tl.log(1.0 + tl.exp(tl.minimum(dt_dk, SOFTPLUS_THRESHOLD)))
                    dt_dk = tl.where(dt_dk > SOFTPLUS_THRESHOLD, dt_dk, soft_dk)
                dt_dk = tl.where(mask_dk, dt_dk, 0.0)
                dtu_dk = dt_dk * tl.load(u_ptr + seq_base + seq_dk, mask=mask_dk, other=0.0).to(tl.float32)
                dy_dk = tl.load(dout_ptr + seq_base + seq_dk, mask=mask_dk, other=0.0).to(tl.float32)
                if HAS_Z:
                    z_dk = tl.load(z_ptr + seq_base + seq_dk, mask=mask_dk, other=0.0).to(tl.float32)
                    # Gradient w.r.t. the pre-gate output C h + D u.
                    dy_dk *= z_dk / (1.0 + tl.exp(-z_dk))
                y_dk = tl.full([BLOCK_D, CHUNK], 0.0, tl.float32)
                sum_gB_dk = tl.full([BLOCK_D, CHUNK], 0.0, tl.float32)  # sum_n g B: dL/dx per unit of dt u
                sum_gaA_dk = tl.full([BLOCK_D, CHUNK], 0.0, tl.float32)  # sum_n g a h_prev A: dL/ddt via a
                dA_dn = tl.full([BLOCK_D, N_PAD], 0.0, tl.float32)

                for n in range(d_state):
                    is_n = offs_n[None, :] == n  # [1, N_PAD]
                    h_start_d = tl.reduce(tl.where(is_n, h_start_dn, 0.0), 1, _sum_combine)  # [BLOCK_D]
                    g_end_d = tl.reduce(tl.where(is_n, g_dn, 0.0), 1, _sum_combine)  # [BLOCK_D]
                    A_d = tl.load(A_ptr + offs_d * d_state + n, mask=mask_d, other=0.0).to(tl.float32)
                    bc_dk = bc_row_d[:, None] + n * seqlen + offs_t[None, :]  # [BLOCK_D, CHUNK]
                    B_dk = tl.load(B_ptr + bc_base + bc_dk, mask=mask_dk, other=0.0).to(tl.float32)
                    C_dk = tl.load(C_ptr + bc_base + bc_dk, mask=mask_dk, other=0.0).to(tl.float32)

                    # Recompute the chunk's states from its starting state.
                    a_dk = tl.exp2(dt_dk * (A_d * LOG2E)[:, None])  # [BLOCK_D, CHUNK]
                    x_dk = dtu_dk * B_dk
                    x_in_dk = x_dk + tl.where(offs_k[None, :] == 0, a_dk * h_start_d[:, None], 0.0)
                    _, h_dk = tl.associative_scan((a_dk, x_in_dk), axis=1, combine_fn=_linear_recurrence_combine)
                    y_dk += h_dk * C_dk

                    # g_k = dL/dh_k = dy_k C_k + a_{k+1} g_{k+1}, with the gradient
                    # from after the chunk entering at its last real step (a zero
                    # decay after it cuts off the padding).
                    a_head_dk = tl.where(offs_k[None, :] <= last_k, a_dk, 0.0)
                    beta_dk = dy_dk * C_dk + tl.where(offs_k[None, :] == last_k, g_end_d[:, None], 0.0)
                    _, _, g_dk = tl.associative_scan(
                        (a_head_dk, tl.full([BLOCK_D, CHUNK], 1.0, tl.float32), beta_dk),
                        axis=1,
                        combine_fn=_gradient_recurrence_combine,
                        reverse=True,
                    )
                    # What flows into the state entering the chunk: a_0 g_0.
                    g_start_d = tl.reduce(tl.where(offs_k[None, :] == 0, a_dk * g_dk, 0.0), 1, _sum_combine)
                    g_dn = tl.where(is_n, g_start_d[:, None], g_dn)

                    # g_k a_k h_{k-1} without a division: a_k h_{k-1} = h_k - x_k.
                    ga_dk = g_dk * (h_dk - x_dk)  # [BLOCK_D, CHUNK]
                    dA_dn += tl.where(is_n, tl.reduce(ga_dk * dt_dk, 1, _sum_combine)[:, None], 0.0)
                    sum_gaA_dk += ga_dk * A_d[:, None]
                    sum_gB_dk += g_dk * B_dk

                    gx_dk = g_dk * dtu_dk  # dL/dB before summing over a group's channels
                    yh_dk = dy_dk * h_dk  # dL/dC likewise
                    if GROUPED:
                        # The groups this channel block touches: one unless it straddles two.
                        first_group = (j * BLOCK_D) // channels_per_group
                        last_group = (tl.minimum(j * BLOCK_D + BLOCK_D, dim) - 1) // channels_per_group
                        for grp in range(first_group, last_group + 1):
                            in_group_d = ((offs_d // channels_per_group) == grp) & mask_d  # [BLOCK_D]
                            bc_k = bc_base + (grp * d_state + n) * seqlen + offs_t  # [CHUNK]
                            dB_k = tl.reduce(tl.where(in_group_d[:, None], gx_dk, 0.0), 0, _sum_combine)
                            dC_k = tl.reduce(tl.where(in_group_d[:, None], yh_dk, 0.0), 0, _sum_combine)
                            tl.atomic_add(dB_ptr + bc_k, dB_k, mask=mask_t, sem="relaxed")
                            tl.atomic_add(dC_ptr + bc_k, dC_k, mask=mask_t, sem="relaxed")
                    else:
                        is_n_nk = offs_n[:, None] == n  # [N_PAD, 1]
                        dB_nk += tl.where(is_n_nk, tl.reduce(gx_dk, 0, _sum_combine)[None, :], 0.0)
                        dC_nk += tl.where(is_n_nk, tl.reduce(yh_dk, 0, _sum_combine)[None, :], 0.0)

                u_dk = tl.load(u_ptr + seq_base + seq_dk, mask=mask_dk, other=0.0).to(tl.float32)
                ddt_dk = sum_gaA_dk + sum_gB_dk * u_dk
                du_dk = sum_gB_dk * dt_dk
                part_d = pid_p * dim + offs_d  # [BLOCK_D] this program's row of the partial sums
                if HAS_D:
                    skip_d = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)  # [BLOCK_D]
                    du_dk += dy_dk * skip_d[:, None]
                    y_dk += skip_d[:, None] * u_dk
                    dD_d = tl.load(dD_part_ptr + part_d, mask=mask_d, other=0.0)
                    tl.store(dD_part_ptr + part_d, dD_d + tl.reduce(dy_dk * u_dk, 1, _sum_combine), mask=mask_d)
                if HAS_Z:
                    dout_dk = tl.load(dout_ptr + seq_base + seq_dk, mask=mask_dk, other=0.0).to(tl.float32)
                    sig_z_dk = 1.0 / (1.0 + tl.exp(-z_dk))
                    dz_dk = dout_dk * y_dk * sig_z_dk * (1.0 + z_dk * (1.0 - sig_z_dk))
                    tl.store(dz_ptr + seq_base + seq_dk, dz_dk, mask=mask_dk)
                if DELTA_SOFTPLUS:
                    dt_raw_dk = tl.load(delta_ptr + seq_base + seq_dk, mask=mask_dk, other=0.0).to(tl.float32)
                    if HAS_DELTA_BIAS:
                        dt_raw_dk += tl.load(delta_bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[:, None]
                    ddt_dk *= 1.0 / (1.0 + tl.exp(-dt_raw_dk))
                ddt_dk = tl.where(mask_dk, ddt_dk, 0.0)
                tl.store(du_ptr + seq_base + seq_dk, du_dk, mask=mask_dk)
                tl.store(ddelta_ptr + seq_base + seq_dk, ddt_dk, mask=mask_dk)
                if HAS_DELTA_BIAS:
                    dbias_d = tl.load(ddelta_bias_part_ptr + part_d, mask=mask_d, other=0.0)
                    tl.store(ddelta_bias_part_ptr + part_d, dbias_d + tl.reduce(ddt_dk, 1, _sum_combine), mask=mask_d)
                part_dn = pid_p * dim * d_state + state_dn  # [BLOCK_D, N_PAD]
                dA_prev_dn = tl.load(dA_part_ptr + part_dn, mask=mask_dn, other=0.0)
                tl.store(dA_part_ptr + part_dn, dA_prev_dn + dA_dn, mask=mask_dn)
                # The gradient w.r.t. the state entering chunk c: d(initial
                # state) for the first chunk, else handed to chunk c - 1.
                if HAS_H0:
                    tl.store(dh0_ptr + state_base + state_dn, g_dn, mask=mask_dn & (c == 0))
                if MULTI_CHUNK:
                    tl.store(g_carry_ptr + state_base + state_dn, g_dn, mask=mask_dn & (c > 0))

            if not GROUPED:
                split_nk = ((split * batch + b) * d_state + offs_n[:, None]) * seqlen + offs_t[None, :]
                mask_nk = (offs_n[:, None] < d_state) & mask_t[None, :]  # [N_PAD, CHUNK]
                tl.store(dB_ptr + split_nk, dB_nk, mask=mask_nk)
                tl.store(dC_ptr + split_nk, dC_nk, mask=mask_nk)


_REBUILT: dict[tuple[str, bool], Any] = {}


def _in_mode(kernel: Any, interpret: bool) -> Any:
    """The kernel as an interpreted or a compiled function, whichever is asked.

    ``@triton.jit`` fixes the mode when this module is imported, but the test
    suite imports it before any test sets TRITON_INTERPRET, and a GPU machine
    runs interpreter tests and CUDA tests in one process: rebuild from the
    Python source instead of depending on import order.
    """
    if isinstance(kernel, InterpretedFunction) == interpret:
        return kernel
    key = (kernel.fn.__name__, interpret)
    if key not in _REBUILT:
        _REBUILT[key] = InterpretedFunction(kernel.fn) if interpret else triton.JITFunction(kernel.fn)
    return _REBUILT[key]


def _candidate_configs(chunk: int, elements_per_thread: tuple[int, ...]) -> list[ScanConfig]:
    """BLOCK_D x num_warps pairs giving each thread this many tile elements."""
    configs = []
    for num_warps in (4, 8):
        for per_thread in elements_per_thread:
            block_d = per_thread * 32 * num_warps // chunk
            if 1 <= block_d <= 256:
                configs.append(ScanConfig(block_d=block_d, num_warps=num_warps, chunk=chunk))
    return configs


_AUTOTUNED: dict[tuple[str, int], Any] = {}
# Tile elements per thread the candidates aim at. ptxas for sm_90a (bf16, all
# options, lengths divisible by 16; compiled without a GPU): the forward takes
# 50-120 registers, the backward 100-230 with at most a few dozen bytes of
# spill in some candidates; lengths not divisible by 16 lose vectorized
# addressing and take up to 255. Timings on the GPU should prune this list.
FWD_ELEMENTS_PER_THREAD = (4, 8)
BWD_ELEMENTS_PER_THREAD = (2, 4)
BWD_ACCUMULATORS = ("dA_part_ptr", "dD_part_ptr", "ddelta_bias_part_ptr", "dB_ptr", "dC_ptr")
"""Backward outputs that are zeroed and then added into (dB, dC only when grouped)."""


def _zero_backward_accumulators(nargs: dict[str, Any], reset_only: bool = False) -> None:
    """Autotuner hook: each timed run must start from zeroed accumulators."""
    for name in BWD_ACCUMULATORS:
        if name in ("dB_ptr", "dC_ptr") and not nargs.get("GROUPED", False):
            # Ungrouped, these are written with plain stores, never added into.
            continue
        if nargs.get(name) is not None:
            nargs[name].zero_()


def _autotuned(kernel: Any, chunk: int, per_thread: tuple[int, ...], pre_hook: Callable[..., None] | None) -> Any:
    """The compiled kernel behind an autotuner over BLOCK_D and num_warps for this chunk length."""
    key = (kernel.fn.__name__, chunk)
    if key not in _AUTOTUNED:
        configs = [
            triton.Config({"BLOCK_D": cfg.block_d}, num_warps=cfg.num_warps)
            for cfg in _candidate_configs(chunk, per_thread)
        ]
        _AUTOTUNED[key] = triton.autotune(
            configs=configs, key=["dim", "d_state", "seqlen", "n_groups"], pre_hook=pre_hook
        )(_in_mode(kernel, interpret=False))
    return _AUTOTUNED[key]


def _launch(
    kernel: Any,
    grid: Callable[[dict[str, Any]], tuple[int, ...]],
    args: dict[str, Any],
    config: ScanConfig | None,
    per_thread: tuple[int, ...],
    pre_hook: Callable[..., None] | None = None,
) -> None:
    """Run `kernel` pinned to `config`, or autotuned when none is pinned (CUDA only).

    `per_thread`: the tile elements per thread the autotuner's candidates aim
    at; `pre_hook`: run before every timed autotuning run.
    """
    if config is not None:
        runner = _in_mode(kernel, interpreter_enabled())
        runner[grid](**args, BLOCK_D=config.block_d, num_warps=config.num_warps)
        return
    _autotuned(kernel, args["CHUNK"], per_thread, pre_hook)[grid](**args)


def _resolve_config() -> ScanConfig | None:
    """A pinned config, the interpreter's single config, or None (autotune)."""
    pinned = pinned_config()
    if pinned is not None:
        return pinned
    return INTERPRETER_CONFIG if interpreter_enabled() else None


def _chunk_length(seqlen: int, config: ScanConfig | None) -> int:
    longest = (config or ScanConfig()).chunk
    return max(2, min(longest, triton.next_power_of_2(seqlen)))


def _new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    if FILL_OUTPUTS_WITH_NAN:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _as_grouped(M: Tensor) -> Tensor:
    """B or C as a contiguous (b, g, n, l); ungrouped is one group."""
    return (M if M.dim() == 4 else M.unsqueeze(1)).contiguous()


def _shared_groups(B: Tensor, C: Tensor) -> tuple[Tensor, Tensor, int]:
    """B and C as (b, g, n, l) with one g: the kernels read both through one group index.

    Different groupings are refined to their least common multiple (it divides
    dim, as both do) by repeating groups; the backward sums the repeats back.
    """
    B4, C4 = _as_grouped(B), _as_grouped(C)
    n_groups = math.lcm(B4.shape[1], C4.shape[1])
    if B4.shape[1] != n_groups:
        B4 = B4.repeat_interleave(n_groups // B4.shape[1], dim=1)
    if C4.shape[1] != n_groups:
        C4 = C4.repeat_interleave(n_groups // C4.shape[1], dim=1)
    return B4, C4, n_groups


def _check_kernel_dtypes(**tensors: Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None:
            _check(
                t.dtype in KERNEL_DTYPES,
                name,
                f"must be float32, bfloat16 or float16 for the Triton kernel, got {t.dtype}",
            )


def selective_scan_fwd(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    delta_softplus: bool,
    initial_state: Tensor | None,
    store_last: bool,
    store_checkpoints: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Launch the forward kernel on validated inputs.

    Returns y (b, d, l) in u's dtype, the last state (b, d, n) fp32 when
    `store_last`, and the chunk-boundary states (b, d, c - 1, n) fp32 when
    `store_checkpoints` and the sequence spans more than one chunk.
    """
    batch, dim, seqlen = u.shape
    d_state = A.shape[1]
    config = _resolve_config()
    chunk = _chunk_length(seqlen, config)
    n_chunks = triton.cdiv(seqlen, chunk)
    B4, C4, n_groups = _shared_groups(B, C)
    device = u.device
    y = _new_output((batch, dim, seqlen), u.dtype, device)
    last = _new_output((batch, dim, d_state), torch.float32, device) if store_last else None
    ckpt = None
    if store_checkpoints and n_chunks > 1:
        ckpt = _new_output((batch, dim, n_chunks - 1, d_state), torch.float32, device)
    args = {
        "u_ptr": u.contiguous(),
        "delta_ptr": delta.contiguous(),
        "A_ptr": A.contiguous(),
        "B_ptr": B4,
        "C_ptr": C4,
        "D_ptr": D.contiguous() if D is not None else None,
        "z_ptr": z.contiguous() if z is not None else None,
        "delta_bias_ptr": delta_bias.contiguous() if delta_bias is not None else None,
        "h0_ptr": initial_state.contiguous() if initial_state is not None else None,
        "y_ptr": y,
        "last_ptr": last,
        "ckpt_ptr": ckpt,
        "dim": dim,
        "seqlen": seqlen,
        "d_state": d_state,
        "n_groups": n_groups,
        "channels_per_group": dim // n_groups,
        "n_chunks": n_chunks,
        "HAS_D": D is not None,
        "HAS_Z": z is not None,
        "HAS_DELTA_BIAS": delta_bias is not None,
        "DELTA_SOFTPLUS": delta_softplus,
        "HAS_H0": initial_state is not None,
        "STORE_LAST": store_last,
        "STORE_CKPT": ckpt is not None,
        "CHUNK": chunk,
        "N_PAD": max(2, triton.next_power_of_2(d_state)),
    }

    def grid(meta: dict[str, Any]) -> tuple[int, int]:
        return (batch, triton.cdiv(dim, meta["BLOCK_D"]))

    _launch(selective_scan_fwd_kernel, grid, args, config, FWD_ELEMENTS_PER_THREAD)
    return y, last, ckpt


def _backward_grid_shape(batch: int, dim: int, device: torch.device, config: ScanConfig | None) -> tuple[int, int]:
    """(batch rows per backward program, channel splits).

    More rows per program shrink the (p, d, n) partial sums of dA; more
    channel splits add programs (and (s, b, n, l) partials of dB, dC). Aim at
    a few waves of programs on the device, at most 16 rows per program, and
    at least 64 channels per split.
    """
    block_b = config.batch_per_program if config is not None and config.batch_per_program > 0 else 0
    if block_b == 0:
        block_b = max(1, min(16, batch // 512))
    splits = config.channel_splits if config is not None and config.channel_splits > 0 else 0
    if splits == 0:
        n_sm = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
        splits = max(1, min(triton.cdiv(32 * n_sm, triton.cdiv(batch, block_b)), dim // 64))
    return block_b, splits


def selective_scan_bwd(
    dout: Tensor,
    dlast: Tensor | None,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    delta_softplus: bool,
    initial_state: Tensor | None,
    ckpt: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Launch the backward kernel; returns the gradients of
    (u, delta, A, B, C, D, z, delta_bias, initial_state), each in its input's
    dtype and shape (None for an absent optional input)."""
    batch, dim, seqlen = u.shape
    d_state = A.shape[1]
    config = _resolve_config()
    chunk = _chunk_length(seqlen, config)
    n_chunks = triton.cdiv(seqlen, chunk)
    if n_chunks > 1 and ckpt is None:
        raise ValueError("ckpt must hold the chunk-boundary states when the sequence spans several chunks")
    B4, C4, n_groups = _shared_groups(B, C)
    device = u.device
    block_b, n_splits = _backward_grid_shape(batch, dim, device, config)
    n_parts = triton.cdiv(batch, block_b)
    f32 = torch.float32

    du = _new_output((batch, dim, seqlen), u.dtype, device)
    ddelta = _new_output((batch, dim, seqlen), delta.dtype, device)
    dz = _new_output((batch, dim, seqlen), z.dtype, device) if z is not None else None
    # The kernel adds each batch row into these, so they start at zero.
    dA_part = torch.zeros((n_parts, dim, d_state), dtype=f32, device=device)
    dD_part = torch.zeros((n_parts, dim), dtype=f32, device=device) if D is not None else None
    dbias_part = torch.zeros((n_parts, dim), dtype=f32, device=device) if delta_bias is not None else None
    if n_groups == 1:
        dB_part = _new_output((n_splits, batch, d_state, seqlen), f32, device)
        dC_part = _new_output((n_splits, batch, d_state, seqlen), f32, device)
    else:
        # Atomics accumulate into these.
        dB_part = torch.zeros((batch, n_groups, d_state, seqlen), dtype=f32, device=device)
        dC_part = torch.zeros((batch, n_groups, d_state, seqlen), dtype=f32, device=device)
    dh0 = _new_output((batch, dim, d_state), f32, device) if initial_state is not None else None
    g_carry = _new_output((batch, dim, d_state), f32, device) if n_chunks > 1 else None
    args = {
        "u_ptr": u.contiguous(),
        "delta_ptr": delta.contiguous(),
        "A_ptr": A.contiguous(),
        "B_ptr": B4,
        "C_ptr": C4,
        "D_ptr": D.contiguous() if D is not None else None,
        "z_ptr": z.contiguous() if z is not None else None,
        "delta_bias_ptr": delta_bias.contiguous() if delta_bias is not None else None,
        "h0_ptr": initial_state.contiguous() if initial_state is not None else None,
        "ckpt_ptr": ckpt,
        "dout_ptr": dout.contiguous(),
        "dlast_ptr": dlast.contiguous() if dlast is not None else None,
        "du_ptr": du,
        "ddelta_ptr": ddelta,
        "dz_ptr": dz,
        "dA_part_ptr": dA_part,
        "dB_ptr": dB_part,
        "dC_ptr": dC_part,
        "dD_part_ptr": dD_part,
        "ddelta_bias_part_ptr": dbias_part,
        "dh0_ptr": dh0,
        "g_carry_ptr": g_carry,
        "batch": batch,
        "dim": dim,
        "seqlen": seqlen,
        "d_state": d_state,
        "n_groups": n_groups,
        "channels_per_group": dim // n_groups,
        "n_chunks": n_chunks,
        "n_splits": n_splits,
        "HAS_D": D is not None,
        "HAS_Z": z is not None,
        "HAS_DELTA_BIAS": delta_bias is not None,
        "DELTA_SOFTPLUS": delta_softplus,
        "HAS_H0": initial_state is not None,
        "HAS_DLAST": dlast is not None,
        "MULTI_CHUNK": n_chunks > 1,
        "GROUPED": n_groups > 1,
        "BLOCK_B": block_b,
        "CHUNK": chunk,
        "N_PAD": max(2, triton.next_power_of_2(d_state)),
    }

    def grid(meta: dict[str, Any]) -> tuple[int, int]:
        return (n_parts, n_splits)

    _launch(selective_scan_bwd_kernel, grid, args, config, BWD_ELEMENTS_PER_THREAD, _zero_backward_accumulators)

    if n_groups == 1:
        dB4, dC4 = dB_part.sum(dim=0).unsqueeze(1), dC_part.sum(dim=0).unsqueeze(1)
    else:
        dB4, dC4 = dB_part, dC_part

    def ungroup(dM4: Tensor, M: Tensor) -> Tensor:
        # Sum the equalized groups back to M's own grouping and layout.
        groups = 1 if M.dim() == 3 else M.shape[1]
        dM4 = dM4.view(batch, groups, n_groups // groups, d_state, seqlen).sum(dim=2)
        return (dM4 if M.dim() == 4 else dM4.squeeze(1)).to(M.dtype)

    return (
        du,
        ddelta,
        dA_part.sum(dim=0).to(A.dtype),
        ungroup(dB4, B),
        ungroup(dC4, C),
        dD_part.sum(dim=0).to(D.dtype) if dD_part is not None and D is not None else None,
        dz,
        dbias_part.sum(dim=0).to(delta_bias.dtype) if dbias_part is not None and delta_bias is not None else None,
        dh0.to(initial_state.dtype) if dh0 is not None and initial_state is not None else None,
    )


class SelectiveScanFunction(torch.autograd.Function):
    """Autograd over the Triton kernels; the last state is an output with a gradient."""

    @staticmethod
    def forward(
        ctx: Any,
        u: Tensor,
        delta: Tensor,
        A: Tensor,
        B: Tensor,
        C: Tensor,
        D: Tensor | None,
        z: Tensor | None,
        delta_bias: Tensor | None,
        initial_state: Tensor | None,
        delta_softplus: bool,
    ) -> tuple[Tensor, Tensor]:
        # Made contiguous once, for both kernels.
        u, delta, A, B, C = (t.contiguous() for t in (u, delta, A, B, C))
        z = z.contiguous() if z is not None else None
        y, last, ckpt = selective_scan_fwd(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, store_last=True, store_checkpoints=True
        )
        assert last is not None
        ctx.delta_softplus = delta_softplus
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state, ckpt)
        # An unused last state arrives as None, and the kernel skips it.
        ctx.set_materialize_grads(False)
        return y, last

    @staticmethod
    def backward(ctx: Any, dy: Tensor | None, dlast: Tensor | None) -> tuple[Tensor | None, ...]:
        u, delta, A, B, C, D, z, delta_bias, initial_state, ckpt = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(u)
        grads = selective_scan_bwd(
            dy, dlast, u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, initial_state, ckpt
        )
        needed = ctx.needs_input_grad
        return (*(g if needed[i] else None for i, g in enumerate(grads)), None)


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    initial_state: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Selective scan through the Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1).

    Args:
        u: (b, d, l) input; float32, bfloat16 or float16.
        delta: (b, d, l) step sizes before ``delta_bias`` and softplus; u's dtype.
        A: (d, n) real state matrix (negative for decay).
        B: (b, n, l) or grouped (b, g, n, l) input matrix per step; g divides d.
        C: (b, n, l) or grouped (b, g, n, l) output matrix per step.
        D: optional (d,) skip weight.
        z: optional (b, d, l) gate, u's dtype; the output is multiplied by silu(z).
        delta_bias: optional (d,) added to delta before the softplus.
        delta_softplus: apply softplus to delta (after the bias).
        return_last_state: also return the state after the last step.
        initial_state: optional (b, d, n) state before the first step; zeros when None.

    Returns:
        y (b, d, l) in u's dtype, or (y, last_state (b, d, n) float32) with
        ``return_last_state``. Computed in float32. Every output, the last
        state included, has a gradient w.r.t. every tensor input.

    Raises:
        ValueError: naming the argument whose shape, dtype or device is wrong.
    """
    _validate(u, delta, A, B, C, D, z, delta_bias, initial_state)
    _check_kernel_dtypes(u=u, A=A, B=B, C=C, D=D, delta_bias=delta_bias, initial_state=initial_state)
    inputs = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    if needs_grad:
        y, last = SelectiveScanFunction.apply(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus)
    else:
        y, last, _ = selective_scan_fwd(
            u,
            delta,
            A,
            B,
            C,
            D,
            z,
            delta_bias,
            delta_softplus,
            initial_state,
            store_last=return_last_state,
            store_checkpoints=False,
        )
    if return_last_state:
        assert last is not None
        return y, last
    return y
