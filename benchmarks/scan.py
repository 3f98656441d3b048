"""Selective-scan benchmark: the Triton kernel (or the CPU path) against the eager and the compiled reference.

Shape legend: b batch (B*N per-patch sequences of the temporal core), d
channels (2 * d_model, the Mamba inner width), l frames, n state size.

Every implementation runs on one device in one run, on the call the cores make
(D, z, delta_bias, softplus, initial state in, last state out): the forward
alone (no grad, as in streaming inference) and forward + backward (training;
the gradient reaches every input and the carried state). Each line prints the
time, the effective bandwidth, the physical limit and the fraction of it
reached, and the speedup over the eager reference measured in the same run.

The limit is max(bytes / HBM bandwidth, n * elements * passes / exp2 rate):
bytes per element (one (b, d, t)) are printed with the model behind them;
every (element, state) pair needs one exp(delta * A) per pass, and fwd+bwd
makes two passes because the backward must re-form exp(delta * A) (reading it
back instead would cost 4 * n = 64 bytes per element).

On a machine without CUDA the benchmark runs tiny shapes and times the
reference, the compiled reference and the CPU path (`selective_scan_cpu`, the
dispatch's choice there) only: the Triton kernels would run in the
interpreter there, which measures Python, not the kernel.

`--cpu` compares the CPU path with the eager reference on the cores' CPU
training shapes, one thread, the two interleaved rep by rep and the minimum
kept (a shared CPU makes single runs swing), and prints their ratio.

    python -m benchmarks.scan              # CUDA: the per-patch grid; CPU: --quick
    python -m benchmarks.scan --quick      # tiny shapes, any device
    python -m benchmarks.scan --cpu        # CPU path vs reference, fwd and fwd+bwd
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from kernels.selective_scan import selective_scan_cpu, selective_scan_ref, selective_scan_triton

EXP2_PER_S = 3.9e12
"""exp2 throughput of an H100/H200 (MUFU ex2, 132 SMs)."""

HBM_BYTES_PER_S = {"H200": 4.8e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "A100": 2.0e12}
"""Spec HBM bandwidth by device-name fragment (first match in this order)."""

SECONDS_PER_MS = 1e-3


@dataclass(frozen=True)
class Shape:
    batch: int
    """b = B * N per-patch sequences."""
    d_model: int
    """Core width; the scan has d = 2 * d_model channels."""
    length: int
    """l frames."""
    d_state: int = 16

    @property
    def dim(self) -> int:
        return 2 * self.d_model

    @property
    def elements(self) -> int:
        return self.batch * self.dim * self.length

    def __str__(self) -> str:
        return f"b={self.batch} d={self.dim} l={self.length} n={self.d_state}"


GPU_SHAPES = [
    Shape(512, 384, 8),
    Shape(2048, 384, 16),
    Shape(8192, 384, 16),
    Shape(4096, 1024, 12),
    Shape(2048, 1024, 64),
    Shape(8192, 1024, 16),
]
"""ViT-S (d_model 384) and ViT-L (1024) cores; B*N from 512 to 8192; 8 to 64 frames."""

QUICK_SHAPES = [Shape(64, 32, 8), Shape(128, 64, 16)]

CPU_SHAPES = [Shape(512, 32, 16, d_state=8), Shape(8192, 32, 16, d_state=8)]
"""CPU fine-tuning of the temporal core: 8 videos x 64 patches (and 128 x 64), d = 64, n = 8, 16 frames."""


CHUNK = 64
"""The kernels' longest time tile: longer sequences add a checkpoint per 64 steps."""


