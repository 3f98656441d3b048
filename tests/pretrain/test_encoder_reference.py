"""The ViT against a deliberately naive second implementation of the same math.

The reference below reads the native state dict and spells everything out:
patches cut with loops, LayerNorm from its formula, attention head by head with
an explicit softmax (no SDPA), RoPE as a rotation of each (x_i, x_{i+E/2})
pair by its angle, with the patch-centre coordinates computed one by one.
Random weights, fp64, so any disagreement is a bug, not rounding.

Legend: B batch, H W pixels, N patches, S sequence, D embed dim, E head dim.
"""

import math

import pytest
import torch

from pretrain.model.vit import VIT_ARCHS, VisionTransformer, ViTArch


def _layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _patches(image_CHW: torch.Tensor, p: int) -> list[torch.Tensor]:
    _, H, W = image_CHW.shape
    return [image_CHW[:, r * p : (r + 1) * p, c * p : (c + 1) * p] for r in range(H // p) for c in range(W // p)]


def _rope_rotate(x_SE: torch.Tensor, coords: list[tuple[float, float]], arch: ViTArch) -> torch.Tensor:
    """Rotate the last len(coords) rows; pair i couples dims i and i + E/2."""
    E = x_SE.shape[-1]
    Q = E // 4
    periods = [arch.rope_base ** (i / Q) for i in range(Q)]
    out = x_SE.clone()
    first_patch = x_SE.shape[0] - len(coords)
    for row, (y, x) in enumerate(coords, start=first_patch):
        # Angles: first Q pairs follow y, next Q pairs follow x.
        angles = [2 * math.pi * y / period for period in periods] + [2 * math.pi * x / period for period in periods]
        for i, angle in enumerate(angles):
            a, b = x_SE[row, i], x_SE[row, i + E // 2]
            out[row, i] = a * math.cos(angle) - b * math.sin(angle)
            out[row, i + E // 2] = a * math.sin(angle) + b * math.cos(angle)
    return out


def _naive_forward(
    state: dict[str, torch.Tensor], arch: ViTArch, image_CHW: torch.Tensor, keep: list[int] | None = None
) -> torch.Tensor:
    """One image -> (N, D) patch tokens after the final norm; only patches `keep` if given, in that order."""
    p, D, A = arch.patch_size, arch.embed_dim, arch.num_heads
    E = D // A
    h, w = image_CHW.shape[1] // p, image_CHW.shape[2] // p
    proj_w, proj_b = state["patch_embed.proj.weight"], state["patch_embed.proj.bias"]
    tokens = [torch.stack([(patch * proj_w[d]).sum() for d in range(D)]) + proj_b for patch in _patches(image_CHW, p)]
    patches_ND = torch.stack(tokens)
    cls_D = state["cls_token"][0, 0]
    if arch.position == "learned":
        # Only the checkpoint's own grid here: no resize in the reference.
        assert (h, w) == (arch.pos_grid, arch.pos_grid)
        patches_ND = patches_ND + state["pos_embed"][0, 1:]
        cls_D = cls_D + state["pos_embed"][0, 0]
    coords = [(2 * (r + 0.5) / h - 1, 2 * (c + 0.5) / w - 1) for r in range(h) for c in range(w)]
    if keep is not None:
        patches_ND = patches_ND[keep]
        coords = [coords[n] for n in keep]
    registers = [state["register_tokens"][0]] if arch.num_registers else []
    x_SD = torch.cat([cls_D[None], *registers, patches_ND])
    for i in range(arch.depth):
        blk = {k.removeprefix(f"blocks.{i}."): v for k, v in state.items() if k.startswith(f"blocks.{i}.")}
        y_SD = _layer_norm(x_SD, blk["norm1.weight"], blk["norm1.bias"], arch.ln_eps)
        qkv_S3D = y_SD @ blk["attn.qkv.weight"].T + blk["attn.qkv.bias"]
        heads = []
        for a in range(A):
            q = qkv_S3D[:, a * E : (a + 1) * E]
            k = qkv_S3D[:, D + a * E : D + (a + 1) * E]
            v = qkv_S3D[:, 2 * D + a * E : 2 * D + (a + 1) * E]
            if arch.position == "rope":
                q, k = _rope_rotate(q, coords, arch), _rope_rotate(k, coords, arch)
            scores = (q @ k.T) / math.sqrt(E)
            weights = torch.exp(scores - scores.max(dim=-1, keepdim=True).values)
            weights = weights / weights.sum(dim=-1, keepdim=True)
            heads.append(weights @ v)
        attn_SD = torch.cat(heads, dim=-1) @ blk["attn.proj.weight"].T + blk["attn.proj.bias"]
        x_SD = x_SD + blk["ls1.gamma"] * attn_SD
        y_SD = _layer_norm(x_SD, blk["norm2.weight"], blk["norm2.bias"], arch.ln_eps)
        mlp_SD = _gelu(y_SD @ blk["mlp.fc1.weight"].T + blk["mlp.fc1.bias"]) @ blk["mlp.fc2.weight"].T
        x_SD = x_SD + blk["ls2.gamma"] * (mlp_SD + blk["mlp.fc2.bias"])
    x_SD = _layer_norm(x_SD, state["norm.weight"], state["norm.bias"], arch.ln_eps)
    return x_SD[1 + arch.num_registers :]


@pytest.mark.parametrize(
    ("name", "h", "w"),
    [("vit_test16", 3, 4), ("vit_test16", 5, 2), ("vit_test", 8, 8)],
    ids=["dinov3-3x4", "dinov3-5x2", "dinov2-grid"],
)
def test_forward_matches_naive_reference(name: str, h: int, w: int) -> None:
    arch = VIT_ARCHS[name]
    torch.manual_seed(0)
    model = VisionTransformer(arch).double().eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    images = torch.randn(2, 3, h * arch.patch_size, w * arch.patch_size, dtype=torch.float64)
    with torch.no_grad():
        tokens_BND = model(images)
        keep_idx = torch.tensor([[h * w - 1, 0, 2], [1, h * w - 2, 3]])
        subset_BKD = model.forward_subset(images, keep_idx)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    # The model computes RoPE angles and rotations in fp32 by design (as Meta
    # does); everything else follows the fp64 input.
    tol = 1e-6 if arch.position == "rope" else 1e-9
    for b in range(2):
        expected_ND = _naive_forward(state, arch, images[b])
        torch.testing.assert_close(tokens_BND[b], expected_ND, rtol=tol, atol=tol)
        # Kept patches keep their own coordinates: the reference over the same subset.
        expected_KD = _naive_forward(state, arch, images[b], keep_idx[b].tolist())
        torch.testing.assert_close(subset_BKD[b], expected_KD, rtol=tol, atol=tol)
