"""The Triton selective scan against the reference: output, every gradient, the last state.

CPU cases run the kernels through the Triton interpreter: a fixture sets
TRITON_INTERPRET=1 for each test only (the kernel module picks the mode per
call, so the rest of the suite keeps the reference path), pins one small launch
config so channel blocks, chunk checkpoints and batch tails are all exercised,
and NaN-fills every kernel output so an unwritten element fails. `gpu` cases
run the compiled, autotuned kernels on CUDA with larger shapes.

Shape legend: b batch, d channels, n state size, l sequence length, g groups.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from kernels.selective_scan import selective_scan, selective_scan_ref, selective_scan_triton, uses_triton

# The package's `selective_scan` attribute is the dispatching function, which
# shadows the submodule of the same name; import the module by its full name.
scan_module = importlib.import_module("kernels.selective_scan.selective_scan")

# triton 3.6's interpreter turns each runtime loop bound (a one-element array)
# into an index with a numpy deprecation warning: noise, once per loop.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

# block_d=4 splits every odd dim into several masked channel blocks; chunk=16
# makes l=63 four chunks with three checkpoints; two batch rows per backward
# program leave a masked tail row for odd batches; two channel splits make
# the backward walk strided channel blocks (and idle ones when d <= 4).
PINNED = "block_d=4,num_warps=1,chunk=16,batch_per_program=2,channel_splits=2"

INPUT_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")

TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    # Same math in fp32, different summation order.
    torch.float32: {"atol": 1e-4, "rtol": 1e-4},
    # Both sides compute in fp32 from the same rounded inputs; outputs and the
    # gradients of half-precision inputs are rounded once more (bf16 keeps 8
    # mantissa bits, fp16 11), after sums whose order differs.
    torch.float16: {"atol": 5e-3, "rtol": 5e-3},
    torch.bfloat16: {"atol": 3e-2, "rtol": 2e-2},
}


@dataclass(frozen=True)
class Case:
    id: str
    batch: int = 2
    dim: int = 5
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


CPU_CASES = [
    Case("L1", length=1),
    Case("L1-plain", length=1, use_skip=False, use_z=False, use_delta_bias=False, softplus=False),
    Case("L7-plain", use_skip=False, use_z=False, use_delta_bias=False, softplus=False, use_initial_state=False),
    Case("L7-all-dim5"),
    Case("L7-n16-dim6", dim=6, d_state=16),
    Case("L7-odd-batch", batch=3),
    Case("grouped-BC-lcm", dim=6, groups_b=2, groups_c=3),
    Case("grouped-straddling-blocks", dim=6, groups_b=3, groups_c=3, batch=1),
    Case("grouped-B-flat-C", dim=6, groups_b=6),
    Case("bias-no-softplus", softplus=False, use_z=False),
    Case("L32-two-full-chunks", batch=1, dim=3, length=32),
    Case("L63-chunked-n16", batch=1, dim=3, d_state=16, length=63, groups_b=1),
    Case("L63-chunked-no-init", batch=1, dim=6, length=63, groups_c=2, use_initial_state=False),
    Case("bf16", length=16, dtype=torch.bfloat16),
    Case("fp16", length=16, dtype=torch.float16, groups_b=1, groups_c=1),
    Case("bf16-L63-chunked", batch=1, dim=3, length=63, dtype=torch.bfloat16),
]


def _bc(case: Case, groups: int, gen: torch.Generator) -> Tensor:
    shape = (case.batch, case.d_state, case.length) if groups == 0 else (case.batch, groups, case.d_state, case.length)
    return torch.randn(*shape, generator=gen)


def make_inputs(case: Case, seed: int = 0) -> dict[str, Tensor | None]:
    gen = torch.Generator().manual_seed(seed)
    b, d, n, length = case.batch, case.dim, case.d_state, case.length
    # Without softplus delta must be positive to be a step size.
    delta = torch.randn(b, d, length, generator=gen) if case.softplus else torch.rand(b, d, length, generator=gen) * 0.5
    inputs: dict[str, Tensor | None] = {
        "u": torch.randn(b, d, length, generator=gen),
        "delta": delta,
        "A": -torch.rand(d, n, generator=gen) * 2 - 0.1,
        "B": _bc(case, case.groups_b, gen),
        "C": _bc(case, case.groups_c, gen),
        "D": torch.randn(d, generator=gen) if case.use_skip else None,
        "z": torch.randn(b, d, length, generator=gen) if case.use_z else None,
        "delta_bias": torch.randn(d, generator=gen) * 0.5 if case.use_delta_bias else None,
        "initial_state": torch.randn(b, d, n, generator=gen) if case.use_initial_state else None,
    }
    for key in ("u", "delta", "z", "B", "C"):
        value = inputs[key]
        if value is not None:
            inputs[key] = value.to(case.dtype)
    return inputs


def run_with_grads(
    scan: object, inputs: dict[str, Tensor | None], softplus: bool, seed: int = 5
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """y, last state and the gradients of a random weighting of both."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items() if v is not None}
    kwargs = {k: leaves.get(k) for k in INPUT_NAMES}
    y, last = scan(**kwargs, delta_softplus=softplus, return_last_state=True)  # type: ignore[operator]
    gen = torch.Generator().manual_seed(seed)
    w_y = torch.randn(y.shape, generator=gen).to(y.device)
    w_last = torch.randn(last.shape, generator=gen).to(y.device)
    ((y.float() * w_y).sum() + (last * w_last).sum()).backward()
    grads = {k: v.grad for k, v in leaves.items() if v.grad is not None}
    assert set(grads) == set(leaves), f"no gradient for {set(leaves) - set(grads)}"
    return y.detach(), last.detach(), grads


