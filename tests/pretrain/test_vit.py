"""VisionTransformer: shapes, input checks, subset encoding, weight hashing.

Legend: B batch, H W pixels, N patches, K kept patches, D embed dim.
"""

import dataclasses

import pytest
import torch

from pretrain.model.vit import VIT_ARCHS, VisionTransformer, ViTArch, weights_hash

TEST_ARCH = VIT_ARCHS["vit_test"]
PATCH = TEST_ARCH.patch_size


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
    assert shapes["pos_embed"] == (1, 1 + arch.pos_grid**2, D)
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
    keep_idx_BK = _random_keep_idx(3, h * w, keep)
    edited = _images(3, h * PATCH, w * PATCH, seed=9) * 10
    kept_mask_BN = torch.zeros(3, h * w, dtype=torch.bool)
    kept_mask_BN.scatter_(1, keep_idx_BK, True)
    pixel_mask = kept_mask_BN.reshape(3, 1, h, 1, w, 1).expand(3, 3, h, PATCH, w, PATCH)
    edited = torch.where(pixel_mask.reshape(3, 3, h * PATCH, w * PATCH), images, edited)
    with torch.no_grad():
        before_BKD = model.forward_subset(images, keep_idx_BK)
        after_BKD = model.forward_subset(edited, keep_idx_BK)
        full_changed = not torch.allclose(model(images), model(edited))
    assert before_BKD.shape == (3, keep, TEST_ARCH.embed_dim)
    assert torch.equal(before_BKD, after_BKD)
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
