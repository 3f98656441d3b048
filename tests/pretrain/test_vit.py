"""VisionTransformer: shapes, input checks, subset encoding, weight hashing.

Legend: B batch, H W pixels, N patches, K kept patches, D embed dim.
"""

import dataclasses
import math

import pytest
import torch

from pretrain.model.vit import VIT_ARCHS, VisionTransformer, ViTArch, resolve_attn_backend, weights_hash

TEST_ARCH = VIT_ARCHS["vit_test"]
PATCH = TEST_ARCH.patch_size
# weights_hash of vit_test, seed 0, as computed before DINOv3 support.
PINNED_VIT_TEST_HASH = "d05f44d9f55cc72a"


def _model(arch: ViTArch = TEST_ARCH, seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(arch).eval()


def _images(batch: int, height: int, width: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def _random_keep_idx(batch: int, num_patches: int, keep: int, seed: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(num_patches, generator=generator)[:keep] for _ in range(batch)])


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("embed_dim", 0),
        ("depth", -1),
        ("num_heads", 5),
        ("patch_size", 2.5),
        ("num_registers", -1),
        ("pos_grid", 0),
        ("mlp_ratio", 0.0),
        ("ln_eps", 0.0),
        ("layer_scale", 1),
        ("qkv_bias", "yes"),
    ],
    ids=lambda v: str(v),
)
def test_arch_validation_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(TEST_ARCH, **{field: value})


def test_arch_from_dict_rejects_unknown_keys() -> None:
    fields = TEST_ARCH.to_dict()
    assert ViTArch.from_dict(fields) == TEST_ARCH
    with pytest.raises(ValueError, match="emb_dim"):
        ViTArch.from_dict({**fields, "emb_dim": 3})


@pytest.mark.parametrize("name", sorted(VIT_ARCHS))
def test_presets_build_with_dinov2_names(name: str) -> None:
    with torch.device("meta"):
        model = VisionTransformer(VIT_ARCHS[name])
    arch = VIT_ARCHS[name]
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    D = arch.embed_dim
    if arch.position == "learned":
        assert shapes["pos_embed"] == (1, 1 + arch.pos_grid**2, D)
    else:
        # DINOv3: no position parameter; RoPE frequencies are not in the state dict.
        assert "pos_embed" not in shapes and not any("rope" in k for k in shapes)
        assert shapes["register_tokens"] == (1, 4, D) and arch.patch_size == 16
    assert shapes["cls_token"] == (1, 1, D)
    assert shapes["patch_embed.proj.weight"] == (D, 3, arch.patch_size, arch.patch_size)
    last = arch.depth - 1
    assert shapes[f"blocks.{last}.attn.qkv.weight"] == (3 * D, D)
    assert shapes[f"blocks.{last}.ls2.gamma"] == (D,)
    assert shapes[f"blocks.{last}.mlp.fc1.weight"] == (arch.mlp_hidden_dim, D)
    assert shapes["norm.weight"] == (D,)