def assert_matches_reference(case: Case, inputs: dict[str, Tensor | None]) -> None:
    y, last, grads = run_with_grads(selective_scan_triton, inputs, case.softplus)
    y_ref, last_ref, grads_ref = run_with_grads(selective_scan_ref, inputs, case.softplus)
    tol = TOLERANCES[case.dtype]
    assert y.dtype == case.dtype and last.dtype == torch.float32
    torch.testing.assert_close(y.float(), y_ref.float(), **tol, msg=lambda m: f"y: {m}")
    torch.testing.assert_close(last, last_ref, **tol, msg=lambda m: f"last state: {m}")
    for name, grad_ref in grads_ref.items():
        grad = grads[name]
        assert grad.dtype == inputs[name].dtype and grad.shape == grad_ref.shape, name  # type: ignore[union-attr]
        torch.testing.assert_close(grad.float(), grad_ref.float(), **tol, msg=lambda m, k=name: f"d{k}: {m}")


@pytest.fixture
def interpreter(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv(scan_module.CONFIG_ENV, PINNED)
    monkeypatch.setattr(scan_module, "FILL_OUTPUTS_WITH_NAN", True)
    yield


@pytest.mark.usefixtures("interpreter")
@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: c.id)
def test_kernel_matches_reference(case: Case) -> None:
    assert_matches_reference(case, make_inputs(case))


@pytest.mark.usefixtures("interpreter")
@pytest.mark.parametrize("splits", [(4, 1, 2), (1,) * 7], ids=["4-1-2", "steps"])
def test_chunked_calls_with_carried_state_equal_one_call(splits: tuple[int, ...]) -> None:
    """Output, last state and every gradient, through the carried states too."""
    case = Case("carry", dim=6, groups_b=2)
    inputs = make_inputs(case, seed=1)
    y_full, last_full, grads_full = run_with_grads(selective_scan_triton, inputs, softplus=True)

    def chunked(delta_softplus: bool, return_last_state: bool, **kw: Tensor) -> tuple[Tensor, Tensor]:
        state, ys, start = kw["initial_state"], [], 0
        for size in splits:
            window = slice(start, start + size)
            piece = dict(kw)
            for key in ("u", "delta", "z", "B", "C"):
                piece[key] = kw[key][..., window]
            piece["initial_state"] = state
            y, state = selective_scan_triton(**piece, delta_softplus=delta_softplus, return_last_state=True)  # type: ignore[misc]
            ys.append(y)
            start += size
        return torch.cat(ys, dim=-1), state

    y, last, grads = run_with_grads(chunked, inputs, softplus=True)
    torch.testing.assert_close(y, y_full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last, last_full, atol=1e-5, rtol=1e-5)
    for name, grad in grads_full.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-5, msg=lambda m, k=name: f"d{k}: {m}")


