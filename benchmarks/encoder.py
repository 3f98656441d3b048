"""Frozen-encoder benchmark: eager fp32, autocast, bf16 weights + SDPA, and that plus compile.

Random weights (the speed of a ViT does not depend on them). For each size
and resolution, every mode runs on the same batch in one run and the table
gives ms per batch, images/s, achieved TFLOP/s, MFU against the device's bf16
peak, and the speedup over eager autocast measured in the same run.

FLOPs per image (multiply-add = 2), with L blocks, width d, patch p, N_p
patches and N = N_p + 1 + R tokens:

    F = L * (24 * N * d^2 + 4 * N^2 * d) + 6 * p^2 * N_p * d

(qkv 6Nd^2 + proj 2Nd^2 + MLP 16Nd^2, QK^T and AV 2N^2d each, patch
embedding 2 * 3p^2 * d per patch). On a device without a known peak (CPU)
MFU is not printed.

    python -m benchmarks.encoder             # CUDA: ViT-S/B/L /16 at 224 and 256, batch 256
    python -m benchmarks.encoder --quick     # CPU-sized: ViT-S/16 at 224, batch 2, no compile
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pretrain.model.vit import VIT_ARCHS, VisionTransformer, ViTArch

PEAK_BF16_FLOPS = {"H100": 790e12, "H200": 790e12}
"""Dense bf16 peak by device-name fragment, the denominator of MFU."""

MODES = ("eager-fp32", "autocast", "bf16-sdpa", "bf16-sdpa-compile")
"""eager fp32 weights and math; fp32 weights under bf16 autocast; bf16 weights
(no fp32 copy) through SDPA; the same compiled with torch.compile."""
BASELINE_MODE = "autocast"


@dataclass(frozen=True)
class Result:
    arch: str
    image_size: int
    batch: int
    mode: str
    ms: float
    """Median milliseconds per batch."""
    flops_per_image: float

    @property
    def images_per_s(self) -> float:
        return self.batch / (self.ms * 1e-3)

    @property
    def flops_per_s(self) -> float:
        return self.flops_per_image * self.images_per_s


def flops_per_image(arch: ViTArch, image_size: int) -> float:
    """F = L * (24 * N * d^2 + 4 * N^2 * d) + 6 * p^2 * N_p * d, N counting CLS and registers."""
    p, d, L = arch.patch_size, arch.embed_dim, arch.depth
    num_patches = (image_size // p) ** 2
    N = num_patches + 1 + arch.num_registers
    return L * (24 * N * d**2 + 4 * N**2 * d) + 6 * p**2 * num_patches * d


def peak_flops(device: torch.device) -> float | None:
    """bf16 peak of the device, or None where it is not known (CPU, other GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for fragment, peak in PEAK_BF16_FLOPS.items() if fragment in name), None)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Median wall time of fn in milliseconds, after warmup calls."""
    for _ in range(warmup):
        fn()
    _synchronize(device)
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        _synchronize(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


ContextFactory = Callable[[], contextlib.AbstractContextManager]


def build_mode(
    mode: str, arch: ViTArch, device: torch.device
) -> tuple[Callable[[Tensor], Tensor], torch.dtype, ContextFactory]:
    """The callable, input dtype and a fresh-context factory of one mode, on random weights.

    Every mode but the first two holds bf16 weights only, as the frozen encoder does on CUDA.
    """
    torch.manual_seed(0)
    model: nn.Module = VisionTransformer(arch).eval().requires_grad_(False).to(device)
    if mode == "eager-fp32":
        return model, torch.float32, contextlib.nullcontext
    if mode == "autocast":
        return model, torch.float32, lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    model = model.to(torch.bfloat16)
    if mode == "bf16-sdpa":
        return model, torch.bfloat16, contextlib.nullcontext
    if mode == "bf16-sdpa-compile":
        # Static shapes: one graph per (batch, resolution), no recompiles.
        return torch.compile(model, dynamic=False), torch.bfloat16, contextlib.nullcontext
    raise ValueError(f"unknown mode {mode!r} (known: {', '.join(MODES)})")


def run_case(
    name: str, image_size: int, batch: int, modes: Sequence[str], device: torch.device, warmup: int, iters: int
) -> list[Result]:
    arch = VIT_ARCHS[name]
    images = torch.randn(batch, 3, image_size, image_size, device=device)
    results = []
    for mode in modes:
        model, dtype, context = build_mode(mode, arch, device)
        inputs = images.to(dtype)

        def step(
            model: Callable[[Tensor], Tensor] = model, inputs: Tensor = inputs, context: ContextFactory = context
        ) -> Tensor:
            with torch.inference_mode(), context():
                return model(inputs)

        ms = time_ms(step, device, warmup, iters)
        results.append(Result(name, image_size, batch, mode, ms, flops_per_image(arch, image_size)))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def format_table(results: Sequence[Result], peak: float | None) -> str:
    header = (
        f"{'arch':<11} {'res':>4} {'batch':>5} {'mode':<18} {'ms':>9} {'img/s':>9} "
        f"{'TFLOP/s':>8} {'MFU':>6} {'vs autocast':>11}"
    )
    lines = [header, "-" * len(header)]
    baselines = {(r.arch, r.image_size, r.batch): r.ms for r in results if r.mode == BASELINE_MODE}
    for r in results:
        mfu = f"{r.flops_per_s / peak:6.1%}" if peak else f"{'-':>6}"
        base = baselines.get((r.arch, r.image_size, r.batch))
        ratio = f"{base / r.ms:10.2f}x" if base else f"{'-':>11}"
        lines.append(
            f"{r.arch:<11} {r.image_size:>4} {r.batch:>5} {r.mode:<18} {r.ms:>9.2f} "
            f"{r.images_per_s:>9.1f} {r.flops_per_s / 1e12:>8.3f} {mfu} {ratio}"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.encoder", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU-sized run: ViT-S/16 at 224, batch 2, no compile")
    parser.add_argument("--archs", nargs="+", default=None, help=f"VIT_ARCHS names (known: {', '.join(VIT_ARCHS)})")
    parser.add_argument("--sizes", nargs="+", type=int, default=None, help="square resolutions in pixels")
    parser.add_argument("--batch", type=int, default=None, help="images per batch")
    parser.add_argument("--modes", nargs="+", default=None, choices=MODES)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    quick = args.quick or device.type != "cuda"
    archs = args.archs or (["vits16"] if quick else ["vits16", "vitb16", "vitl16"])
    sizes = args.sizes or ([224] if quick else [224, 256])
    batch = args.batch or (2 if quick else 256)
    # Inductor on CPU spends minutes compiling; the quick run leaves compile out unless asked.
    modes = args.modes or ([m for m in MODES if m != "bf16-sdpa-compile"] if quick else list(MODES))
    warmup = args.warmup if args.warmup is not None else (1 if quick else 5)
    iters = args.iters if args.iters is not None else (3 if quick else 20)
    unknown = [a for a in archs if a not in VIT_ARCHS]
    if unknown:
        print(f"error: unknown arch {unknown} (known: {', '.join(VIT_ARCHS)})", file=sys.stderr)
        return 2
    peak = peak_flops(device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {device_name}, torch {torch.__version__}, bf16 peak {peak / 1e12 if peak else '-'} TFLOP/s")
    results = []
    for name in archs:
        for size in sizes:
            results += run_case(name, size, batch, modes, device, warmup, iters)
    print(format_table(results, peak))
    return 0


if __name__ == "__main__":
    sys.exit(main())
