"""Selective scan (Mamba's S6 recurrence) in plain PyTorch: the ground truth.

Shape legend (lower case, because ``B`` and ``C`` name the SSM's input and
output matrices): b batch, d channels (dim), n state size (d_state),
l sequence length, g groups of channels sharing one B/C (d divisible by g).

Layouts and semantics are those of mamba_ssm's ``selective_scan_fn`` for a
real ``A`` and input-dependent ``B``/``C``, plus an ``initial_state`` so that a
long sequence can be scanned in chunks (or one step at a time) by carrying the
state. See README.md for the math.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _check(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise ValueError(f"{name} {message}")


def _check_float(t: Tensor, name: str) -> None:
    _check(
        t.is_floating_point(),
        name,
        f"must be a real floating-point tensor, got dtype {t.dtype}",
    )


def _check_bc(t: Tensor, name: str, batch: int, dim: int, d_state: int, length: int) -> None:
    """B and C are (b, n, l) or grouped (b, g, n, l) with d divisible by g."""
    _check_float(t, name)
    if t.dim() == 3:
        expected = (batch, d_state, length)
        _check(
            tuple(t.shape) == expected, name, f"must have shape (batch, d_state, L)={expected}, got {tuple(t.shape)}"
        )
        return
    _check(t.dim() == 4, name, f"must be 3-D (batch, d_state, L) or 4-D (batch, G, d_state, L), got {t.dim()}-D")
    groups = t.shape[1]
    _check(groups >= 1 and dim % groups == 0, name, f"groups G={groups} must divide dim={dim}")
    expected = (batch, groups, d_state, length)
    _check(tuple(t.shape) == expected, name, f"must have shape (batch, G, d_state, L)={expected}, got {tuple(t.shape)}")


def _validate(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    initial_state: Tensor | None,
) -> None:
    _check(u.dim() == 3, "u", f"must be 3-D (batch, dim, L), got shape {tuple(u.shape)}")
    _check_float(u, "u")
    batch, dim, length = u.shape
    _check(length >= 1, "u", "must have L >= 1")
    _check(
        A.dim() == 2 and A.shape[0] == dim, "A", f"must have shape (dim, d_state) with dim={dim}, got {tuple(A.shape)}"
    )
    _check(not A.is_complex(), "A", "must be real (complex A is not supported)")
    _check_float(A, "A")
    d_state = A.shape[1]
    # The kernel loads u, delta and z as one element type, so the reference
    # refuses mixed dtypes too rather than accept calls the kernel cannot serve.
    _check(
        tuple(delta.shape) == tuple(u.shape), "delta", f"must have u's shape {tuple(u.shape)}, got {tuple(delta.shape)}"
    )
    _check(delta.dtype == u.dtype, "delta", f"must have u's dtype {u.dtype}, got {delta.dtype}")
    if z is not None:
        _check(tuple(z.shape) == tuple(u.shape), "z", f"must have u's shape {tuple(u.shape)}, got {tuple(z.shape)}")
        _check(z.dtype == u.dtype, "z", f"must have u's dtype {u.dtype}, got {z.dtype}")
    _check_bc(B, "B", batch, dim, d_state, length)
    _check_bc(C, "C", batch, dim, d_state, length)
    for name, vec in (("D", D), ("delta_bias", delta_bias)):
        if vec is not None:
            _check(tuple(vec.shape) == (dim,), name, f"must have shape (dim,)=({dim},), got {tuple(vec.shape)}")
            _check_float(vec, name)
    if initial_state is not None:
        expected = (batch, dim, d_state)
        _check(
            tuple(initial_state.shape) == expected,
            "initial_state",
            f"must have shape (batch, dim, d_state)={expected}, got {tuple(initial_state.shape)}",
        )
        _check_float(initial_state, "initial_state")
    others = {
        "delta": delta,
        "A": A,
        "B": B,
        "C": C,
        "D": D,
        "z": z,
        "delta_bias": delta_bias,
        "initial_state": initial_state,
    }
    for name, t in others.items():
        if t is not None:
            _check(t.device == u.device, name, f"must be on u's device {u.device}, got {t.device}")


def _per_channel(M_bgnl: Tensor, t: int, dim: int) -> Tensor:
    """Step t of a grouped B or C, repeated to every channel of its group: (b, d, n)."""
    groups = M_bgnl.shape[1]
    # Group g serves the contiguous channels g*dim/G .. (g+1)*dim/G - 1.
    return M_bgnl[:, :, :, t].repeat_interleave(dim // groups, dim=1)


def selective_scan_ref(
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
    """Sequential selective scan, computed in fp32.

    Args:
        u: (b, d, l) input.
        delta: (b, d, l) step sizes before ``delta_bias`` and softplus.
        A: (d, n) real state matrix (diagonal per channel; negative for decay).
        B: (b, n, l) or (b, g, n, l) input matrix per step.
        C: (b, n, l) or (b, g, n, l) output matrix per step.
        D: optional (d,) skip connection weight.
        z: optional (b, d, l) gate; the output is multiplied by silu(z).
        delta_bias: optional (d,) added to delta before the softplus.
        delta_softplus: apply softplus to delta (after the bias).
        return_last_state: also return the state after the last step.
        initial_state: optional (b, d, n) state before the first step; zeros when None.

    Returns:
        y: (b, d, l) in u's dtype; with ``return_last_state`` the tuple
        (y, last_state) where last_state is (b, d, n) fp32.

    Raises:
        ValueError: naming the argument whose shape, dtype or device is wrong.
    """
    _validate(u, delta, A, B, C, D, z, delta_bias, initial_state)
    batch, dim, length = u.shape
    d_state = A.shape[1]

    u_bdl = u.float()
    delta_bdl = delta.float()
    if delta_bias is not None:
        delta_bdl = delta_bdl + delta_bias.float()[:, None]
    if delta_softplus:
        delta_bdl = F.softplus(delta_bdl)
    A_dn = A.float()
    # View ungrouped B/C as one group so both layouts share one loop.
    B_bgnl = (B if B.dim() == 4 else B[:, None]).float()
    C_bgnl = (C if C.dim() == 4 else C[:, None]).float()

    h_bdn = u_bdl.new_zeros(batch, dim, d_state) if initial_state is None else initial_state.float()

    ys = []
    for t in range(length):
        delta_bd = delta_bdl[:, :, t]
        decay_bdn = torch.exp(delta_bd[:, :, None] * A_dn)
        inject_bdn = (delta_bd * u_bdl[:, :, t])[:, :, None] * _per_channel(B_bgnl, t, dim)
        h_bdn = decay_bdn * h_bdn + inject_bdn
        ys.append((h_bdn * _per_channel(C_bgnl, t, dim)).sum(dim=-1))
    y_bdl = torch.stack(ys, dim=-1)

    if D is not None:
        y_bdl = y_bdl + u_bdl * D.float()[:, None]
    if z is not None:
        y_bdl = y_bdl * F.silu(z.float())
    y_bdl = y_bdl.to(u.dtype)
    if return_last_state:
        return y_bdl, h_bdn
    return y_bdl