def bytes_per_element(shape: Shape, elem_size: int, backward: bool) -> tuple[float, str]:
    """HBM bytes per (b, d, t) element and the formula, s = element size of u, delta, z, y.

    The minimum any implementation must move, so GB/s is an effective rate.
    """
    n, d, length = shape.d_state, shape.dim, shape.length
    # fwd: read u, delta, z, write y; B and C are read once per (b, t) for all
    # d channels; the fp32 state is read in and written out once per (b, d).
    fwd = 4 * elem_size + 2 * n * elem_size / d + 2 * 4 * n / length
    if not backward:
        return fwd, f"fwd 4s + 2ns/d + 8n/l = {fwd:.2f}"
    # bwd: read u, delta, z, dy, write du, ddelta, dz; read B, C and write
    # their fp32 gradients; read h0 and d(last state), write d(h0); plus the
    # fp32 states checkpointed every 64 steps (written by fwd, read by bwd).
    checkpoints = (length - 1) // CHUNK
    bwd = 7 * elem_size + 2 * n * elem_size / d + 2 * 4 * n / d + 3 * 4 * n / length + 2 * 4 * n * checkpoints / length
    return fwd + bwd, f"fwd+bwd 11s + 4ns/d + 8n/d + 20n/l + 8n(ceil(l/64)-1)/l = {fwd + bwd:.2f}"


def make_inputs(shape: Shape, device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict[str, Tensor]:
    """The call the Mamba cores make: bf16 activations on GPU, fp32 parameters and state."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    b, d, n, length = shape.batch, shape.dim, shape.d_state, shape.length

    def randn(*size: int, scale: float = 1.0, to: torch.dtype = dtype) -> Tensor:
        return (torch.randn(*size, generator=gen) * scale).to(device=device, dtype=to)

    return {
        "u": randn(b, d, length),
        "delta": randn(b, d, length, scale=0.5),
        "A": -torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1).to(device),
        "B": randn(b, n, length),
        "C": randn(b, n, length),
        "D": randn(d, to=torch.float32),
        "z": randn(b, d, length),
        "delta_bias": randn(d, scale=0.5, to=torch.float32) - 3.0,
        "initial_state": randn(b, d, n, to=torch.float32),
    }


Scan = Callable[..., tuple[Tensor, Tensor]]


def forward_only(scan: Scan, inputs: dict[str, Tensor]) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad():
            return scan(**inputs, delta_softplus=True, return_last_state=True)

    return run


def forward_backward(scan: Scan, inputs: dict[str, Tensor]) -> Callable[[], object]:
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items()}
    gen = torch.Generator(device="cpu").manual_seed(1)
    dy = torch.randn(inputs["u"].shape, generator=gen).to(inputs["u"])
    dlast = torch.randn(inputs["initial_state"].shape, generator=gen).to(inputs["initial_state"])

    def run() -> object:
        y, last = scan(**leaves, delta_softplus=True, return_last_state=True)
        return torch.autograd.grad((y, last), list(leaves.values()), (dy, dlast))

    return run


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, reps: int) -> float:
    """Median wall time of `fn` in milliseconds (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) / SECONDS_PER_MS)
    return statistics.median(times)


def time_interleaved_ms(fns: dict[str, Callable[[], object]], warmup: int, reps: int) -> dict[str, float]:
    """Minimum wall time of each fn in milliseconds, the fns run in turn within each rep.

    Interleaving exposes every candidate to the same background load, and the
    minimum is the run it disturbed least.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) / SECONDS_PER_MS)
    return {name: min(values) for name, values in times.items()}


def cpu_comparison(shapes: Sequence[Shape], warmup: int, reps: int) -> list[str]:
    """The CPU path against the eager reference on CPU, fp32: one line per shape and pass."""
    device = torch.device("cpu")
    lines = [f"  {'shape':<28}{'pass':<9}{'reference ms':>14}{'cpu path ms':>13}{'ratio':>8}"]
    for shape in shapes:
        inputs = make_inputs(shape, device, torch.float32)
        for passes, make in (("fwd", forward_only), ("fwd+bwd", forward_backward)):
            fns = {"reference": make(selective_scan_ref, inputs), "cpu": make(selective_scan_cpu, inputs)}  # type: ignore[arg-type]
            ms = time_interleaved_ms(fns, warmup, reps)
            ratio = ms["reference"] / ms["cpu"]
            lines.append(f"  {shape!s:<28}{passes:<9}{ms['reference']:>14.2f}{ms['cpu']:>13.2f}{ratio:>7.2f}x")
    return lines


def hbm_bytes_per_s(device: torch.device) -> tuple[float, str]:
    """Spec bandwidth for known GPUs, else a measured device copy (a lower figure)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, value in HBM_BYTES_PER_S.items():
            if fragment in name:
                return value, f"{value / 1e12:.2f} TB/s (spec, {fragment})"
    src = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup=2, reps=5)
    value = 2 * src.numel() / (ms * SECONDS_PER_MS)
    return value, f"{value / 1e12:.3f} TB/s (measured copy)"


