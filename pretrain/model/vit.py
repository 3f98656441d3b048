"""A DINOv2-compatible Vision Transformer, the frozen per-frame encoder.

Parameter names follow Meta's DINOv2 release (`patch_embed.proj`, `cls_token`,
`pos_embed`, `register_tokens`, `blocks.{i}.attn.qkv`, `blocks.{i}.ls1.gamma`,
`norm`), so Meta checkpoints load as they are and the Hugging Face / ONNX
loaders in `pretrain.weights` map onto one set of names.

Shape legend:
    B batch, C image channels, H W image height and width in pixels,
    p patch side in pixels, h w patch-grid height and width (H/p, W/p),
    N = h*w patches (row-major), K kept patches, G side of the learned
    position grid, R register tokens, S sequence length (1 + R + N or K),
    D embed dim, A attention heads, E head dim (D/A), F flattened patch
    pixels (C*p*p), M MLP hidden dim.
"""

import dataclasses
import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "VIT_ARCHS",
    "ViTArch",
    "VisionTransformer",
    "weights_hash",
]


@dataclass(kw_only=True, slots=True)
class ViTArch:
    """Shape of a DINOv2-style ViT; everything needed to rebuild it from weights."""

    patch_size: int = 14
    """Side of a square patch, in pixels."""
    embed_dim: int
    """Token width D."""
    depth: int
    """Number of transformer blocks."""
    num_heads: int
    """Attention heads per block; must divide embed_dim."""
    mlp_ratio: float = 4.0
    """MLP hidden width as a multiple of embed_dim (hidden = int(D * ratio))."""
    num_registers: int = 0
    """Register tokens after CLS (DINOv2-reg); they get no position embedding."""
    pos_grid: int = 37
    """Side of the learned position-embedding grid the checkpoint was trained with."""
    layer_scale: bool = True
    """Per-channel residual scales ls1/ls2 after attention and MLP."""
    ln_eps: float = 1e-6
    """Epsilon of every LayerNorm."""
    qkv_bias: bool = True
    """Whether the fused qkv projection has a bias."""

    def __post_init__(self) -> None:
        for name in ("patch_size", "embed_dim", "depth", "num_heads", "pos_grid"):
            _require_int(name, getattr(self, name), minimum=1)
        _require_int("num_registers", self.num_registers, minimum=0)
        for name in ("layer_scale", "qkv_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ViTArch.{name} must be a bool, got {getattr(self, name)!r}")
        if self.embed_dim % self.num_heads != 0:
            raise ValueError(f"ViTArch.num_heads={self.num_heads} must divide embed_dim={self.embed_dim}")
        if not (math.isfinite(self.mlp_ratio) and self.mlp_ratio > 0):
            raise ValueError(f"ViTArch.mlp_ratio must be positive, got {self.mlp_ratio!r}")
        if int(self.embed_dim * self.mlp_ratio) < 1:
            raise ValueError(f"ViTArch.mlp_ratio={self.mlp_ratio} gives an empty MLP for embed_dim={self.embed_dim}")
        if not (math.isfinite(self.ln_eps) and self.ln_eps > 0):
            raise ValueError(f"ViTArch.ln_eps must be positive, got {self.ln_eps!r}")

    @property
    def mlp_hidden_dim(self) -> int:
        """Hidden width M of each block's MLP."""
        return int(self.embed_dim * self.mlp_ratio)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict of the fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any]) -> "ViTArch":
        """Build from a dict of fields; unknown keys are errors, not ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"unknown ViTArch fields {unknown}; known: {sorted(known)}")
        return cls(**fields)


def _require_int(name: str, value: object, *, minimum: int) -> None:
    # bool is an int subclass; `depth=True` is a typo, not a depth of 1.
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"ViTArch.{name} must be an int >= {minimum}, got {value!r}")


# Meta's DINOv2 sizes at patch 14. ViT-g/14 is left out: it uses a SwiGLU MLP,
# which this module does not implement.
VIT_ARCHS: dict[str, ViTArch] = {
    "vits14": ViTArch(embed_dim=384, depth=12, num_heads=6),
    "vitb14": ViTArch(embed_dim=768, depth=12, num_heads=12),
    "vitl14": ViTArch(embed_dim=1024, depth=24, num_heads=16),
    "vit_test": ViTArch(embed_dim=48, depth=2, num_heads=3, pos_grid=8),
}


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> D-dim tokens (a strided convolution)."""

    def __init__(self, patch_size: int, embed_dim: int, in_chans: int = 3) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, D), patches in row-major order."""
        return self.proj(images_BCHW).flatten(2).transpose(1, 2)

    def embed_pixels(self, pixels_BKF: torch.Tensor) -> torch.Tensor:
        """Project pre-cut patches (B, K, C*p*p) with the same weights -> (B, K, D)."""
        weight_DF = self.proj.weight.flatten(1)
        return F.linear(pixels_BKF, weight_DF, self.proj.bias)


class Attention(nn.Module):
    """Multi-head self-attention through PyTorch SDPA (flash/cuDNN on GPU)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape
        A = self.num_heads
        qkv_3BASE = self.qkv(x_BSD).reshape(B, S, 3, A, D // A).permute(2, 0, 3, 1, 4)
        q_BASE, k_BASE, v_BASE = qkv_3BASE.unbind(0)
        out_BASE = F.scaled_dot_product_attention(q_BASE, k_BASE, v_BASE)
        out_BSD = out_BASE.transpose(1, 2).reshape(B, S, D)
        return self.proj(out_BSD)


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x_BSD)))