@pytest.mark.usefixtures("interpreter")
def test_gradient_through_the_last_state_alone() -> None:
    """A loss on the carried state only: the output gradient is absent."""
    case = Case("last-only", length=5)
    inputs = make_inputs(case, seed=2)
    grads = {}
    for name, scan in (("triton", selective_scan_triton), ("ref", selective_scan_ref)):
        leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items() if v is not None}
        _, last = scan(**leaves, delta_softplus=True, return_last_state=True)  # type: ignore[misc]
        last.square().sum().backward()
        grads[name] = {k: v.grad for k, v in leaves.items()}
    for key, grad_ref in grads["ref"].items():
        if grad_ref is None:
            assert grads["triton"][key] is None or not grads["triton"][key].any(), key
            continue
        torch.testing.assert_close(grads["triton"][key], grad_ref, atol=1e-4, rtol=1e-4, msg=lambda m, k=key: k + m)


@pytest.mark.usefixtures("interpreter")
def test_no_grad_call_returns_y_alone_or_with_the_last_state() -> None:
    case = Case("no-grad", length=9)
    inputs = make_inputs(case, seed=3)
    with torch.no_grad():
        y = selective_scan_triton(**inputs, delta_softplus=True)  # type: ignore[misc]
        y2, last = selective_scan_triton(**inputs, delta_softplus=True, return_last_state=True)  # type: ignore[misc]
        y_ref, last_ref = selective_scan_ref(**inputs, delta_softplus=True, return_last_state=True)  # type: ignore[misc]
    assert isinstance(y, Tensor)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y2, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last, last_ref, atol=1e-5, rtol=1e-5)


