"""The selective-scan reference against independent implementations.

Shape legend: b batch, d channels, n state size, l sequence length, g groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.selective_scan import selective_scan, selective_scan_cpu, selective_scan_ref


@dataclass(frozen=True)
class Case:
    id: str
    batch: int = 2
    dim: int = 6
    d_state: int = 3
    length: int = 7
    groups_b: int = 0
    """0: B is (b, n, l); otherwise (b, g, n, l) with this many groups."""
    groups_c: int = 0
    """The same for C."""
    use_skip: bool = False
    """Pass the skip weight D."""
    use_z: bool = False
    use_delta_bias: bool = False
    softplus: bool = False
    use_initial_state: bool = False


CASES = [
    Case("plain"),
    Case("L1", length=1),
    Case("L1-all", length=1, use_skip=True, use_z=True, use_delta_bias=True, softplus=True, use_initial_state=True),
    Case("grouped-BC", groups_b=2, groups_c=3),
    Case("grouped-B-flat-C", groups_b=6),
    Case("D", use_skip=True),
    Case("z", use_z=True),
    Case("bias-softplus", use_delta_bias=True, softplus=True),
    Case("initial-state", use_initial_state=True),
    Case(
        "all-odd",
        batch=3,
        dim=9,
        d_state=5,
        length=13,
        groups_b=3,
        groups_c=1,
        use_skip=True,
        use_z=True,
        use_delta_bias=True,
        softplus=True,
        use_initial_state=True,
    ),
]


def _bc(case: Case, groups: int, gen: torch.Generator) -> Tensor:
    if groups == 0:
        return torch.randn(case.batch, case.d_state, case.length, generator=gen)
    return torch.randn(case.batch, groups, case.d_state, case.length, generator=gen)


def make_inputs(case: Case, seed: int = 0) -> dict[str, Tensor | bool | None]:
    gen = torch.Generator().manual_seed(seed)
    b, d, n, length = case.batch, case.dim, case.d_state, case.length
    # Without softplus delta must be positive to be a step size.
    delta = torch.randn(b, d, length, generator=gen) if case.softplus else torch.rand(b, d, length, generator=gen) * 0.5
    return {
        "u": torch.randn(b, d, length, generator=gen),
        "delta": delta,
        "A": -torch.rand(d, n, generator=gen) * 2 - 0.1,
        "B": _bc(case, case.groups_b, gen),
        "C": _bc(case, case.groups_c, gen),
        "D": torch.randn(d, generator=gen) if case.use_skip else None,
        "z": torch.randn(b, d, length, generator=gen) if case.use_z else None,
        "delta_bias": torch.randn(d, generator=gen) * 0.5 if case.use_delta_bias else None,
        "delta_softplus": case.softplus,
        "initial_state": torch.randn(b, d, n, generator=gen) if case.use_initial_state else None,
    }


def _per_channel_full(M: Tensor, dim: int) -> Tensor:
    """(b, n, l) or (b, g, n, l) -> (b, d, n, l), channel c reading group c // (d / g)."""
    if M.dim() == 3:
        return M[:, None].expand(-1, dim, -1, -1)
    groups = M.shape[1]
    return torch.stack([M[:, c // (dim // groups)] for c in range(dim)], dim=1)


def closed_form_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Unrolled recurrence in float64, all steps at once (no loop over time):

    h_t = sum_{s<=t} exp(A (cum_t - cum_s)) delta_s B_s u_s + exp(A cum_t) h_0,
    with cum the cumulative sum of delta.
    """
    u, delta, A = u.double(), delta.double(), A.double()
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    b, d, length = u.shape
    n = A.shape[1]
    B_bdnl = _per_channel_full(B.double(), d)
    C_bdnl = _per_channel_full(C.double(), d)
    h0_bdn = torch.zeros(b, d, n, dtype=torch.float64) if initial_state is None else initial_state.double()

    cum_bdl = delta.cumsum(dim=-1)
    seg_bdts = cum_bdl[:, :, :, None] - cum_bdl[:, :, None, :]
    causal_ts = torch.ones(length, length, dtype=torch.bool).tril()
    decay_bdtsn = torch.exp(A[None, :, None, None, :] * seg_bdts[..., None])
    decay_bdtsn = decay_bdtsn.masked_fill(~causal_ts[None, None, :, :, None], 0.0)
    inject_bdsn = (delta * u)[:, :, :, None] * B_bdnl.permute(0, 1, 3, 2)
    h_bdtn = torch.einsum("bdtsn,bdsn->bdtn", decay_bdtsn, inject_bdsn)
    h_bdtn = h_bdtn + torch.exp(A[None, :, None, :] * cum_bdl[..., None]) * h0_bdn[:, :, None, :]
    y_bdl = torch.einsum("bdtn,bdnt->bdt", h_bdtn, C_bdnl)
    if D is not None:
        y_bdl = y_bdl + u * D.double()[:, None]
    if z is not None:
        y_bdl = y_bdl * F.silu(z.double())
    return y_bdl, h_bdtn[:, :, -1]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_reference_matches_closed_form(case: Case) -> None:
    inputs = make_inputs(case)
    y, last = selective_scan_ref(**inputs, return_last_state=True)  # type: ignore[arg-type]
    y_want, last_want = closed_form_scan(**inputs)  # type: ignore[arg-type]
    assert y.dtype == torch.float32 and last.dtype == torch.float32
    assert y.shape == (case.batch, case.dim, case.length)
    assert last.shape == (case.batch, case.dim, case.d_state)
    torch.testing.assert_close(y.double(), y_want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last.double(), last_want, atol=1e-5, rtol=1e-5)


def test_reference_matches_scalar_loops() -> None:
    """Tiny grouped case with every option, against per-element Python arithmetic."""
    case = Case(
        "scalar",
        batch=2,
        dim=4,
        d_state=2,
        length=4,
        groups_b=2,
        groups_c=2,
        use_skip=True,
        use_z=True,
        use_delta_bias=True,
        softplus=True,
        use_initial_state=True,
    )
    inp = make_inputs(case, seed=3)
    u, delta, A, B, C = (inp[k].tolist() for k in ("u", "delta", "A", "B", "C"))  # type: ignore[union-attr]
    D, z, bias, h0 = (inp[k].tolist() for k in ("D", "z", "delta_bias", "initial_state"))  # type: ignore[union-attr]
    per_group = case.dim // case.groups_b
    y_want = torch.zeros(case.batch, case.dim, case.length, dtype=torch.float64)
    for bi in range(case.batch):
        for c in range(case.dim):
            g = c // per_group
            h = list(h0[bi][c])
            for t in range(case.length):
                dt = F.softplus(torch.tensor(delta[bi][c][t] + bias[c], dtype=torch.float64)).item()
                acc = 0.0
                for s in range(case.d_state):
                    h[s] = torch.tensor(dt * A[c][s], dtype=torch.float64).exp().item() * h[s]
                    h[s] += dt * B[bi][g][s][t] * u[bi][c][t]
                    acc += C[bi][g][s][t] * h[s]
                gate = z[bi][c][t] * torch.sigmoid(torch.tensor(z[bi][c][t], dtype=torch.float64)).item()
                y_want[bi, c, t] = (acc + D[c] * u[bi][c][t]) * gate
    y = selective_scan_ref(**inp)  # type: ignore[arg-type]
    torch.testing.assert_close(y.double(), y_want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("splits", [(4, 1, 4), (1,) * 9, (8, 1)], ids=["4-1-4", "ones", "8-1"])
@pytest.mark.parametrize("grouped", [False, True], ids=["flat", "grouped"])
def test_chunks_with_carried_state_equal_one_call(splits: tuple[int, ...], grouped: bool) -> None:
    case = Case(
        "chunks",
        length=sum(splits),
        groups_b=3 if grouped else 0,
        groups_c=2 if grouped else 0,
        use_skip=True,
        use_z=True,
        use_delta_bias=True,
        softplus=True,
        use_initial_state=True,
    )
    inp = make_inputs(case, seed=1)
    y_full, last_full = selective_scan_ref(**inp, return_last_state=True)  # type: ignore[arg-type]

    state = inp["initial_state"]
    ys = []
    start = 0
    for size in splits:
        window = slice(start, start + size)
        chunk = dict(inp)
        for key in ("u", "delta", "z"):
            chunk[key] = inp[key][:, :, window]  # type: ignore[index]
        for key in ("B", "C"):
            chunk[key] = inp[key][..., window]  # type: ignore[index]
        chunk["initial_state"] = state
        y, state = selective_scan_ref(**chunk, return_last_state=True)  # type: ignore[arg-type]
        ys.append(y)
        start += size
    torch.testing.assert_close(torch.cat(ys, dim=-1), y_full, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(state, last_full, atol=1e-6, rtol=1e-6)


def test_return_last_state_is_optional_and_zero_initial_state_is_default() -> None:
    inp = make_inputs(Case("default"))
    y_only = selective_scan_ref(**inp)  # type: ignore[arg-type]
    assert isinstance(y_only, Tensor)
    y_zero, _ = selective_scan_ref(  # type: ignore[misc]
        **{**inp, "initial_state": torch.zeros(2, 6, 3)},
        return_last_state=True,  # type: ignore[arg-type]
    )
    torch.testing.assert_close(y_only, y_zero, atol=0, rtol=0)


def test_dispatch_calls_cpu_path() -> None:
    """On CPU the dispatch runs `selective_scan_cpu`, pinned to the reference in test_selective_scan_cpu.py."""
    inp = make_inputs(
        Case("dispatch", use_skip=True, use_z=True, use_delta_bias=True, softplus=True, use_initial_state=True)
    )
    y, last = selective_scan(**inp, return_last_state=True)  # type: ignore[call-overload]
    y_cpu, last_cpu = selective_scan_cpu(**inp, return_last_state=True)  # type: ignore[arg-type]
    torch.testing.assert_close(y, y_cpu, atol=0, rtol=0)
    torch.testing.assert_close(last, last_cpu, atol=0, rtol=0)


def test_bf16_inputs_give_bf16_output_close_to_fp32() -> None:
    inp = make_inputs(
        Case(
            "bf16",
            length=16,
            groups_b=2,
            use_skip=True,
            use_z=True,
            use_delta_bias=True,
            softplus=True,
            use_initial_state=True,
        )
    )
    low = dict(inp)
    for key in ("u", "delta", "z", "B", "C"):
        low[key] = inp[key].to(torch.bfloat16)  # type: ignore[union-attr]
    y_low, last_low = selective_scan_ref(**low, return_last_state=True)  # type: ignore[arg-type]
    assert y_low.dtype == torch.bfloat16
    assert last_low.dtype == torch.float32
    # Computed in fp32 on the same (rounded) values, the only bf16 step is the final cast.
    upcast = {k: (v.float() if isinstance(v, Tensor) else v) for k, v in low.items()}
    y_up = selective_scan_ref(**upcast)  # type: ignore[arg-type]
    torch.testing.assert_close(y_low, y_up.to(torch.bfloat16), atol=0, rtol=0)
    y_fp32 = selective_scan_ref(**inp)  # type: ignore[arg-type]
    torch.testing.assert_close(y_low.float(), y_fp32, atol=5e-2, rtol=5e-2)


def _bad(**overrides: object) -> dict[str, object]:
    inp: dict[str, object] = dict(
        make_inputs(Case("bad", use_skip=True, use_z=True, use_delta_bias=True, use_initial_state=True))
    )
    inp.update(overrides)
    return inp


BAD_CASES = [
    ("u-2d", "u", _bad(u=torch.randn(6, 7))),
    ("u-int", "u", _bad(u=torch.ones(2, 6, 7, dtype=torch.int64))),
    ("delta-shape", "delta", _bad(delta=torch.rand(2, 6, 6))),
    ("delta-dtype", "delta", _bad(delta=torch.rand(2, 6, 7, dtype=torch.float64))),
    ("A-shape", "A", _bad(A=-torch.rand(5, 3))),
    ("A-complex", "A", _bad(A=torch.complex(-torch.rand(6, 3), torch.rand(6, 3)))),
    ("B-shape", "B", _bad(B=torch.randn(2, 4, 7))),
    ("B-groups", "B", _bad(B=torch.randn(2, 4, 3, 7))),
    ("B-5d", "B", _bad(B=torch.randn(2, 1, 2, 3, 7))),
    ("C-length", "C", _bad(C=torch.randn(2, 3, 8))),
    ("D-shape", "D", _bad(D=torch.randn(5))),
    ("z-shape", "z", _bad(z=torch.randn(2, 6, 8))),
    ("z-dtype", "z", _bad(z=torch.randn(2, 6, 7, dtype=torch.bfloat16))),
    ("delta_bias-shape", "delta_bias", _bad(delta_bias=torch.randn(6, 1))),
    ("initial_state-shape", "initial_state", _bad(initial_state=torch.randn(2, 6, 4))),
]


@pytest.mark.parametrize(("name", "kwargs"), [(n, k) for _, n, k in BAD_CASES], ids=[i for i, _, _ in BAD_CASES])
def test_malformed_arguments_raise_value_error_naming_them(name: str, kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=rf"^{name} "):
        selective_scan_ref(**kwargs)  # type: ignore[arg-type]
