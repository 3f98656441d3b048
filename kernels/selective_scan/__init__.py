"""Selective scan (Mamba's S6 recurrence): one dispatch point, the reference and the CPU path.

Shape legend: b batch, d channels (dim), n state size (d_state), l sequence
length, g groups of channels sharing one B/C.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal, overload

import torch
from torch import Tensor

from kernels.selective_scan.cpu import selective_scan_cpu
from kernels.selective_scan.reference import selective_scan_ref

logger = logging.getLogger(__name__)

selective_scan_triton: Callable[..., Tensor | tuple[Tensor, Tensor]] | None
try:
    from kernels.selective_scan.selective_scan import interpreter_enabled
    from kernels.selective_scan.selective_scan import selective_scan as selective_scan_triton
except ImportError as error:  # triton is absent: every device gets the CPU path
    logger.debug("selective scan: no Triton kernel (%s); using the CPU path", error)
    selective_scan_triton = None

__all__ = ["selective_scan", "selective_scan_cpu", "selective_scan_ref", "selective_scan_triton", "uses_triton"]


def uses_triton(device: torch.device) -> bool:
    """Whether `selective_scan` runs the Triton kernels for tensors on `device`.

    CUDA: yes. Any device under TRITON_INTERPRET=1: yes, through the
    interpreter (tests). Otherwise `selective_scan_cpu` (fp32, hand-written
    backward, pinned to the reference by tests). Read at call time, so a
    test can switch the interpreter on and off around a call.
    """
    if selective_scan_triton is None:
        return False
    return device.type == "cuda" or interpreter_enabled()


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
    ``return_last_state``; both have gradients w.r.t. every tensor input.
    Raises ValueError naming a malformed argument. The Triton path takes
    float32, bfloat16 and float16; float64 is served by the CPU path only
    (computed in fp32 there, as in the reference).
    """
    # The single dispatch point for every caller (the temporal cores included):
    # the Triton kernels on CUDA (or under the interpreter), elsewhere the CPU
    # path: the reference's fp32 math with a hand-written backward, about
    # twice as fast to train through as autograd over the reference's loop.
    # All validate the same way and compute the same math.
    scan = selective_scan_triton if uses_triton(u.device) else selective_scan_cpu
    assert scan is not None
    return scan(
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
