"""Hugging Face checkpoint layouts: Dinov2 and DINOv3ViT directories (config.json + model.safetensors)."""

import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file

from pretrain.encoder.weights_common import (
    DINOV3_LN_EPS,
    StateDict,
    check_state_dict,
    grid_side,
    require_key,
)
from pretrain.encoder.weights_native import WEIGHTS_FILE
from pretrain.model.vit import ViTArch

logger = logging.getLogger(__name__)


# Hugging Face Dinov2 -> native names, per-layer part. q/k/v are fused
# separately since three HF tensors make one native one.
_HF_LAYER_RENAMES = {
    "norm1": "norm1",
    "attention.output.dense": "attn.proj",
    "layer_scale1.lambda1": "ls1.gamma",
    "norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "layer_scale2.lambda1": "ls2.gamma",
}
_HF_TOP_RENAMES = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.register_tokens": "register_tokens",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
# The mask token belongs to iBOT-style training, not to the encoder.
_HF_PREFIX = "dinov2."
_HF_IGNORED = frozenset({"embeddings.mask_token"})
_HF_LAYER_KEY = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
_HF_QKV_KEY = re.compile(r"^attention\.attention\.(query|key|value)\.(weight|bias)$")


def hf_to_native(hf_state: Mapping[str, torch.Tensor]) -> StateDict:
    """Rename a Hugging Face Dinov2 state dict (optionally `dinov2.`-prefixed) to native.

    With the prefix (a task model such as Dinov2ForImageClassification), keys
    outside `dinov2.` are task heads and are dropped. Other keys it does not
    know are kept under their own name, so that `check_state_dict` reports
    them as unexpected rather than dropping them silently.
    """
    if any(key.startswith(_HF_PREFIX) for key in hf_state):
        heads = sorted(key for key in hf_state if not key.startswith(_HF_PREFIX))
        if heads:
            logger.info("ignoring %d non-backbone keys, e.g. %s", len(heads), heads[0])
        hf_state = {key: t for key, t in hf_state.items() if key.startswith(_HF_PREFIX)}
    native: StateDict = {}
    qkv_parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in hf_state.items():
        name = key.removeprefix(_HF_PREFIX)
        if name in _HF_IGNORED:
            continue
        if name in _HF_TOP_RENAMES:
            native[_HF_TOP_RENAMES[name]] = tensor
            continue
        layer_match = _HF_LAYER_KEY.match(name)
        if layer_match is None:
            native[key] = tensor
            continue
        layer, rest = int(layer_match.group(1)), layer_match.group(2)
        qkv_match = _HF_QKV_KEY.match(rest)
        if qkv_match is not None:
            qkv_parts.setdefault((layer, qkv_match.group(2)), {})[qkv_match.group(1)] = tensor
            continue
        param, _, kind = rest.rpartition(".")
        if param in _HF_LAYER_RENAMES:
            native[f"blocks.{layer}.{_HF_LAYER_RENAMES[param]}.{kind}"] = tensor
        elif rest in _HF_LAYER_RENAMES:
            native[f"blocks.{layer}.{_HF_LAYER_RENAMES[rest]}"] = tensor
        else:
            native[key] = tensor
    for (layer, kind), parts in sorted(qkv_parts.items()):
        native[f"blocks.{layer}.attn.qkv.{kind}"] = _fuse_qkv(layer, kind, parts)
    return native


def _fuse_qkv(layer: int, kind: str, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
    names = ("query", "key", "value")
    prefix = f"encoder.layer.{layer}.attention.attention"
    absent = [f"{prefix}.{n}.{kind}" for n in names if n not in parts]
    if absent:
        raise ValueError(f"incomplete q/k/v projection, missing {absent}")
    shapes = {n: tuple(parts[n].shape) for n in names}
    if len(set(shapes.values())) != 1:
        described = ", ".join(f"{prefix}.{n}.{kind} {s}" for n, s in shapes.items())
        raise ValueError(f"q/k/v shapes differ: {described}")
    return torch.cat([parts[n] for n in names], dim=0)


def load_hf_dinov2(model_dir: Path) -> tuple[ViTArch, StateDict]:
    """Load a Hugging Face Dinov2 directory (config.json + model.safetensors).

    pos_grid comes from the length of the stored position embedding, not from
    config.image_size, so a checkpoint is read as it really is.
    """
    model_dir = Path(model_dir)
    config_path, weights_path = model_dir / "config.json", model_dir / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"Hugging Face Dinov2 checkpoint file not found: {path}")
    config = json.loads(config_path.read_text())
    if config.get("use_swiglu_ffn", False):
        raise ValueError(f"{config_path}: SwiGLU MLPs (ViT-g) are not supported")
    if config.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"{config_path}: hidden_act {config['hidden_act']!r} is not 'gelu'")
    native = hf_to_native(load_file(weights_path))
    pos_embed = require_key(native, "pos_embed", weights_path)
    qkv_bias_key = "blocks.0.attn.qkv.bias"
    arch = ViTArch(
        patch_size=int(config["patch_size"]),
        embed_dim=int(config["hidden_size"]),
        depth=int(config["num_hidden_layers"]),
        num_heads=int(config["num_attention_heads"]),
        mlp_ratio=float(config.get("mlp_ratio", 4.0)),
        num_registers=int(config.get("num_register_tokens", 0)),
        pos_grid=grid_side(pos_embed.shape[1] - 1, str(weights_path)),
        # Hugging Face Dinov2 always has layer scale; layerscale_value is its init.
        layer_scale=True,
        ln_eps=float(config.get("layer_norm_eps", 1e-6)),
        qkv_bias=bool(config.get("qkv_bias", qkv_bias_key in native)),
    )
    check_state_dict(arch, native)
    return arch, native