def reference_fits(shape: Shape, device: torch.device, backward: bool) -> bool:
    """The eager reference keeps about 8 fp32 (b, d, n) tensors per step for autograd."""
    if device.type != "cuda":
        return True
    per_step = shape.batch * shape.dim * shape.d_state * 4
    need = per_step * (8 * shape.length if backward else 4)
    free, _ = torch.cuda.mem_get_info(device)
    return need < 0.5 * free


@dataclass
class Result:
    impl: str
    passes: str
    ms: float | None
    note: str = ""


def run_shape(
    shape: Shape,
    device: torch.device,
    dtype: torch.dtype,
    impls: dict[str, Scan],
    warmup: int,
    reps: int,
) -> list[Result]:
    inputs = make_inputs(shape, device, dtype)
    results = []
    for impl, scan in impls.items():
        for passes, make in (("fwd", forward_only), ("fwd+bwd", forward_backward)):
            if impl != "triton" and not reference_fits(shape, device, passes == "fwd+bwd"):
                results.append(Result(impl, passes, None, "skipped: would not fit in memory"))
                continue
            try:
                ms = time_ms(make(scan, inputs), device, warmup, reps)
            except Exception as error:  # a failing baseline is reported, not fatal
                results.append(Result(impl, passes, None, f"failed: {type(error).__name__}: {error}"[:120]))
                continue
            results.append(Result(impl, passes, ms))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return results


def report(
    shape: Shape, results: list[Result], elem_size: int, bandwidth: float, exp2_rate: float, on_gpu: bool
) -> list[str]:
    lines = [f"{shape}  ({shape.elements:,} elements)"]
    lines.append(f"  {'impl':<9}{'pass':<9}{'ms':>9}{'GB/s':>9}{'limit ms':>10}{'of limit':>10}{'vs eager':>10}")
    eager = {r.passes: r.ms for r in results if r.impl == "eager" and r.ms is not None}
    for r in results:
        backward = r.passes == "fwd+bwd"
        per_elem, _ = bytes_per_element(shape, elem_size, backward)
        if r.ms is None:
            lines.append(f"  {r.impl:<9}{r.passes:<9}{'-':>9}  {r.note}")
            continue
        moved = per_elem * shape.elements
        gbps = moved / (r.ms * SECONDS_PER_MS) / 1e9
        exp_passes = 2 if backward else 1
        limit_s = max(moved / bandwidth, shape.d_state * shape.elements * exp_passes / exp2_rate)
        limit_ms = limit_s / SECONDS_PER_MS
        reached = f"{limit_ms / r.ms:>9.0%}" if on_gpu else f"{'n/a':>9}"
        limit_text = f"{limit_ms:>10.3f}" if on_gpu else f"{'n/a':>10}"
        speedup = f"{eager[r.passes] / r.ms:>9.1f}x" if r.passes in eager else f"{'-':>10}"
        lines.append(f"  {r.impl:<9}{r.passes:<9}{r.ms:>9.3f}{gbps:>9.1f}{limit_text} {reached}{speedup}")
    return lines


def parse_shapes(text: str) -> list[Shape]:
    """ "b,d_model,l[,n];..." -> shapes."""
    shapes = []
    for item in filter(None, (part.strip() for part in text.split(";"))):
        numbers = [int(v) for v in item.split(",")]
        if len(numbers) not in (3, 4):
            raise ValueError(f"--shapes: {item!r} is not b,d_model,l[,n]")
        shapes.append(Shape(*numbers))
    return shapes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (the default without CUDA)")
    parser.add_argument(
        "--cpu", action="store_true", help="CPU path vs eager reference on CPU (one thread), fwd and fwd+bwd"
    )
    parser.add_argument("--shapes", default="", help='override the grid: "b,d_model,l[,n];..."')
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd reference")
    parser.add_argument(
        "--compile-max-shapes", type=int, default=2, help="compile the reference for the first N shapes only"
    )
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--hbm-tbps", type=float, default=0.0, help="override the HBM bandwidth (TB/s)")
    parser.add_argument("--exp2-per-s", type=float, default=EXP2_PER_S)
    args = parser.parse_args(argv)

    on_gpu = torch.cuda.is_available()
    threads = torch.get_num_threads()
    if args.cpu or not on_gpu:
        # Tiny CPU ops gain nothing from threads, and on a shared machine
        # OpenMP's spinning threads make the timings swing by 100x.
        torch.set_num_threads(1)
    try:
        return _run_cpu_comparison(args) if args.cpu else _run(args, on_gpu)
    finally:
        torch.set_num_threads(threads)


