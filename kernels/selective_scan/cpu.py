"""Selective scan on CPU: the reference's math with a hand-written backward.

``selective_scan_ref`` stays the readable specification; autograd through its
per-step loop records about ten small ops per time step and replays them one
by one. Here the recurrence is one ``torch.autograd.Function``
(``SelectiveScanCPUFunction``) whose forward and backward each run a handful
of vectorized ops plus one in-place ``addcmul`` per step; ``delta_bias``, the
softplus, the D skip and the ``silu(z)`` gate stay plain autograd ops around
it. ``selective_scan_cpu`` is the drop-in for ``selective_scan_ref`` that the
dispatch uses on CPU; tests pin it to the reference.

The measured design choices (batch chunks with recompute instead of saved
states, ``exp2``, time-major chunk buffers, public layouts at the Function's
boundary) and the backward's math are in README.md, "The CPU path".

Shape legend: b batch, d channels, n state size (d_state), l sequence length,
g groups of channels sharing one B/C, k channels per group (d / g), r rows of
the batch in one chunk; L = l + 1 steps of a state buffer that starts with h_0.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from kernels.selective_scan.reference import _validate

__all__ = ["SelectiveScanCPUFunction", "selective_scan_cpu"]

CHUNK_ELEMENTS = 2**19
"""Target size of one (l, r, n, d) chunk buffer; 2^18 to 2^20 measured within noise at l = 16."""

MIN_CHUNK_ROWS = 32
"""Fewer rows make each per-step op too small to amortize its dispatch (long sequences)."""


def _chunk_rows(batch: int, length: int, d_state: int, dim: int) -> int:
    """Batch rows per chunk."""
    rows = max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS // (length * d_state * dim))
    return min(batch, rows)


def _prefix(buf: Tensor, *shape: int) -> Tensor:
    """The first prod(shape) elements of a flat buffer: contiguous, for views, for a short last chunk too."""
    return buf[: math.prod(shape)].view(shape)


def _per_channel(M_lrng: Tensor, v_lrd: Tensor, out_lrnd: Tensor) -> Tensor:
    """out[l, r, n, d] = M[l, r, n, group(d)] · v[l, r, d]."""
    length, rows, d_state, groups = M_lrng.shape
    dim = v_lrd.shape[-1]
    v_lr1gk = v_lrd.view(length, rows, 1, groups, dim // groups)
    torch.mul(M_lrng[..., None], v_lr1gk, out=out_lrnd.view(length, rows, d_state, groups, dim // groups))
    return out_lrnd


def _sum_over_state(M_lrng: Tensor, X_lrnd: Tensor, scratch_lrnd: Tensor) -> Tensor:
    """Σ_n M[l, r, n, group(d)] · X[l, r, n, d]: (l, r, d)."""
    length, rows, d_state, groups = M_lrng.shape
    dim = X_lrnd.shape[-1]
    if groups == 1:
        # One (1, n) @ (n, d) product per (l, r): half the time of mul + sum.
        M_x1n = M_lrng.reshape(length * rows, 1, d_state)
        return torch.bmm(M_x1n, X_lrnd.view(length * rows, d_state, dim)).view(length, rows, dim)
    shape = (length, rows, d_state, groups, dim // groups)
    prod = torch.mul(X_lrnd.view(shape), M_lrng[..., None], out=scratch_lrnd.view(shape))
    return prod.sum(dim=2).view(length, rows, dim)


def _sum_over_group(X_lrnd: Tensor, v_lrd: Tensor, groups: int, out_lrng: Tensor, scratch_lrnd: Tensor) -> None:
    """out[l, r, n, g] = Σ over the channels d of group g of X[l, r, n, d] · v[l, r, d]."""
    length, rows, d_state, dim = X_lrnd.shape
    shape = (length, rows, d_state, groups, dim // groups)
    v_lr1gk = v_lrd.view(length, rows, 1, groups, dim // groups)
    # mul + sum is about 3x a batch of (n, d) @ (d, 1) bmm products here.
    torch.sum(torch.mul(X_lrnd.view(shape), v_lr1gk, out=scratch_lrnd.view(shape)), dim=-1, out=out_lrng)


def _decays(delta_lrd: Tensor, A2_nd: Tensor, out_lrnd: Tensor) -> Tensor:
    """exp(Δ A) = exp2(Δ · A log2 e), with A2 = A log2 e: (l, r, n, d)."""
    return torch.exp2(torch.mul(delta_lrd[:, :, None, :], A2_nd, out=out_lrnd), out=out_lrnd)


def _states(decay_lrnd: Tensor, B_lrng: Tensor, x_lrd: Tensor, h0_rnd: Tensor | None, out_Lrnd: Tensor) -> Tensor:
    """h_t = Ā_t h_{t-1} + x_t B_t into out[1:], with out[0] = h_0: out is (l + 1, r, n, d)."""
    if h0_rnd is None:
        out_Lrnd[0].zero_()
    else:
        out_Lrnd[0].copy_(h0_rnd)
    h_lrnd = _per_channel(B_lrng, x_lrd, out_Lrnd[1:])
    steps = out_Lrnd.unbind(0)
    decays = decay_lrnd.unbind(0)
    for t in range(1, len(steps)):
        steps[t].addcmul_(decays[t - 1], steps[t - 1])
    return h_lrnd


def _state_grads(
    decay_lrnd: Tensor, C_lrng: Tensor, dy_lrd: Tensor | None, dlast_rnd: Tensor | None, out_lrnd: Tensor
) -> Tensor:
    """g_t = ∂L/∂h_t = C_t dy_t + Ā_{t+1} g_{t+1}, with g_{l-1} also taking dlast: (l, r, n, d).

    dy or dlast is None when the loss does not use that output.
    """
    g_lrnd = out_lrnd.zero_() if dy_lrd is None else _per_channel(C_lrng, dy_lrd, out_lrnd)
    steps = g_lrnd.unbind(0)
    decays = decay_lrnd.unbind(0)
    if dlast_rnd is not None:
        steps[-1].add_(dlast_rnd)
    for t in range(len(steps) - 2, -1, -1):
        steps[t].addcmul_(decays[t + 1], steps[t + 1])
    return g_lrnd


def _bc_time_major(M: Tensor) -> Tensor:
    """B or C, (b, n, l) or (b, g, n, l) -> contiguous (l, b, n, g)."""
    M_bgnl = M if M.dim() == 4 else M[:, None]
    return M_bgnl.permute(3, 0, 2, 1).contiguous()


def _bc_from_time_major(M_lbng: Tensor, shape: torch.Size) -> Tensor:
    """Inverse of `_bc_time_major`: (l, b, n, g) -> B's or C's own shape."""
    return M_lbng.permute(1, 3, 2, 0).reshape(shape)


class SelectiveScanCPUFunction(torch.autograd.Function):
    """The recurrence alone: h_t = exp(Δ_t A) h_{t-1} + Δ_t u_t B_t, y_t = Σ_n C_t h_t.

    Takes the public layouts, all in one floating dtype (the math runs in it):
    u, delta (b, d, l), delta final (bias and softplus applied); A (d, n);
    B, C (b, n, l) or (b, g, n, l); h0 (b, d, n), or None for zeros.
    Returns y (b, d, l) and the last state (b, d, n), both contiguous. The
    time-major copies are made here, once, so that the ops around the
    Function see contiguous (b, d, l) tensors and gradients, as around the
    reference's loop (an elementwise op on mixed layouts costs about 3x).
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        u_bdl: Tensor,
        delta_bdl: Tensor,
        A_dn: Tensor,
        B: Tensor,
        C: Tensor,
        h0_bdn: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        batch, dim, length = u_bdl.shape
        d_state = A_dn.shape[1]
        u_lbd = u_bdl.permute(2, 0, 1).contiguous()
        delta_lbd = delta_bdl.permute(2, 0, 1).contiguous()
        A_nd = A_dn.t().contiguous()
        B_lbng, C_lbng = _bc_time_major(B), _bc_time_major(C)
        h0_bnd = None if h0_bdn is None else h0_bdn.transpose(1, 2)

        rows = _chunk_rows(batch, length, d_state, dim)
        A2_nd = A_nd * math.log2(math.e)
        x_lbd = delta_lbd * u_lbd
        decay_buf = u_lbd.new_empty(length * rows * d_state * dim)
        h_buf = u_lbd.new_empty((length + 1) * rows * d_state * dim)
        y_bdl = u_lbd.new_empty(batch, dim, length)
        last_bdn = u_lbd.new_empty(batch, dim, d_state)
        # Written through transposed views: the copy out of each chunk is the transpose.
        y_lbd, last_bnd = y_bdl.permute(2, 0, 1), last_bdn.transpose(1, 2)
        for start in range(0, batch, rows):
            r = slice(start, start + rows)
            size = min(rows, batch - start)
            decay_lrnd = _decays(delta_lbd[:, r], A2_nd, _prefix(decay_buf, length, size, d_state, dim))
            h0_rnd = None if h0_bnd is None else h0_bnd[r]
            h_Lrnd = _prefix(h_buf, length + 1, size, d_state, dim)
            h_lrnd = _states(decay_lrnd, B_lbng[:, r], x_lbd[:, r], h0_rnd, h_Lrnd)
            # The decays are spent: their buffer is the scratch space.
            y_lbd[:, r] = _sum_over_state(C_lbng[:, r], h_lrnd, decay_lrnd)
            last_bnd[r] = h_lrnd[-1]

        ctx.save_for_backward(u_lbd, delta_lbd, A_nd, B_lbng, C_lbng, h0_bdn)
        ctx.bc_shapes = (B.shape, C.shape)
        # An output the loss does not use gets None, not zeros: C then gets no
        # gradient at all, as through the reference, and no work is spent on it.
        ctx.set_materialize_grads(False)
        return y_bdl, last_bdn

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy_bdl: Tensor | None, dlast_bdn: Tensor | None) -> tuple[Tensor | None, ...]:
        u_lbd, delta_lbd, A_nd, B_lbng, C_lbng, h0_bdn = ctx.saved_tensors
        need_u, need_delta, need_A, need_B, need_C, need_h0 = ctx.needs_input_grad
        length, batch, dim = u_lbd.shape
        d_state = A_nd.shape[0]
        rows = _chunk_rows(batch, length, d_state, dim)
        A2_nd = A_nd * math.log2(math.e)
        x_lbd = delta_lbd * u_lbd
        dy_lbd = None if dy_bdl is None else dy_bdl.permute(2, 0, 1).contiguous()
        dlast_bnd = None if dlast_bdn is None else dlast_bdn.transpose(1, 2)
        h0_bnd = None if h0_bdn is None else h0_bdn.transpose(1, 2)
        decay_buf = u_lbd.new_empty(length * rows * d_state * dim)
        h_buf = u_lbd.new_empty((length + 1) * rows * d_state * dim)
        g_buf = torch.empty_like(decay_buf)
        scratch_buf = torch.empty_like(decay_buf)

        need_dx = need_u or need_delta
        need_dlogdecay = need_delta or need_A
        # ∂L/∂x with x = Δ u, and Σ_n ∂L/∂(Δ A) A: Δ's and u's gradients, whole-batch ops after the loop.
        dx_lbd = torch.empty_like(u_lbd) if need_dx else None
        ddelta_decay_lbd = torch.empty_like(u_lbd) if need_delta else None
        dA_nd = torch.zeros_like(A_nd) if need_A else None
        dB_lbng = torch.empty_like(B_lbng) if need_B else None
        dC_lbng = torch.empty_like(C_lbng) if need_C and dy_lbd is not None else None
        dh0_bdn = torch.empty_like(h0_bdn) if need_h0 else None
        for start in range(0, batch, rows):
            r = slice(start, start + rows)
            size = min(rows, batch - start)
            chunk = (length, size, d_state, dim)
            scratch_lrnd = _prefix(scratch_buf, *chunk)
            delta_lrd, x_lrd = delta_lbd[:, r], x_lbd[:, r]
            dy_lrd = None if dy_lbd is None else dy_lbd[:, r]
            dlast_rnd = None if dlast_bnd is None else dlast_bnd[r]
            decay_lrnd = _decays(delta_lrd, A2_nd, _prefix(decay_buf, *chunk))
            h0_rnd = None if h0_bnd is None else h0_bnd[r]
            h_Lrnd = _prefix(h_buf, length + 1, size, d_state, dim)
            h_lrnd = _states(decay_lrnd, B_lbng[:, r], x_lrd, h0_rnd, h_Lrnd)
            if dC_lbng is not None and dy_lrd is not None:
                _sum_over_group(h_lrnd, dy_lrd, C_lbng.shape[-1], dC_lbng[:, r], scratch_lrnd)
            g_lrnd = _state_grads(decay_lrnd, C_lbng[:, r], dy_lrd, dlast_rnd, _prefix(g_buf, *chunk))
            if dh0_bdn is not None:
                torch.mul(decay_lrnd[0], g_lrnd[0], out=dh0_bdn.transpose(1, 2)[r])
            if dB_lbng is not None:
                _sum_over_group(g_lrnd, x_lrd, B_lbng.shape[-1], dB_lbng[:, r], scratch_lrnd)
            if dx_lbd is not None:
                dx_lbd[:, r] = _sum_over_state(B_lbng[:, r], g_lrnd, scratch_lrnd)
            if need_dlogdecay:
                # ∂L/∂(Δ A) = g Ā h_{t-1}, formed in g's buffer (g is spent).
                dlogdecay_lrnd = g_lrnd.mul_(decay_lrnd).mul_(h_Lrnd[:-1])
                if dA_nd is not None:
                    dA_nd += torch.mul(dlogdecay_lrnd, delta_lrd[:, :, None, :], out=scratch_lrnd).sum(dim=(0, 1))
                if ddelta_decay_lbd is not None:
                    torch.sum(dlogdecay_lrnd.mul_(A_nd), dim=2, out=ddelta_decay_lbd[:, r])

        du_bdl = ddelta_bdl = None
        if need_u:
            du_bdl = u_lbd.new_empty(batch, dim, length)
            torch.mul(dx_lbd, delta_lbd, out=du_bdl.permute(2, 0, 1))
        if need_delta:
            ddelta_bdl = u_lbd.new_empty(batch, dim, length)
            torch.addcmul(ddelta_decay_lbd, dx_lbd, u_lbd, out=ddelta_bdl.permute(2, 0, 1))
        B_shape, C_shape = ctx.bc_shapes
        dB = None if dB_lbng is None else _bc_from_time_major(dB_lbng, B_shape)
        dC = None if dC_lbng is None else _bc_from_time_major(dC_lbng, C_shape)
        dA_dn = None if dA_nd is None else dA_nd.t()
        return du_bdl, ddelta_bdl, dA_dn, dB, dC, dh0_bdn


