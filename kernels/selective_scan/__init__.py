"""Selective scan (Mamba's S6 recurrence): one dispatch point and the reference.

Shape legend: b batch, d channels (dim), n state size (d_state), l sequence
length, g groups of channels sharing one B/C.
"""

from __future__ import annotations

from typing import Literal, overload

from torch import Tensor

from kernels.selective_scan.reference import selective_scan_ref

__all__ = ["selective_scan", "selective_scan_ref"]


@overload
def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = ...,
    z: Tensor | None = ...,
    delta_bias: Tensor | None = ...,
    delta_softplus: bool = ...,
    return_last_state: Literal[False] = ...,
    initial_state: Tensor | None = ...,
) -> Tensor: ...


@overload
def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = ...,
    z: Tensor | None = ...,
    delta_bias: Tensor | None = ...,
    delta_softplus: bool = ...,
    *,
    return_last_state: Literal[True],
    initial_state: Tensor | None = ...,
) -> tuple[Tensor, Tensor]: ...


@overload
def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = ...,
    z: Tensor | None = ...,
    delta_bias: Tensor | None = ...,
    delta_softplus: bool = ...,
    return_last_state: bool = ...,
    initial_state: Tensor | None = ...,
) -> Tensor | tuple[Tensor, Tensor]: ...


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
    """Selective scan with the layouts of mamba_ssm's ``selective_scan_fn``.

    u, delta, z: (b, d, l); A: (d, n) real; B, C: (b, n, l) or (b, g, n, l);
    D, delta_bias: (d,); initial_state: (b, d, n), zeros when None.
    Returns y (b, d, l) in u's dtype, or (y, last_state (b, d, n) fp32) with
    ``return_last_state``. Raises ValueError naming a malformed argument.
    """
    # The single dispatch point for every caller (the temporal cores included):
    # the Triton kernel (a later issue) plugs in here, chosen by device, and the
    # fp32 reference stays the fallback on CPU and the ground truth in tests.
    return selective_scan_ref(
        u,
        delta,
        A,
        B,
        C,
        D=D,
        z=z,
        delta_bias=delta_bias,
        delta_softplus=delta_softplus,
        return_last_state=return_last_state,
        initial_state=initial_state,
    )
