"""A DINOv2 / DINOv3 Vision Transformer, the frozen per-frame encoder.

Parameter names follow Meta's DINOv2 release (`patch_embed.proj`, `cls_token`,
`pos_embed`, `register_tokens`, `blocks.{i}.attn.qkv`, `blocks.{i}.ls1.gamma`,
`norm`), so Meta DINOv2 checkpoints load as they are and the DINOv3 / Hugging
Face / ONNX loaders in `pretrain.encoder` (weights_*.py) map onto one set of names.

The two families differ in positions only: DINOv2 adds a learned (resized)
position embedding to the patch tokens; DINOv3 rotates the queries and keys
of patch tokens with a 2-D axial RoPE (`position="rope"`), and has no
position parameter at all (its frequencies are computed from rope_base, so
they never enter a state dict or a weights hash, and stay fp32 under bf16).

Shape letters follow the glossary in ``pretrain/__init__.py``: B batch,
C image channels, H W image height and width in pixels, p patch side in
pixels, h w patch-grid height and width (H/p, W/p), N = h*w patches
(row-major), V kept (visible) patches, G side of the learned position grid,
Y sequence length (1 + registers + N or V), D embed dim, A attention heads,
E head dim (D/A), F flattened patch pixels (C*p*p), Q RoPE frequencies per
axis (E/4).
"""

import dataclasses
import hashlib
import importlib.util
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pretrain.model.spec import AttnBackend

__all__ = [
    "ATTN_BACKENDS",
    "VIT_ARCHS",
    "ViTArch",
    "VisionTransformer",
    "attention",
    "resolve_attn_backend",
    "weights_hash",
]

logger = logging.getLogger(__name__)

ATTN_BACKENDS: tuple[str, ...] = get_args(AttnBackend)
"""Attention implementations: PyTorch SDPA (flash / cuDNN / efficient on GPU),
xformers memory_efficient_attention (CUDA only), and explicit softmax(QK^T)V."""
POSITIONS = ("learned", "rope")


@dataclass(kw_only=True, slots=True)
class ViTArch:
    """Shape of a DINOv2 / DINOv3 ViT; everything needed to rebuild it from weights."""

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
    position: str = "learned"
    """'learned' (DINOv2: resized absolute embedding) or 'rope' (DINOv3: 2-D axial rotary on q/k)."""
    rope_base: float = 100.0
    """RoPE base period: axis frequency i of Q has period rope_base**(i/Q), coordinates in [-1, 1]."""

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
        if self.position not in POSITIONS:
            raise ValueError(f"ViTArch.position must be one of {POSITIONS}, got {self.position!r}")
        if not (math.isfinite(self.rope_base) and self.rope_base > 1):
            raise ValueError(f"ViTArch.rope_base must be > 1, got {self.rope_base!r}")
        if self.position == "rope" and self.head_dim % 4 != 0:
            raise ValueError(f"ViTArch.position='rope' needs a head dim divisible by 4, got {self.head_dim}")

    @property
    def head_dim(self) -> int:
        """Width E of one attention head."""
        return self.embed_dim // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        """Hidden width of each block's MLP."""
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


def _dinov3(**fields: Any) -> ViTArch:
    # Meta's DINOv3 ViTs: patch 16, 4 registers ("storage tokens"), layer
    # scale, RoPE with base 100, LayerNorm eps 1e-5 (its "layernormbf16").
    return ViTArch(patch_size=16, num_registers=4, position="rope", rope_base=100.0, ln_eps=1e-5, **fields)