def selective_scan_cpu(
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
    """``selective_scan_ref`` with a hand-written backward: same arguments, results, errors.

    u, delta, z: (b, d, l); A: (d, n) real; B, C: (b, n, l) or (b, g, n, l);
    D, delta_bias: (d,); initial_state: (b, d, n), zeros when None. Computed
    in fp32. Returns y (b, d, l) in u's dtype, or (y, last_state (b, d, n)
    fp32) with ``return_last_state``; both have gradients w.r.t. every tensor
    input, each in its input's dtype. Raises ValueError naming a malformed
    argument. Saves only fp32 time-major copies of the inputs for the
    backward, no (b, d, n, l) activation.
    """
    _validate(u, delta, A, B, C, D, z, delta_bias, initial_state)
    u_bdl = u.float()
    delta_bdl = delta.float()
    if delta_bias is not None:
        delta_bdl = delta_bdl + delta_bias.float()[:, None]
    if delta_softplus:
        delta_bdl = F.softplus(delta_bdl)
    h0_bdn = None if initial_state is None else initial_state.float()

    y_bdl, last_bdn = SelectiveScanCPUFunction.apply(u_bdl, delta_bdl, A.float(), B.float(), C.float(), h0_bdn)
    if D is not None:
        y_bdl = y_bdl + u_bdl * D.float()[:, None]
    if z is not None:
        y_bdl = y_bdl * F.silu(z.float())
    y_bdl = y_bdl.to(u.dtype)
    if return_last_state:
        return y_bdl, last_bdn
    return y_bdl
