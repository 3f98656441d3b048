"""The CPU selective scan (hand-written backward) against the reference.

Output, last state and the gradient of every differentiable input, over every
option, grouping, L = 1, bf16 and non-contiguous inputs; gradcheck of the
autograd Function in float64. A fixture pins two batch rows per chunk, so the
odd batches below end on a short chunk; one test keeps the default chunking.

Shape legend: b batch, d channels, n state size, l sequence length, g groups.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from kernels.selective_scan import selective_scan, selective_scan_cpu, selective_scan_ref
from tests.kernels.test_selective_scan_triton import make_inputs  # one input builder for every scan test

cpu_module = importlib.import_module("kernels.selective_scan.cpu")

INPUT_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")

TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    # Both sides compute in fp32; only the order of sums and exp vs exp2 differ.
    torch.float32: {"atol": 2e-5, "rtol": 2e-5},
    # Same fp32 math from the same rounded inputs; each result is rounded to
    # bf16 (8 mantissa bits) once, after sums whose order differs.
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
}


@dataclass(frozen=True)
class Case:
    id: str
    batch: int = 3
    dim: int = 6
    d_state: int = 4
    length: int = 7
    groups_b: int = 0
    """0: B is (b, n, l); otherwise (b, g, n, l) with this many groups."""
    groups_c: int = 0
    use_skip: bool = True
    use_z: bool = True
    use_delta_bias: bool = True
    softplus: bool = True
    use_initial_state: bool = True
    dtype: torch.dtype = torch.float32
    """u, delta, z, B, C; A, D, delta_bias and the initial state stay fp32 (as in the cores)."""


PLAIN = {"use_skip": False, "use_z": False, "use_delta_bias": False, "softplus": False, "use_initial_state": False}

CASES = [
    Case("all-options"),
    Case("plain", **PLAIN),
    Case("D-only", **{**PLAIN, "use_skip": True}),
    Case("z-only", **{**PLAIN, "use_z": True}),
    Case("bias-no-softplus", **{**PLAIN, "use_delta_bias": True}),
    Case("softplus-no-bias", **{**PLAIN, "softplus": True}),
    Case("initial-state-only", **{**PLAIN, "use_initial_state": True}),
    Case("L1", length=1),
    Case("L1-plain", length=1, **PLAIN),
    Case("grouped-BC", groups_b=2, groups_c=3),
    Case("grouped-B-flat-C", groups_b=6),
    Case("flat-B-grouped-C-no-init", groups_c=2, use_initial_state=False),
    Case("odd-b5-d9-n5-l13", batch=5, dim=9, d_state=5, length=13, groups_b=3, groups_c=1),
    Case("L63-n16", batch=2, dim=4, d_state=16, length=63),
    Case("bf16", length=16, groups_b=2, dtype=torch.bfloat16),
]


@pytest.fixture(autouse=True)
def two_rows_per_chunk(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Chunks of two batch rows: odd batches end on a short chunk, and dA sums over chunks."""
    monkeypatch.setattr(cpu_module, "CHUNK_ELEMENTS", 1)
    monkeypatch.setattr(cpu_module, "MIN_CHUNK_ROWS", 2)
    yield


Loss = Callable[[Tensor, Tensor, torch.Generator], Tensor]


def _weighted_both(y: Tensor, last: Tensor, gen: torch.Generator) -> Tensor:
    return (y.float() * torch.randn(y.shape, generator=gen)).sum() + (
        last * torch.randn(last.shape, generator=gen)
    ).sum()


def _last_state_only(y: Tensor, last: Tensor, gen: torch.Generator) -> Tensor:
    # y is unused: its gradient reaches the Function as zeros.
    return (last * torch.randn(last.shape, generator=gen)).sum()