# Meta's DINOv2 sizes at patch 14 and DINOv3 sizes at patch 16. ViT-g/14 and
# DINOv3's S+/H+/7B are left out: they use SwiGLU MLPs, not implemented here.
VIT_ARCHS: dict[str, ViTArch] = {
    "vits14": ViTArch(embed_dim=384, depth=12, num_heads=6),
    "vitb14": ViTArch(embed_dim=768, depth=12, num_heads=12),
    "vitl14": ViTArch(embed_dim=1024, depth=24, num_heads=16),
    "vit_test": ViTArch(embed_dim=48, depth=2, num_heads=3, pos_grid=8),
    "vits16": _dinov3(embed_dim=384, depth=12, num_heads=6),
    "vitb16": _dinov3(embed_dim=768, depth=12, num_heads=12),
    "vitl16": _dinov3(embed_dim=1024, depth=24, num_heads=16),
    # Odd depth and 16-dim heads: small, yet every RoPE frequency pair is exercised.
    "vit_test16": _dinov3(embed_dim=48, depth=3, num_heads=3),
}


def resolve_attn_backend(requested: str, device: torch.device | str) -> str:
    """Check that backend `requested` can run on `device`; returns it or raises ValueError.

    xformers has no CPU kernels and is an optional install, so asking for it
    where it cannot run is an error rather than a silent switch.
    """
    device = torch.device(device)
    if requested not in ATTN_BACKENDS:
        raise ValueError(f"attention backend {requested!r} unknown (known: {', '.join(ATTN_BACKENDS)})")
    if requested == "xformers":
        if device.type != "cuda":
            raise ValueError(f"attention backend 'xformers' needs CUDA, the encoder is on {device}")
        if importlib.util.find_spec("xformers") is None:
            raise ValueError("attention backend 'xformers' is not installed (pip install xformers)")
    return requested


def attention(q_BAYE: torch.Tensor, k_BAYE: torch.Tensor, v_BAYE: torch.Tensor, backend: str) -> torch.Tensor:
    """softmax(q k^T / sqrt(E)) v over heads: (B, A, Y, E) x3 -> (B, A, Y, E)."""
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q_BAYE, k_BAYE, v_BAYE)
    if backend == "math":
        # fp32 scores: the reference against which the fused kernels are judged.
        scores_BAYY = (q_BAYE.float() @ k_BAYE.float().transpose(-2, -1)) * q_BAYE.shape[-1] ** -0.5
        return (scores_BAYY.softmax(dim=-1) @ v_BAYE.float()).to(q_BAYE.dtype)
    if backend == "xformers":
        import xformers.ops as xops

        # xformers takes (B, Y, A, E).
        out_BYAE = xops.memory_efficient_attention(
            q_BAYE.transpose(1, 2), k_BAYE.transpose(1, 2), v_BAYE.transpose(1, 2)
        )
        return out_BYAE.transpose(1, 2)
    raise ValueError(f"attention backend {backend!r} unknown (known: {', '.join(ATTN_BACKENDS)})")


def _rotate_half(x_BAYE: torch.Tensor) -> torch.Tensor:
    x1, x2 = x_BAYE.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x_BAYE: torch.Tensor, sin_BVE: torch.Tensor, cos_BVE: torch.Tensor) -> torch.Tensor:
    """Rotate the last V positions of x (the patches, N or the kept V); the prefix tokens pass unchanged.

    Computed in fp32 (the angles reach 2*pi*rope_base) and cast back.
    """
    V = sin_BVE.shape[-2]
    patches_BAVE = x_BAYE[:, :, -V:].float()
    sin_B1VE, cos_B1VE = sin_BVE.unsqueeze(1), cos_BVE.unsqueeze(1)
    rotated_BAVE = patches_BAVE * cos_B1VE + _rotate_half(patches_BAVE) * sin_B1VE
    return torch.cat([x_BAYE[:, :, :-V], rotated_BAVE.to(x_BAYE.dtype)], dim=2)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> D-dim tokens (a strided convolution)."""

    def __init__(self, patch_size: int, embed_dim: int, in_chans: int = 3) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, D), patches in row-major order."""
        return self.proj(images_BCHW).flatten(2).transpose(1, 2)

    def embed_pixels(self, pixels_BVF: torch.Tensor) -> torch.Tensor:
        """Project pre-cut patches (B, V, C*p*p) with the same weights -> (B, V, D)."""
        weight_DF = self.proj.weight.flatten(1)
        return F.linear(pixels_BVF, weight_DF, self.proj.bias)


