"""The frozen image encoder: a ViT with its preprocessing, run in chunks, without gradients.

Shape legend: B clips, T frames, K target frames, V visible patches, N patches
per frame, D encoder width, C=3 channels, H x W pixels.

The encoder never trains: its parameters have requires_grad=False, it stays
in eval mode, it runs under ``torch.no_grad`` and, on CUDA, holds bf16
weights only (no fp32 copy). Its identity (name + weights hash) goes into
every checkpoint and export so eval can refuse a mismatched encoder.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.model.layer_adapters import LayerAdapters
from pretrain.model.vit import VisionTransformer, ViTArch, weights_hash

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def set_compile_cache_dir(cache_dir: str | Path) -> None:
    """Point inductor's and Triton's on-disk caches at ``cache_dir`` (before the first compile)."""
    root = Path(cache_dir).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    # Both read the environment when a cache is first touched, so this must precede compilation.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(root / "triton")
    log.info("torch.compile caches in %s (inductor/, triton/)", root)


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
        if chunk_frames < 1:
            raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
        self.vit = vit
        self.name = name
        self.image_size = image_size
        self.chunk_frames = chunk_frames
        self.static_shapes = False
        """Pad every chunk to chunk_frames frames, so each ViT call sees one shape (compile, CUDA graphs)."""
        self.compiled = False
        self._vit_forward: Callable[[Tensor], Tensor] = vit.forward
        self._vit_forward_layers: Callable[..., list[Tensor]] = vit.forward_layers
        self._vit_forward_subset: Callable[[Tensor, Tensor], Tensor] = vit.forward_subset
        self.feature_adapters: LayerAdapters | None = None
        """Eval only: an export's trained layer adapters, applied by ``eval.features.encode_frames``.
        Training never sets it: there the adapters are part of the trainable model."""
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
    def depth(self) -> int:
        """Number of ViT blocks (valid block indices: 0 .. depth - 1)."""
        return self.vit.arch.depth

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid

    @property
    def dtype(self) -> torch.dtype:
        return self.vit.patch_embed.proj.weight.dtype

    def train(self, mode: bool = True) -> FrozenEncoder:
        # Frozen: stays in eval mode whatever the surrounding module asks.
        return super().train(False)

    def enable_compile(self, cache_dir: str | Path = "", mode: str = "default") -> None:
        """Compile the ViT's forwards with static shapes (``dynamic=False``) and pad chunks to one size.

        Compilation happens lazily at the first call. Every chunk of a call has
        one shape (see ``_chunked``), so each call site compiles once and then
        never recompiles: ``mode='reduce-overhead'`` can capture and replay
        CUDA graphs. Outputs are copied out of the compiled region at once
        (``_chunked`` converts them to float32), so a graph replay never
        overwrites tokens still in use.
        """
        if cache_dir:
            set_compile_cache_dir(cache_dir)
        self._vit_forward = torch.compile(self.vit.forward, dynamic=False, mode=mode)
        self._vit_forward_layers = torch.compile(self.vit.forward_layers, dynamic=False, mode=mode)
        self._vit_forward_subset = torch.compile(self.vit.forward_subset, dynamic=False, mode=mode)
        self.static_shapes = True
        self.compiled = True

    def _chunked(self, fn: Callable[..., list[Tensor]], *inputs_F: Tensor) -> list[Tensor]:
        """Run ``fn`` over chunks of chunk_frames along dim 0 of every input; concatenate each output.

        With static_shapes a short last chunk is padded (repeating its last
        frame) up to the size of the full chunks and the padding is sliced off
        the outputs: frames are encoded independently, so padding changes no
        real frame's tokens. Calls of fewer frames than chunk_frames run as one
        chunk of their own size, unpadded: a call site's frame count (B*S
        sources, B*K targets, their visible patches) is the same every step, so
        its shape is static anyway, and padding 16 frames to a chunk of 1024
        would cost 64 times the compute.
        """
        frames = inputs_F[0].shape[0]
        size = min(self.chunk_frames, frames)
        per_chunk: list[list[Tensor]] = []
        for start in range(0, frames, size):
            chunk = [x[start : start + size] for x in inputs_F]
            real = chunk[0].shape[0]
            if self.static_shapes and real < size:
                pad = size - real
                chunk = [torch.cat([x, x[-1:].expand(pad, *x.shape[1:])]) for x in chunk]
            # A copy when compiled: CUDA-graph replays reuse their output memory.
            per_chunk.append([out[:real].to(torch.float32, copy=self.compiled) for out in fn(*chunk)])
        return [torch.cat(outs) for outs in zip(*per_chunk, strict=True)]

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
        return self._vit_forward(images_BCHW.to(self.mean_C.device, self.dtype))

    @torch.no_grad()
    def forward_layers(self, images_BCHW: Tensor, layers: list[int]) -> list[Tensor]:
        """Patch tokens of the given blocks (0-based), each (B, N, D), through the final norm."""
        return self._vit_forward_layers(images_BCHW.to(self.mean_C.device, self.dtype), layers)

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
        (tokens_FND,) = self._chunked(lambda x: [self._vit_forward(self.preprocess(x))], frames_BTCHW.flatten(0, 1))
        return tokens_FND.view(B, T, self.num_tokens, self.embed_dim)

    @torch.no_grad()
    def encode_layers(self, frames_BTCHW: Tensor, layers: list[int]) -> list[Tensor]:
        """Patch tokens of the given blocks (0-based, final-normed), each (B, T, N, D) float32.

        Feeds `pretrain.model.layer_adapters.LayerAdapters`; same chunking as `encode`.
        """
        B, T = frames_BTCHW.shape[:2]
        blocks = self._chunked(
            lambda x: self._vit_forward_layers(self.preprocess(x), list(layers)), frames_BTCHW.flatten(0, 1)
        )
        return [tokens_FND.view(B, T, self.num_tokens, self.embed_dim) for tokens_FND in blocks]

    @torch.no_grad()
    def encode_with_layers(self, frames_BTCHW: Tensor, layers: list[int]) -> tuple[Tensor, Tensor]:
        """Final tokens (B, T, N, D) and the given blocks stacked (B, T, L, N, D), float32, in one pass.

        The final tokens are the last block's, so asking for it with the others
        costs one forward, not two.
        """
        last = self.arch.depth - 1
        wanted = list(dict.fromkeys([*layers, last]))
        blocks = self.encode_layers(frames_BTCHW, wanted)
        return blocks[wanted.index(last)], torch.stack(blocks[: len(layers)], dim=2)

    @torch.no_grad()
    def encode_subset(self, frames_BKCHW: Tensor, keep_idx_BKV: Tensor) -> Tensor:
        """Tokens of the kept patches computed from those patches only, (B, K, V, D) float32."""
        B, K, V = keep_idx_BKV.shape
        if V == 0:
            return torch.zeros(B, K, 0, self.embed_dim, device=self.mean_C.device)
        images = self.preprocess(frames_BKCHW.flatten(0, 1))
        idx = keep_idx_BKV.flatten(0, 1).to(images.device)
        (tokens_FVD,) = self._chunked(lambda x, i: [self._vit_forward_subset(x, i)], images, idx)
        return tokens_FVD.view(B, K, V, self.embed_dim)