def _run_cpu_comparison(args: argparse.Namespace) -> int:
    shapes = parse_shapes(args.shapes) if args.shapes else CPU_SHAPES
    print(f"CPU path vs eager reference: CPU, fp32, one thread, torch {torch.__version__}")
    print(f"each time: the minimum of {args.reps} reps, the two implementations interleaved; ratio = reference / cpu")
    print("\n".join(cpu_comparison(shapes, args.warmup, args.reps)))
    return 0


def _run(args: argparse.Namespace, on_gpu: bool) -> int:
    device = torch.device("cuda" if on_gpu else "cpu")
    quick = args.quick or not on_gpu
    shapes = parse_shapes(args.shapes) if args.shapes else (QUICK_SHAPES if quick else GPU_SHAPES)
    dtype = torch.bfloat16 if on_gpu else torch.float32
    elem_size = torch.tensor([], dtype=dtype).element_size()
    bandwidth, bandwidth_text = (args.hbm_tbps * 1e12, f"{args.hbm_tbps} TB/s (given)") if args.hbm_tbps else (0, "")
    if not bandwidth:
        bandwidth, bandwidth_text = hbm_bytes_per_s(device)

    import triton

    name = torch.cuda.get_device_name(device) if on_gpu else "CPU"
    print(f"device: {name} ({device.type}); dtype {dtype}; torch {torch.__version__}; triton {triton.__version__}")
    if on_gpu:
        print(f"limit: HBM {bandwidth_text}; exp2 {args.exp2_per_s:.2e}/s; exp passes: fwd 1, fwd+bwd 2")
    else:
        print(
            "CPU: timing the reference, the compiled reference and the CPU path only; the Triton kernels need CUDA"
            " (the interpreter is not a speed measurement). One thread; limits are not computed on CPU."
        )
    probe = shapes[0]
    for backward in (False, True):
        print(f"bytes per element (s = {elem_size}): {bytes_per_element(probe, elem_size, backward)[1]} at {probe}")
    sys.stdout.flush()

    for index, shape in enumerate(shapes):
        impls: dict[str, Scan] = {}
        if on_gpu and selective_scan_triton is not None:
            impls["triton"] = selective_scan_triton  # type: ignore[assignment]
        impls["eager"] = selective_scan_ref  # type: ignore[assignment]
        if not on_gpu:
            impls["cpu"] = selective_scan_cpu  # type: ignore[assignment]
        if not args.no_compile and index < args.compile_max_shapes:
            impls["compiled"] = torch.compile(selective_scan_ref)  # type: ignore[assignment]
        results = run_shape(shape, device, dtype, impls, args.warmup, args.reps)
        print("\n".join(report(shape, results, elem_size, bandwidth, args.exp2_per_s, on_gpu)))
        sys.stdout.flush()
        torch._dynamo.reset()

    if on_gpu:
        # What the autotuner picked, per kernel and chunk length: the starting
        # point for pinning or pruning configs.
        tuned = importlib.import_module("kernels.selective_scan.selective_scan")._AUTOTUNED
        for (kernel, chunk), autotuner in sorted(tuned.items()):
            print(f"autotuned {kernel} chunk={chunk}: {getattr(autotuner, 'best_config', None)}")
    goal = "goal (H100/H200): triton fwd+bwd >= 80% of the limit and >= 10x eager"
    print(goal if on_gpu else "goal applies to H100/H200 runs; " + goal)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