Rope = tuple[torch.Tensor, torch.Tensor]
"""(sin, cos) of the patch tokens' RoPE angles, each (B or 1, N or V, E), fp32."""


class Attention(nn.Module):
    """Multi-head self-attention; `backend` is one of ATTN_BACKENDS (SDPA by default)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.backend = "sdpa"
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x_BYD: torch.Tensor, rope: Rope | None = None) -> torch.Tensor:
        B, Y, D = x_BYD.shape
        A = self.num_heads
        qkv_3BAYE = self.qkv(x_BYD).reshape(B, Y, 3, A, D // A).permute(2, 0, 3, 1, 4)
        q_BAYE, k_BAYE, v_BAYE = qkv_3BAYE.unbind(0)
        if rope is not None:
            q_BAYE, k_BAYE = apply_rope(q_BAYE, *rope), apply_rope(k_BAYE, *rope)
        out_BAYE = attention(q_BAYE, k_BAYE, v_BAYE, self.backend)
        out_BYD = out_BAYE.transpose(1, 2).reshape(B, Y, D)
        return self.proj(out_BYD)


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x_BYD: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x_BYD)))


class LayerScale(nn.Module):
    """Per-channel residual scale gamma (D,)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        # Checkpoints always overwrite gamma; 1.0 (as Hugging Face initialises
        # it) keeps a randomly initialised model's blocks non-trivial in tests.
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x_BYD: torch.Tensor) -> torch.Tensor:
        return x_BYD * self.gamma


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

    def forward(self, x_BYD: torch.Tensor, rope: Rope | None = None) -> torch.Tensor:
        x_BYD = x_BYD + self.ls1(self.attn(self.norm1(x_BYD), rope))
        return x_BYD + self.ls2(self.mlp(self.norm2(x_BYD)))