@pytest.mark.parametrize(
    ("height", "width"),
    [(8 * PATCH, 8 * PATCH), (7 * PATCH, 9 * PATCH), (PATCH, 3 * PATCH)],
    ids=["pos-grid", "interpolated", "thin"],
)
@pytest.mark.parametrize("registers", [0, 2], ids=["no-reg", "reg2"])
def test_forward_shape(height: int, width: int, registers: int) -> None:
    model = _model(dataclasses.replace(TEST_ARCH, num_registers=registers))
    with torch.no_grad():
        tokens_BND = model(_images(2, height, width))
    assert tokens_BND.shape == (2, (height // PATCH) * (width // PATCH), TEST_ARCH.embed_dim)
    assert torch.isfinite(tokens_BND).all()


def test_registers_change_the_output() -> None:
    arch = dataclasses.replace(TEST_ARCH, num_registers=2)
    model = _model(arch)
    images = _images(1, 4 * PATCH, 4 * PATCH)
    with torch.no_grad():
        before = model(images)
        model.register_tokens.add_(1.0)
        after = model(images)
    assert not torch.allclose(before, after)


@pytest.mark.parametrize(("height", "width"), [(8 * PATCH + 1, 8 * PATCH), (8 * PATCH, 50)])
def test_non_multiple_of_patch_size_is_rejected(height: int, width: int) -> None:
    model = _model()
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(_images(1, height, width))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model.forward_subset(_images(1, height, width), torch.zeros(1, 1, dtype=torch.long))


def test_position_embedding_matches_checkpoint_grid_without_resize() -> None:
    model = _model()
    grid = TEST_ARCH.pos_grid
    assert model.patch_pos_embed(grid, grid).data_ptr() == model.pos_embed[:, 1:].data_ptr()
    assert model.patch_pos_embed(grid + 1, grid).shape == (1, (grid + 1) * grid, TEST_ARCH.embed_dim)


@pytest.mark.parametrize("registers", [0, 2], ids=["no-reg", "reg2"])
@pytest.mark.parametrize(("h", "w"), [(8, 8), (5, 7)], ids=["pos-grid", "interpolated"])
def test_forward_subset_of_all_patches_equals_forward(registers: int, h: int, w: int) -> None:
    model = _model(dataclasses.replace(TEST_ARCH, num_registers=registers))
    images = _images(2, h * PATCH, w * PATCH)
    N = h * w
    order_BN = torch.stack([torch.arange(N), torch.randperm(N, generator=torch.Generator().manual_seed(3))])
    with torch.no_grad():
        full_BND = model(images)
        subset_BND = model.forward_subset(images, order_BN)
    expected_BND = torch.stack([full_BND[b, order_BN[b]] for b in range(2)])
    torch.testing.assert_close(subset_BND, expected_BND, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("registers", [0, 2], ids=["no-reg", "reg2"])
def test_forward_subset_never_reads_masked_pixels(registers: int) -> None:
    model = _model(dataclasses.replace(TEST_ARCH, num_registers=registers))
    h, w, keep = 6, 7, 5
    images = _images(3, h * PATCH, w * PATCH)
    keep_idx_BV = _random_keep_idx(3, h * w, keep)
    edited = _images(3, h * PATCH, w * PATCH, seed=9) * 10
    kept_mask_BN = torch.zeros(3, h * w, dtype=torch.bool)
    kept_mask_BN.scatter_(1, keep_idx_BV, True)
    pixel_mask = kept_mask_BN.reshape(3, 1, h, 1, w, 1).expand(3, 3, h, PATCH, w, PATCH)
    edited = torch.where(pixel_mask.reshape(3, 3, h * PATCH, w * PATCH), images, edited)
    with torch.no_grad():
        before_BVD = model.forward_subset(images, keep_idx_BV)
        after_BVD = model.forward_subset(edited, keep_idx_BV)
        full_changed = not torch.allclose(model(images), model(edited))
    assert before_BVD.shape == (3, keep, TEST_ARCH.embed_dim)
    assert torch.equal(before_BVD, after_BVD)
    # The edit is large enough that full-frame attention does see it.
    assert full_changed


def test_forward_subset_rejects_bad_indices() -> None:
    model = _model()
    images = _images(2, 4 * PATCH, 4 * PATCH)
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        model.forward_subset(images, torch.tensor([[0, 16], [1, 2]]))
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        model.forward_subset(images, torch.tensor([[0, -1], [1, 2]]))
    with pytest.raises(ValueError, match="B=2"):
        model.forward_subset(images, torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="integer"):
        model.forward_subset(images, torch.zeros(2, 3))


def test_weights_hash_is_stable_and_sensitive() -> None:
    model = _model()
    first = weights_hash(model)
    assert first == weights_hash(model)
    assert first == weights_hash(model.state_dict())
    assert first == weights_hash(_model())
    assert len(first) == 16 and int(first, 16) >= 0
    with torch.no_grad():
        model.blocks[1].mlp.fc2.bias[3] += 1e-3
    assert weights_hash(model) != first


ROPE_ARCH = VIT_ARCHS["vit_test16"]
ROPE_PATCH = ROPE_ARCH.patch_size


def _rope_model(seed: int = 0) -> VisionTransformer:
    model = _model(ROPE_ARCH, seed)
    with torch.no_grad():
        # Non-trivial tokens and layer scales, so registers and every block matter.
        for param in model.parameters():
            param.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(seed + 7))
    return model


def test_rope_arch_validation() -> None:
    with pytest.raises(ValueError, match="position"):
        dataclasses.replace(ROPE_ARCH, position="sincos")
    with pytest.raises(ValueError, match="divisible by 4"):
        dataclasses.replace(ROPE_ARCH, embed_dim=30, num_heads=3)
    with pytest.raises(ValueError, match="rope_base"):
        dataclasses.replace(ROPE_ARCH, rope_base=0.5)


def test_rope_sin_cos_layout() -> None:
    model = _rope_model()
    sin_NE, cos_NE = model.rope_sin_cos(2, 3)
    E = ROPE_ARCH.head_dim
    assert sin_NE.shape == cos_NE.shape == (6, E)
    torch.testing.assert_close(sin_NE**2 + cos_NE**2, torch.ones(6, E))
    # Both halves carry the same angles (rotate_half pairing), and the first
    # frequency (period 1) of the first patch on the 3-wide x axis (coordinate -2/3) is 2*pi*(-2/3).
    torch.testing.assert_close(sin_NE[:, : E // 2], sin_NE[:, E // 2 :])
    Q = E // 4
    assert math.isclose(float(sin_NE[0, Q]), math.sin(2 * math.pi * (-2 / 3)), abs_tol=1e-6)


@pytest.mark.parametrize(("h", "w"), [(4, 4), (3, 5)], ids=["square", "oblong"])
def test_rope_forward_subset_of_all_patches_equals_forward(h: int, w: int) -> None:
    model = _rope_model()
    images = _images(2, h * ROPE_PATCH, w * ROPE_PATCH)
    N = h * w
    order_BN = torch.stack([torch.arange(N), torch.randperm(N, generator=torch.Generator().manual_seed(3))])
    with torch.no_grad():
        full_BND = model(images)
        subset_BND = model.forward_subset(images, order_BN)
    assert full_BND.shape == (2, N, ROPE_ARCH.embed_dim)
    expected_BND = torch.stack([full_BND[b, order_BN[b]] for b in range(2)])
    torch.testing.assert_close(subset_BND, expected_BND, atol=1e-5, rtol=1e-5)


def test_rope_subset_keeps_each_patch_position() -> None:
    # Same pixels at two places of the grid: RoPE must tell them apart.
    model = _rope_model()
    images = _images(1, 3 * ROPE_PATCH, 3 * ROPE_PATCH)
    with torch.no_grad():
        at_0 = model.forward_subset(images, torch.tensor([[0, 4]]))
        swapped = images.clone()
        swapped[..., :ROPE_PATCH, :ROPE_PATCH] = images[..., ROPE_PATCH : 2 * ROPE_PATCH, ROPE_PATCH : 2 * ROPE_PATCH]
        swapped[..., ROPE_PATCH : 2 * ROPE_PATCH, ROPE_PATCH : 2 * ROPE_PATCH] = images[..., :ROPE_PATCH, :ROPE_PATCH]
        at_swapped = model.forward_subset(swapped, torch.tensor([[4, 0]]))
    assert not torch.allclose(at_0, at_swapped, atol=1e-4)


def test_rope_forward_subset_never_reads_masked_pixels() -> None:
    model = _rope_model()
    h, w, keep = 4, 5, 6
    images = _images(2, h * ROPE_PATCH, w * ROPE_PATCH)
    keep_idx_BV = _random_keep_idx(2, h * w, keep)
    with torch.no_grad():
        before = model.forward_subset(images, keep_idx_BV)
        edited = images.clone()
        kept = torch.zeros(2, h * w, dtype=torch.bool).scatter_(1, keep_idx_BV, True)
        mask = kept.reshape(2, 1, h, 1, w, 1).expand(2, 3, h, ROPE_PATCH, w, ROPE_PATCH)
        edited = torch.where(mask.reshape(2, 3, h * ROPE_PATCH, w * ROPE_PATCH), images, images * 10 + 3)
        after = model.forward_subset(edited, keep_idx_BV)
    assert torch.equal(before, after)


@pytest.mark.parametrize("name", ["vit_test", "vit_test16"])
def test_forward_layers(name: str) -> None:
    model = _rope_model() if name == "vit_test16" else _model()
    arch = model.arch
    images = _images(2, 3 * arch.patch_size, 4 * arch.patch_size)
    keep_idx_BV = _random_keep_idx(2, 12, 5)
    with torch.no_grad():
        last, first = model.forward_layers(images, [arch.depth - 1, 0])
        torch.testing.assert_close(last, model(images))
        assert first.shape == last.shape and not torch.allclose(first, last)
        (sub_first,) = model.forward_layers(images, [0], keep_idx_BV=keep_idx_BV)
        assert sub_first.shape == (2, 5, arch.embed_dim)
    with pytest.raises(ValueError, match="block indices"):
        model.forward_layers(images, [arch.depth])
    with pytest.raises(ValueError, match="block indices"):
        model.forward_layers(images, [])


@pytest.mark.parametrize("name", ["vit_test", "vit_test16"])
def test_sdpa_equals_math_backend(name: str) -> None:
    model = _rope_model() if name == "vit_test16" else _model()
    images = _images(2, 4 * model.arch.patch_size, 3 * model.arch.patch_size)
    with torch.no_grad():
        sdpa = model(images)
        model.set_attn_backend("math")
        assert model.attn_backend == "math"
        math_out = model(images)
    torch.testing.assert_close(sdpa, math_out, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="flash"):
        model.set_attn_backend("flash")


def test_xformers_backend_needs_cuda() -> None:
    with pytest.raises(ValueError, match="CUDA"):
        resolve_attn_backend("xformers", "cpu")
    with pytest.raises(ValueError, match="unknown"):
        resolve_attn_backend("naive", "cpu")
    assert resolve_attn_backend("math", "cpu") == "math"


def test_dinov2_random_weights_hash_is_unchanged() -> None:
    # Recorded before DINOv3 support: adding RoPE must not change DINOv2 models
    # (their state dict names, shapes and random init), or exports stop matching.
    assert weights_hash(_model()) == PINNED_VIT_TEST_HASH


def test_rope_angles_stay_fp32_in_a_bf16_model() -> None:
    model = _rope_model()
    expected = model.rope_sin_cos(5, 6)
    model.to(torch.bfloat16)
    for got, want in zip(model.rope_sin_cos(5, 6), expected, strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    with torch.no_grad():
        assert model(_images(1, 2 * ROPE_PATCH, 2 * ROPE_PATCH).bfloat16()).dtype == torch.bfloat16
