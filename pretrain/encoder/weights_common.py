"""What every weight format shares: the state-dict type, the fit check against a ViTArch, small readers.

Each format module (``weights_meta``, ``weights_hf``, ``weights_onnx``,
``weights_native``) returns ``(ViTArch, StateDict)`` in the native names of
``pretrain.model.vit.VisionTransformer``, checked here against the architecture.
"""

import math
import re
from collections.abc import Mapping

import torch

from pretrain.model.vit import VisionTransformer, ViTArch

StateDict = dict[str, torch.Tensor]

# The families' own LayerNorm epsilon, for layouts that do not store it (Meta's .pth files).
DINOV2_LN_EPS = 1e-6
DINOV3_LN_EPS = 1e-5
# Fields that change the weights' shapes or the computation's structure; a
# requested arch differing from the loaded weights in one of them is an error.
_ARCH_IDENTITY_FIELDS = ("patch_size", "embed_dim", "depth", "num_heads", "num_registers", "position", "mlp_ratio")


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


def check_requested_arch(requested: ViTArch, loaded: ViTArch, source: object) -> None:
    """Raise ValueError naming every field in which the weights differ from the requested arch."""
    differences = [
        f"{field}: weights have {getattr(loaded, field)!r}, requested {getattr(requested, field)!r}"
        for field in _ARCH_IDENTITY_FIELDS
        if getattr(loaded, field) != getattr(requested, field)
    ]
    if differences:
        raise ValueError(f"{source} does not hold the requested architecture:\n  " + "\n  ".join(differences))


def grid_side(num_positions: int, what: str) -> int:
    """Side G of a square G x G position grid holding num_positions patches."""
    side = math.isqrt(num_positions)
    if side * side != num_positions or side == 0:
        raise ValueError(f"{what}: {num_positions} patch positions do not form a square grid")
    return side


def count_layers(native: Mapping[str, torch.Tensor]) -> int:
    """Number of transformer blocks in native-named weights (``blocks.<i>.``)."""
    layers = {int(m.group(1)) for k in native if (m := re.match(r"^blocks\.(\d+)\.", k))}
    return max(layers) + 1 if layers else 0


def require_key(state: Mapping[str, torch.Tensor], key: str, source: object) -> torch.Tensor:
    """``state[key]``, or a ValueError naming the source and the key."""
    if key not in state:
        raise ValueError(f"{source}: no {key!r} among the weights")
    return state[key]