class VisionTransformer(nn.Module):
    """DINOv2 / DINOv3 ViT returning normalised patch tokens.

    `forward` encodes whole frames; `forward_subset` encodes only chosen
    patches, so attention never sees the others (the masked-target objective
    depends on that: the visible tokens must not leak masked content). Kept
    patches keep their own positions (learned embedding or RoPE coordinates).
    `forward_layers` returns the outputs of any set of blocks.
    """

    def __init__(self, arch: ViTArch) -> None:
        super().__init__()
        self.arch = arch
        D = arch.embed_dim
        self.patch_embed = PatchEmbed(arch.patch_size, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        if arch.position == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, 1 + arch.pos_grid**2, D))
        if arch.num_registers > 0:
            self.register_tokens = nn.Parameter(torch.zeros(1, arch.num_registers, D))
        self.blocks = nn.ModuleList(Block(arch) for _ in range(arch.depth))
        self.norm = nn.LayerNorm(D, eps=arch.ln_eps)
        self._init_tokens()

    def _init_tokens(self) -> None:
        # DINOv2's init for the learned tokens; only matters for random models
        # (tests), since the encoder is always loaded from a checkpoint.
        if self.arch.position == "learned":
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.arch.num_registers > 0:
            nn.init.normal_(self.register_tokens, std=1e-6)

    @property
    def num_prefix_tokens(self) -> int:
        """CLS plus registers, the tokens before the patches in the sequence."""
        return 1 + self.arch.num_registers

    @property
    def attn_backend(self) -> str:
        """The attention implementation every block uses (one of ATTN_BACKENDS)."""
        return self.blocks[0].attn.backend if len(self.blocks) else "sdpa"

    def set_attn_backend(self, backend: str) -> None:
        """Switch every block to `backend`; see `resolve_attn_backend` for availability."""
        if backend not in ATTN_BACKENDS:
            raise ValueError(f"attention backend {backend!r} unknown (known: {', '.join(ATTN_BACKENDS)})")
        for block in self.blocks:
            block.attn.backend = backend

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
        """Learned patch position embedding for an h x w grid -> (1, h*w, D).

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

    def rope_sin_cos(self, h: int, w: int) -> Rope:
        """RoPE (sin, cos) of every patch of an h x w grid, each (N, E) fp32, row-major.

        The periods are recomputed here rather than held in a buffer: a buffer
        would follow the model to bf16 and lose the angles' precision, and it
        would enter state dicts and hashes although it is fixed by rope_base.
        """
        periods_Q = rope_periods(self.arch).to(self.cls_token.device)
        return rope_sin_cos(periods_Q, h, w)

    def _prefix_tokens(self, batch: int) -> torch.Tensor:
        """CLS (+ its position, if learned) then registers (no position) -> (B, 1 + registers, D)."""
        cls_11D = self.cls_token
        if self.arch.position == "learned":
            cls_11D = cls_11D + self.pos_embed[:, :1]
        prefix = [cls_11D.expand(batch, -1, -1)]
        if self.arch.num_registers > 0:
            prefix.append(self.register_tokens.expand(batch, -1, -1))
        return torch.cat(prefix, dim=1)

    def _check_layers(self, layers: Sequence[int]) -> list[int]:
        depth = self.arch.depth
        checked = [int(i) for i in layers]
        if not checked or any(i < 0 or i >= depth for i in checked):
            raise ValueError(f"layers must be a non-empty list of block indices in [0, {depth}), got {list(layers)}")
        return checked

    def _encode_patches(
        self, patches_BVD: torch.Tensor, rope: Rope | None, layers: Sequence[int] | None = None
    ) -> list[torch.Tensor]:
        """Prefix, blocks, final norm; patch positions only, one (B, V, D) per requested block.

        layers=None means the last block. Blocks after the last requested one are not run.
        """
        wanted = [self.arch.depth - 1] if layers is None else self._check_layers(layers)
        x_BYD = torch.cat([self._prefix_tokens(patches_BVD.shape[0]), patches_BVD], dim=1)
        outputs: dict[int, torch.Tensor] = {}
        for index, block in enumerate(self.blocks[: max(wanted) + 1]):
            x_BYD = block(x_BYD, rope)
            if index in wanted:
                # Intermediate blocks go through the final norm too (DINOv2's
                # get_intermediate_layers(norm=True)), so all share one scale.
                outputs[index] = self.norm(x_BYD)[:, self.num_prefix_tokens :]
        return [outputs[i] for i in wanted]

    def _embed_all(self, images_BCHW: torch.Tensor) -> tuple[torch.Tensor, Rope | None]:
        h, w = self._check_images(images_BCHW)
        patches_BND = self.patch_embed(images_BCHW)
        if self.arch.position == "learned":
            return patches_BND + self.patch_pos_embed(h, w), None
        sin_NE, cos_NE = self.rope_sin_cos(h, w)
        return patches_BND, (sin_NE.unsqueeze(0), cos_NE.unsqueeze(0))

    def _embed_subset(self, images_BCHW: torch.Tensor, keep_idx_BV: torch.Tensor) -> tuple[torch.Tensor, Rope | None]:
        h, w = self._check_images(images_BCHW)
        keep_idx_BV = self._check_keep_idx(keep_idx_BV, images_BCHW.shape[0], h * w)
        pixels_BVF = self._gather_patch_pixels(images_BCHW, keep_idx_BV, w)
        patches_BVD = self.patch_embed.embed_pixels(pixels_BVF)
        if self.arch.position == "learned":
            return patches_BVD + self.patch_pos_embed(h, w)[0][keep_idx_BV], None
        # Each kept patch keeps the coordinates of its place in the full grid.
        sin_NE, cos_NE = self.rope_sin_cos(h, w)
        return patches_BVD, (sin_NE[keep_idx_BV], cos_NE[keep_idx_BV])

    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, H, W) -> patch tokens (B, N, D) after the final norm.

        H and W must be multiples of the patch size; CLS and registers are dropped.
        """
        return self._encode_patches(*self._embed_all(images_BCHW))[0]

    def forward_layers(
        self, images_BCHW: torch.Tensor, layers: Sequence[int], keep_idx_BV: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Patch tokens of the given blocks (0-based), each (B, N, D) or (B, V, D), final-normed.

        With keep_idx_BV, only those patches are encoded, as in `forward_subset`.
        """
        if keep_idx_BV is None:
            return self._encode_patches(*self._embed_all(images_BCHW), layers)
        return self._encode_patches(*self._embed_subset(images_BCHW, keep_idx_BV), layers)

    def forward_subset(self, images_BCHW: torch.Tensor, keep_idx_BV: torch.Tensor) -> torch.Tensor:
        """Encode only the kept patches: (B, 3, H, W), (B, V) -> tokens (B, V, D).

        keep_idx_BV indexes the row-major N = h*w patch grid; the output follows
        its order. Pixels of patches not kept are never read, so changing them
        leaves the output bit-identical, and the cost scales with V, not N.
        """
        return self._encode_patches(*self._embed_subset(images_BCHW, keep_idx_BV))[0]

    @staticmethod
    def _check_keep_idx(keep_idx_BV: torch.Tensor, batch: int, num_patches: int) -> torch.Tensor:
        if keep_idx_BV.ndim != 2 or keep_idx_BV.shape[0] != batch:
            raise ValueError(f"keep_idx must be (B={batch}, V), got {tuple(keep_idx_BV.shape)}")
        if keep_idx_BV.dtype.is_floating_point or keep_idx_BV.dtype == torch.bool:
            raise ValueError(f"keep_idx must be an integer tensor, got {keep_idx_BV.dtype}")
        keep_idx_BV = keep_idx_BV.long()
        # Checked here (a host sync) because an out-of-range index on CUDA
        # surfaces only as an unreadable device-side assert.
        if keep_idx_BV.numel() > 0 and (int(keep_idx_BV.min()) < 0 or int(keep_idx_BV.max()) >= num_patches):
            raise ValueError(f"keep_idx values must lie in [0, {num_patches})")
        return keep_idx_BV

    def _gather_patch_pixels(self, images_BCHW: torch.Tensor, keep_idx_BV: torch.Tensor, w: int) -> torch.Tensor:
        """Cut out only the kept patches -> (B, V, C*p*p), flattened as the conv weight."""
        B, C, H, W = images_BCHW.shape
        p = self.arch.patch_size
        # A view, not a copy: advanced indexing below reads only the kept patches.
        grid_BhwCpp = images_BCHW.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
        batch_BV = torch.arange(B, device=keep_idx_BV.device).unsqueeze(1).expand_as(keep_idx_BV)
        pixels_BVCpp = grid_BhwCpp[batch_BV, keep_idx_BV // w, keep_idx_BV % w]
        return pixels_BVCpp.flatten(2)


def rope_periods(arch: ViTArch) -> torch.Tensor:
    """Periods of the Q = E/4 RoPE frequencies per axis: rope_base**(i/Q), i = 0..Q-1 -> (Q,) fp32.

    DINOv3's schedule: periods from 1 to nearly rope_base, in units of the
    [-1, 1] coordinate range, so the slowest frequency spans the whole image.
    """
    Q = arch.head_dim // 4
    return arch.rope_base ** (torch.arange(Q, dtype=torch.float32) / Q)


def rope_sin_cos(periods_Q: torch.Tensor, h: int, w: int) -> Rope:
    """(sin, cos) of the 2-D axial RoPE angles of an h x w patch grid, each (N, E) fp32.

    Patch centres are normalised per axis to [-1, 1] (DINOv3's "separate"
    normalisation: (i + 0.5) / h * 2 - 1), so the angles depend on the relative
    place in the image, not on the resolution. Per patch, the E/2 angles are
    [y / periods, x / periods] * 2*pi, repeated twice to pair with rotate_half.
    """
    device = periods_Q.device
    coords_h = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
    coords_w = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
    coords_N2 = torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), dim=-1).flatten(0, 1) * 2.0 - 1.0
    angles_N2Q = 2 * math.pi * coords_N2[:, :, None] / periods_Q.float()[None, None, :]
    angles_NE = angles_N2Q.flatten(1, 2).tile(2)
    return angles_NE.sin(), angles_NE.cos()


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