class LayerScale(nn.Module):
    """Per-channel residual scale gamma (D,)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        # Checkpoints always overwrite gamma; 1.0 (as Hugging Face initialises
        # it) keeps a randomly initialised model's blocks non-trivial in tests.
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        return x_BSD * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block with optional layer scale."""

    def __init__(self, arch: ViTArch) -> None:
        super().__init__()
        dim = arch.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=arch.ln_eps)
        self.attn = Attention(dim, arch.num_heads, arch.qkv_bias)
        self.ls1: nn.Module = LayerScale(dim) if arch.layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=arch.ln_eps)
        self.mlp = Mlp(dim, arch.mlp_hidden_dim)
        self.ls2: nn.Module = LayerScale(dim) if arch.layer_scale else nn.Identity()

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        x_BSD = x_BSD + self.ls1(self.attn(self.norm1(x_BSD)))
        return x_BSD + self.ls2(self.mlp(self.norm2(x_BSD)))


class VisionTransformer(nn.Module):
    """DINOv2-style ViT returning normalised patch tokens.

    `forward` encodes whole frames; `forward_subset` encodes only chosen
    patches, so attention never sees the others (the masked-target objective
    depends on that: the visible tokens must not leak masked content).
    """

    def __init__(self, arch: ViTArch) -> None:
        super().__init__()
        self.arch = arch
        D = arch.embed_dim
        self.patch_embed = PatchEmbed(arch.patch_size, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + arch.pos_grid**2, D))
        if arch.num_registers > 0:
            self.register_tokens = nn.Parameter(torch.zeros(1, arch.num_registers, D))
        self.blocks = nn.ModuleList(Block(arch) for _ in range(arch.depth))
        self.norm = nn.LayerNorm(D, eps=arch.ln_eps)
        self._init_tokens()

    def _init_tokens(self) -> None:
        # DINOv2's init for the learned tokens; only matters for random models
        # (tests), since the encoder is always loaded from a checkpoint.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.arch.num_registers > 0:
            nn.init.normal_(self.register_tokens, std=1e-6)

    @property
    def num_prefix_tokens(self) -> int:
        """CLS plus registers, the tokens before the patches in the sequence."""
        return 1 + self.arch.num_registers

    def patch_grid(self, height: int, width: int) -> tuple[int, int]:
        """Patch-grid (h, w) for an image of height x width pixels.

        Raises ValueError when either side is not a multiple of the patch size:
        silently cropping would shift every patch relative to the checkpoint.
        """
        p = self.arch.patch_size
        if height % p != 0 or width % p != 0 or height <= 0 or width <= 0:
            raise ValueError(
                f"image size {height}x{width} (HxW) is not a positive multiple of the "
                f"patch size {p}; resize or crop to e.g. "
                f"{max(p, height // p * p)}x{max(p, width // p * p)}"
            )
        return height // p, width // p

    def _check_images(self, images_BCHW: torch.Tensor) -> tuple[int, int]:
        in_chans = self.patch_embed.proj.in_channels
        if images_BCHW.ndim != 4 or images_BCHW.shape[1] != in_chans:
            raise ValueError(f"images must be (B, {in_chans}, H, W), got {tuple(images_BCHW.shape)}")
        return self.patch_grid(images_BCHW.shape[2], images_BCHW.shape[3])

    def patch_pos_embed(self, h: int, w: int) -> torch.Tensor:
        """Patch position embedding for an h x w grid -> (1, h*w, D).

        Bicubic resize of the learned G x G grid (align_corners=False, no
        antialias: the Hugging Face / ONNX export convention), in fp32 since
        bicubic is unsupported or lossy in half precision.
        """
        G = self.arch.pos_grid
        patch_pos_1ND = self.pos_embed[:, 1:]
        if (h, w) == (G, G):
            return patch_pos_1ND
        D = patch_pos_1ND.shape[-1]
        grid_1DGG = patch_pos_1ND.reshape(1, G, G, D).permute(0, 3, 1, 2).float()
        grid_1Dhw = F.interpolate(grid_1DGG, size=(h, w), mode="bicubic", align_corners=False, antialias=False)
        return grid_1Dhw.permute(0, 2, 3, 1).reshape(1, h * w, D).to(patch_pos_1ND.dtype)

    def _prefix_tokens(self, batch: int) -> torch.Tensor:
        """CLS (+ its position) then registers (no position) -> (B, 1 + R, D)."""
        cls_11D = self.cls_token + self.pos_embed[:, :1]
        prefix = [cls_11D.expand(batch, -1, -1)]
        if self.arch.num_registers > 0:
            prefix.append(self.register_tokens.expand(batch, -1, -1))
        return torch.cat(prefix, dim=1)

    def _encode_patches(self, patches_BKD: torch.Tensor) -> torch.Tensor:
        """Prefix, blocks, final norm; returns only the patch positions (B, K, D)."""
        prefix_BPD = self._prefix_tokens(patches_BKD.shape[0])
        x_BSD = torch.cat([prefix_BPD, patches_BKD], dim=1)
        for block in self.blocks:
            x_BSD = block(x_BSD)
        return self.norm(x_BSD)[:, self.num_prefix_tokens :]

    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, H, W) -> patch tokens (B, N, D) after the final norm.

        H and W must be multiples of the patch size; CLS and registers are dropped.
        """
        h, w = self._check_images(images_BCHW)
        patches_BND = self.patch_embed(images_BCHW) + self.patch_pos_embed(h, w)
        return self._encode_patches(patches_BND)

    def forward_subset(self, images_BCHW: torch.Tensor, keep_idx_BK: torch.Tensor) -> torch.Tensor:
        """Encode only the kept patches: (B, 3, H, W), (B, K) -> tokens (B, K, D).

        keep_idx_BK indexes the row-major N = h*w patch grid; the output follows
        its order. Pixels of patches not kept are never read, so changing them
        leaves the output bit-identical, and the cost scales with K, not N.
        """
        h, w = self._check_images(images_BCHW)
        keep_idx_BK = self._check_keep_idx(keep_idx_BK, images_BCHW.shape[0], h * w)
        pixels_BKF = self._gather_patch_pixels(images_BCHW, keep_idx_BK, w)
        pos_BKD = self.patch_pos_embed(h, w)[0][keep_idx_BK]
        patches_BKD = self.patch_embed.embed_pixels(pixels_BKF) + pos_BKD
        return self._encode_patches(patches_BKD)

    @staticmethod
    def _check_keep_idx(keep_idx_BK: torch.Tensor, batch: int, num_patches: int) -> torch.Tensor:
        if keep_idx_BK.ndim != 2 or keep_idx_BK.shape[0] != batch:
            raise ValueError(f"keep_idx must be (B={batch}, K), got {tuple(keep_idx_BK.shape)}")
        if keep_idx_BK.dtype.is_floating_point or keep_idx_BK.dtype == torch.bool:
            raise ValueError(f"keep_idx must be an integer tensor, got {keep_idx_BK.dtype}")
        keep_idx_BK = keep_idx_BK.long()
        # Checked here (a host sync) because an out-of-range index on CUDA
        # surfaces only as an unreadable device-side assert.
        if keep_idx_BK.numel() > 0 and (int(keep_idx_BK.min()) < 0 or int(keep_idx_BK.max()) >= num_patches):
            raise ValueError(f"keep_idx values must lie in [0, {num_patches})")
        return keep_idx_BK

    def _gather_patch_pixels(self, images_BCHW: torch.Tensor, keep_idx_BK: torch.Tensor, w: int) -> torch.Tensor:
        """Cut out only the kept patches -> (B, K, C*p*p), flattened as the conv weight."""
        B, C, H, W = images_BCHW.shape
        p = self.arch.patch_size
        # A view, not a copy: advanced indexing below reads only the kept patches.
        grid_BhwCpp = images_BCHW.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
        batch_BK = torch.arange(B, device=keep_idx_BK.device).unsqueeze(1).expand_as(keep_idx_BK)
        pixels_BKCpp = grid_BhwCpp[batch_BK, keep_idx_BK // w, keep_idx_BK % w]
        return pixels_BKCpp.flatten(2)


def weights_hash(module_or_state_dict: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """Stable 16-hex-char identity of a set of weights.

    sha256 over the sorted names, shapes and fp32 bytes of every tensor. Hash
    the weights as loaded (fp32), before any cast to bf16, so that the trainer
    and eval agree on the value.
    """
    is_module = isinstance(module_or_state_dict, nn.Module)
    state = module_or_state_dict.state_dict() if is_module else module_or_state_dict
    digest = hashlib.sha256()
    for name in sorted(state):
        array = state[name].detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
        digest.update(name.encode())
        digest.update(np.asarray(array.shape, dtype=np.int64).tobytes())
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]