def run_with_grads(
    scan: Callable[..., tuple[Tensor, Tensor]],
    inputs: dict[str, Tensor | None],
    softplus: bool,
    loss: Loss = _weighted_both,
    seed: int = 5,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """y, last state and the gradients of a random weighting of them (the same on both sides)."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items() if v is not None}
    kwargs = {k: leaves.get(k) for k in INPUT_NAMES}
    y, last = scan(**kwargs, delta_softplus=softplus, return_last_state=True)
    loss(y, last, torch.Generator().manual_seed(seed)).backward()
    grads = {k: v.grad for k, v in leaves.items() if v.grad is not None}
    return y.detach(), last.detach(), grads


def assert_matches_reference(
    inputs: dict[str, Tensor | None], softplus: bool, dtype: torch.dtype, loss: Loss = _weighted_both
) -> None:
    y, last, grads = run_with_grads(selective_scan_cpu, inputs, softplus, loss)  # type: ignore[arg-type]
    y_ref, last_ref, grads_ref = run_with_grads(selective_scan_ref, inputs, softplus, loss)  # type: ignore[arg-type]
    tol = TOLERANCES[dtype]
    assert y.dtype == inputs["u"].dtype and last.dtype == torch.float32  # type: ignore[union-attr]
    assert y.is_contiguous() and last.is_contiguous()
    torch.testing.assert_close(y.float(), y_ref.float(), **tol, msg=lambda m: f"y: {m}")
    torch.testing.assert_close(last, last_ref, **tol, msg=lambda m: f"last state: {m}")
    assert set(grads) == set(grads_ref)
    for name, grad_ref in grads_ref.items():
        grad = grads[name]
        assert grad.dtype == grad_ref.dtype and grad.shape == grad_ref.shape, name
        torch.testing.assert_close(grad.float(), grad_ref.float(), **tol, msg=lambda m, k=name: f"d{k}: {m}")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_reference(case: Case) -> None:
    assert_matches_reference(make_inputs(case), case.softplus, case.dtype)


@pytest.mark.parametrize("case", [c for c in CASES if c.id in ("all-options", "grouped-BC")], ids=lambda c: c.id)
def test_gradient_through_the_last_state_alone(case: Case) -> None:
    assert_matches_reference(make_inputs(case, seed=2), case.softplus, case.dtype, loss=_last_state_only)


def test_output_alone_without_the_last_state() -> None:
    """return_last_state=False: the state's gradient reaches the Function as zeros."""
    inputs = make_inputs(Case("y-only"), seed=3)
    grads = {}
    for name, scan in (("cpu", selective_scan_cpu), ("ref", selective_scan_ref)):
        leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items() if v is not None}
        y = scan(**leaves, delta_softplus=True)
        assert isinstance(y, Tensor)
        y.square().sum().backward()
        grads[name] = {k: v.grad for k, v in leaves.items()}
    for key, grad_ref in grads["ref"].items():
        torch.testing.assert_close(grads["cpu"][key], grad_ref, **TOLERANCES[torch.float32])


def test_non_contiguous_inputs() -> None:
    """Transposed and sliced views of every tensor input give the contiguous inputs' results."""
    case = Case("strided", groups_b=2)
    inputs = make_inputs(case, seed=4)

    def strided(t: Tensor) -> Tensor:
        # The same values behind a transposed layout with a gap in the last dim.
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1]).transpose(-1, -2).contiguous().transpose(-1, -2)
        wide[..., ::2] = t
        view = wide[..., ::2]
        assert not view.is_contiguous()
        return view

    views = {k: (strided(v) if v is not None and v.dim() > 1 else v) for k, v in inputs.items()}
    y, last, grads = run_with_grads(selective_scan_cpu, views, softplus=True)  # type: ignore[arg-type]
    y_ref, last_ref, grads_ref = run_with_grads(selective_scan_ref, inputs, softplus=True)  # type: ignore[arg-type]
    tol = TOLERANCES[torch.float32]
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(last, last_ref, **tol)
    for name, grad_ref in grads_ref.items():
        torch.testing.assert_close(grads[name], grad_ref, **tol, msg=lambda m, k=name: f"d{k}: {m}")


def test_float64_inputs_compute_in_fp32_like_the_reference() -> None:
    inputs = make_inputs(Case("fp64", groups_c=3), seed=6)
    inputs = {k: (v.double() if v is not None else None) for k, v in inputs.items()}
    y, last, grads = run_with_grads(selective_scan_cpu, inputs, softplus=True)  # type: ignore[arg-type]
    y_ref, last_ref, grads_ref = run_with_grads(selective_scan_ref, inputs, softplus=True)  # type: ignore[arg-type]
    assert y.dtype == torch.float64 and last.dtype == torch.float32
    tol = TOLERANCES[torch.float32]
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(last, last_ref, **tol)
    for name, grad_ref in grads_ref.items():
        assert grads[name].dtype == torch.float64, name
        torch.testing.assert_close(grads[name], grad_ref, **tol, msg=lambda m, k=name: f"d{k}: {m}")