# Hugging Face DINOv3ViT -> native names. q/k/v are separate projections; HF
# has no key bias (key_bias=False), the native fused bias gets zeros there.
_HF3_TOP_RENAMES = {
    "embeddings.cls_token": "cls_token",
    "embeddings.register_tokens": "register_tokens",
    "embeddings.patch_embeddings.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.bias": "patch_embed.proj.bias",
    "norm.weight": "norm.weight",
    "norm.bias": "norm.bias",
}
_HF3_IGNORED_PREFIXES = ("embeddings.mask_token", "rope_embeddings.")
_HF3_LAYER_RENAMES = {
    "norm1": "norm1",
    "attention.o_proj": "attn.proj",
    "norm2": "norm2",
    "mlp.up_proj": "mlp.fc1",
    "mlp.down_proj": "mlp.fc2",
}
_HF3_LAYER_KEY = re.compile(r"^layer\.(\d+)\.(.+)$")
_HF3_QKV_KEY = re.compile(r"^attention\.(q|k|v)_proj\.(weight|bias)$")
_HF3_SCALE_KEY = re.compile(r"^layer_scale([12])\.lambda1$")


def hf_dinov3_to_native(hf_state: Mapping[str, torch.Tensor]) -> StateDict:
    """Rename a Hugging Face DINOv3ViT state dict to native; unknown keys are kept as they are."""
    native: StateDict = {}
    qkv_parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in hf_state.items():
        if key.startswith(_HF3_IGNORED_PREFIXES):
            continue
        if key in _HF3_TOP_RENAMES:
            native[_HF3_TOP_RENAMES[key]] = tensor
            continue
        layer_match = _HF3_LAYER_KEY.match(key)
        if layer_match is None:
            native[key] = tensor
            continue
        layer, rest = int(layer_match.group(1)), layer_match.group(2)
        qkv_match = _HF3_QKV_KEY.match(rest)
        scale_match = _HF3_SCALE_KEY.match(rest)
        param, _, kind = rest.rpartition(".")
        if qkv_match is not None:
            qkv_parts.setdefault((layer, qkv_match.group(2)), {})[qkv_match.group(1)] = tensor
        elif scale_match is not None:
            native[f"blocks.{layer}.ls{scale_match.group(1)}.gamma"] = tensor
        elif param in _HF3_LAYER_RENAMES:
            native[f"blocks.{layer}.{_HF3_LAYER_RENAMES[param]}.{kind}"] = tensor
        else:
            native[key] = tensor
    for (layer, kind), parts in sorted(qkv_parts.items()):
        if kind == "bias" and "k" not in parts and "q" in parts:
            parts = {**parts, "k": torch.zeros_like(parts["q"])}
        missing = [f"layer.{layer}.attention.{n}_proj.{kind}" for n in "qkv" if n not in parts]
        if missing:
            raise ValueError(f"incomplete q/k/v projection, missing {missing}")
        native[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts[n] for n in "qkv"], dim=0)
    return native


def load_hf_dinov3(model_dir: Path) -> tuple[ViTArch, StateDict]:
    """Load a Hugging Face DINOv3ViT directory (config.json + model.safetensors)."""
    model_dir = Path(model_dir)
    config_path, weights_path = model_dir / "config.json", model_dir / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"Hugging Face DINOv3 checkpoint file not found: {path}")
    config = json.loads(config_path.read_text())
    if config.get("use_gated_mlp", False):
        raise ValueError(f"{config_path}: gated (SwiGLU) MLPs (ViT-S+/H+/7B) are not supported")
    if config.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"{config_path}: hidden_act {config['hidden_act']!r} is not 'gelu'")
    native = hf_dinov3_to_native(load_file(weights_path))
    hidden = int(config["hidden_size"])
    arch = ViTArch(
        patch_size=int(config["patch_size"]),
        embed_dim=hidden,
        depth=int(config["num_hidden_layers"]),
        num_heads=int(config["num_attention_heads"]),
        mlp_ratio=int(config["intermediate_size"]) / hidden,
        num_registers=int(config.get("num_register_tokens", 0)),
        layer_scale=True,
        ln_eps=float(config.get("layer_norm_eps", DINOV3_LN_EPS)),
        qkv_bias="blocks.0.attn.qkv.bias" in native,
        position="rope",
        rope_base=float(config.get("rope_theta", 100.0)),
    )
    check_state_dict(arch, native)
    return arch, native