def test_dispatch_follows_device_and_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not uses_triton(cpu)
    assert uses_triton(torch.device("cuda"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert uses_triton(cpu)
    calls: list[str] = []
    real = scan_module.selective_scan_fwd

    def spy(*args: object, **kwargs: object) -> object:
        calls.append("kernel")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(scan_module, "selective_scan_fwd", spy)
    inputs = make_inputs(Case("dispatch"))
    with torch.no_grad():
        y = selective_scan(**inputs, delta_softplus=True)  # type: ignore[call-overload]
    assert calls == ["kernel"]
    torch.testing.assert_close(y, selective_scan_ref(**inputs, delta_softplus=True), atol=1e-5, rtol=1e-5)  # type: ignore[arg-type]


def test_kernels_run_in_either_mode_whatever_the_import_saw() -> None:
    """The interpreter and the compiler each get a kernel object of their kind."""
    from triton.runtime.interpreter import InterpretedFunction

    for kernel in (scan_module.selective_scan_fwd_kernel, scan_module.selective_scan_bwd_kernel):
        interpreted = scan_module._in_mode(kernel, interpret=True)
        compiled = scan_module._in_mode(kernel, interpret=False)
        assert isinstance(interpreted, InterpretedFunction)
        assert not isinstance(compiled, InterpretedFunction) and compiled.fn is kernel.fn


@pytest.mark.usefixtures("interpreter")
def test_outputs_are_nan_filled_under_the_test_hook() -> None:
    out = scan_module._new_output((2, 3), torch.float32, torch.device("cpu"))
    assert out.isnan().all()


BAD_DTYPES = [
    ("u-float64", "u", {"u": torch.float64, "delta": torch.float64, "z": torch.float64}),
    ("A-float64", "A", {"A": torch.float64}),
    ("B-float64", "B", {"B": torch.float64}),
    ("initial_state-float64", "initial_state", {"initial_state": torch.float64}),
]


@pytest.mark.parametrize(("name", "casts"), [(n, c) for _, n, c in BAD_DTYPES], ids=[i for i, _, _ in BAD_DTYPES])
def test_kernel_refuses_dtypes_it_cannot_load(name: str, casts: dict[str, torch.dtype]) -> None:
    inputs = make_inputs(Case("bad"))
    for key, dtype in casts.items():
        inputs[key] = inputs[key].to(dtype)  # type: ignore[union-attr]
    with pytest.raises(ValueError, match=rf"^{name} "):
        selective_scan_triton(**inputs)  # type: ignore[misc]


def test_kernel_shares_the_reference_shape_checks() -> None:
    inputs = make_inputs(Case("bad-shape"))
    inputs["C"] = torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match=r"^C "):
        selective_scan_triton(**inputs)  # type: ignore[misc]


def test_config_parsing() -> None:
    config = scan_module.ScanConfig.parse(" block_d=8, chunk=16 ")
    assert (config.block_d, config.chunk, config.num_warps) == (8, 16, 4)
    with pytest.raises(ValueError, match="blockd"):
        scan_module.ScanConfig.parse("blockd=8")
    with pytest.raises(ValueError, match="block_d must be a power of two"):
        scan_module.ScanConfig(block_d=6)
    with pytest.raises(ValueError, match="chunk must be >= 2"):
        scan_module.ScanConfig(chunk=1)


GPU_CASES = [
    Case("gpu-fp32-L64", batch=64, dim=96, d_state=16, length=64),
    Case("gpu-fp32-L200-grouped", batch=16, dim=48, d_state=16, length=200, groups_b=4, groups_c=2),
    Case("gpu-bf16-L16", batch=512, dim=64, d_state=16, length=16, dtype=torch.bfloat16),
    Case("gpu-bf16-L1", batch=256, dim=80, d_state=16, length=1, dtype=torch.bfloat16),
    Case("gpu-fp16-L33-n4", batch=32, dim=24, d_state=4, length=33, dtype=torch.float16),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.id)
def test_kernel_matches_reference_on_cuda(case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv(scan_module.CONFIG_ENV, raising=False)
    monkeypatch.setattr(scan_module, "FILL_OUTPUTS_WITH_NAN", True)
    inputs = {k: (v.cuda() if v is not None else None) for k, v in make_inputs(case).items()}
    assert_matches_reference(case, inputs)


@pytest.mark.gpu
def test_chunked_calls_equal_one_call_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    case = Case("gpu-carry", batch=128, dim=64, d_state=16, length=48)
    inputs = {k: (v.cuda() if v is not None else None) for k, v in make_inputs(case).items()}
    with torch.no_grad():
        y_full, last_full = selective_scan(**inputs, delta_softplus=True, return_last_state=True)  # type: ignore[call-overload]
        state, ys = inputs["initial_state"], []
        for start in range(0, case.length, 16):
            piece = dict(inputs)
            for key in ("u", "delta", "z", "B", "C"):
                piece[key] = inputs[key][..., start : start + 16]  # type: ignore[index]
            piece["initial_state"] = state
            y, state = selective_scan(**piece, delta_softplus=True, return_last_state=True)  # type: ignore[call-overload]
            ys.append(y)
    torch.testing.assert_close(torch.cat(ys, dim=-1), y_full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, last_full, atol=1e-5, rtol=1e-5)


def test_benchmark_runs_in_quick_mode(capsys: pytest.CaptureFixture[str]) -> None:
    """The benchmark's CPU path: the reference only, saying why there is no kernel timing."""
    from benchmarks import scan as benchmark

    assert benchmark.main(["--quick", "--no-compile", "--shapes", "8,8,4", "--warmup", "0", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    assert "b=8 d=16 l=4 n=16" in out and "eager" in out
    if not torch.cuda.is_available():
        assert "Triton kernels need CUDA" in out
        assert not any(line.lstrip().startswith("triton") for line in out.splitlines())


def test_autotuner_candidates_and_accumulator_reset() -> None:
    """The CUDA path's autotuner, built (not run) on CPU: tile sizes and the zeroing hook."""
    autotuner = scan_module._autotuned(
        scan_module.selective_scan_bwd_kernel, 16, scan_module.BWD_ELEMENTS_PER_THREAD, None
    )
    per_thread = {cfg.kwargs["BLOCK_D"] * 16 // (32 * cfg.num_warps) for cfg in autotuner.configs}
    assert per_thread == set(scan_module.BWD_ELEMENTS_PER_THREAD)

    nargs: dict[str, object] = {name: torch.ones(3) for name in scan_module.BWD_ACCUMULATORS}
    nargs["dD_part_ptr"] = None
    scan_module._zero_backward_accumulators({**nargs, "GROUPED": False})
    assert not nargs["dA_part_ptr"].any() and nargs["dB_ptr"].all()  # type: ignore[union-attr]
    scan_module._zero_backward_accumulators({**nargs, "GROUPED": True}, reset_only=True)
    assert not nargs["dB_ptr"].any() and not nargs["dC_ptr"].any()  # type: ignore[union-attr]
