"""Meta's checkpoint layouts: DINOv2 and DINOv3 .pth files (or .safetensors in Meta names).

DINOv2 names are the native ones; DINOv3 calls the registers storage tokens,
stores its RoPE periods and a mask over the qkv bias. Neither stores the head
count or the LayerNorm epsilon: they are inferred (64-dim heads unless the
RoPE periods say otherwise; the family's epsilon) unless an arch is given.
"""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from pretrain.encoder.weights_common import (
    DINOV2_LN_EPS,
    DINOV3_LN_EPS,
    StateDict,
    check_state_dict,
    count_layers,
    grid_side,
    require_key,
)
from pretrain.model.vit import ViTArch, rope_periods

_META_IGNORED = frozenset({"mask_token"})
_META_RENAMES = {"storage_tokens": "register_tokens"}
_META_PERIODS = "rope_embed.periods"
_META_BIAS_MASK_SUFFIX = ".attn.qkv.bias_mask"
# Training checkpoints nest the backbone weights under one of these.
_META_WRAPPERS = ("teacher", "model", "state_dict")
_META_BACKBONE_PREFIX = "backbone."
# Every released DINOv2/DINOv3 size uses 64-dim heads; used when the weights cannot say.
_DEFAULT_HEAD_DIM = 64


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
    cls_token = require_key(native, "cls_token", source)
    patch_weight = require_key(native, "patch_embed.proj.weight", source)
    fc1_weight = require_key(native, "blocks.0.mlp.fc1.weight", source)
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
        "depth": count_layers(native),
        "num_heads": embed_dim // head_dim,
        "mlp_ratio": fc1_weight.shape[0] / embed_dim,
        "num_registers": 0 if registers is None else int(registers.shape[1]),
        "layer_scale": "blocks.0.ls1.gamma" in native,
        "qkv_bias": "blocks.0.attn.qkv.bias" in native,
    }
    if family == "dinov2":
        pos_embed = require_key(native, "pos_embed", source)
        grid = grid_side(pos_embed.shape[1] - 1, str(source))
        return ViTArch(**common, pos_grid=grid, ln_eps=DINOV2_LN_EPS)
    rope_base = 100.0 if periods_Q is None else _rope_base_from_periods(periods_Q, source)
    return ViTArch(**common, position="rope", rope_base=rope_base, ln_eps=DINOV3_LN_EPS)


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