def test_default_chunking_equals_two_row_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = make_inputs(Case("chunks", batch=5, groups_b=3), seed=7)
    y_two, last_two, grads_two = run_with_grads(selective_scan_cpu, inputs, softplus=True)  # type: ignore[arg-type]
    monkeypatch.undo()
    assert cpu_module._chunk_rows(5, 7, 4, 6) == 5
    y, last, grads = run_with_grads(selective_scan_cpu, inputs, softplus=True)  # type: ignore[arg-type]
    torch.testing.assert_close(y, y_two, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(last, last_two, atol=1e-6, rtol=1e-6)
    for name, grad in grads_two.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=1e-6, msg=lambda m, k=name: f"d{k}: {m}")


def test_no_grad_call_returns_y_alone_or_with_the_last_state() -> None:
    inputs = make_inputs(Case("no-grad"), seed=8)
    with torch.no_grad():
        y = selective_scan_cpu(**inputs, delta_softplus=True)  # type: ignore[arg-type]
        y2, last = selective_scan_cpu(**inputs, delta_softplus=True, return_last_state=True)  # type: ignore[arg-type,misc]
        y_ref, last_ref = selective_scan_ref(**inputs, delta_softplus=True, return_last_state=True)  # type: ignore[arg-type,misc]
    assert isinstance(y, Tensor)
    tol = TOLERANCES[torch.float32]
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(y2, y, atol=0, rtol=0)
    torch.testing.assert_close(last, last_ref, **tol)


GRADCHECK_CASES = [
    ("flat-init", 0, 0, True),
    ("grouped-no-init", 2, 3, False),
]


@pytest.mark.parametrize(
    ("groups_b", "groups_c", "with_init"),
    [c[1:] for c in GRADCHECK_CASES],
    ids=[c[0] for c in GRADCHECK_CASES],
)
def test_function_gradcheck_float64(groups_b: int, groups_c: int, with_init: bool) -> None:
    """The Function runs in its inputs' dtype, so float64 gradcheck checks the hand-written backward."""
    case = Case("gradcheck", batch=3, dim=6, d_state=2, length=4, groups_b=groups_b, groups_c=groups_c)
    inputs = make_inputs(case, seed=9)
    args = [
        inputs["u"],
        torch.rand(case.batch, case.dim, case.length, generator=torch.Generator().manual_seed(1)) + 0.1,
        inputs["A"],
        inputs["B"],
        inputs["C"],
        inputs["initial_state"] if with_init else None,
    ]
    args = [a.double().requires_grad_(True) if a is not None else None for a in args]
    assert torch.autograd.gradcheck(cpu_module.SelectiveScanCPUFunction.apply, tuple(args), eps=1e-6, atol=1e-6)


def test_dispatch_runs_cpu_path_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    package = importlib.import_module("kernels.selective_scan")
    calls: list[str] = []

    def spy(*args: object, **kwargs: object) -> object:
        calls.append("cpu")
        return selective_scan_cpu(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(package, "selective_scan_cpu", spy)
    inputs = make_inputs(Case("dispatch"))
    y = selective_scan(**inputs, delta_softplus=True)  # type: ignore[call-overload]
    assert calls == ["cpu"]
    torch.testing.assert_close(y, selective_scan_ref(**inputs, delta_softplus=True), **TOLERANCES[torch.float32])  # type: ignore[arg-type]


def _bad(**overrides: object) -> dict[str, object]:
    inputs: dict[str, object] = dict(make_inputs(Case("bad", softplus=False)))
    inputs.update(overrides)
    return inputs


BAD_CASES = [
    ("u-2d", "u", _bad(u=torch.randn(6, 7))),
    ("delta-dtype", "delta", _bad(delta=torch.rand(3, 6, 7, dtype=torch.float64))),
    ("A-shape", "A", _bad(A=-torch.rand(5, 4))),
    ("B-groups", "B", _bad(B=torch.randn(3, 4, 4, 7))),
    ("C-length", "C", _bad(C=torch.randn(3, 4, 8))),
    ("D-shape", "D", _bad(D=torch.randn(5))),
    ("z-shape", "z", _bad(z=torch.randn(3, 6, 8))),
    ("delta_bias-shape", "delta_bias", _bad(delta_bias=torch.randn(6, 1))),
    ("initial_state-shape", "initial_state", _bad(initial_state=torch.randn(3, 6, 5))),
]


@pytest.mark.parametrize(("name", "kwargs"), [(n, k) for _, n, k in BAD_CASES], ids=[i for i, _, _ in BAD_CASES])
def test_malformed_arguments_raise_value_error_naming_them(name: str, kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=rf"^{name} "):
        selective_scan_cpu(**kwargs)  # type: ignore[arg-type]
